"""One batch: drain Kafka, parse, validate, transform, load Redis, report.

Two ways to run it share the same chunk functions:

- :func:`run_batch`, one process (the ``etl run`` command): a thread drains
  the next chunk, two threads process chunks, and a thread writes them to
  Redis one at a time, in drain order;
- :func:`drain_to_staging`, :func:`transform_staging`, :func:`load_staging`
  and :func:`report_staging`, one step per Airflow task, passing only a staging
  folder between them.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import polars as pl
from confluent_kafka import OFFSET_BEGINNING

from contracts.models import OUTPUT_KEYS, InputReading, OutputRow
from etl.config import ConfigurationError
from etl.parse import parse
from etl.reasons import Reason
from etl.sink import (
    Chunk,
    OffsetConflict,
    RedisSink,
    SinkError,
    WriteCancelled,
    WriteResult,
    reset_offsets_command,
    set_offsets_command,
    topic_id_field,
)
from etl.source import KafkaSource, OffsetsOutOfRange, Prefetcher
from etl.transform import transform
from etl.validate import split_valid

if TYPE_CHECKING:
    from etl.config import Settings

logger = logging.getLogger(__name__)

#: Raw payload bytes kept in a reject; the rest is cut and flagged.
REJECT_PAYLOAD_BYTES: Final = 4096
_CARRY: Final = ("partition", "offset", "value")
#: Input contract columns that the parser derives from a message field of
#: another name. A missing value is reported under the field the producer sends.
MESSAGE_FIELD_OF: Final = {
    "systolic": "blood_pressure",
    "diastolic": "blood_pressure",
    "measured_at": "timestamp",
}
#: Seconds between checks of the write thread while the caller waits for it.
_POLL_S: Final = 0.05
#: Chunks processed at once. While one chunk is in a single-threaded step (a
#: regex, the JSON encoding), the other keeps Polars' thread pool busy. Each
#: further chunk in flight costs memory.
_WORKERS: Final = 2


@dataclass
class BatchReport:
    """Counts and timings of one batch, printed by the CLI and kept in Redis.

    ``offsets`` maps each partition read to ``[first, next]``, the offset the
    batch started from and the offset after its last chunk.
    """

    topic: str
    started_at: str
    status: str = "ok"
    read: int = 0
    written: int = 0
    rejected: int = 0
    duplicates: int = 0
    skipped: int = 0
    alerts: int = 0
    chunks: int = 0
    stop_reason: str = "end_of_partitions"
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    bp_status: dict[str, int] = field(default_factory=dict)
    news2_risk: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, list[int]] = field(default_factory=dict)
    duration_s: float = 0.0
    #: The message of the error that ended a batch of status ``failed`` or
    #: ``offset_conflict``. None when the batch ended on its own.
    error: str | None = None

    @property
    def rate_per_s(self) -> float:
        return self.read / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate_per_s": round(self.rate_per_s, 1)}

    def stream_fields(self) -> dict[str, str | int | float]:
        """Flat numeric fields for the reports stream (Grafana charts them)."""
        return {
            "status": self.status,
            "read": self.read,
            "written": self.written,
            "rejected": self.rejected,
            "tombstones": self.rejected_by_reason.get(Reason.TOMBSTONE.value, 0),
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "alerts": self.alerts,
            "duration_s": round(self.duration_s, 3),
            "rate_per_s": round(self.rate_per_s, 1),
        }

    def add(self, chunk: Chunk, result: WriteResult) -> None:
        """Count one written chunk: what the sink wrote, by label."""
        self.chunks += 1
        self.written += result.written
        self.rejected += result.rejected
        self.alerts += result.alerts
        self.skipped += result.skipped
        labelled = {
            "reject_reason": self.rejected_by_reason,
            "bp_status": self.bp_status,
            "news2_risk": self.news2_risk,
        }
        for name, amount in result.counts.items():
            prefix, _, label = name.partition(":")
            if prefix in labelled:
                counts = labelled[prefix]
                counts[label] = counts.get(label, 0) + amount
        for partition, next_offset in chunk.next_offsets.items():
            span = self.offsets.get(str(partition))
            if span is None:
                start = chunk.expected.get(partition)
                if start is None:
                    start = _first_offset(chunk, partition)
                self.offsets[str(partition)] = [start, next_offset]
            else:
                span[1] = max(span[1], next_offset)


def _keep_highest(offsets: dict[int, int], reached: dict[int, int]) -> None:
    """Update each offset of ``offsets`` to the one in ``reached`` where that is higher."""
    for partition, offset in reached.items():
        offsets[partition] = max(offset, offsets.get(partition, offset))


def _first_offset(chunk: Chunk, partition: int) -> int:
    """Return the lowest offset of ``partition`` among the chunk's rows and rejects."""
    offsets = pl.concat(
        [
            chunk.rows.select("partition", "offset"),
            chunk.rejects.select("partition", "offset"),
        ]
    ).filter(pl.col("partition") == partition)["offset"]
    lowest = offsets.min()
    return int(lowest) if isinstance(lowest, int) else chunk.next_offsets[partition]


