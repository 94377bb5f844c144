"""The ``etl run`` command's output: its summary, and when the batch does not end on its own."""

from __future__ import annotations

import json
import os
import signal
import time
from unittest import mock

import pytest
from click.testing import CliRunner

from etl.cli import StopRequested, main
from etl.pipeline import BatchReport
from etl.sink import RedisLoading, SinkError


def test_run_summary_fits_80_columns() -> None:
    """Counts have thousands separators and name their Redis key, within 80 columns."""
    report = BatchReport(
        topic="vitals",
        started_at="2024-06-10T06:13:20+00:00",
        read=12_000,
        written=10_000,
        rejected=2_000,
        alerts=3,
    )

    with mock.patch("etl.pipeline.run_batch", return_value=report):
        result = CliRunner().invoke(main, ["run"], env={"COLUMNS": "80"})

    lines = result.stdout.splitlines()
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in lines) <= 80
    assert any(
        "alerts" in line and "3 -> liste-patients:alerts" in line for line in lines
    )
    assert any("read" in line and "12,000" in line for line in lines)


@pytest.mark.parametrize(
    ("stop", "code", "message"),
    [
        pytest.param(StopRequested("SIGTERM"), 143, "SIGTERM received", id="sigterm"),
        pytest.param(KeyboardInterrupt(), 130, "SIGINT received", id="ctrl-c"),
    ],
)
def test_run_json_stopped_status(stop: BaseException, code: int, message: str) -> None:
    with mock.patch("etl.pipeline.run_batch", side_effect=stop):
        result = CliRunner().invoke(main, ["run", "--json"])

    assert result.exit_code == code, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "stopped"
    assert document["message"] == message
    assert document["exit_code"] == code


@pytest.mark.parametrize(
    ("number", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
        pytest.param(signal.SIGINT, 130, id="sigint"),
    ],
)
def test_run_second_signal_leaves_cleanup(number: int, code: int) -> None:
    """A signal repeated while the batch cleans up does not interrupt the cleanup."""
    cleaned: list[bool] = []

    def batch(_settings: object) -> None:
        try:
            os.kill(os.getpid(), number)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), number)
            cleaned.append(True)

    with mock.patch("etl.pipeline.run_batch", side_effect=batch):
        result = CliRunner().invoke(main, ["run", "--json"])
    handler = signal.getsignal(number)

    assert result.exit_code == code, result.output
    assert cleaned == [True]
    assert json.loads(result.stdout)["status"] == "stopped"
    # Later signals stay ignored until the process exits.
    assert handler == signal.SIG_IGN


def test_run_ignores_signals_once_batch_ended() -> None:
    """After the batch there is nothing to stop, so both signals are ignored."""
    with mock.patch("etl.pipeline.run_batch", side_effect=StopRequested("SIGTERM")):
        CliRunner().invoke(main, ["run", "--json"])

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_run_signal_while_failure_prints_is_ignored() -> None:
    """The batch has failed, so a signal during its message changes nothing."""
    from etl.sink import SinkError

    def print_then_signal(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    with (
        mock.patch("etl.pipeline.run_batch", side_effect=SinkError("Redis is down")),
        mock.patch("etl.cli.print_error", side_effect=print_then_signal),
    ):
        result = CliRunner().invoke(main, ["run", "--json"])

    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout)["status"] == "failed"


@pytest.mark.parametrize(
    ("error", "advised"),
    [
        pytest.param(
            SinkError("Redis at redis://h:1/0 is unreachable"), True, id="down"
        ),
        pytest.param(
            RedisLoading("Redis ... then rerun the batch"), False, id="loading"
        ),
    ],
)
def test_run_failure_advice(error: SinkError, advised: bool) -> None:
    """Messages that end with their own fix get no general advice after them."""
    with mock.patch("etl.pipeline.run_batch", side_effect=error):
        result = CliRunner().invoke(main, ["run"])

    assert result.exit_code == 3
    assert str(error) in result.stderr
    assert ("Fix the cause above" in result.stderr) == advised
