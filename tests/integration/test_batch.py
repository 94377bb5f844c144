"""A batch against a real Kafka-protocol broker and a real redis-server."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from pydantic import SecretStr

from contracts.models import OUTPUT_KEYS
from etl.config import ConfigurationError, Settings
from etl.pipeline import run_batch
from etl.sink import (
    RedisSink,
    SinkError,
    redis_cli_command,
)
from etl.source import KafkaSource, OffsetsOutOfRange, SourceError, _ChunkBuffer
from tests.conftest import (
    OPERATIONS_DOC,
    case_value,
    create_topic,
    encode,
    load_cases,
    produce,
    reading,
)

pytestmark = pytest.mark.integration


def stored_rows(client: redis.Redis, settings: Settings) -> list[dict[str, object]]:
    return [json.loads(v) for v in client.lrange(settings.redis_list_key, 0, -1)]


def stored_offsets(client: redis.Redis, settings: Settings) -> list[tuple[int, int]]:
    """(partition, offset) of every row and reject in Redis."""
    found = []
    for key in (settings.redis_list_key, settings.redis_rejects_key):
        for value in client.lrange(key, 0, -1):
            source = json.loads(value)["source"]
            found.append((source["partition"], source["offset"]))
    return sorted(found)


def test_batch_writes_rows_in_contract_order(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings, partitions=1)
    readings = [
        reading(
            patient_id="PT-1",
            name="Pieter van den Broek",
            age=68,
            blood_pressure="149/93",
        ),
        reading(
            patient_id="PT-2",
            name="Jean-Pierre Morel",
            age=35,
            blood_pressure="118/76",
            spo2=97,
            respiratory_rate=16,
            consciousness="A",
            on_oxygen=False,
            heart_rate=70,
            temperature=36.8,
        ),
    ]
    produce(settings, [encode(r) for r in readings])

    report = run_batch(settings)

    assert (report.read, report.written, report.rejected) == (2, 2, 0)
    rows = stored_rows(redis_client, settings)
    assert [list(row) for row in rows] == [OUTPUT_KEYS, OUTPUT_KEYS]
    first, second = rows
    assert (first["first_name"], first["last_name"]) == ("Pieter", "van den Broek")
    assert first["timestamp"] == "2024-06-10T06:13:20.000+00:00"
    assert first["source"] == {
        "topic": settings.kafka_topic,
        "partition": 0,
        "offset": 0,
    }
    assert (second["systolic"], second["diastolic"]) == (118, 76)
    assert second["news2_score"] is not None or second["news2_risk"] == "Incomplete"


def test_batch_empty_topic_ends_at_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings, partitions=3)
    report = run_batch(settings)
    assert report.read == 0
    assert report.stop_reason == "end_of_partitions"
    assert report.duration_s < settings.deadline_s
    assert redis_client.llen(settings.redis_list_key) == 0


def test_batch_missing_topic_fails_with_advice(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A misspelt or deleted topic fails the batch instead of reading nothing, run after run."""
    with pytest.raises(SourceError) as failure:
        run_batch(settings)

    message = str(failure.value)
    assert f"topic {settings.kafka_topic!r} does not exist" in message
    assert "check the topic name (VITALS_KAFKA_TOPIC" in message
    assert f"'etl generate --count 0 --topic {settings.kafka_topic}' creates" in message
    assert "loses its topics when it restarts" in message
    [(_, fields)] = redis_client.xrange(settings.redis_reports_key)
    assert fields[b"status"] == b"failed"
    assert fields[b"read"] == b"0"


def test_batch_second_run_writes_nothing(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(50)])
    first = run_batch(settings)
    second = run_batch(settings)
    assert first.written == 50
    assert second.read == 0
    assert redis_client.llen(settings.redis_list_key) == 50