def process_chunk(
    raw: pl.DataFrame,
    settings: Settings,
    *,
    topic: str,
    now: float,
    expected: dict[int, int | None],
    topic_id: str | None = None,
) -> tuple[Chunk, int]:
    """Turn one raw chunk into rows and rejects; return the chunk and its duplicate count.

    A record delivered twice in the chunk (same partition and offset) is kept once.
    ``topic_id``, when the broker gives one, goes into the source of each reject.
    """
    # Offsets rise within each partition unless Kafka delivered records again.
    # That check costs about a seventh of the hash-based unique.
    rising = raw.select(
        (pl.col("offset").diff().over("partition") > 0).fill_null(True).all()
    ).item()
    unique = (
        raw
        if rising
        else raw.unique(
            subset=["partition", "offset"], keep="first", maintain_order=True
        )
    )
    duplicates = raw.height - unique.height
    next_offsets = _next_offsets(unique)

    # Parse, then apply the input contract: every failure becomes a reject.
    typed, type_rejects = parse(
        unique,
        max_bytes=settings.max_message_bytes,
        now=now,
        max_future_skew_s=settings.max_future_skew_s,
        min_timestamp=settings.min_timestamp,
    )
    readings, contract_rejects = split_valid(typed, InputReading, carry=_CARRY)
    missing = pl.col("reason") == Reason.MISSING_FIELD.value
    contract_rejects = contract_rejects.with_columns(
        pl.when(missing)
        .then(pl.col("field").replace(MESSAGE_FIELD_OF))
        .otherwise(pl.col("field"))
        .alias("field")
    )
    # Polars 2.1 can panic in pl.format on a frame that filtering left with an
    # empty chunk between others ("assertion failed: i < self.len()"); one
    # contiguous chunk avoids it.
    readings = readings.rechunk()

    # Derive the output rows and check them against the output contract.
    derived = transform(
        readings.drop(_CARRY[2]),
        topic=topic,
        rule_set=settings.rule_set,
        time_zone=settings.time_zone,
        with_alert=True,
    )
    derived = pl.concat([derived, readings.select(_CARRY)], how="horizontal")
    rows, output_rejects = split_valid(
        derived,
        OutputRow,
        carry=(*_CARRY, "news2_alert"),
        default_reason=Reason.OUTPUT_CONTRACT,
    )
    if output_rejects.height:
        logger.error(
            "%s rows broke the output contract; they were kept as rejects (%s)",
            output_rejects.height,
            Reason.OUTPUT_CONTRACT.value,
        )

    # In offset order within each partition, as the rows are, whatever step
    # rejected them.
    rejects = pl.concat([type_rejects, contract_rejects, output_rejects]).sort(
        "partition", "offset"
    )
    # Each reject gets its Kafka key and its value as sent (the parser folds
    # the line breaks of multi-line JSON), so that a replay sends the same record.
    if rejects.height:
        rejects = rejects.drop("value").join(
            unique.select("partition", "offset", "value", "key"),
            on=["partition", "offset"],
            how="left",
            maintain_order="left",
        )
    else:
        rejects = rejects.with_columns(pl.lit(None, pl.Binary).alias("key"))
    row_frame = _encode_rows(rows)
    chunk = Chunk(
        rows=row_frame,
        rejects=_encode_rejects(rejects, topic=topic, topic_id=topic_id),
        alerts=row_frame.filter("news2_alert"),
        expected={p: expected.get(p) for p in next_offsets},
        next_offsets=next_offsets,
    )
    return chunk, duplicates


def _encode_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """Serialise each row as compact JSON with the keys in contract order.

    ``struct.json_encode`` writes the same bytes as ``write_ndjson`` at about
    half the cost, with no Python object per row.
    """
    payload = pl.struct(OUTPUT_KEYS).struct.json_encode().cast(pl.Binary)
    return rows.select(
        "partition",
        "offset",
        payload.alias("payload"),
        "blood_pressure_status",
        "news2_risk",
        "news2_alert",
    )


def _encode_rejects(
    rejects: pl.DataFrame, *, topic: str, topic_id: str | None = None
) -> pl.DataFrame:
    """Serialise each reject with its source, Kafka key and raw value, bounded in size.

    A value that is valid UTF-8 is kept as text; any other is kept as base64,
    so the list stays valid JSON and the bytes can be replayed. The Kafka key,
    when not null, is kept the same way and flagged ``key_truncated``. The
    source contains the topic id when there is one: a recreated topic numbers
    its records from 0 again, and the replay uses the id to keep the rejects
    of the old and the new topic apart.
    """
    payloads = []
    columns = ("partition", "offset", "reason", "field", "detail", "key", "value")
    for partition, offset, reason, field_name, detail, key, value in rejects.select(
        columns
    ).iter_rows():
        source: dict[str, Any] = {
            "topic": topic,
            "partition": partition,
            "offset": offset,
        }
        if topic_id is not None:
            source["topic_id"] = topic_id
        document: dict[str, Any] = {
            "reason": reason,
            "field": field_name,
            "detail": detail,
            "source": source,
        }
        if key is not None:
            document.update(_reject_bytes(key, "key"))
        if value is not None:
            document.update(_reject_bytes(value, "payload"))
        payloads.append(orjson.dumps(document))
    return rejects.select(
        "partition", "offset", pl.Series("payload", payloads, pl.Binary), "reason"
    )


