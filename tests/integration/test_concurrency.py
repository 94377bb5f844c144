"""Two batch processes on the same topic and group at the same moment."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from etl.config import Settings
from etl.pipeline import run_batch
from tests.conftest import create_topic, encode, reading
from tests.integration.accounting import (
    assert_accounted,
    assert_prefix_written,
    kafka_committed,
    produce_tracked,
    redis_positions,
)
from tests.integration.faultpoints import (
    ChildResult,
    fault_argv,
    finish,
    settings_env,
    spawn,
)

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        yield client
    finally:
        client.close()


def run_together(settings: Settings, workdir: Path, count: int) -> list[ChildResult]:
    """Start ``count`` batch processes and release them at once, after their imports."""
    gate = workdir / "gate"
    children = []
    for index in range(count):
        ready = workdir / f"ready-{index}"
        env = {
            **settings_env(settings),
            "FAULT_GATE": str(gate),
            "FAULT_READY": str(ready),
        }
        started = time.monotonic()
        process, out, err = spawn(fault_argv("none"), env, workdir / str(index))
        children.append((process, out, err, started, ready))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for *_, ready in children):
        assert time.monotonic() < deadline, "a batch process did not start"
        time.sleep(0.01)
    gate.touch()
    return [
        finish(process, out, err, started=started)
        for process, out, err, started, _ in children
    ]


@pytest.mark.parametrize(
    "chunk_size",
    [
        # Many small chunks: the two batches interleave chunk by chunk.
        pytest.param(150, id="small-chunks"),
        # One chunk each: both drain everything and race for one transaction.
        pytest.param(10_000, id="one-chunk"),
    ],
)
def test_two_batches_no_loss_no_duplicate(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, chunk_size: int
) -> None:
    create_topic(settings, PARTITIONS)
    values: list[bytes | None] = [
        encode(reading(patient_id=f"PT-{i}", age="old" if i % 9 == 0 else 58))
        for i in range(3000)
    ]
    produced = produce_tracked(settings, values)
    chunked = settings.model_copy(update={"chunk_size": chunk_size})

    results = run_together(chunked, tmp_path, 2)

    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    reports = [result.report() for result in results]
    assert {report["status"] for report in reports} <= {"ok", "concurrent_batch"}
    # The counts in the two reports add up to the records in Redis, so no
    # record was written by both. Redis contains a gap-free prefix of each partition.
    in_redis = len(redis_positions(redis_client, settings))
    assert sum(r["written"] + r["rejected"] for r in reports) == in_redis
    # The per-label counts of each report count only what that batch wrote.
    for report in reports:
        assert sum(report["bp_status"].values()) == report["written"]
        assert sum(report["news2_risk"].values()) == report["written"]
        assert sum(report["rejected_by_reason"].values()) == report["rejected"]
    stored = assert_prefix_written(redis_client, settings)
    # Kafka's committed offsets (for lag) end equal to those in Redis, not behind.
    committed = kafka_committed(settings, PARTITIONS)
    for partition, offset in stored.items():
        assert committed.get(partition) == offset, (partition, committed, stored)
    if any(r["status"] == "ok" and r["read"] for r in reports):
        # A batch that met no other batch's write drained to the end.
        assert in_redis == len(produced)

    # Both may stop early after seeing the other's writes; the next run
    # writes the rest.
    run_batch(chunked)
    assert_accounted(redis_client, settings, produced)
    assert run_batch(chunked).read == 0


def test_three_batches_then_rerun(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Three at once, with a record cap so that some stop early; a rerun finishes the topic."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(
        settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(2000)]
    )
    capped = settings.model_copy(update={"chunk_size": 100, "max_records": 700})

    results = run_together(capped, tmp_path, 3)

    for result in results:
        # Three writers of one offsets hash can outlast a batch's five attempts
        # on a loaded machine. That batch fails without writing its chunk, and
        # the reruns below write it.
        contended = "another batch kept changing the offsets" in result.stderr
        assert result.returncode == 0 or contended, result.stderr[-3000:]
    while run_batch(capped).read:
        pass
    assert_accounted(redis_client, settings, produced)
