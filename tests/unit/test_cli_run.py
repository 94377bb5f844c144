"""The ``etl run`` command's output when the batch does not end on its own."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from click.testing import CliRunner

from etl.cli import StopRequested, main


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