def _reject_bytes(data: bytes, name: str) -> dict[str, Any]:
    """Return ``data`` as the reject fields ``name`` (text) or ``name_base64``, cut in size.

    The ``name_truncated`` field is true when the bytes were cut at
    :data:`REJECT_PAYLOAD_BYTES`.
    """
    head = data[:REJECT_PAYLOAD_BYTES]
    truncated = len(data) > REJECT_PAYLOAD_BYTES
    # A cut through a multi-byte character drops that character, so long
    # UTF-8 text stays text instead of turning into base64.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        fields: dict[str, Any] = {name: decoder.decode(head, final=not truncated)}
    except UnicodeDecodeError:
        fields = {f"{name}_base64": _base64(head)}
    fields[f"{name}_truncated"] = truncated
    return fields


def _base64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _advance(expected: dict[int, int | None], next_offsets: dict[int, int]) -> None:
    """Move the expected stored offsets forward; a chunk of redelivered records never moves them back."""
    for partition, next_offset in next_offsets.items():
        expected[partition] = max(next_offset, expected.get(partition) or 0)


def _start_offsets(
    source: KafkaSource, sink: RedisSink
) -> tuple[dict[int, int], dict[int, int]]:
    """Return (start offset per partition, offsets stored in Redis).

    Redis offsets win. Kafka's committed offsets serve partitions that Redis
    has never seen, and the rest start at the earliest offset, so records
    produced before the group existed are read on the first run.
    """
    partitions = source.partitions()
    topic = source.topic
    stored = sink.stored_offsets(topic)
    recorded = sink.stored_topic_id(topic)
    if recorded is not None or sink.last_write_id(topic) is not None:
        sink.expect_known(topic)
    elif partitions and not stored:
        _check_offsets_kept(source, sink, partitions)
    replaced = _check_same_topic(source, sink, stored, recorded) if partitions else None
    if replaced is not None:
        stored = _adopt_new_topic(source, sink, partitions, replaced)
    missing = [p for p in partitions if p not in stored]
    committed = source.committed(missing) if missing else {}
    start = {p: stored.get(p, committed.get(p, OFFSET_BEGINNING)) for p in partitions}
    return start, stored


def _check_offsets_kept(
    source: KafkaSource, sink: RedisSink, partitions: list[int]
) -> None:
    """Fail when Redis stores nothing of the topic but the group's commits would skip records.

    Called when Redis stores no offset, topic id or last write id of the
    topic. A Redis restarted without persistence, a FLUSHDB or an eviction
    deletes the offsets hash with the rows, while Kafka keeps the group's
    commits. Starting from those commits would leave every reading before
    them out of Redis, with no error. A topic whose offsets
    ``etl services start`` or a documented ``HDEL`` deleted keeps its topic
    id or last write id (the latter on a broker that gives no topic id), so
    it does not get here. A commit at or below the earliest retained offset
    skips nothing and passes.
    """
    topic = source.topic
    committed = source.committed(partitions)
    if not committed:
        return
    earliest = source.earliest_offsets(partitions)
    skipped = {p: o for p, o in sorted(committed.items()) if o > earliest[p]}
    if not skipped:
        return
    positions = ", ".join(
        f"partition {p} at {offset} (earliest {earliest[p]})"
        for p, offset in skipped.items()
    )
    settings = sink.settings
    again = set_offsets_command(settings, topic, {p: earliest[p] for p in partitions})
    # A commit below the earliest offset points at records that retention
    # deleted, so the batch would fail there.
    resume = set_offsets_command(
        settings,
        topic,
        {p: max(committed.get(p, earliest[p]), earliest[p]) for p in partitions},
    )
    msg = (
        f"Redis stores no offsets of topic {topic}, but consumer group "
        f"{settings.kafka_group_id!r} committed offsets past the earliest "
        f"records the broker keeps: {positions}. Redis probably lost its data (a "
        "restart without persistence, a FLUSHDB, an eviction), or VITALS_REDIS_URL "
        "or VITALS_REDIS_OFFSETS_KEY changed. Starting from the commits would "
        "leave the readings before them out of this Redis. To read again what the "
        f"topic keeps, run {again} "
        "and rerun; rows still in the list are then appended a second time. To go "
        "on from the commits, run "
        f"{resume} and rerun (see "
        "docs/operations.md, The delivery guarantee)"
    )
    raise OffsetsOutOfRange(msg)


def _adopt_new_topic(
    source: KafkaSource, sink: RedisSink, partitions: list[int], replaced: str
) -> dict[int, int]:
    """Store the earliest offset of every partition of a topic that Redis knew under another id.

    Kafka's committed offsets of the group may be the old topic's, because
    a batch that ran across a restart of a broker without storage can commit
    its offsets on the restarted broker, after ``etl services start``
    removed them from Redis. With a stored offset for every partition, no later
    batch reads those commits. Returns the offsets stored afterwards.
    """
    topic = source.topic
    earliest = source.earliest_offsets(partitions)
    logger.warning(
        "Topic %s has a new id since Redis stored its offsets; Kafka's committed "
        "offsets of the group may be the old topic's, so the batch stores the "
        "earliest offset of each partition in Redis and starts there",
        topic,
    )
    stored = sink.adopt_topic(topic, earliest, replaced=replaced)
    # Kafka's commits follow Redis. The old topic's would otherwise serve a
    # partition whose field an operator deletes later.
    source.commit(stored)
    return stored


