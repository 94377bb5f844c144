"""Shared fixtures: a real Kafka-protocol broker and a real redis-server.

By default the pytest session starts its own Tansu broker and ``redis-server`` on free
ports of 127.0.0.1. Set ``ETL_TEST_KAFKA_BOOTSTRAP_SERVERS`` and ``ETL_TEST_REDIS_URL`` to run
the integration tests against an existing Apache Kafka and Redis instead;
each test then uses its own topic and its own Redis key names.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import settings

from etl.config import Settings, load_settings
from etl.services import Service, free_port, start_broker, start_redis

# Speed is measured by benchmarks/, never by a timed test. Hypothesis's
# deadline of 200 ms per example would time the first call of a property
# test, which compiles its regexes, and fail it on a busy two-vCPU host.
settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")

#: Inputs that broke pipelines like this one in public bug reports (Kafka
#: clients, Polars, Pandera, redis-py, Airflow, name parsers); invented patients.
CASES = Path(__file__).parent / "data" / "cases.jsonl"
#: The operations guide, whose commands some tests run as written.
OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers after each test, because 'etl run' ignores both once its batch ends."""
    handlers = {
        number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)
    }
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


@dataclass
class Broker:
    """A Kafka-protocol broker reachable at ``bootstrap``; ``service`` is None when external."""

    bootstrap: str
    service: Service | None


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker for the whole session: Tansu on a free port, or ETL_TEST_KAFKA_BOOTSTRAP_SERVERS."""
    external = os.environ.get("ETL_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield Broker(external, None)
        return
    service = start_broker(port=free_port(), state_dir=tmp_path_factory.mktemp("kafka"))
    try:
        yield Broker(f"127.0.0.1:{service.port}", service)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Redis for the session: our own redis-server, or ETL_TEST_REDIS_URL."""
    external = os.environ.get("ETL_TEST_REDIS_URL")
    if external:
        yield external
        return
    service = start_redis(port=free_port(), state_dir=tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{service.port}/0"
    finally:
        service.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Service]:
    """A redis-server for one test only, which the test may stop or kill."""
    service = start_redis(port=free_port(), state_dir=tmp_path / "redis")
    try:
        yield service
    finally:
        service.stop()


def make_settings(bootstrap: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings with a fresh topic, group and key prefix, so tests never share state."""
    token = uuid.uuid4().hex[:10]
    prefix = f"test-{token}"
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic": f"vitals-{token}",
        "kafka_group_id": f"etl-{token}",
        "redis_url": redis_url,
        "redis_list_key": f"{prefix}:liste-patients",
        "redis_rejects_key": f"{prefix}:rejects",
        "redis_offsets_key": f"{prefix}:offsets",
        "redis_alerts_key": f"{prefix}:alerts",
        "redis_reports_key": f"{prefix}:reports",
        "redis_stats_key": f"{prefix}:stats",
        "kafka_timeout_s": 5.0,
        "redis_timeout_s": 5.0,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(broker: Broker, redis_service: str) -> Settings:
    """Settings on the session broker and Redis, with a topic and keys of the test's own."""
    return make_settings(broker.bootstrap, redis_service)


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """A client on the test's Redis."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        yield client
    finally:
        client.close()


def create_topic(settings: Settings, partitions: int = 3) -> None:
    """Create the test topic with ``partitions`` partitions."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    futures = admin.create_topics([NewTopic(settings.kafka_topic, partitions, 1)])
    futures[settings.kafka_topic].result(timeout=10)


def produce(
    settings: Settings,
    values: list[bytes | None],
    *,
    keys: list[bytes] | None = None,
    partition: int | None = None,
) -> None:
    """Produce ``values`` to the test topic and wait until every one is acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    failures: list[str] = []

    def on_delivery(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    for index, value in enumerate(values):
        key = keys[index] if keys else f"k{index}".encode()
        extra = {} if partition is None else {"partition": partition}
        producer.produce(
            settings.kafka_topic, key=key, value=value, on_delivery=on_delivery, **extra
        )
    remaining = producer.flush(15)
    assert remaining == 0, f"{remaining} messages not delivered"
    assert not failures, failures


def reading(**fields: Any) -> dict[str, Any]:
    """A well-formed reading, with ``fields`` replacing or adding keys."""
    base: dict[str, Any] = {
        "patient_id": "PT-0001",
        "name": "Amara Okafor",
        "age": 58,
        "blood_pressure": "142/91",
        "heart_rate": 88,
        "temperature": 37.1,
        "timestamp": 1718000000.0,
    }
    base.update(fields)
    return base


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def load_cases() -> list[dict[str, Any]]:
    """The public failure cases, one envelope per line (case, condition, value...)."""
    lines = CASES.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def case_value(envelope: dict[str, Any]) -> bytes | None:
    """The Kafka value bytes of a case envelope."""
    if "value_hex" in envelope:
        return bytes.fromhex(envelope["value_hex"])
    if "value_raw" in envelope:
        return str(envelope["value_raw"]).encode()
    if envelope.get("value") is None:
        return None
    return encode(envelope["value"])