def rebuild_from_offset_zero(
    settings: Settings, redis_client: redis.Redis, *, keep_topic_id: bool
) -> Settings:
    """Load 60 readings, then rebuild the list from offset 0 without Kafka's tools.

    Returns settings with a new group, which has no commits, like every
    group of the local broker after a restart.
    """
    create_topic(settings)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(60)])
    assert run_batch(settings).written == 60
    redis_client.delete(
        settings.redis_list_key,
        settings.redis_rejects_key,
        settings.redis_alerts_key,
        settings.redis_stats_key,
    )
    if not keep_topic_id:
        redis_client.delete(settings.redis_offsets_key)
    topic = settings.kafka_topic
    redis_client.hset(
        settings.redis_offsets_key, mapping={f"{topic}:{p}": 0 for p in range(3)}
    )
    return settings.model_copy(update={"kafka_group_id": f"{topic}-rebuilt"})


def documented_offset_query() -> str:
    """Return the shell command of docs/operations.md that finds a partition's next offset."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    [block] = [
        block
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
        if "max_by(.source.offset)" in block
    ]
    return block.replace("\\\n", " ")


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_documented_offset_query_counts_rejects(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The query finds the stored offset when a partition's last records are rejects."""
    create_topic(settings, partitions=3)
    produce(
        settings, [encode(reading()) for _ in range(5)] + [b"{", b"[]"], partition=2
    )
    run_batch(settings)
    port = redis_client.connection_pool.connection_kwargs["port"]
    command = (
        documented_offset_query()
        .replace("-p 6380", f"-p {port}")
        .replace("liste-patients:rejects", settings.redis_rejects_key)
        .replace("liste-patients ", f"{settings.redis_list_key} ")
        .replace('"vitals"', json.dumps(settings.kafka_topic))
    )

    found = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, check=True
    )
    empty = subprocess.run(
        ["bash", "-c", command.replace("partition == 2", "partition == 1")],
        capture_output=True,
        text=True,
        check=False,
    )

    stored = redis_client.hget(settings.redis_offsets_key, f"{settings.kafka_topic}:2")
    assert stored == b"7"
    assert found.stdout.strip() == "7"
    assert empty.returncode == 5
    assert empty.stdout == ""
    assert "no entry of this partition" in empty.stderr


def test_rebuild_keeping_topic_id_reads_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The rebuild that docs/operations.md gives for the local broker."""
    uncommitted = rebuild_from_offset_zero(settings, redis_client, keep_topic_id=True)

    assert run_batch(uncommitted).written == 60
    offsets = stored_offsets(redis_client, settings)
    assert len(offsets) == 60
    assert len(set(offsets)) == 60
    assert redis_client.llen(settings.redis_list_key) == 60


def test_rebuild_without_topic_id_stops(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Offsets without a topic id, on a group without commits, stop the batch."""
    uncommitted = rebuild_from_offset_zero(settings, redis_client, keep_topic_id=False)

    with pytest.raises(SourceError, match="carry no topic id"):
        run_batch(uncommitted)
    assert redis_client.llen(settings.redis_list_key) == 0


def test_batch_reads_records_older_than_group(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Records produced before the group ever existed are read on the first run (C02)."""
    create_topic(settings)
    values = [case_value(e) for e in load_cases() if e["case"] == "C02"]
    produce(settings, values)
    report = run_batch(settings)
    assert report.written == 2


def test_batch_single_message_topic_ends(settings: Settings) -> None:
    """One message and then silence: the batch ends on end-of-partition events (C03)."""
    create_topic(settings)
    produce(settings, [case_value(e) for e in load_cases() if e["case"] == "C03"])
    report = run_batch(settings)
    assert report.written == 1
    assert report.stop_reason == "end_of_partitions"


def test_batch_failure_before_write_commits_nothing(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A failure between consume and the Redis write leaves the records for the next run (C04)."""
    create_topic(settings)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(10)])
    with (
        mock.patch.object(RedisSink, "write_chunk", side_effect=SinkError("injected")),
        pytest.raises(SinkError, match="injected"),
    ):
        run_batch(settings)
    assert redis_client.llen(settings.redis_list_key) == 0
    assert redis_client.hlen(settings.redis_offsets_key) == 0

    report = run_batch(settings)
    assert report.written == 10