def _check_same_topic(
    source: KafkaSource, sink: RedisSink, stored: dict[int, int], recorded: str | None
) -> str | None:
    """Fail when the stored offsets were written for another topic of the same name.

    ``recorded`` is the topic id that Redis stores with the offsets, if any.

    A deleted and recreated topic, or one of a broker that lost its data,
    starts again at offset 0 under a new topic id. Stored offsets below the
    new end would otherwise make the batch skip the new records silently.
    Offsets stored without an id (by an older version, or after the id field
    was deleted) pass when Kafka still has committed offsets for the group,
    which a recreated topic or a restarted broker without storage has lost,
    unless a batch that ran across the restart committed again.
    Otherwise the sink records the current id with the offsets it writes.

    Returns the id that Redis records when it is another one and Redis
    stores no offsets: the topic is new since Redis's last write (see
    :func:`_adopt_new_topic`). Returns None otherwise.
    """
    current = source.topic_id()
    if current is None:
        return None
    topic = source.topic
    reset_command = reset_offsets_command(sink.settings, topic, stored)
    if stored and recorded not in (None, current):
        msg = (
            f"topic {topic} was recreated: its id is now {current}, while the offsets "
            f"stored in Redis belong to the topic with id {recorded}, so they do not "
            f"apply to its records. Reset them with {reset_command} "
            "(see the README, Operations), then rerun"
        )
        raise OffsetsOutOfRange(msg)
    if stored and recorded is None and not source.committed(sorted(stored)):
        msg = (
            f"the offsets of topic {topic} stored in Redis carry no topic id, and "
            "Kafka has no committed offsets of the group for them: the topic was "
            "probably recreated (or the group changed, or its offsets expired). If "
            f"it was recreated, reset them with {reset_command} "
            "(see the README, Operations). If not, confirm them and rerun. This "
            "command confirms them: "
            f"{sink.cli_command('HSET', sink.offsets_key, topic_id_field(topic), current)}"
        )
        raise OffsetsOutOfRange(msg)
    sink.set_topic_id(topic, current)
    return recorded if not stored and recorded not in (None, current) else None


