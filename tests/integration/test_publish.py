"""Publish a feed file to a real broker, then run the batch on what arrived."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from etl.cli import main
from etl.config import Settings
from etl.feed import PublishError, find_message_key, publish_feed
from etl.generate import ProduceStopped
from etl.pipeline import run_batch
from etl.services import free_port
from etl.terminal import stop_on_signals
from tests.conftest import encode, reading

pytestmark = pytest.mark.integration


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "VITALS_KAFKA_TOPIC": settings.kafka_topic,
        "VITALS_KAFKA_TIMEOUT_S": "5",
        "VITALS_REDIS_URL": settings.redis_url.get_secret_value(),
    }


def test_published_feed_becomes_rows_and_rejects(
    settings: Settings, tmp_path: Path
) -> None:
    feed = tmp_path / "feed.ndjson"
    lines = [
        encode(reading(patient_id="PT-1", name="Marie Claire DUBOIS")),
        b"",
        encode(reading(patient_id="PT-2")) + b"\r",
        b"not json",
        encode(reading(patient_id="PT-3", temperature=98.6)),
    ]
    feed.write_bytes(b"\n".join(lines) + b"\n")

    result = CliRunner().invoke(main, ["publish", str(feed)], env=env_of(settings))
    report = run_batch(settings)

    assert result.exit_code == 0, result.output
    assert "Published 4 messages" in result.output
    assert "1 blank line skipped" in result.output
    assert report.read == 4
    assert report.written == 2
    assert report.rejected_by_reason == {"invalid_json": 1, "out_of_range": 1}
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        rows = [
            json.loads(row) for row in client.lrange(settings.redis_list_key, 0, -1)
        ]
    finally:
        client.close()
    # The carriage return of a CRLF line ending is not part of the message.
    assert sorted(row["patient_id"] for row in rows) == ["PT-1", "PT-2"]


def test_publish_topic_option_overrides_variable(
    settings: Settings, tmp_path: Path
) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(encode(reading(patient_id="PT-1")) + b"\n")
    env = {**env_of(settings), "VITALS_KAFKA_TOPIC": "another-ward"}

    result = CliRunner().invoke(
        main, ["publish", str(feed), "--topic", settings.kafka_topic], env=env
    )
    report = run_batch(settings)

    assert result.exit_code == 0, result.output
    assert f"to topic {settings.kafka_topic}" in result.output
    assert report.written == 1


def test_bom_not_sent_with_first_line(settings: Settings, tmp_path: Path) -> None:
    """A feed saved with a UTF-8 BOM: line 1 arrives without it, keyed and valid."""
    feed = tmp_path / "notepad.ndjson"
    first = encode(reading(patient_id="PT-1"))
    feed.write_bytes(b"\xef\xbb\xbf" + first + b"\r\n")

    result = CliRunner().invoke(main, ["publish", str(feed)], env=env_of(settings))
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"check-{settings.kafka_topic}",
        }
    )
    try:
        consumer.assign(
            [
                TopicPartition(settings.kafka_topic, p, OFFSET_BEGINNING)
                for p in range(3)
            ]
        )
        message = consumer.poll(15)
    finally:
        consumer.close()

    assert result.exit_code == 0, result.output
    assert message is not None
    assert message.error() is None
    assert message.value() == first
    assert message.key() == b"PT-1"
    report = run_batch(settings)
    assert report.written == 1


def test_readings_are_keyed_by_patient(settings: Settings) -> None:
    feed = io.BytesIO(
        b"\n".join(
            encode(reading(patient_id=f"PT-{i % 3}", timestamp=1_718_000_000 + i))
            for i in range(30)
        )
    )
    result = publish_feed(feed, settings, partitions=3)
    report = run_batch(settings)

    assert result.lines == 30
    assert result.blank == 0
    assert result.published == 30
    assert report.written == 30
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        rows = [
            json.loads(row) for row in client.lrange(settings.redis_list_key, 0, -1)
        ]
    finally:
        client.close()
    partitions: dict[str, set[int]] = {}
    for row in rows:
        partitions.setdefault(row["patient_id"], set()).add(row["source"]["partition"])
    assert all(len(found) == 1 for found in partitions.values())


@pytest.mark.parametrize(
    ("value", "key_field", "key"),
    [
        pytest.param(b'{"patient_id": "PT-7"}', "patient_id", b"PT-7", id="string"),
        pytest.param(b'{"patient_id": 7}', "patient_id", b"7", id="integer"),
        pytest.param(b'{"device_id": "D-1"}', "device_id", b"D-1", id="other-field"),
        pytest.param(b'{"patient_id": "PT-7"}', "", None, id="no-key"),
        pytest.param(b"[1, 2]", "patient_id", None, id="array"),
        pytest.param(b"{", "patient_id", None, id="unreadable"),
        pytest.param(
            b'{"patient_id": "A", "x": {"patient_id": "C"}, "patient_id": "B"}',
            "patient_id",
            b"A",
            id="first-of-duplicates",
        ),
        pytest.param(
            b'{"patient_id": "A", "p\\u0061tient_id": "B"}',
            "patient_id",
            b"A",
            id="first-of-escaped-duplicates",
        ),
        pytest.param(b'{"patient_id": " PT-7 "}', "patient_id", b"PT-7", id="padded"),
        pytest.param(b'{"patient_id": "  "}', "patient_id", None, id="blank"),
    ],
)
def test_message_key(value: bytes, key_field: str, key: bytes | None) -> None:
    found_key, _ = find_message_key(value, key_field)

    assert found_key == key


def test_publish_counts_lines_without_key(settings: Settings) -> None:
    feed = io.BytesIO(
        b"\n".join(
            [
                b'{"patient_id": "PT-1"}',
                b'{"patient_id": 7.5}',
                b'{"device_id": "D-1"}',
                b"[1]",
                b'{"patient_id": "  "}',
                b"",
            ]
        )
    )

    result = publish_feed(feed, settings, partitions=1)

    assert result.published == 5
    assert result.without_field == 2
    assert result.unusable_key == 2


def test_publish_unknown_key_field_warns(settings: Settings, tmp_path: Path) -> None:
    """A --key-field that no line has: every message goes out unkeyed, with a warning."""
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(encode(reading(patient_id="PT-1")) + b"\n[1]\n")

    result = CliRunner().invoke(
        main, ["publish", "--key-field", "nosuch", str(feed)], env=env_of(settings)
    )

    summary = " ".join(result.stdout.split())
    assert result.exit_code == 0, result.output
    assert "Published 2 messages" in summary
    assert "2 sent without a key (2 not a JSON object with the field 'nosuch')" in (
        summary
    )
    assert "warning: no line has the field 'nosuch'" in result.stderr


def test_publish_some_unkeyed_no_warning(settings: Settings, tmp_path: Path) -> None:
    feed = tmp_path / "feed.ndjson"
    lines = [reading(patient_id="PT-1"), reading(patient_id=7.5), {"x": 1}]
    feed.write_bytes(b"\n".join(encode(line) for line in lines) + b"\n")

    result = CliRunner().invoke(main, ["publish", str(feed)], env=env_of(settings))

    summary = " ".join(result.stdout.split())
    assert result.exit_code == 0, result.output
    assert (
        "2 sent without a key (1 not a JSON object with the field 'patient_id', "
        "1 with a 'patient_id' that is blank or neither a string nor a whole number)"
        in summary
    )
    assert "warning" not in result.stderr


def test_publish_without_key_field_is_quiet(settings: Settings, tmp_path: Path) -> None:
    """--key-field '' sends no key on purpose, so nothing is counted or reported."""
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(encode(reading(patient_id="PT-1")) + b"\n")

    result = CliRunner().invoke(
        main, ["publish", "--key-field", "", str(feed)], env=env_of(settings)
    )

    assert result.exit_code == 0, result.output
    assert "without a key" not in result.stdout
    assert "warning" not in result.stderr


def test_failed_line_resumes_with_from_line(settings: Settings, tmp_path: Path) -> None:
    # librdkafka fails a message above message.max.bytes before sending it.
    small = settings.model_copy(update={"kafka_extra": {"message.max.bytes": 2_000}})
    feed = tmp_path / "feed.ndjson"
    lines = [encode(reading(patient_id=f"PT-{i}")) for i in range(3)]
    lines.insert(2, encode(reading(name="A" * 5_000)))
    feed.write_bytes(b"\n".join(lines))
    env = env_of(settings) | {"VITALS_KAFKA_EXTRA": '{"message.max.bytes": 2000}'}

    failed = CliRunner().invoke(main, ["publish", str(feed)], env=env)
    first = run_batch(small)
    resumed = CliRunner().invoke(
        main, ["publish", str(feed), "--from-line", "4"], env=env
    )
    second = run_batch(small)

    assert failed.exit_code == 3
    assert "Line 3 could not be produced, and every line before it was delivered" in (
        failed.output
    )
    assert "'--from-line 4' skips it" in failed.output
    assert first.written == 2
    assert resumed.exit_code == 0, resumed.output
    assert second.written == 1


def test_unreachable_broker_names_no_line(settings: Settings) -> None:
    unreachable = settings.model_copy(
        update={
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
            "kafka_timeout_s": 1.0,
        }
    )
    with pytest.raises(PublishError, match="is unreachable") as caught:
        publish_feed(io.BytesIO(encode(reading())), unreachable)
    assert caught.value.failed_line is None


def test_from_line_past_end_exits_2(settings: Settings, tmp_path: Path) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(encode(reading()) + b"\n")

    result = CliRunner().invoke(
        main, ["publish", str(feed), "--from-line", "3"], env=env_of(settings)
    )

    assert result.exit_code == 2
    assert "the feed has 1 line, so --from-line 3 is past its end" in result.stderr


def test_stop_delivers_earlier_lines(settings: Settings) -> None:
    stop = threading.Event()

    def lines() -> Iterator[bytes]:
        for number in range(1, 11):
            if number == 6:
                stop.set()
            yield encode(reading(patient_id=f"PT-{number}"))

    with pytest.raises(ProduceStopped) as caught:
        publish_feed(lines(), settings, stop=stop)
    report = run_batch(settings)

    assert caught.value.line == 6
    assert caught.value.sent == 5
    assert caught.value.delivered == 5
    assert report.written == 5


def test_signal_stop_restores_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)

    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    # The first signal names the stop.
    assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_early_stop_names_first_line(settings: Settings) -> None:
    stop = threading.Event()
    stop.set()
    feed = io.BytesIO(b"\n".join(encode(reading()) for _ in range(3)))

    with pytest.raises(ProduceStopped) as caught:
        publish_feed(feed, settings, stop=stop, from_line=2)

    assert caught.value.sent == 0
    assert caught.value.line == 2