def test_batch_cap_and_chunks(settings: Settings, redis_client: redis.Redis) -> None:
    create_topic(settings)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(250)])
    capped = settings.model_copy(update={"chunk_size": 40, "max_records": 100})
    first = run_batch(capped)
    assert first.read == 100
    assert first.stop_reason == "record_cap"
    assert first.chunks == 3
    rest = run_batch(settings.model_copy(update={"chunk_size": 40}))
    assert rest.read == 150
    offsets = stored_offsets(redis_client, settings)
    assert len(offsets) == len(set(offsets)) == 250


def test_batch_public_cases_accounted(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Every produced offset ends as exactly one row or reject."""
    create_topic(settings, partitions=1)
    values = [case_value(e) for e in load_cases()]
    produce(settings, values)
    report = run_batch(settings)
    assert report.read == len(values)
    assert stored_offsets(redis_client, settings) == [
        (0, i) for i in range(len(values))
    ]
    assert report.rejected_by_reason["tombstone"] == 1


def test_batch_report_in_stream(settings: Settings, redis_client: redis.Redis) -> None:
    create_topic(settings)
    produce(settings, [encode(reading())])
    run_batch(settings)
    ((_, fields),) = redis_client.xrange(settings.redis_reports_key)
    assert fields[b"written"] == b"1"
    assert json.loads(fields[b"report"])["read"] == 1


def test_batch_report_offsets_span(settings: Settings) -> None:
    """Each report spans from the offset its batch started at to the next one to read."""
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading()) for _ in range(250)])
    chunked = settings.model_copy(update={"chunk_size": 100})
    first = run_batch(chunked)
    produce(settings, [encode(reading()) for _ in range(30)])
    second = run_batch(chunked)

    assert first.offsets == {"0": [0, 250]}
    assert second.offsets == {"0": [250, 280]}


@pytest.mark.parametrize(
    ("rule_set", "expected"),
    [
        pytest.param("acc_aha_2017", "Stage 2 hypertension range", id="acc-aha"),
        pytest.param(
            "esc_esh_2018", "Isolated systolic hypertension grade 1 range", id="esc-esh"
        ),
        pytest.param("legacy_age_bands", "High", id="legacy"),
    ],
)
def test_batch_rule_set_setting(
    settings: Settings, redis_client: redis.Redis, rule_set: str, expected: str
) -> None:
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading(age=45, blood_pressure="145/85"))])
    run_batch(settings.model_copy(update={"rule_set": rule_set}))
    (row,) = stored_rows(redis_client, settings)
    assert row["blood_pressure_status"] == expected
    assert row["rule_set"] == rule_set


def test_batch_news2_alerts_in_same_transaction(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings, partitions=1)
    full = {
        "spo2": 97,
        "respiratory_rate": 16,
        "consciousness": "A",
        "on_oxygen": False,
    }
    calm = reading(
        patient_id="PT-CALM",
        heart_rate=70,
        temperature=36.8,
        blood_pressure="120/78",
        **full,
    )
    unwell = reading(
        patient_id="PT-UNWELL",
        heart_rate=135,
        temperature=39.5,
        blood_pressure="88/50",
        spo2=89,
        respiratory_rate=28,
        consciousness="V",
        on_oxygen=True,
    )
    produce(settings, [encode(calm), encode(unwell)])

    report = run_batch(settings)

    risks = {
        row["patient_id"]: row["news2_risk"]
        for row in stored_rows(redis_client, settings)
    }
    assert risks == {"PT-CALM": "Low", "PT-UNWELL": "High"}
    alerts = [
        json.loads(v)["patient_id"]
        for v in redis_client.lrange(settings.redis_alerts_key, 0, -1)
    ]
    assert alerts == ["PT-UNWELL"]
    assert report.alerts == 1

    stats = redis_client.hgetall(settings.redis_stats_key)
    assert stats[b"news2_risk:High"] == b"1"
    assert stats[b"written"] == b"2"


def test_batch_alerts_incomplete_reading_scoring_5(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Recorded parameters that score 5 or more alert, because a missing one only adds."""
    create_topic(settings, partitions=1)
    # No consciousness: respiration 3, SpO2 3, oxygen 2, pulse 2 and 3 for 35.0 C.
    unwell = reading(
        patient_id="PT-NO-ACVPU",
        heart_rate=115,
        temperature=35.0,
        spo2=90,
        respiratory_rate=26,
        on_oxygen=True,
    )
    # No SpO2: respiration 2, pulse 1 and temperature 1, 4 in all.
    watch = reading(
        patient_id="PT-NO-SPO2",
        heart_rate=95,
        temperature=38.5,
        respiratory_rate=22,
        consciousness="A",
        on_oxygen=False,
    )
    produce(settings, [encode(unwell), encode(watch)])

    report = run_batch(settings)

    risks = {
        row["patient_id"]: (row["news2_score"], row["news2_risk"])
        for row in stored_rows(redis_client, settings)
    }
    assert risks == {
        "PT-NO-ACVPU": (None, "Incomplete"),
        "PT-NO-SPO2": (None, "Incomplete"),
    }
    alerts = [
        json.loads(v)["patient_id"]
        for v in redis_client.lrange(settings.redis_alerts_key, 0, -1)
    ]
    assert alerts == ["PT-NO-ACVPU"]
    assert report.alerts == 1


def store_past_end(settings: Settings, client: redis.Redis) -> None:
    """Store offset 5000 for partition 0, with the topic's current id."""
    source = KafkaSource(settings)
    try:
        topic_id = source.topic_id()
    finally:
        source.close()
    assert topic_id is not None
    client.hset(
        settings.redis_offsets_key,
        mapping={
            f"{settings.kafka_topic}:0": 5000,
            f"{settings.kafka_topic}:topic_id": topic_id,
        },
    )


def test_batch_offsets_past_topic_end_fail_loudly(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Stored offsets beyond the topic's data (a recreated topic) fail the batch, never skip silently."""
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(5)])
    # Offsets past the end, stored for this very topic (same id).
    store_past_end(settings, redis_client)
    quick = settings.model_copy(update={"kafka_timeout_s": 2.0, "deadline_s": 60.0})
    started = time.monotonic()
    with pytest.raises(
        SourceError, match=r"from offsets \{0: 5000\}.*Move their stored offsets back"
    ) as failure:
        run_batch(quick)
    assert time.monotonic() - started < 30
    # No batch committed an offset, so the partition goes back to the earliest.
    command = redis_cli_command(
        settings, "HDEL", settings.redis_offsets_key, f"{settings.kafka_topic}:0"
    )
    assert f"Move their stored offsets back with {command}, then rerun" in str(
        failure.value
    )
    assert redis_client.llen(settings.redis_list_key) == 0