def run_batch(settings: Settings, *, now: float | None = None) -> BatchReport:
    """Drain the topic once and load every chunk into Redis exactly once.

    Raises ``SourceError`` or ``SinkError`` on infrastructure failure; what was
    written before stays consistent with the stored offsets. A batch that ends
    on an error other than a Redis or settings error still appends its report
    (:func:`_report_failure`).
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    report = BatchReport(
        topic=settings.kafka_topic,
        started_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    )
    sink = RedisSink(settings)
    source: KafkaSource | None = None
    chunks: Prefetcher | None = None
    writer: _WriteBehind | None = None
    failure: Exception | None = None
    interrupted = False
    try:
        sink.check()
        source = KafkaSource(settings, last_written=sink.last_written)
        start, stored = _start_offsets(source, sink)
        if not start:
            return _finish(report, sink, started)
        # Kafka's committed offsets serve lag monitoring, and partitions without
        # a stored offset. They are not committed before the drain confirms
        # them: a stored offset past the end of the log would otherwise become
        # the committed one too, and deleting it from Redis would not reset it.
        source.assign(start)
        sink.rely_on(source.topic, stored)
        expected: dict[int, int | None] = {p: stored.get(p) for p in start}
        # The next chunk drains while this one is processed and written.
        chunks = Prefetcher(
            source,
            chunk_size=settings.chunk_size,
            max_records=settings.max_records,
            deadline=started + settings.deadline_s,
        )
        # Chunk n is written while the next chunks are processed.
        writer = _WriteBehind(sink, source, report)
        processed = _process_ahead(
            chunks,
            settings,
            topic=source.topic,
            now=now,
            expected=expected,
            topic_id=sink.topic_id(source.topic),
        )
        try:
            for chunk, read, duplicates in processed:
                if not writer.submit(chunk, read=read, duplicates=duplicates):
                    break
        finally:
            processed.close()
        writer.finish()
        # Fails when Redis lost offsets after the last write. The last batch to
        # end also leaves Kafka's committed offsets equal to those in Redis, for
        # every partition that the drain confirmed. After a crash between EXEC
        # and a chunk's commit, they lag behind Redis until then. A partition
        # without a stored offset has its start committed again, so that the
        # commit does not expire (offsets.retention.minutes) while it is idle.
        stored = sink.check_offsets_kept(source.topic)
        source.commit_forward(source.confirmed_offsets(stored, start, writer.written))
        chunks.close()
        report.stop_reason = (
            source.stats.stop_reason if report.status == "ok" else report.status
        )
        return _finish(report, sink, started)
    except Exception as error:
        # Not on SIGTERM or Ctrl-C (BaseException), which must end the batch
        # at once, even while Redis hangs.
        failure = error
        raise
    except BaseException:
        interrupted = True
        raise
    finally:
        if writer is not None:
            writer.close()
        if interrupted:
            # No report goes to Redis then, so this warning gives the counts.
            logger.warning(
                "Batch on topic %s stopped before its end, after %s chunk(s): "
                "%s rows, %s rejects and %s alerts written with their offsets",
                report.topic,
                report.chunks,
                report.written,
                report.rejected,
                report.alerts,
            )
        if chunks is not None:
            chunks.close()
        if source is not None:
            source.close()
        # After the writer closed, so that the report counts its last chunk.
        # A write that failed in Redis while the batch failed on another
        # error means Redis may hang too.
        redis_failed = writer is not None and isinstance(writer.unraised, SinkError)
        if failure is not None and not redis_failed:
            _report_failure(report, sink, started, failure)
        sink.close()


def _report_failure(
    report: BatchReport, sink: RedisSink, started: float, error: Exception
) -> None:
    """Append the report of a batch that ``error`` ended, unless Redis itself failed.

    The status is ``offset_conflict`` for stored offsets that moved back or
    vanished, and ``failed`` otherwise. After a Redis failure another write
    would only wait for another timeout, and a settings error is no batch:
    neither gets a report.
    """
    report.status = "offset_conflict" if isinstance(error, OffsetConflict) else "failed"
    report.stop_reason = report.status
    report.error = str(error) or type(error).__name__
    report.duration_s = time.monotonic() - started
    if isinstance(error, SinkError | ConfigurationError):
        return
    try:
        sink.write_report(report.to_dict(), report.stream_fields())
    except Exception:
        logger.warning(
            "Writing the report of the failed batch to Redis failed", exc_info=True
        )


def _process_ahead(
    chunks: Iterable[pl.DataFrame],
    settings: Settings,
    *,
    topic: str,
    now: float,
    expected: dict[int, int | None],
    topic_id: str | None = None,
) -> Generator[tuple[Chunk, int, int], None, None]:
    """Process up to :data:`_WORKERS` chunks at once and yield them in drain order.

    Yields ``(chunk, records read, duplicates)``. Polars releases the GIL, so
    the chunks of two threads overlap on two cores. ``expected`` moves on as
    each raw chunk is taken, from the offsets in that chunk. Closing the
    generator cancels the chunks not started and waits for the others.
    """
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="process") as pool:
        pending: deque[tuple[int, Future[tuple[Chunk, int]]]] = deque()
        try:
            for raw in chunks:
                continued_from = dict(expected)
                _advance(expected, _next_offsets(raw))
                future = pool.submit(
                    process_chunk,
                    raw,
                    settings,
                    topic=topic,
                    now=now,
                    expected=continued_from,
                    topic_id=topic_id,
                )
                pending.append((raw.height, future))
                if len(pending) == _WORKERS:
                    yield _outcome(*pending.popleft())
            while pending:
                yield _outcome(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()


def _outcome(read: int, future: Future[tuple[Chunk, int]]) -> tuple[Chunk, int, int]:
    chunk, duplicates = future.result()
    return chunk, read, duplicates


def _next_offsets(raw: pl.DataFrame) -> dict[int, int]:
    """Return the offset after the last record of each partition in ``raw``."""
    return dict(
        raw.group_by("partition")
        .agg((pl.col("offset").max() + 1).alias("next"))
        .iter_rows()
    )


class _WriteBehind:
    """Write chunks to Redis and commit them to Kafka in a thread, one chunk behind.

    The caller processes chunk n + 1 while the thread writes chunk n; Polars
    and the socket release the GIL, so the two overlap on two cores. The
    thread takes one chunk at a time and the caller waits for it to be free,
    so chunks are written in order and memory grows by one processed chunk.
    The thread stops after a chunk that another batch was writing too
    (status ``concurrent_batch``); its exception is raised again in the
    caller's thread.
    """

    def __init__(
        self, sink: RedisSink, source: KafkaSource, report: BatchReport
    ) -> None:
        self._sink = sink
        self._source = source
        self._report = report
        self._free = threading.Semaphore(1)
        self._queue: queue.SimpleQueue[tuple[Chunk, int, int] | None] = (
            queue.SimpleQueue()
        )
        self._done = threading.Event()
        self._error: BaseException | None = None
        #: The thread's error that :meth:`close` logged instead of raising.
        self.unraised: BaseException | None = None
        #: The next offset per partition after the chunks this batch wrote.
        self.written: dict[int, int] = {}
        self._thread = threading.Thread(
            target=self._run, name="redis-write", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                chunk, read, duplicates = item
                result = self._sink.write_chunk(self._source.topic, chunk)
                self._report.read += read
                self._report.duplicates += duplicates
                self._report.add(chunk, result)
                if not result.concurrent:
                    # The offsets this chunk wrote. What Redis stores may be more
                    # (another batch) or wrong (a manual HSET past the end), and
                    # a chunk that met another write may be partly unwritten,
                    # so neither is committed here.
                    # NOTE: the topic id is not checked again here. A topic
                    # recreated between the write and this commit gets the old
                    # offsets. Redis stays right, and the next batch stores the
                    # earliest offsets while Redis records the old topic's id.
                    self._source.commit(chunk.next_offsets)
                    _keep_highest(self.written, chunk.next_offsets)
                else:
                    self._report.status = "concurrent_batch"
                    logger.warning(
                        "Another batch is writing the same topic; stopping after "
                        "%s chunk(s)",
                        self._report.chunks,
                    )
                    return
                self._free.release()
        except BaseException as exc:  # raised again in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def submit(self, chunk: Chunk, *, read: int, duplicates: int) -> bool:
        """Hand ``chunk`` to the thread once it is free; False once it has stopped."""
        while not self._free.acquire(timeout=_POLL_S):
            if self._done.is_set():
                break
        if self._done.is_set():
            self._raise_error()
            return False
        self._queue.put((chunk, read, duplicates))
        return True

    def finish(self) -> None:
        """Wait until every submitted chunk is written; raise the thread's error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def close(self) -> None:
        """Let the transaction in flight finish, drop the rest and stop the thread.

        A write waiting to retry gives up at once. An error of the thread that
        was not raised in the caller, because the caller failed first, is
        logged here.
        """
        if not self._done.is_set():
            self._sink.cancel()
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            if isinstance(self._error, KeyboardInterrupt):
                # On Ctrl-C, Polars raises KeyboardInterrupt in the thread that
                # runs a query (pola-rs/polars#20961). Nothing failed in Redis.
                logger.warning(
                    "Writing to Redis stopped on the interrupt; each chunk is in "
                    "Redis whole, with its offsets, or not at all"
                )
            elif isinstance(self._error, WriteCancelled):
                logger.warning(
                    "Writing to Redis stopped with the batch: %s", self._error
                )
            else:
                logger.error(
                    "Writing to Redis failed while the batch stopped: %s",
                    str(self._error) or type(self._error).__name__,
                )
            self.unraised, self._error = self._error, None

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _finish(report: BatchReport, sink: RedisSink, started: float) -> BatchReport:
    report.duration_s = time.monotonic() - started
    try:
        sink.write_report(report.to_dict(), report.stream_fields())
    except Exception:
        # The rows and offsets are already committed; a lost report is not a lost row.
        logger.warning("Writing the batch report to Redis failed", exc_info=True)
    logger.info(
        "Batch done: read %s, written %s, rejected %s, duplicates %s, in %.2f s",
        report.read,
        report.written,
        report.rejected,
        report.duplicates,
        report.duration_s,
    )
    return report


