"""The check that stored offsets belong to the topic that the broker serves now."""

from __future__ import annotations

from typing import Any

import pytest

from etl.config import load_settings
from etl.pipeline import _check_same_topic
from etl.sink import redis_cli_command
from etl.source import OffsetsOutOfRange

#: The sink's Redis: a database other than 0, which the printed commands must name.
REDIS_URL = "redis://127.0.0.1:6380/5"


class FakeSource:
    topic = "vitals"

    def __init__(self, topic_id: str | None, committed: dict[int, int]) -> None:
        self._topic_id = topic_id
        self._committed = committed

    def topic_id(self) -> str | None:
        return self._topic_id

    def committed(self, partitions: list[int]) -> dict[int, int]:
        return {p: o for p, o in self._committed.items() if p in partitions}


class FakeSink:
    offsets_key = "liste-patients:offsets"

    def __init__(self) -> None:
        self.to_record: str | None = None
        self.replaced: str | None = None

    def set_topic_id(self, topic: str, topic_id: str) -> None:
        self.to_record = topic_id

    settings = load_settings(redis_url=REDIS_URL)

    def cli_command(self, *arguments: str) -> str:
        return redis_cli_command(self.settings, *arguments)


def check(
    current: str | None,
    recorded: str | None,
    stored: dict[int, int],
    committed: dict[int, int] | None = None,
) -> Any:
    sink = FakeSink()
    source = FakeSource(current, stored if committed is None else committed)
    sink.replaced = _check_same_topic(source, sink, stored, recorded)  # type: ignore[arg-type]
    return sink


def test_other_id_with_offsets_fails() -> None:
    with pytest.raises(OffsetsOutOfRange) as failure:
        check("new-id", "old-id", {0: 187, 2: 140})

    message = str(failure.value)
    assert "topic vitals was recreated" in message
    assert "new-id" in message
    assert "old-id" in message
    assert (
        "redis-cli -h 127.0.0.1 -p 6380 -n 5 HDEL liste-patients:offsets vitals:0 "
        "vitals:2 vitals:last_write (see" in message
    )


@pytest.mark.parametrize(
    ("recorded", "stored"),
    [
        pytest.param("id-1", {0: 5}, id="same-id"),
        pytest.param(None, {}, id="first-batch"),
        pytest.param(None, {0: 5}, id="offsets-from-before-ids"),
        pytest.param("old-id", {}, id="after-a-reset"),
    ],
)
def test_id_written_with_next_offsets(
    recorded: str | None, stored: dict[int, int]
) -> None:
    sink = check("id-1", recorded, stored)

    assert sink.to_record == "id-1"


@pytest.mark.parametrize(
    ("recorded", "replaced"),
    [
        pytest.param("id-1", None, id="same-id"),
        pytest.param(None, None, id="no-id"),
        # Offsets removed after a broker restart: Kafka's commits may be stale.
        pytest.param("old-id", "old-id", id="other-id"),
    ],
)
def test_other_id_without_offsets_replaced(
    recorded: str | None, replaced: str | None
) -> None:
    sink = check("id-1", recorded, {})

    assert sink.replaced == replaced


def test_offsets_without_id_or_commits_fail() -> None:
    with pytest.raises(OffsetsOutOfRange) as failure:
        check("id-1", None, {0: 187}, committed={})

    message = str(failure.value)
    assert "carry no topic id" in message
    reset = "-n 5 HDEL liste-patients:offsets vitals:0 vitals:last_write"
    confirm = "-n 5 HSET liste-patients:offsets vitals:topic_id id-1"
    assert f"redis-cli -h 127.0.0.1 -p 6380 {reset}" in message
    assert f"redis-cli -h 127.0.0.1 -p 6380 {confirm}" in message


def test_broker_without_ids_skips_check() -> None:
    sink = check(None, "old-id", {0: 5})

    assert sink.to_record is None
    assert sink.replaced is None
