"""Drain a Kafka topic in bounded chunks with ``assign()`` and end-of-partition events.

The consumer never calls ``subscribe()``: no group membership means no
rebalance can interrupt a batch and no ``max.poll.interval.ms`` eviction. The
group id is only used to commit offsets for lag monitoring.

A partition is drained until its end-of-partition event
(``enable.partition.eof``) and then paused, so records produced during the
batch wait for the next one. The high watermark from a ListOffsets request is
not used: Tansu 0.6 returns the base offset of the last record batch
plus one, which would stop the drain early.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import polars as pl
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    OFFSET_STORED,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from etl.config import kafka_client
from etl.parse import RAW_SCHEMA
from etl.sink import offset_field, redis_cli_command, set_offsets_command

if TYPE_CHECKING:
    from etl.config import Settings

logger = logging.getLogger(__name__)

#: librdkafka settings for a fast drain, measured on a 2-core machine with
#: benchmarks/run.py. A fetch back-off of 10 ms instead of the 1 s default
#: made the drain 1.8 to 2.6 times faster, while 0 ms spins the fetcher and
#: was slower. A short fetch wait makes the end-of-partition event arrive at
#: once. The prefetch queue (20k records per partition, 8 MB) and the fetch
#: sizes are capped, so memory depends on the chunk size, not on the backlog.
#: With 64 MB caps the peak RSS grew by about a quarter from a backlog of 200k
#: records to 2M, and with these by 7 to 13 %, at the same drain rate within
#: noise.
CONSUMER_TUNING: Final[dict[str, Any]] = {
    "fetch.wait.max.ms": 10,
    "fetch.queue.backoff.ms": 10,
    "queued.min.messages": 20_000,
    "queued.max.messages.kbytes": 8_192,
    "max.partition.fetch.bytes": 2 * 1024 * 1024,
    "fetch.max.bytes": 8 * 1024 * 1024,
    "receive.message.max.bytes": 9 * 1024 * 1024,
}

#: Errors after which the broker cannot be reached any more.
FATAL_CODES: Final = {
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError._SSL,
}

#: Properties the exactly-once drain depends on; VITALS_KAFKA_EXTRA cannot change
#: them. "auto.offset.reset=error" turns a stored offset outside the topic (a
#: recreated or truncated topic) into an error instead of a silent jump.
PROTECTED_PROPERTIES: Final[dict[str, Any]] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,
    "auto.offset.reset": "error",
}

#: Names of librdkafka's logical offsets, which are negative numbers. Messages
#: and logs print these names in place of the numbers.
_LOGICAL_OFFSETS: Final = {
    OFFSET_BEGINNING: "earliest",
    OFFSET_END: "latest",
    OFFSET_STORED: "committed",
    OFFSET_INVALID: "unknown",
}

_CONSUME_BATCH: Final = 10_000
_GC_THRESHOLD: Final = 100_000
_CONSUME_TIMEOUT_S: Final = 0.05
#: A pass of the drain loop that takes this much longer than the ``consume()``
#: timeout means that the drain did not run: its process was stopped
#: (SIGSTOP), its virtual machine paused, or it got no CPU. librdkafka returns
#: from ``consume()`` within the timeout whether or not the broker replies.
_PAUSE_S: Final = 1.0


def describe_offsets(offsets: dict[int, int]) -> str:
    """Format offsets by partition for a message, as ``{0: earliest, 1: 5000}``.

    librdkafka marks a logical offset with a negative number, such as -2 for
    the earliest offset, which means nothing to a reader of the message.
    """
    entries = (
        f"{partition}: {_LOGICAL_OFFSETS.get(offset, offset)}"
        for partition, offset in sorted(offsets.items())
    )
    return "{" + ", ".join(entries) + "}"


class SourceError(RuntimeError):
    """The broker cannot be reached, or it failed during the drain."""


class OffsetsOutOfRange(SourceError):
    """The stored offsets do not apply to the topic on the broker (a recreated topic)."""


@dataclass
class DrainStats:
    """Counters of one drain, for the batch report."""

    read: int = 0
    stop_reason: str = "end_of_partitions"


class KafkaSource:
    """A consumer assigned to every partition of one topic, from given offsets."""

    def __init__(
        self,
        settings: Settings,
        *,
        last_written: Callable[[str, list[int]], dict[int, int]] | None = None,
    ) -> None:
        """Make a consumer for ``settings``; ``last_written`` finds written offsets.

        ``last_written(topic, partitions)`` returns the highest offset of
        each partition among the rows and rejects in Redis
        (:meth:`etl.sink.RedisSink.last_written`). The reset advice of a
        failed drain uses it.
        """
        self._settings = settings
        self._topic = settings.kafka_topic
        self._find_written = last_written
        extra = settings.kafka_config()
        overridden = sorted(set(extra) & set(PROTECTED_PROPERTIES))
        if overridden:
            logger.warning(
                "Ignoring Kafka properties the batch must control: %s", overridden
            )
        config = {
            **CONSUMER_TUNING,
            **extra,
            **PROTECTED_PROPERTIES,
            "group.id": settings.kafka_group_id,
            "error_cb": self._on_error,
        }
        self._consumer = kafka_client(Consumer, config)
        self._admin: AdminClient | None = None
        self._commits_failed = False
        self._errors: list[KafkaError] = []
        self._logged_codes: set[int] = set()
        self._partitions: list[int] = []
        self._start: dict[int, int] = {}
        #: Partitions whose start offset the broker confirmed in this drain,
        #: by a record or by the end-of-partition event. A stored offset past
        #: the end of the log gets neither.
        self.confirmed: set[int] = set()
        self.stats = DrainStats()

    @property
    def topic(self) -> str:
        return self._topic

    def _on_error(self, error: KafkaError) -> None:
        # librdkafka retries transport errors itself; keep them to report a stall.
        self._errors.append(error)
        # A lost broker repeats the same error many times a second: log each
        # kind once at WARNING, the repeats at DEBUG.
        level = logging.DEBUG if error.code() in self._logged_codes else logging.WARNING
        self._logged_codes.add(error.code())
        logger.log(level, "Kafka client error: %s", error)

    def partitions(self) -> list[int]:
        """Return the partition ids of the topic.

        Raises SourceError when the broker is unreachable or does not have
        the topic: a misspelt or deleted topic would otherwise give batches
        that end ``ok`` with nothing read, run after run.
        """
        servers = self._settings.kafka_bootstrap_servers
        try:
            metadata = self._consumer.list_topics(
                self._topic, timeout=self._settings.kafka_timeout_s
            )
        except KafkaException as exc:
            # A broker that is stopped (SIGSTOP) or hung accepts connections but
            # never replies, which librdkafka reports as a transport failure too.
            msg = (
                f"Kafka broker at {servers} is unreachable or did not answer within "
                f"{self._settings.kafka_timeout_s:g} s (VITALS_KAFKA_TIMEOUT_S): "
                f"{exc.args[0]}. Check the address and port: a process listening "
                "there may hang or be another service than Kafka"
            )
            raise SourceError(msg) from exc
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None:
            code = topic.error.code() if topic is not None and topic.error else None
            if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                msg = (
                    f"topic {self._topic!r} does not exist on the Kafka broker at "
                    f"{servers}: check the topic name (VITALS_KAFKA_TOPIC, or "
                    "--topic of etl run), or create the topic before the batch "
                    f"runs ('etl generate --count 0 --topic {self._topic}' creates "
                    "it empty, with 3 partitions). A broker without storage, as "
                    "the local one started by 'etl services start', loses its "
                    "topics when it restarts"
                )
                raise SourceError(msg)
            msg = f"cannot read metadata of topic {self._topic!r} from {servers}: {topic.error if topic else 'no metadata'}"
            raise SourceError(msg)
        return sorted(topic.partitions)

    def topic_id(self) -> str | None:
        """Return the topic's id, which a broker gives each new topic (Kafka 2.8+, KIP-516).

        A deleted and recreated topic, or a topic of a broker that keeps no
        data across a restart, gets a new id while its offsets start again
        at 0. Returns None, with a warning, when the broker gives no id or
        cannot describe the topic: a recreated topic then goes unnoticed.
        """
        timeout = self._settings.kafka_timeout_s
        try:
            futures = self._admin_client().describe_topics(
                TopicCollection([self._topic]), request_timeout=timeout
            )
            description = futures[self._topic].result(timeout=timeout + 1)
        except (KafkaException, TimeoutError) as exc:
            logger.warning(
                "Reading the id of topic %s failed (%s); a recreated topic goes unnoticed",
                self._topic,
                exc,
            )
            return None
        topic_id = description.topic_id
        if topic_id is None or (
            topic_id.get_most_significant_bits() == 0
            and topic_id.get_least_significant_bits() == 0
        ):
            logger.warning(
                "Topic %s has no id on the broker (Kafka before 2.8?); a recreated "
                "topic goes unnoticed",
                self._topic,
            )
            return None
        return str(topic_id)

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._settings.kafka_config())
        return self._admin

    def committed(self, partitions: list[int]) -> dict[int, int]:
        """Return the offsets committed in Kafka for the group, where there are any."""
        wanted = [TopicPartition(self._topic, p) for p in partitions]
        try:
            found = self._consumer.committed(
                wanted, timeout=self._settings.kafka_timeout_s
            )
        except KafkaException as exc:
            msg = f"cannot read committed offsets of group {self._settings.kafka_group_id!r}: {exc.args[0]}"
            raise SourceError(msg) from exc
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    def earliest_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Return the earliest offset that the broker still has for each partition.

        Tansu 0.6 returns the right earliest offset, unlike its end offset.
        """
        earliest = {}
        for partition in partitions:
            watermarks = self._watermarks(partition)
            if watermarks is None:
                msg = (
                    f"cannot read the earliest offset of partition {partition} of "
                    f"topic {self._topic} from the Kafka broker at "
                    f"{self._settings.kafka_bootstrap_servers}"
                )
                raise SourceError(msg)
            earliest[partition] = int(watermarks[0])
        return earliest

    def assign(self, start: dict[int, int]) -> None:
        """Assign every partition, each from ``start[p]`` or from the earliest offset."""
        self._partitions = sorted(start)
        self._start = dict(start)
        self._consumer.assign(
            [TopicPartition(self._topic, p, offset) for p, offset in start.items()]
        )
        logger.info(
            "Assigned topic %s partitions %s from offsets %s",
            self._topic,
            self._partitions,
            describe_offsets(start),
        )
        timeout_s = self._settings.kafka_timeout_s
        if self._settings.deadline_s < 2 * timeout_s:
            logger.warning(
                "The deadline (VITALS_DEADLINE_S, or --deadline of etl run: %s s) "
                "is shorter than twice VITALS_KAFKA_TIMEOUT_S "
                "(%s s): a partition that sends nothing ends the drain at the "
                "deadline with a warning instead of failing the batch",
                self._settings.deadline_s,
                timeout_s,
            )

    def chunks(
        self,
        *,
        chunk_size: int,
        max_records: int,
        deadline: float,
        stop: threading.Event | None = None,
    ) -> Generator[pl.DataFrame, None, None]:
        """Yield frames of at most ``chunk_size`` records (:data:`etl.parse.RAW_SCHEMA`).

        The drain ends when every partition has reached its end, after
        ``max_records`` records, or at ``deadline`` (a ``time.monotonic()``
        value), whichever comes first, and ``stats.stop_reason`` names it.
        Setting ``stop`` (from another thread) ends it at once and drops the
        records of the unfinished chunk, which the next batch reads again.
        """
        with _rare_gc():
            yield from self._drain(
                chunk_size=chunk_size,
                max_records=max_records,
                deadline=deadline,
                stop=stop,
            )

    def _drain(
        self,
        *,
        chunk_size: int,
        max_records: int,
        deadline: float,
        stop: threading.Event | None,
    ) -> Generator[pl.DataFrame, None, None]:
        pending = set(self._partitions)
        buffer = _ChunkBuffer()
        last_progress = time.monotonic()
        heard: dict[int, float] = dict.fromkeys(pending, last_progress)
        previous_pass = last_progress
        while pending:
            if stop is not None and stop.is_set():
                self.stats.stop_reason = "stopped"
                return
            if self.stats.read >= max_records:
                self.stats.stop_reason = "record_cap"
                break
            if time.monotonic() >= deadline:
                self.stats.stop_reason = "deadline"
                unconfirmed = sorted(pending - self.confirmed)
                if unconfirmed:
                    # The silent-partition check needs twice the Kafka timeout.
                    logger.warning(
                        "Partitions %s of topic %s sent neither records nor "
                        "their end before the deadline; a deadline longer than "
                        "twice VITALS_KAFKA_TIMEOUT_S (%s s) lets the batch tell "
                        "a hung broker or an offset past the end",
                        unconfirmed,
                        self._topic,
                        self._settings.kafka_timeout_s,
                    )
                break
            wanted = min(
                _CONSUME_BATCH, chunk_size - len(buffer), max_records - self.stats.read
            )
            messages = self._consumer.consume(
                num_messages=wanted, timeout=_CONSUME_TIMEOUT_S
            )
            now = time.monotonic()
            if messages:
                last_progress = now
            # One pass per column instead of one call chain per record: the
            # drain is the stage with the lowest ceiling.
            records = [m for m in messages if m.error() is None]
            buffer.extend(records)
            self.stats.read += len(records)
            partitions = {int(m.partition() or 0) for m in messages}
            heard.update(dict.fromkeys(partitions, now))
            if len(records) < len(messages):
                self.confirmed.update(int(m.partition() or 0) for m in records)
                self._handle_events(messages, pending)
            else:
                self.confirmed.update(partitions)
            # Time in which the process did not run, at any point of this
            # pass, is no silence of the broker. The checks measure up to
            # ``checked``, so the next pass covers a stop after it.
            checked = time.monotonic()
            paused = checked - previous_pass - _CONSUME_TIMEOUT_S
            if paused > _PAUSE_S:
                last_progress += paused
                heard.update({p: at + paused for p, at in heard.items()})
            previous_pass = checked
            self._check_stall(last_progress, now=checked)
            self._check_silent_partitions(pending, heard, now=checked)
            if len(buffer) >= chunk_size:
                yield buffer.flush()
                # Time spent by the consumer of this generator is not silence.
                resumed = time.monotonic()
                heard.update(dict.fromkeys(heard, resumed))
                last_progress = previous_pass = resumed
        if len(buffer):
            yield buffer.flush()
        logger.info(
            "Drained %s records from topic %s (%s)",
            self.stats.read,
            self._topic,
            self.stats.stop_reason,
        )

    def _handle_events(self, messages: list[Any], pending: set[int]) -> None:
        """Pause partitions that reached their end; raise on fatal errors."""
        for message in messages:
            error = message.error()
            if error is None:
                continue
            if error.code() == KafkaError._AUTO_OFFSET_RESET:
                partition = int(message.partition() or 0)
                msg = (
                    f"the stored offset of partition {partition} of topic {self._topic} "
                    f"is outside the data the broker holds ({error.str()}). "
                    f"{self._out_of_range_advice(partition)}"
                )
                raise OffsetsOutOfRange(msg)
            if error.code() == KafkaError._PARTITION_EOF:
                partition = int(message.partition() or 0)
                pending.discard(partition)
                self.confirmed.add(partition)
                # Records produced from now on wait for the next batch.
                self._consumer.pause([TopicPartition(self._topic, partition)])
            else:
                self._raise_if_fatal(error)

    def _raise_if_fatal(self, error: KafkaError) -> None:
        if error.fatal() or error.code() in FATAL_CODES:
            msg = f"Kafka consumer failed on {self._settings.kafka_bootstrap_servers}: {error.str()}"
            raise SourceError(msg)
        logger.warning("Kafka consume error (retried by the client): %s", error.str())

    def _check_silent_partitions(
        self, pending: set[int], heard: dict[int, float], *, now: float
    ) -> None:
        """Fail when a partition sends neither records nor its end for too long.

        With a reachable broker each partition yields records or its
        end-of-partition event within one fetch. A partition that stays silent
        was assigned an offset the broker cannot serve: some brokers, Tansu
        among them, reply to such a fetch with neither records nor an error, which would
        otherwise hold the batch until its deadline.
        """
        limit = 2 * self._settings.kafka_timeout_s
        silent = sorted(p for p in pending if now - heard[p] > limit)
        if silent:
            # Before its first fetch a partition has no position (-1001);
            # the offset it was assigned from is then the one to report.
            positions = {
                tp.partition: tp.offset
                if tp.offset >= 0
                else self._start.get(tp.partition, tp.offset)
                for tp in self._consumer.position(
                    [TopicPartition(self._topic, p) for p in silent]
                )
            }
            msg = (
                f"partitions {silent} of topic {self._topic} on the Kafka broker at "
                f"{self._settings.kafka_bootstrap_servers} sent neither records nor "
                f"their end for {limit:.0f} s from offsets "
                f"{describe_offsets(positions)}. "
                f"{self._reset_advice(silent, lookup=False)}"
            )
            raise SourceError(msg)

    def _out_of_range_advice(self, partition: int) -> str:
        """Say how to reset the stored offset of ``partition``, which the broker does not hold.

        Below the broker's earliest offset, retention deleted the records,
        and the partition can only go on from there. Past its end, it goes
        back as :meth:`_reset_advice` describes.
        """
        stored = self._start.get(partition, -1)
        watermarks = self._watermarks(partition)
        earliest = watermarks[0] if watermarks else -1
        if 0 <= stored < earliest:
            command = redis_cli_command(
                self._settings,
                "HSET",
                self._settings.redis_offsets_key,
                offset_field(self._topic, partition),
                str(earliest),
            )
            return (
                f"The broker deleted the records from offset {stored} to "
                f"{earliest - 1} (retention), so they cannot be read. To go on "
                f"from its earliest record, run {command} and rerun"
            )
        return self._reset_advice([partition], lookup=True)

    def confirmed_offsets(
        self, stored: dict[int, int], start: dict[int, int], written: dict[int, int]
    ) -> dict[int, int]:
        """Return the offsets to commit for the partitions that the drain confirmed.

        A partition with a stored offset gets it when the log reaches it,
        because another batch may have written more. Otherwise a wrong HSET
        put it past the log, and the partition gets the lower of it and the
        offset this batch wrote up to (``written``, or the start offset when
        it wrote nothing). One without a stored offset gets its start offset
        again, so that an idle partition's commit does not expire.
        """
        # A copy: the drain thread may still add to the set.
        offsets = {
            p: self._within_log(p, stored[p], written.get(p, start[p]))
            if p in stored
            else start[p]
            for p in sorted(self.confirmed.copy())
        }
        return {p: offset for p, offset in offsets.items() if offset >= 0}

    def _within_log(self, partition: int, stored: int, written: int) -> int:
        """Return ``stored`` when the log reaches it, else the lower of it and ``written``.

        The end of the log comes from the last fetch response
        (:meth:`_log_end`). Another batch may have stored more than this
        drain reached.
        """
        end = self._log_end(partition, lookup=False)
        if end is not None and 0 <= stored <= end:
            return stored
        return min(stored, written)

    def _reset_advice(self, partitions: list[int], *, lookup: bool) -> str:
        """Say how to move the stored offsets of ``partitions`` back into the log.

        Commands are given only for partitions whose offset is past the end
        of the log (:meth:`_log_end`, which asks the broker with
        ``lookup``). Such a partition goes back to the higher of the offset
        after its last row or reject in Redis, which ``last_written`` finds,
        and Kafka's committed offset. The commit is the last offset that a
        batch wrote or confirmed: higher when an operator skipped records,
        lower when a batch could not commit. Without either, deleting the
        field starts the partition at the earliest offset. When Redis or the
        commit has offsets past the end that the broker reports, that end is
        in doubt, and no command is given. The other partitions keep their
        stored offsets.
        """
        key = self._settings.redis_offsets_key
        ends = {}
        for p in partitions:
            if (end := self._log_end(p, lookup=lookup)) is not None:
                ends[p] = end
        try:
            committed = self.committed(partitions)
        except SourceError:
            committed = None
        if len(ends) < len(partitions):
            return (
                "The broker may be hung or unreachable: it did not answer the "
                "fetches or the offset lookups either. Rerun once it answers"
            )
        if committed is None:
            return (
                "The broker may be hung or unreachable: it did not answer the "
                "request for the group's committed offsets either. Rerun once "
                "it answers"
            )
        # An offset equal to the end is where the next record will be.
        past_end = [p for p, end in ends.items() if self._start.get(p, -1) > end]
        if not past_end:
            return (
                "The broker reports these offsets inside the log, so it is "
                "probably hung: rerun once it answers"
            )
        written = {p: offset + 1 for p, offset in self._last_written(past_end).items()}
        # A batch commits only offsets it wrote or that Redis stored within
        # the log, so a commit above the last entry found is an offset that
        # an operator skipped to. The higher of the two is the target.
        reached = {p: max(written.get(p, -1), committed.get(p, -1)) for p in past_end}
        doubtful = [p for p in past_end if reached[p] > ends[p]]
        if doubtful == past_end:
            return self._doubtful_end(doubtful, ends, reached)
        reset = [p for p in past_end if p not in doubtful]
        targets = {p: reached[p] for p in reset}
        commands = []
        hset = {p: targets[p] for p in reset if targets[p] >= 0}
        if hset:
            commands.append(set_offsets_command(self._settings, self._topic, hset))
        hdel = [offset_field(self._topic, p) for p in reset if targets[p] < 0]
        if hdel:
            commands.append(redis_cli_command(self._settings, "HDEL", key, *hdel))
        advice = (
            f"The broker reports partitions {reset} past the end of the log "
            "(a recreated topic, or a wrong HSET). Move their stored offsets "
            f"back with {' and '.join(commands)}, then rerun. "
            + self._targets_explained(reset, written)
        )
        if doubtful:
            advice += ". " + self._doubtful_end(doubtful, ends, reached)
        return advice

    @staticmethod
    def _targets_explained(reset: list[int], written: dict[int, int]) -> str:
        """Say where the commands of :meth:`_reset_advice` send each partition."""
        if all(p in written for p in reset):
            return (
                "HSET goes to the offset after the partition's last row or "
                "reject in Redis, or to the group's commit in Kafka when an "
                "operator skipped past that row"
            )
        return (
            "HSET goes to the offset after the partition's last row or reject "
            "in Redis where one was found, or to the group's commit in Kafka "
            "when it is higher; HDEL goes to the earliest offset. Where no row "
            "or reject was found, that commit may lag behind Redis after a "
            "batch that was killed or could not commit; the exact offset is "
            "one past the highest source.offset of the partition in the rows "
            "and rejects (see the README, Operations)"
        )

    def _doubtful_end(
        self, partitions: list[int], ends: dict[int, int], reached: dict[int, int]
    ) -> str:
        """Explain why no command is given for ``partitions``, read past the end reported."""
        offsets = {p: reached[p] for p in partitions}
        reported = {p: ends[p] for p in partitions}
        return (
            f"Redis or the group's commits in Kafka show that batches read "
            f"partitions {partitions} up to {describe_offsets(offsets)}, past "
            f"the end that the broker reports ({describe_offsets(reported)}): "
            "the broker lost records, answers wrongly, or the topic was "
            "recreated, so no command is given for them. Check the broker "
            "before moving their offsets"
        )

    def _last_written(self, partitions: list[int]) -> dict[int, int]:
        """Return the highest offset in Redis of each of ``partitions`` that it finds."""
        if self._find_written is None:
            return {}
        try:
            return self._find_written(self._topic, partitions)
        except Exception:  # the advice must not hide the drain's own error
            logger.warning("Reading the last written offsets failed", exc_info=True)
            return {}

    def _log_end(self, partition: int, *, lookup: bool) -> int | None:
        """Return the end offset of ``partition``'s log, or None when it is unknown.

        The end from the last fetch response is right on Tansu and on
        Apache Kafka. Without one, and with ``lookup``, a ListOffsets request
        gives it. Use ``lookup`` only for an offset that the broker reported
        out of range: Tansu 0.6 returns the base offset of the last record
        batch plus one, too low by the size of that batch. A partition that
        Tansu leaves silent past the end has a fetch response anyway.
        """
        try:
            cached = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, partition), cached=True
            )
        except KafkaException:
            cached = None
        if cached is not None and cached[1] >= 0:
            return int(cached[1])
        if not lookup:
            return None
        watermarks = self._watermarks(partition)
        return None if watermarks is None else watermarks[1]

    def _watermarks(self, partition: int) -> tuple[int, int] | None:
        """Return the broker's earliest and end offsets of ``partition``, or None when the request fails."""
        try:
            # None when the request times out.
            return self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, partition),
                timeout=self._settings.kafka_timeout_s,
            )
        except KafkaException:
            return None

    def _check_stall(self, last_progress: float, *, now: float) -> None:
        """Fail when the broker went silent after reporting errors."""
        if not self._errors:
            return
        fatal = [e for e in self._errors if e.fatal() or e.code() in FATAL_CODES]
        if fatal:
            address = self._settings.kafka_bootstrap_servers
            if fatal[0].code() == KafkaError._ALL_BROKERS_DOWN:
                # librdkafka counts a broker that stops responding as down too,
                # as a SIGSTOP of the broker mid-drain shows. Its text can read
                # "0/1 brokers are down" while it reconnects, so the message
                # states the fact in its own words and names only the code.
                msg = (
                    f"Kafka broker at {address} failed: the client lost every "
                    "broker connection, because the broker stopped, or runs but "
                    "stopped responding: frozen or overloaded (librdkafka error "
                    f"{fatal[0].name()})"
                )
            else:
                msg = f"Kafka broker at {address} failed: {fatal[0].str()}"
            raise SourceError(msg)
        stalled_for = now - last_progress
        if stalled_for > self._settings.kafka_timeout_s:
            msg = (
                f"no data from the Kafka broker at {self._settings.kafka_bootstrap_servers} "
                f"for {stalled_for:.0f} s after client errors ({self._errors[-1].str()})"
            )
            raise SourceError(msg)

    def commit(self, offsets: dict[int, int], *, retry: bool = False) -> None:
        """Commit the next offsets in Kafka, for lag monitoring only.

        Redis stores the authoritative offsets, so a failed commit is logged and
        never fails the batch. The commit goes through an admin client with a
        request timeout: the consumer's own commit has none, and with
        librdkafka 2.16 and a broker that stops answering, a synchronous
        commit blocks for good and an asynchronous one blocks ``close()``.
        A failed commit drops the admin client, and a retry makes a new one.
        After one failure the batch stops committing, so a lost broker costs
        one timeout, not one per remaining chunk. With ``retry``, as at the
        end of a batch, the commit is tried again after such a failure.
        """
        if not offsets or (self._commits_failed and not retry):
            return
        timeout = self._settings.kafka_timeout_s
        request = ConsumerGroupTopicPartitions(
            self._settings.kafka_group_id,
            [TopicPartition(self._topic, p, o) for p, o in offsets.items()],
        )
        try:
            futures = self._admin_client().alter_consumer_group_offsets(
                [request], request_timeout=timeout
            )
            for future in futures.values():
                future.result(timeout=timeout + 1)
        except (KafkaException, TimeoutError) as exc:
            self._commits_failed = True
            # A response that arrives after the request timed out aborts
            # librdkafka 2.16 on an assertion (eonce->refcnt > 0, reported as
            # confluentinc/librdkafka#4605). Dropping the client drops its
            # pending requests.
            self._admin = None
            logger.warning(
                "Kafka offset commit failed; no more commits after chunks in "
                "this batch, one more at its end (Redis offsets stay "
                "authoritative): %s",
                exc,
            )

    def commit_forward(self, offsets: dict[int, int]) -> None:
        """Commit ``offsets`` at the end of a batch, where they do not move a commit back.

        A partition whose group commit is already further keeps it: another
        batch that read further committed it, and moving it back would make
        an ``HDEL`` of the stored offset read rows again. Commits equal to
        the stored ones are made again, so that an idle partition's commit
        does not expire. When the commits cannot be read, every offset is
        committed. A batch that commits between the lookup and the commit
        can still be moved back.
        """
        if not offsets:
            return
        try:
            committed = self.committed(sorted(offsets))
        except SourceError as exc:
            # Commit every offset then, so that Kafka's commit does not stay behind Redis.
            logger.warning(
                "Reading the group's commits before the last commit failed: %s", exc
            )
            committed = {}
        self.commit(
            {p: o for p, o in offsets.items() if o >= committed.get(p, -1)},
            retry=True,
        )

    def close(self) -> None:
        self._admin = None
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError):
            logger.warning("Closing the Kafka consumer failed", exc_info=True)


