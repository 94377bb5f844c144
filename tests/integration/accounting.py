"""Account for every Kafka record: produced (partition, offset) against Redis."""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from etl.config import Settings

Position = tuple[int, int]


def produce_tracked(
    settings: Settings,
    values: list[bytes | None],
    *,
    keys: list[bytes] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> list[Position]:
    """Produce ``values`` and return the (partition, offset) of each, in the order of ``values``."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "linger.ms": 5,
            **(extra_config or {}),
        }
    )
    positions: list[Position | None] = [None] * len(values)
    failures: list[str] = []

    def on_delivery(index: int, error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            positions[index] = (message.partition(), message.offset())

    for index, value in enumerate(values):
        key = keys[index] if keys else f"k{index}".encode()
        while True:
            try:
                producer.produce(
                    settings.kafka_topic,
                    key=key,
                    value=value,
                    on_delivery=functools.partial(on_delivery, index),
                )
                break
            except BufferError:
                producer.poll(0.1)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} messages not delivered"
    assert not failures, failures[:3]
    delivered = [position for position in positions if position is not None]
    assert len(delivered) == len(values)
    return delivered


def redis_positions(client: redis.Redis, settings: Settings) -> list[Position]:
    """(partition, offset) of every row and reject in Redis, duplicates kept."""
    found: list[Position] = []
    for key in (settings.redis_list_key, settings.redis_rejects_key):
        for value in client.lrange(key, 0, -1):
            source = json.loads(value)["source"]
            assert source["topic"] == settings.kafka_topic
            found.append((source["partition"], source["offset"]))
    return found


def stored_offsets(client: redis.Redis, settings: Settings) -> dict[int, int]:
    """Next offset per partition in the offsets hash."""
    prefix = f"{settings.kafka_topic}:"
    offsets = {}
    for name, value in client.hgetall(settings.redis_offsets_key).items():
        suffix = name.decode().removeprefix(prefix)
        if suffix.isdigit():
            offsets[int(suffix)] = int(value)
    return offsets


def assert_accounted(
    client: redis.Redis, settings: Settings, produced: list[Position]
) -> None:
    """Every produced record is in Redis once, as a row or a reject, and nothing else is."""
    found = redis_positions(client, settings)
    twice = [position for position, n in Counter(found).items() if n > 1]
    assert not twice, f"written more than once: {sorted(twice)[:10]}"
    missing = set(produced) - set(found)
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:10]}"
    extra = set(found) - set(produced)
    assert not extra, f"unexpected records: {sorted(extra)[:10]}"
    ends: dict[int, int] = {}
    for partition, offset in produced:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert stored_offsets(client, settings) == ends


def assert_prefix_written(client: redis.Redis, settings: Settings) -> dict[int, int]:
    """What Redis contains is exactly the records below the stored offset of each partition."""
    found = redis_positions(client, settings)
    assert len(found) == len(set(found)), "a record was written twice"
    stored = stored_offsets(client, settings)
    expected = {(p, o) for p, end in stored.items() for o in range(end)}
    assert set(found) == expected
    return stored


def kafka_committed(settings: Settings, partitions: int) -> dict[int, int]:
    """Offsets committed in Kafka for the batch's group, where there are any."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": settings.kafka_group_id,
            "enable.auto.commit": False,
        }
    )
    try:
        wanted = [TopicPartition(settings.kafka_topic, p) for p in range(partitions)]
        found = consumer.committed(wanted, timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
