"""Run one batch in a child process and SIGKILL it at a named point.

Usage: ``python -m tests.integration.faultpoints POINT``, with the settings in
``VITALS_*`` environment variables. The child prints the batch report as JSON
on stdout when it is not killed. Points:

``none``
    Run the batch to its end; the report also includes ``peak_rss_mb``.
``before_write``
    Die when the first chunk is drained and processed, before any Redis write.
``after_exec``
    Die right after the first chunk's ``MULTI/EXEC`` succeeded, before the
    Kafka commit.
``between_chunks``
    Die after the first chunk was written and committed, before the second
    chunk's write.
``mid_transaction``
    Die in the middle of sending the first ``MULTI ... EXEC`` to Redis, after
    ``MULTI`` and part of the queued commands, before ``EXEC``.
``pause_first_write``
    Touch ``$FAULT_READY`` before the first chunk's write, then wait until
    ``$FAULT_GO`` exists, so the test can break a service mid-batch.

With ``$FAULT_GATE`` set, the child imports everything, touches
``$FAULT_READY`` and waits for the gate file before it starts the batch, so
that two children start at the same moment.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from etl.config import Settings

POINTS: Final = (
    "none",
    "before_write",
    "after_exec",
    "between_chunks",
    "mid_transaction",
    "pause_first_write",
)
_WAIT_LIMIT_S: Final = 60.0


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + _WAIT_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            msg = f"{path} did not appear within {_WAIT_LIMIT_S:.0f} s"
            raise TimeoutError(msg)
        time.sleep(0.01)


def _install(point: str) -> None:
    """Wrap the sink or the Redis connection so that the process dies at ``point``."""
    from redis.connection import AbstractConnection

    from etl.sink import RedisSink

    original_write = RedisSink.write_chunk
    calls = {"write": 0}

    def write_chunk(self: RedisSink, topic: str, chunk: Any) -> Any:
        calls["write"] += 1
        if point == "before_write" or (
            point == "between_chunks" and calls["write"] == 2
        ):
            _die()
        if point == "pause_first_write" and calls["write"] == 1:
            Path(os.environ["FAULT_READY"]).touch()
            _wait_for(Path(os.environ["FAULT_GO"]))
        result = original_write(self, topic, chunk)
        if point == "after_exec":
            _die()
        return result

    RedisSink.write_chunk = write_chunk  # type: ignore[method-assign]

    if point == "mid_transaction":
        original_send = AbstractConnection.send_packed_command

        def send_packed_command(
            self: Any, command: Any, check_health: bool = True
        ) -> None:
            items = [command] if isinstance(command, bytes | str) else list(command)
            data = b"".join(i.encode() if isinstance(i, str) else i for i in items)
            if data.startswith(b"*1\r\n$5\r\nMULTI\r\n"):
                # MULTI and the first queued commands reach Redis; EXEC never does.
                self._sock.sendall(data[: max(len(data) // 2, 16)])
                time.sleep(0.2)
                _die()
            original_send(self, command, check_health)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]


def main(point: str) -> None:
    from etl.config import load_settings
    from etl.pipeline import run_batch

    # A test that gives up on a hung child sends SIGUSR1 first: the stacks go to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if point not in POINTS:
        msg = f"unknown fault point {point!r}; expected one of {', '.join(POINTS)}"
        raise SystemExit(msg)
    _install(point)
    settings = load_settings()
    gate = os.environ.get("FAULT_GATE")
    if gate:
        Path(os.environ["FAULT_READY"]).touch()
        _wait_for(Path(gate))
    report = run_batch(settings)
    print(json.dumps({**report.to_dict(), "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """Return this process's peak resident set size (``VmHWM``, Linux) in MB.

    ``ru_maxrss`` from ``wait4`` would not do: a child starts with the
    high-water mark of the parent that forked it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# Helpers for the tests that start the child.


def settings_env(settings: Settings) -> dict[str, str]:
    """Return the environment of a child process that rebuilds ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALS_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        env[f"VITALS_{name.upper()}"] = text
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


@dataclass
class ChildResult:
    """Exit status, output and duration of a finished child."""

    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    def report(self) -> dict[str, Any]:
        """Return the batch report that the child printed last."""
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, (
            f"no report; exit {self.returncode}, stderr: {self.stderr[-2000:]}"
        )
        report: dict[str, Any] = json.loads(lines[-1])
        return report


def spawn(
    argv: list[str], env: dict[str, str], workdir: Path
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start ``argv`` with output to files in ``workdir``; return the process and the files."""
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"child-{time.monotonic_ns()}"
    out, err = workdir / f"{stem}.out", workdir / f"{stem}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
        )
    return process, out, err


def finish(
    process: subprocess.Popen[bytes],
    out: Path,
    err: Path,
    *,
    started: float,
    timeout: float = 120.0,
) -> ChildResult:
    """Wait for the child (killing it after ``timeout`` s) and collect its output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        process.kill()
        process.wait()
    return ChildResult(
        returncode=process.returncode,
        stdout=out.read_text(),
        stderr=err.read_text(),
        elapsed_s=time.monotonic() - started,
    )


def run_child(
    argv: list[str],
    settings: Settings,
    workdir: Path,
    *,
    timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> ChildResult:
    """Run ``argv`` with ``settings`` (and ``extra_env`` on top) in its environment."""
    started = time.monotonic()
    env = {**settings_env(settings), **(extra_env or {})}
    process, out, err = spawn(argv, env, workdir)
    return finish(process, out, err, started=started, timeout=timeout)


def fault_argv(point: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.faultpoints", point]


def etl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "etl", *args]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "none")
