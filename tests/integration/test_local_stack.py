"""The local stack of scripts/run-local.sh: a broker without storage beside a Redis with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from etl.cli import main
from etl.services import free_port, local_stack_status, stop_local_stack, terminate

pytestmark = pytest.mark.integration


def start(state_dir: Path, kafka_port: int, redis_port: int) -> str:
    """Run 'etl services start'; return its standard error."""
    result = CliRunner().invoke(
        main,
        [
            "services",
            "start",
            "--state-dir",
            str(state_dir),
            "--kafka-port",
            str(kafka_port),
            "--redis-port",
            str(redis_port),
        ],
        env={"VITALS_KAFKA_TOPIC": "vitals"},
    )
    assert result.exit_code == 0, result.output
    return result.stderr


def test_broker_restart_forgets_stored_offsets(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        assert start(tmp_path, kafka_port, redis_port) == ""
        client.hset("liste-patients:offsets", mapping={"vitals:0": 12, "other:0": 7})
        client.rpush("liste-patients", "a row")

        assert start(tmp_path, kafka_port, redis_port) == ""  # both still run
        kafka_pid = local_stack_status(tmp_path)["kafka"]
        assert kafka_pid is not None
        terminate(kafka_pid)
        message = start(tmp_path, kafka_port, redis_port)

        offsets = client.hgetall("liste-patients:offsets")
        rows = client.llen("liste-patients")
    finally:
        client.close()
        stop_local_stack(tmp_path)

    assert "removed 1 fields of liste-patients:offsets" in " ".join(message.split())
    assert offsets == {"other:0": "7"}
    assert rows == 1