def test_deadline_before_silence_check_warns(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A deadline shorter than the silent-partition check names the silent partition."""
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading())])
    store_past_end(settings, redis_client)
    short = settings.model_copy(update={"kafka_timeout_s": 5.0, "deadline_s": 1.0})

    with caplog.at_level(logging.WARNING, logger="etl.source"):
        report = run_batch(short)

    assert report.stop_reason == "deadline"
    assert "Partitions [0] of topic" in caplog.text
    assert "before the deadline" in caplog.text
    assert "--deadline of etl run: 1.0 s) is shorter than twice" in caplog.text


def test_long_deadline_gives_no_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading())])
    timely = settings.model_copy(update={"kafka_timeout_s": 5.0, "deadline_s": 10.0})

    with caplog.at_level(logging.WARNING, logger="etl.source"):
        report = run_batch(timely)

    assert report.written == 1
    assert "VITALS_DEADLINE_S" not in caplog.text


def test_silent_partitions_from_earliest_named(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Partitions assigned from the earliest offset are reported as 'earliest', not -2."""
    create_topic(settings, partitions=2)
    quick = settings.model_copy(update={"kafka_timeout_s": 1.0})
    source = KafkaSource(quick)
    try:
        with caplog.at_level(logging.INFO, logger="etl.source"):
            source.assign({0: OFFSET_BEGINNING, 1: OFFSET_BEGINNING})
        # Paused partitions are never fetched, so they stay silent like a hung broker.
        source._consumer.pause(
            [TopicPartition(settings.kafka_topic, p) for p in (0, 1)]
        )
        chunks = source.chunks(
            chunk_size=100, max_records=1000, deadline=time.monotonic() + 60
        )
        with pytest.raises(SourceError) as failure:
            list(chunks)
    finally:
        source.close()

    # A fetch that started before the pause may have resolved the position to 0.
    positions = r"from offsets \{0: (earliest|0), 1: (earliest|0)\}"
    assert re.search(positions, str(failure.value)), failure.value
    assert ": -2" not in str(failure.value)
    assert "from offsets {0: earliest, 1: earliest}" in caplog.text


class _PausedConsumer:
    """A consumer whose first ``consume()`` returns nothing after a pause.

    A drain gets the same after a SIGSTOP and SIGCONT of its process:
    nothing arrived in that time because nothing in the process ran.
    """

    def __init__(self, consumer: Any, pause_s: float) -> None:
        self._consumer = consumer
        self._pause_s = pause_s
        self.paused = False

    def consume(self, *args: Any, **kwargs: Any) -> list[Any]:
        if not self.paused:
            self.paused = True
            time.sleep(self._pause_s)
            return []
        return list(self._consumer.consume(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


@pytest.mark.parametrize("where", ["consume", "records"])
def test_paused_drain_is_no_silence(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Time in which the process did not run does not make partitions silent.

    The pause comes inside ``consume()``, or after it returned, while the
    drain copies the records of that pass.
    """
    create_topic(settings, partitions=3)
    produce(settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(30)])
    quick = settings.model_copy(update={"kafka_timeout_s": 1.0})
    pauses: list[float] = []
    if where == "records":
        extend = _ChunkBuffer.extend

        def paused_extend(buffer: _ChunkBuffer, messages: list[Any]) -> None:
            if not pauses:
                pauses.append(3.0)
                time.sleep(3.0)
            extend(buffer, messages)

        monkeypatch.setattr(_ChunkBuffer, "extend", paused_extend)
    source = KafkaSource(quick)
    try:
        source.assign(dict.fromkeys(range(3), OFFSET_BEGINNING))
        if where == "consume":
            consumer = _PausedConsumer(source._consumer, pause_s=3.0)
            source._consumer = consumer
            pauses.append(3.0)
        chunks = list(
            source.chunks(
                chunk_size=100, max_records=1000, deadline=time.monotonic() + 60
            )
        )
    finally:
        source.close()

    assert pauses == [3.0]
    assert sum(chunk.height for chunk in chunks) == 30
    assert source.stats.stop_reason == "end_of_partitions"


class _OffsetResetEvent:
    """A consumer event as librdkafka returns it for an offset outside the log."""

    def error(self) -> KafkaError:
        return KafkaError(KafkaError._AUTO_OFFSET_RESET, "offset out of range")

    def partition(self) -> int:
        return 1


class _Watermarks:
    """A consumer that returns fixed watermarks and committed offsets.

    ``answer`` is the broker's reply to a ListOffsets request, ``fetched`` the
    watermarks of the last fetch response (unknown by default, as before any
    fetch).
    """

    def __init__(
        self,
        answer: tuple[int, int] | None,
        committed: dict[int, int],
        fetched: tuple[int, int] = (-1001, -1001),
    ) -> None:
        self.answer = answer
        self.offsets = committed
        self.fetched = fetched

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int] | None:
        return self.fetched if cached else self.answer

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        return [
            TopicPartition(
                tp.topic, tp.partition, self.offsets.get(tp.partition, -1001)
            )
            for tp in partitions
        ]


@contextlib.contextmanager
def _source_with(
    settings: Settings,
    stored: int,
    fake: _Watermarks,
    last_written: dict[int, int] | None = None,
) -> Iterator[KafkaSource]:
    """Yield a source assigned partition 1 from ``stored``, whose consumer is ``fake``.

    ``last_written`` stands for the highest offsets of the rows and rejects
    in Redis.
    """
    found = last_written or {}
    source = KafkaSource(settings, last_written=lambda topic, partitions: dict(found))
    source.assign({0: 0, 1: stored})
    consumer = source._consumer
    source._consumer = fake  # type: ignore[assignment]
    try:
        yield source
    finally:
        source._consumer = consumer
        source.close()


def _out_of_range_message(
    settings: Settings,
    stored: int,
    watermarks: tuple[int, int] | None,
    committed: dict[int, int] | None = None,
    fetched: tuple[int, int] = (-1001, -1001),
    last_written: dict[int, int] | None = None,
) -> str:
    """Return the error for partition 1 of a source assigned from ``stored``."""
    fake = _Watermarks(watermarks, committed or {}, fetched)
    with (
        _source_with(settings, stored, fake, last_written) as source,
        pytest.raises(OffsetsOutOfRange) as failure,
    ):
        source._handle_events([_OffsetResetEvent()], {1})
    return str(failure.value)


def test_retention_gap_gives_hset(settings: Settings) -> None:
    """Records that retention deleted: the command moves the offset to the earliest kept."""
    redis_url = settings.redis_url.get_secret_value().rsplit("/", 1)[0] + "/5"
    in_database_5 = settings.model_copy(update={"redis_url": SecretStr(redis_url)})
    message = _out_of_range_message(in_database_5, 5, (120, 500))

    topic = settings.kafka_topic
    command = redis_cli_command(
        in_database_5, "HSET", settings.redis_offsets_key, f"{topic}:1", "120"
    )
    assert f"run {command} and rerun" in message
    assert " -n 5 HSET " in command
    assert "from offset 5 to 119 (retention)" in message


def test_offset_past_log_end_goes_back_to_commit(settings: Settings) -> None:
    """Past the end, the partition goes back to its last commit; the others stay."""
    message = _out_of_range_message(settings, 900, (120, 500), committed={1: 480})

    key = settings.redis_offsets_key
    command = redis_cli_command(
        settings, "HSET", key, f"{settings.kafka_topic}:1", "480"
    )
    assert f"Move their stored offsets back with {command}, then rerun" in message
    assert f"{settings.kafka_topic}:0" not in message


@pytest.mark.parametrize(
    ("last_written", "committed", "target"),
    [
        # The commit lags behind Redis after a batch that could not commit.
        pytest.param({1: 449}, {1: 100}, "450", id="commit-lags"),
        # An operator skipped to 480, or trimmed the rows after offset 437.
        pytest.param({1: 437}, {1: 480}, "480", id="commit-ahead"),
    ],
)
def test_reset_target_higher_of_rows_and_commit(
    settings: Settings,
    last_written: dict[int, int],
    committed: dict[int, int],
    target: str,
) -> None:
    message = _out_of_range_message(
        settings, 900, (120, 500), committed=committed, last_written=last_written
    )

    key = settings.redis_offsets_key
    command = redis_cli_command(
        settings, "HSET", key, f"{settings.kafka_topic}:1", target
    )
    assert f"Move their stored offsets back with {command}, then rerun" in message


@pytest.mark.parametrize(
    ("watermarks", "expected"),
    [
        pytest.param(None, "or the offset lookups either", id="no-answer"),
        pytest.param((120, 500), "inside the log", id="inside-the-log"),
    ],
)
def test_offset_reset_needs_the_log_end(
    settings: Settings, watermarks: tuple[int, int] | None, expected: str
) -> None:
    """No command is printed unless the broker reports the offset past the log's end."""
    message = _out_of_range_message(settings, 300, watermarks, committed={1: 100})

    assert expected in message
    assert "redis-cli" not in message


def test_offset_past_log_end_without_commit_deletes(settings: Settings) -> None:
    """Without a commit, the field goes, and the partition starts at the earliest offset."""
    message = _out_of_range_message(settings, 900, (120, 500))

    key = settings.redis_offsets_key
    command = redis_cli_command(settings, "HDEL", key, f"{settings.kafka_topic}:1")
    assert f"Move their stored offsets back with {command}, then rerun" in message


def test_offset_past_log_end_with_commit_past_end(settings: Settings) -> None:
    """A commit at the stored offset shows the log reached it: no command is given."""
    message = _out_of_range_message(settings, 900, (120, 500), committed={1: 900})

    assert "up to {1: 900}, past the end that the broker reports ({1: 500})" in message
    assert "redis-cli" not in message


def test_reset_uses_fetched_log_end(settings: Settings) -> None:
    """Tansu returns the last batch's base offset plus one for ListOffsets.

    The end from the last fetch response decides: the offset is inside the log.
    """
    message = _out_of_range_message(
        settings, 300, (0, 1), committed={1: 100}, fetched=(0, 1000)
    )

    assert "inside the log" in message
    assert "redis-cli" not in message


def _silent_advice(
    settings: Settings,
    stored: int,
    answer: tuple[int, int] | None,
    fetched: tuple[int, int],
    committed: dict[int, int] | None = None,
) -> str:
    """Return the advice for partition 1, assigned from ``stored``, when it stays silent."""
    fake = _Watermarks(answer, committed or {}, fetched)
    with _source_with(settings, stored, fake) as source:
        return source._reset_advice([1], lookup=False)


def test_silent_partition_without_fetch_response_gets_no_command(
    settings: Settings,
) -> None:
    """A broker that paused before its first fetch response: its lookup is not trusted."""
    advice = _silent_advice(settings, 300, (0, 1), fetched=(-1001, -1001))

    assert "did not answer the fetches" in advice
    assert "redis-cli" not in advice


def test_silent_partition_without_committed_offsets_names_that_request(
    settings: Settings,
) -> None:
    """The fetch gave the end, but the committed offsets did not come: no command."""
    fake = _Watermarks((0, 1), {}, fetched=(0, 100))
    fake.committed = mock.Mock(  # type: ignore[method-assign]
        side_effect=KafkaException(KafkaError(KafkaError._TIMED_OUT))
    )
    with _source_with(settings, 300, fake) as source:
        advice = source._reset_advice([1], lookup=False)

    assert "request for the group's committed offsets" in advice
    assert "redis-cli" not in advice


@pytest.mark.parametrize("end", [300, 1000])
def test_silent_partition_inside_log_no_command(settings: Settings, end: int) -> None:
    """An offset equal to the end is where the next record goes: the broker is hung."""
    advice = _silent_advice(settings, 300, (0, 1), fetched=(0, end), committed={1: 100})

    assert "inside the log" in advice
    assert "redis-cli" not in advice


def test_failed_commit_drops_the_admin_client(settings: Settings) -> None:
    """A timed-out commit leaves no request behind: a retry commits with a new client."""
    create_topic(settings, partitions=1)
    source = KafkaSource(settings)
    try:
        timed_out = mock.Mock()
        timed_out.alter_consumer_group_offsets.side_effect = KafkaException(
            KafkaError(KafkaError._TIMED_OUT)
        )
        source._admin = timed_out
        source.commit({0: 1})
        dropped = source._admin is None
        source.commit({0: 1}, retry=True)
        committed = source.committed([0])
    finally:
        source.close()

    assert dropped
    assert committed == {0: 1}


def test_batch_extra_cannot_disable_end_of_partition(settings: Settings) -> None:
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading())])
    unsafe = settings.model_copy(
        update={
            "kafka_extra": {"enable.partition.eof": False, "enable.auto.commit": True}
        }
    )
    report = run_batch(unsafe)
    assert report.stop_reason == "end_of_partitions"
    assert report.written == 1


def test_batch_unknown_kafka_property_is_configuration_error(
    settings: Settings,
) -> None:
    bad = settings.model_copy(update={"kafka_extra": {"no.such.property": 1}})
    with pytest.raises(ConfigurationError, match="VITALS_KAFKA_EXTRA"):
        run_batch(bad)