# Staged form, for orchestrators: each step reads and writes a staging folder.

MANIFEST: Final = "manifest.json"


#: Suffix of the marker file that a staged load leaves before writing a chunk.
ATTEMPTED: Final = ".attempted"
#: The content of a marker from an older release once its chunk is written.
#: Before that, such a marker contains the write id (:data:`_OLDER_WRITE_ID`).
_WRITTEN: Final = "done"
_OLDER_WRITE_ID: Final = re.compile(r"[0-9a-f]{32}")


def drain_to_staging(
    settings: Settings, staging: Path, *, now: float | None = None
) -> dict[str, Any]:
    """Drain the topic into Arrow IPC chunk files; commit nothing, unless :func:`_adopt_new_topic` runs.

    Returns the manifest (also written to ``staging/manifest.json``): start
    and stored offsets, chunk files and counts.
    """
    staging.mkdir(parents=True, exist_ok=True)
    for old in [*staging.glob("*.arrow"), *staging.glob(f"*{ATTEMPTED}*")]:
        old.unlink()
    started = time.monotonic()
    now = time.time() if now is None else now
    sink = RedisSink(settings)
    source: KafkaSource | None = None
    try:
        sink.check()
        source = KafkaSource(settings, last_written=sink.last_written)
        start, stored = _start_offsets(source, sink)
        files = []
        if start:
            source.assign(start)
            chunks = source.chunks(
                chunk_size=settings.chunk_size,
                max_records=settings.max_records,
                deadline=started + settings.deadline_s,
            )
            for index, raw in enumerate(chunks):
                path = staging / f"raw-{index:05d}.arrow"
                raw.write_ipc(path)
                files.append(path.name)
        manifest = {
            "topic": settings.kafka_topic,
            "now": now,
            "start_offsets": {str(p): o for p, o in start.items()},
            "stored_offsets": {str(p): o for p, o in stored.items()},
            "topic_id": sink.topic_id(settings.kafka_topic),
            # The load fails if Redis loses this topic's fields in between.
            "redis_knew_topic": sink.expects_known(settings.kafka_topic),
            "raw_files": files,
            "read": source.stats.read,
            "stop_reason": source.stats.stop_reason,
            "drain_s": round(time.monotonic() - started, 3),
        }
    finally:
        if source is not None:
            source.close()
        sink.close()
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def transform_staging(settings: Settings, staging: Path) -> dict[str, Any]:
    """Process every raw chunk file into rows, rejects and alerts files.

    Two chunks are processed at once, as in :func:`run_batch`; the files of
    each chunk are written in drain order.
    """
    started = time.monotonic()
    manifest = json.loads((staging / MANIFEST).read_text())
    expected: dict[int, int | None] = {
        int(p): o for p, o in manifest["stored_offsets"].items()
    }
    names: list[str] = manifest["raw_files"]
    totals: Counter[str] = Counter()
    processed = []
    chunks = _process_ahead(
        (pl.read_ipc(staging / name) for name in names),
        settings,
        topic=manifest["topic"],
        now=manifest["now"],
        expected=expected,
        topic_id=manifest.get("topic_id"),
    )
    try:
        for name, (chunk, read, duplicates) in zip(names, chunks, strict=True):
            stem = name.removeprefix("raw-").removesuffix(".arrow")
            for kind in ("rows", "rejects", "alerts"):
                getattr(chunk, kind).write_ipc(staging / f"{kind}-{stem}.arrow")
            meta = {
                "expected": {str(p): o for p, o in chunk.expected.items()},
                "next_offsets": {str(p): o for p, o in chunk.next_offsets.items()},
                "duplicates": duplicates,
                "read": read,
            }
            (staging / f"chunk-{stem}.json").write_text(json.dumps(meta))
            processed.append(stem)
            totals.update(
                rows=chunk.rows.height,
                rejects=chunk.rejects.height,
                duplicates=duplicates,
            )
    finally:
        chunks.close()
    manifest["processed"] = processed
    manifest["transform_s"] = round(time.monotonic() - started, 3)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"chunks": len(processed), **totals}


