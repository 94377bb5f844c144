"""The ratios that benchmarks/run.py prints under its table."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks.run import CPU_BOUND, Row, parse_args, ratios, render


def _rows(*, batch_cpu_s: float, server_cpu_s: float) -> list[Row]:
    return [
        Row("(a) drain only (KafkaSource)", 1_000_000, 2.0),
        Row(
            "(c) end to end, run_batch, N = 1,000,000",
            1_000_000,
            5.0,
            extra={"batch_cpu_s": batch_cpu_s, "server_cpu_s": server_cpu_s},
        ),
        Row("(d) original model, N = 50,000", 50_000, 10.0),
    ]


def test_rate_ratios() -> None:
    found = ratios(_rows(batch_cpu_s=6.0, server_cpu_s=2.0))

    assert found["end to end / drain only"] == pytest.approx(0.4)
    assert found["end to end / original model"] == pytest.approx(40.0)


def test_cpu_bound_spreads_cpu_time_over_vcpus() -> None:
    vcpus = len(os.sched_getaffinity(0))

    found = ratios(_rows(batch_cpu_s=6.0, server_cpu_s=2.0))

    # 8 CPU-s of work over every vCPU cannot end before 8 / vcpus seconds.
    assert found[CPU_BOUND] == pytest.approx(2.0 / (8.0 / vcpus))


def test_printed_command_can_be_pasted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty option value keeps its quotes, so the command runs again as printed."""
    argv = ["run.py", "--rss-counts", "", "--count", "1000"]
    monkeypatch.setattr(sys, "argv", argv)

    output = render({}, parse_args(argv[1:]), [])

    assert "command: python -m benchmarks.run --rss-counts '' --count 1000" in output