@contextlib.contextmanager
def _rare_gc() -> Iterator[None]:
    """Run the cyclic garbage collector less often while the block runs.

    Every ``consume()`` call creates up to 10k tracked ``Message`` objects, so
    at the default first threshold (700 allocations) the collector ran about
    1,400 times per million records. That cost about 1 CPU-s per million in
    benchmarks/run.py, a third of the drain. Reference counting still frees
    the records; only cycles wait longer.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], _GC_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


class _ChunkBuffer:
    """Column lists for one chunk of records."""

    def __init__(self) -> None:
        self.partitions: list[int] = []
        self.offsets: list[int] = []
        self.keys: list[bytes | None] = []
        self.values: list[bytes | None] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def extend(self, messages: list[Any]) -> None:
        self.partitions.extend([m.partition() for m in messages])
        self.offsets.extend([m.offset() for m in messages])
        self.keys.extend([m.key() for m in messages])
        self.values.extend([m.value() for m in messages])

    def flush(self) -> pl.DataFrame:
        frame = pl.DataFrame(
            {
                "partition": self.partitions,
                "offset": self.offsets,
                "key": self.keys,
                "value": self.values,
            },
            schema=RAW_SCHEMA,
        )
        self.__init__()  # type: ignore[misc]
        return frame


class Prefetcher:
    """Drain chunks in a background thread, one chunk ahead of the caller.

    While the caller parses and writes chunk n, the thread consumes chunk
    n + 1 and waits with it in a queue of one, so memory stays bounded by
    three chunks. Chunks come out in drain order, so the write order per
    partition is that of a plain loop. An exception in the drain is raised
    again in the caller's thread by the iteration; :meth:`close` stops the
    drain and must run before the consumer is closed.
    """

    def __init__(
        self, source: KafkaSource, *, chunk_size: int, max_records: int, deadline: float
    ) -> None:
        self._stop = threading.Event()
        self._chunks = source.chunks(
            chunk_size=chunk_size,
            max_records=max_records,
            deadline=deadline,
            stop=self._stop,
        )
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(
            target=self._drain, name="kafka-drain", daemon=True
        )
        self._thread.start()

    def _drain(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(("chunk", chunk)):
                    return
        except BaseException as exc:  # handed to the caller's thread
            self._put(("error", exc))
        else:
            self._put(("end", None))

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_CONSUME_TIMEOUT_S)
            except queue.Full:
                continue
            return True
        return False

    def __iter__(self) -> Iterator[pl.DataFrame]:
        while True:
            kind, value = self._queue.get()
            if kind == "chunk":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def close(self) -> None:
        """Stop the drain thread and wait for it; safe to call twice."""
        self._stop.set()
        self._thread.join()
        self._chunks.close()