def load_chunk_file(staging: Path, stem: str) -> Chunk:
    meta = json.loads((staging / f"chunk-{stem}.json").read_text())
    return Chunk(
        rows=pl.read_ipc(staging / f"rows-{stem}.arrow"),
        rejects=pl.read_ipc(staging / f"rejects-{stem}.arrow"),
        alerts=pl.read_ipc(staging / f"alerts-{stem}.arrow"),
        expected={int(p): o for p, o in meta["expected"].items()},
        next_offsets={int(p): o for p, o in meta["next_offsets"].items()},
    )


def load_staging(settings: Settings, staging: Path) -> BatchReport:
    """Write every processed chunk to Redis exactly once, then commit Kafka offsets.

    Safe to retry or repeat: chunks already written are recognised by the
    stored offsets and skipped.
    """
    started = time.monotonic()
    manifest = json.loads((staging / MANIFEST).read_text())
    report = BatchReport(
        topic=manifest["topic"],
        started_at=datetime.fromtimestamp(manifest["now"], UTC).isoformat(
            timespec="seconds"
        ),
        read=manifest["read"],
        stop_reason=manifest["stop_reason"],
    )
    sink = RedisSink(settings)
    drained_id = manifest.get("topic_id")
    if drained_id:
        sink.set_topic_id(manifest["topic"], drained_id)
    # NOTE: a manifest of an older release lacks the field, so its load
    # cannot detect a FLUSHDB since the drain in a partition without a stored
    # offset.
    if manifest.get("redis_knew_topic"):
        sink.expect_known(manifest["topic"])
    # As in run_batch, each write checks every offset stored when the drain began.
    sink.rely_on(
        manifest["topic"],
        {int(p): offset for p, offset in manifest["stored_offsets"].items()},
    )
    source: KafkaSource | None = None
    try:
        sink.check()
        if drained_id:
            source = KafkaSource(settings)
            _check_still_same_topic(source, drained_id)
        # Read before this load's writes replace it.
        last_write = sink.last_write_id(manifest["topic"])
        # The next offset per partition after the chunks this load (or an
        # earlier attempt of it) wrote, and after every staged chunk.
        written: dict[int, int] = {}
        drained: dict[int, int] = {}
        stems: list[str] = manifest.get("processed", [])
        markers = {stem: staging / f"chunk-{stem}{ATTEMPTED}" for stem in stems}
        # Every marker is read before this load's first write replaces the
        # topic's last write id, the only sign that a pending write was applied.
        earlier_writes = {
            stem: _settle_marker(marker, last_write) for stem, marker in markers.items()
        }
        for stem in stems:
            chunk = load_chunk_file(staging, stem)
            _keep_highest(drained, chunk.next_offsets)
            meta = json.loads((staging / f"chunk-{stem}.json").read_text())
            report.duplicates += meta["duplicates"]
            earlier = earlier_writes[stem]
            result = _write_marked(
                sink, manifest["topic"], chunk, markers[stem], earlier
            )
            # The run's report counts the rows of an earlier attempt as written,
            # not as skipped, because they are this run's rows.
            counted = _counted(earlier, result)
            report.add(chunk, counted)
            # A marker of an older release does not say whether another batch
            # wrote the chunk first, so its chunk counts as this run's.
            if not counted.concurrent or earlier is True:
                _keep_highest(written, chunk.next_offsets)
            else:
                report.status = "concurrent_batch"
        if written:
            # Fails when Redis lost offsets after the last write.
            stored = sink.check_offsets_kept(manifest["topic"])
            source = source or KafkaSource(settings)
            if drained_id:
                # Kafka would take the old topic's offsets for the new one's.
                _check_still_same_topic(source, drained_id, written=True)
            source.commit_forward(_staged_commit(stored, drained, written))
    finally:
        if source is not None:
            source.close()
        sink.close()
    # The run's work: its drain, its transform and this load attempt.
    work_s = manifest["drain_s"] + manifest.get("transform_s", 0.0)
    report.duration_s = work_s + time.monotonic() - started
    (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


def _staged_commit(
    stored: dict[int, int], drained: dict[int, int], written: dict[int, int]
) -> dict[int, int]:
    """Return the offsets that a staged load commits, per partition it wrote.

    A partition gets Redis's offset where the staged drain read that far,
    because another batch may have written the later chunks. Past that,
    Redis's offset is either that of a later batch, which committed it
    itself, or a wrong one (a manual HSET), so the partition gets what this
    load wrote. :meth:`KafkaSource.commit_forward` then keeps any group
    commit that is further.
    """
    return {p: stored[p] if stored[p] <= drained[p] else written[p] for p in written}


def _written_by_earlier_attempt(
    marker: Path, last_write: str | None
) -> WriteResult | bool | None:
    """Return what an earlier attempt of this staged load wrote of the chunk of ``marker``.

    Returns None when no earlier attempt applied a write of the chunk, and
    True when one did but its marker, from an older release, does not say
    what it wrote. The marker is a JSON object: ``write_id`` is the last
    write sent, and ``pending`` what that write contains, recorded before
    it was sent. That write was applied if it is ``last_write``, the
    topic's last write when this load started. ``applied`` is what an
    applied write wrote.
    """
    if not marker.exists():
        return None
    try:
        text = marker.read_text().strip()
        if not text.startswith("{"):
            if text in (_WRITTEN, last_write):
                return True
            if _OLDER_WRITE_ID.fullmatch(text) is None:
                msg = "neither JSON nor a write id"
                raise ValueError(msg)
            return None
        state = json.loads(text)
        if state.get("applied") is not None:
            return WriteResult(**state["applied"])
        if state["write_id"] == last_write:
            pending = state.get("pending")
            return WriteResult(**pending) if pending is not None else True
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning(
            "Ignoring the unreadable marker %s (%s): if an earlier attempt wrote "
            "its chunk, the chunk counts as written by another batch",
            marker,
            type(exc).__name__,
        )
    return None


def _settle_marker(marker: Path, last_write: str | None) -> WriteResult | bool | None:
    """Return what an earlier attempt wrote of the chunk of ``marker``, and record it there.

    A write found applied through ``last_write`` is recorded as applied, so
    that a later attempt still finds it once another write replaced
    ``last_write``.
    """
    earlier = _written_by_earlier_attempt(marker, last_write)
    if isinstance(earlier, WriteResult):
        _save_marker(
            marker, {"write_id": None, "pending": None, "applied": asdict(earlier)}
        )
    return earlier


def _counted(earlier: WriteResult | bool | None, result: WriteResult) -> WriteResult:
    """Return what the report counts for a chunk: the earlier write, unless this one wrote.

    This write writes something after an earlier one only when Redis lost
    what the earlier one wrote. What Redis then contains is this write's.
    """
    wrote_nothing = not (result.written or result.rejected or result.alerts)
    return earlier if isinstance(earlier, WriteResult) and wrote_nothing else result


def _write_marked(
    sink: RedisSink,
    topic: str,
    chunk: Chunk,
    marker: Path,
    earlier: WriteResult | bool | None,
) -> WriteResult:
    """Write ``chunk``, keeping in ``marker`` what each write sends and what was applied."""
    state: dict[str, Any] = {
        "write_id": uuid.uuid4().hex,
        "pending": None,
        "applied": asdict(earlier) if isinstance(earlier, WriteResult) else None,
    }

    def record(pending: WriteResult) -> None:
        state["pending"] = asdict(pending)
        _save_marker(marker, state)

    _save_marker(marker, state)
    result = sink.write_chunk(topic, chunk, write_id=state["write_id"], on_send=record)
    state["applied"] = asdict(_counted(earlier, result))
    _save_marker(marker, state)
    return result


def _save_marker(marker: Path, state: dict[str, Any]) -> None:
    """Replace ``marker`` with ``state`` at once, so that a crash leaves the old or the new one."""
    partial = marker.with_name(marker.name + ".tmp")
    with partial.open("w") as file:
        json.dump(state, file)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(marker)


def _check_still_same_topic(
    source: KafkaSource, drained_id: str, *, written: bool = False
) -> None:
    """Fail when the topic was recreated since the staged drain.

    Run before the first write and again before the Kafka commit. Writing the
    staged chunks would store, and committing would hand Kafka, offsets of
    the old topic as if they were the new topic's, so a later batch would
    skip the new topic's first records. ``written`` is true once the chunks
    are in Redis.
    """
    current = source.topic_id()
    if current is not None and current != drained_id:
        done = (
            "The chunks were written under the old topic's id and nothing was "
            "committed to Kafka"
            if written
            else "Nothing was written or committed"
        )
        msg = (
            f"topic {source.topic} was recreated after the staged drain: the chunks "
            f"come from the topic with id {drained_id}, and the topic now has id "
            f"{current}. {done}; the next run checks the stored offsets against "
            "the new topic"
        )
        raise OffsetsOutOfRange(msg)


def report_staging(settings: Settings, staging: Path) -> dict[str, Any]:
    """Append the staged batch's report to the Redis reports stream and return it."""
    data: dict[str, Any] = json.loads((staging / "report.json").read_text())
    report = BatchReport(**{k: v for k, v in data.items() if k != "rate_per_s"})
    sink = RedisSink(settings)
    try:
        sink.check()
        sink.write_report(report.to_dict(), report.stream_fields())
    finally:
        sink.close()
    return report.to_dict()
