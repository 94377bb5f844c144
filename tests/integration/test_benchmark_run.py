"""benchmarks/run.py at a small size: it calls the batch's stages one by one, so a
change to their signatures or columns must not break it unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_small_run_measures_every_stage(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    argv = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--count",
        "3000",
        "--chunk-size",
        "1000",
        "--original-count",
        "200",
        "--rss-counts",
        "",
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
        str(output),
    ]

    finished = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    stages = [row["stage"] for row in json.loads(output.read_text())["rows"]]
    for stage in (
        "(b) parse (decode + to_typed)",
        "(b) output contract (OutputRow)",
        "(b) serialise (struct.json_encode)",
        "(b) process_chunk (all of the above)",
        "(b) Redis write (RedisSink)",
    ):
        assert stage in stages
    assert any(stage.startswith("(c) end to end, run_batch") for stage in stages)
    assert any(stage.startswith("(d) original model") for stage in stages)
