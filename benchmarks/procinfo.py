"""Process measurements shared by the benchmark's child processes."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process (VmHWM).

    ``getrusage`` is not used for it: on Linux its maximum survives ``exec``,
    so a child would report the size of the parent it was forked from.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM is missing from /proc/self/status")
