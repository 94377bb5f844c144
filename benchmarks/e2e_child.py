"""Run one batch (``etl.pipeline.run_batch``) in its own process, for its peak RSS.

Run as ``python -m benchmarks.e2e_child SETTINGS_JSON [--no-prefetch]``,
where the argument is a JSON object of settings overrides. ``--no-prefetch``
drains each chunk in the batch's own thread, as before the background drain
existed, to measure what the overlap brings. It prints one JSON object with
the batch report, the peak RSS (VmHWM) and the CPU time of the whole
process and of the ``run_batch`` call.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.procinfo import peak_rss_bytes
from etl import pipeline
from etl.config import load_settings
from etl.pipeline import run_batch


class InlineDrain:
    """Drop-in for ``etl.source.Prefetcher`` that drains in the caller's thread."""

    def __init__(
        self, source: Any, *, chunk_size: int, max_records: int, deadline: float
    ) -> None:
        self._chunks = source.chunks(
            chunk_size=chunk_size, max_records=max_records, deadline=deadline
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self._chunks)

    def close(self) -> None:
        self._chunks.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if "--no-prefetch" in sys.argv[2:]:
        pipeline.Prefetcher = InlineDrain  # type: ignore[misc,assignment]
    imported = time.perf_counter()
    settings = load_settings(**json.loads(sys.argv[1]))
    cpu_at_start = time.process_time()
    report = run_batch(settings)
    batch_cpu_s = time.process_time() - cpu_at_start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "report": report.to_dict(),
        "batch_s": report.duration_s,
        "after_imports_s": time.perf_counter() - imported,
        "peak_rss_bytes": peak_rss_bytes(),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "batch_cpu_s": batch_cpu_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
