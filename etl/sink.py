"""Write processed chunks to Redis exactly once.

Each chunk goes in one ``MULTI/EXEC``: the rows (``RPUSH`` of many values per
command), the rejects, the alerts, the counters, and the next offset of every
partition in the offsets hash. ``WATCH`` on that hash makes the transaction
fail if another batch moved the offsets meanwhile; the write is then retried
against the new offsets, dropping records that the other batch already wrote.
So a rerun, a retried task or two concurrent batches never write an offset
twice, and a crash leaves either the whole chunk or nothing.

Each transaction also stores a random write id in the offsets hash (field
``<topic>:last_write``). When a connection error or a timeout hides whether
``EXEC`` ran, the retry reads that field: if it contains the id of the failed
attempt, the chunk is already in Redis and is not written again.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
import polars as pl
import redis
from redis.connection import SSLConnection, parse_url

from etl.config import ENV_PREFIX, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from etl.config import Settings

logger = logging.getLogger(__name__)

#: Values per RPUSH command: about 500k rows/s in a MULTI/EXEC on a 2-core
#: machine, against about 100k/s with one command per row.
VALUES_PER_COMMAND: Final = 10_000
_RETRIES: Final = 5
_RETRY_BASE_S: Final = 0.2
#: How long a batch waits for a Redis that replies LOADING: after a restart,
#: Redis loads its append-only file or snapshot before it serves commands.
LOADING_WAIT_S: Final = 60.0
_LOADING_POLL_S: Final = 0.5
#: Redis's reply to ``SELECT`` with an index at or above its ``databases`` setting.
_DB_OUT_OF_RANGE: Final = "DB index is out of range"
#: The maxmemory-policy values that may evict any key, whether or not it has an
#: expiry: allkeys-lru, allkeys-lfu and allkeys-random (Redis docs, "Key
#: eviction").
_EVICTING_POLICY_PREFIX: Final = "allkeys-"
#: The Redis type of each key that a batch writes, by the setting that names it.
_KEY_TYPES: Final = {
    "redis_offsets_key": "hash",
    "redis_list_key": "list",
    "redis_rejects_key": "list",
    "redis_alerts_key": "list",
    "redis_stats_key": "hash",
    "redis_reports_key": "stream",
}
#: redis-cli options (as redis-cli 7.0 names them) for the TLS query options of a URL.
_REDIS_CLI_TLS_OPTIONS: Final = {
    "ssl_ca_certs": "--cacert",
    "ssl_ca_path": "--cacertdir",
    "ssl_certfile": "--cert",
    "ssl_keyfile": "--key",
}


class SinkError(RuntimeError):
    """Redis is unreachable or rejected a write.

    Each chunk's rows and offsets are one transaction, so Redis stores both or
    neither; after a timeout, Redis may still apply the last transaction.
    """


class RedisFull(SinkError):
    """Redis rejected a write because its used memory is above its ``maxmemory``.

    The message names the fix, so the command line adds no other advice.
    """


class WriteCancelled(SinkError):
    """A write that waited to retry gave up because the batch is stopping."""


class RedisLoading(SinkError):
    """Redis was still loading its data into memory after :data:`LOADING_WAIT_S`.

    The message names the fix, so the command line adds no other advice.
    """


class OffsetConflict(RuntimeError):
    """The stored offsets moved back or vanished during the batch (a reset, or Redis lost data)."""


@dataclass
class Chunk:
    """One processed chunk, ready for Redis.

    ``rows``, ``rejects`` and ``alerts`` are frames with columns partition,
    offset and payload (the JSON bytes); rows also carry blood_pressure_status
    and news2_risk, and rejects their reason, for the counters. ``expected`` is the stored offset this
    chunk continues from per partition (None where nothing was stored), and
    ``next_offsets`` the offset after its last record per partition.
    """

    rows: pl.DataFrame
    rejects: pl.DataFrame
    alerts: pl.DataFrame
    expected: dict[int, int | None]
    next_offsets: dict[int, int]


@dataclass
class WriteResult:
    """Outcome of one chunk write: rows, rejects and alerts written, records skipped.

    ``counts`` contains the fields added to the stats hash (see :func:`counters`),
    so they count what this write added, not what another batch wrote.
    """

    written: int
    rejected: int
    alerts: int
    skipped: int
    concurrent: bool
    counts: dict[str, int] = field(default_factory=dict)


def offset_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def write_id_field(topic: str) -> str:
    """Return the field of the offsets hash that contains the id of the last chunk write."""
    return f"{topic}:last_write"


def topic_id_field(topic: str) -> str:
    """Return the field of the offsets hash that contains the id of the topic the offsets belong to."""
    return f"{topic}:topic_id"


def lists_from_field(topic: str) -> str:
    """Return the field of the offsets hash that marks where the topic's current entries begin.

    Its value is a JSON object. ``topic_id`` is the id of the topic when the
    mark was written. Each list key maps to ``[partition, offset, copies]``,
    or to null before a write under that id pushed an entry to the list.
    ``partition`` and ``offset`` are the source of the first entry pushed.
    ``copies`` counts the entries pushed with that source, more than one when
    the partition was read again from that offset. Entries before the first
    may come from an earlier topic of the same name.
    """
    return f"{topic}:lists_from"


class RedisSink:
    """The Redis side of a batch: stored offsets, chunk writes and reports."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self.client = client or redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
        self._cancelled = threading.Event()
        # Per topic and partition, the offset that this sink's writes stored,
        # or that Redis stored when the batch started (rely_on). Every later
        # write checks that Redis still has at least that much.
        self._relied_on: dict[str, dict[int, int]] = {}
        self._topic_ids: dict[str, str] = {}
        #: Topics whose id or last write id Redis contained when the batch started.
        self._known_topics: set[str] = set()

    @property
    def settings(self) -> Settings:
        """The settings of the Redis this sink writes to."""
        return self._settings

    @property
    def offsets_key(self) -> str:
        """The Redis hash of the stored offsets."""
        return self._settings.redis_offsets_key

    def cli_command(self, *arguments: str) -> str:
        """Return the redis-cli command that runs ``arguments`` on this sink's database."""
        return redis_cli_command(self._settings, *arguments)

    def cancel(self) -> None:
        """Make a write that is waiting to retry give up; a transaction in flight finishes."""
        self._cancelled.set()

    def check(self) -> None:
        """Fail fast, naming the URL with its password masked, when PING fails.

        A database index that the server does not have, or a key of another
        type under a name the batch writes, is a settings error
        (:class:`~etl.config.ConfigurationError`), not an unreachable server.
        """
        url = self._settings.redis_url_redacted
        try:
            try:
                self.client.ping()
            except redis.exceptions.BusyLoadingError as exc:
                self._wait_until_loaded(exc)
                self.client.ping()
        except redis.AuthenticationError as exc:
            msg = (
                f"Redis at {url} rejected the user or password of VITALS_REDIS_URL "
                f"(under Airflow, of the connection redis_default when it is defined): {exc}"
            )
            raise SinkError(msg) from exc
        except redis.ResponseError as exc:
            missing = missing_database(exc, url, self._settings.redis_database)
            if missing is not None:
                raise missing from exc
            msg = f"Redis at {url} replied with an error on connecting: {exc}"
            raise SinkError(msg) from exc
        except redis.RedisError as exc:
            msg = f"Redis at {url} is unreachable: {exc}"
            raise SinkError(with_connection_advice(msg, exc, self._settings)) from exc
        try:
            self._check_key_types()
        except redis.RedisError as exc:
            msg = f"checking the types of the batch's keys at Redis {url} failed: {exc}"
            raise SinkError(msg) from exc
        self._check_eviction_policy()
        self._check_truncated_aof_loading()

    def _check_eviction_policy(self) -> None:
        """Raise SinkError when Redis may evict keys that have no expiry.

        Under an ``allkeys-*`` ``maxmemory-policy``, a Redis that reaches its
        ``maxmemory`` deletes keys of its choice, rows and offsets included,
        and the batches that follow still end ``ok``. Under ``noeviction``
        (Redis's default) a full Redis rejects the write, and the
        ``volatile-*`` policies evict only keys with an expiry, which the
        batch never sets.
        """
        url = self._settings.redis_url_redacted
        try:
            memory = self.client.info("memory")
        except redis.exceptions.NoPermissionError as exc:
            logger.warning(
                "Redis at %s rejected INFO (%s), so its maxmemory-policy was "
                "not checked; allow +info for the batch's user",
                url,
                exc,
            )
            return
        except redis.RedisError as exc:
            msg = f"reading the memory settings of Redis at {url} failed: {exc}"
            raise SinkError(msg) from exc
        policy = str(memory.get("maxmemory_policy", ""))
        if policy.startswith(_EVICTING_POLICY_PREFIX):
            msg = (
                f"Redis at {url} has maxmemory-policy {policy}, so once it reaches "
                "its maxmemory it deletes keys of its choice, rows and stored "
                "offsets included, and readings would be lost with no error. Set "
                "'maxmemory-policy noeviction' (Redis's default) in its "
                "configuration, or use another Redis for the batch"
            )
            raise SinkError(msg)

    def _check_truncated_aof_loading(self) -> None:
        """Warn when Redis keeps an append-only file and would load one that a crash cut.

        redis-server 7.0.15 with ``aof-load-truncated yes``, its default, kept
        the start of a transaction cut by a crash in the file, and replayed it
        with the next transaction after another restart, so a retried chunk
        had its first rows twice. A Redis that does not allow ``INFO`` or
        ``CONFIG GET`` is not checked.
        """
        try:
            if not self.client.info("persistence").get("aof_enabled"):
                return
            setting = self.client.config_get("aof-load-truncated")
        except redis.RedisError as exc:
            logger.debug("aof-load-truncated of Redis not checked: %s", exc)
            return
        if setting.get("aof-load-truncated") == "yes":
            logger.warning(
                "Redis at %s keeps an append-only file with aof-load-truncated "
                "yes, so after a crash cut a transaction short it can load part "
                "of it and write rows twice; set 'aof-load-truncated no' "
                "(docs/operations.md, The delivery guarantee)",
                self._settings.redis_url_redacted,
            )

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """Return the next offset to read per partition, as stored by earlier batches."""
        prefix = f"{topic}:"
        try:
            stored = self.client.hgetall(self._settings.redis_offsets_key)
        except redis.RedisError as exc:
            msg = f"cannot read offsets from Redis at {self._settings.redis_url_redacted}: {exc}"
            raise SinkError(msg) from exc
        offsets = {}
        for name, value in stored.items():
            text = name.decode() if isinstance(name, bytes) else name
            if text.startswith(prefix) and text[len(prefix) :].isdigit():
                offsets[int(text[len(prefix) :])] = int(value)
        return offsets

    def last_written(
        self, topic: str, partitions: list[int], *, max_scan: int = 1_000_000
    ) -> dict[int, int]:
        """Return the highest offset of each of ``partitions`` among the rows and rejects.

        Each list is read from its end, in pages. A partition's entries follow
        its offsets in each list, so the scan of a list stops one chunk past
        the first entry of every partition. It also stops at the first entry
        written under the current topic id (:func:`lists_from_field`), at the
        start of the list, or after ``max_scan`` entries. A partition is
        returned when its highest offset is known in both lists (the scan went
        one chunk past its first entry, or read the list whole) and one of them
        contains it. The others are left out, and all are when Redis fails,
        because the caller then has no exact offset for them.
        """
        found: dict[int, int] = {}
        answered = set(partitions)
        try:
            firsts = self._first_current_entries(topic)
        except SinkError:
            return {}
        for key in (self._settings.redis_list_key, self._settings.redis_rejects_key):
            try:
                highest, known = self._scan_tail(
                    key, topic, set(partitions), max_scan, first=firsts.get(key, ())
                )
            except redis.RedisError:
                return {}
            answered &= known
            for partition, offset in highest.items():
                found[partition] = max(offset, found.get(partition, -1))
        return {p: offset for p, offset in found.items() if p in answered}

    def _scan_tail(
        self,
        key: str,
        topic: str,
        partitions: set[int],
        max_scan: int,
        *,
        first: tuple[int, ...] | None,
    ) -> tuple[dict[int, int], set[int]]:
        """Return the highest offset per partition near the end of ``key``.

        Also returns the partitions whose highest offset in ``key`` is known.
        That is all of them when the scan reached the start of the list, or
        the first entry of the current topic id. With ``first`` equal to
        ``(partition, offset, copies)``, that entry is the ``copies``-th
        entry of ``topic`` with that source, counted from the end. Otherwise
        it is those met at least one chunk before the scan stopped. With
        ``first`` None, no entry of ``topic`` counts, and with ``first`` empty
        (no mark), every entry does.
        """
        if first is None:
            return {}, set(partitions)
        copies_left = first[2] if first else 0
        page = VALUES_PER_COMMAND
        margin = self._settings.chunk_size
        highest: dict[int, int] = {}
        # Entries from the end at which each partition was first met.
        first_seen: dict[int, int] = {}
        scanned = 0
        while True:
            entries = self.client.lrange(key, -scanned - page, -scanned - 1)
            for entry in reversed(entries):
                source = _source_of(entry)
                scanned += 1
                if source is None or source[0] != topic:
                    continue
                partition, offset = source[1], source[2]
                highest[partition] = max(offset, highest.get(partition, -1))
                first_seen.setdefault(partition, scanned - 1)
                if first and (partition, offset) == first[:2]:
                    copies_left -= 1
                    if copies_left == 0:
                        return highest, set(partitions)
            if len(entries) < page:
                return highest, set(partitions)
            known = {
                p
                for p in partitions
                if p in first_seen and scanned - first_seen[p] >= margin
            }
            if known == partitions or scanned >= max_scan:
                return highest, known

    def _first_current_entries(self, topic: str) -> dict[str, tuple[int, ...] | None]:
        """Return, per list key, the source and copies of the first entry under the topic's current id.

        None means that the list has no such entry yet. Without a mark for
        the current id (:func:`lists_from_field`), the result is empty and
        every entry counts.
        """
        text = self._offsets_field(lists_from_field(topic))
        mark = _lists_from_mark(topic, self.stored_topic_id(topic), text)
        if mark is None:
            return {}
        return {
            key: None if source is None else tuple(source)
            for key, source in mark.items()
        }

    def stored_topic_id(self, topic: str) -> str | None:
        """Return the topic id recorded with the stored offsets, if any."""
        return self._offsets_field(topic_id_field(topic))

    def last_write_id(self, topic: str) -> str | None:
        """Return the write id stored by the last transaction on ``topic``."""
        return self._offsets_field(write_id_field(topic))

    def _offsets_field(self, field: str) -> str | None:
        """Return one field of the offsets hash, read with HMGET as the documented ACL allows."""
        try:
            (value,) = self.client.hmget(self._settings.redis_offsets_key, [field])
        except redis.RedisError as exc:
            msg = f"cannot read offsets from Redis at {self._settings.redis_url_redacted}: {exc}"
            raise SinkError(msg) from exc
        return _decoded(value)

    def adopt_topic(
        self, topic: str, offsets: dict[int, int], *, replaced: str
    ) -> dict[int, int]:
        """Store ``offsets`` and the current id of a topic that replaced the one of id ``replaced``.

        Stores them only while Redis still records ``replaced`` and no offset
        of ``topic``, so that two batches cannot both do it. Returns the
        offsets that Redis stores for the topic afterwards.
        """
        topic_id = self._topic_ids[topic]
        key = self._settings.redis_offsets_key
        fields = [offset_field(topic, p) for p in offsets]
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                stored_id, *stored = pipe.hmget(key, [topic_id_field(topic), *fields])
                if _decoded(stored_id) == replaced and all(v is None for v in stored):
                    pipe.multi()
                    pipe.hset(
                        key,
                        mapping={
                            **dict(zip(fields, offsets.values(), strict=True)),
                            topic_id_field(topic): topic_id,
                        },
                    )
                    pipe.execute()
        except redis.WatchError:
            logger.info("Another batch stored offsets of topic %s meanwhile", topic)
        except redis.exceptions.OutOfMemoryError as exc:
            unchanged = f"The batch wrote nothing, and the offsets of topic {topic} are as before"
            raise redis_full(
                exc, self._settings.redis_url_redacted, still_stored=unchanged
            ) from exc
        except redis.RedisError as exc:
            msg = f"cannot store offsets in Redis at {self._settings.redis_url_redacted}: {exc}"
            raise SinkError(msg) from exc
        return self.stored_offsets(topic)

    def expect_known(self, topic: str) -> None:
        """Fail the writes to ``topic`` if Redis loses its topic id and last write id.

        For a batch that started when Redis contained one of them: a partition
        without a stored offset then has no offset whose loss a write could
        see, so a FLUSHDB before the batch's first write would go unnoticed.
        """
        self._known_topics.add(topic)

    def expects_known(self, topic: str) -> bool:
        """Return whether :meth:`expect_known` was called for ``topic``."""
        return topic in self._known_topics

    def set_topic_id(self, topic: str, topic_id: str) -> None:
        """Record ``topic_id`` with the offsets of every later write to ``topic``."""
        self._topic_ids[topic] = topic_id

    def topic_id(self, topic: str) -> str | None:
        """Return the id given to :meth:`set_topic_id`, if any."""
        return self._topic_ids.get(topic)

    def write_chunk(
        self,
        topic: str,
        chunk: Chunk,
        *,
        write_id: str | None = None,
        on_send: Callable[[WriteResult], None] | None = None,
    ) -> WriteResult:
        """Write one chunk in one transaction; retry transient failures safely.

        A retry re-reads the stored offsets, so if an earlier attempt's EXEC
        succeeded before its reply was lost, the retry writes nothing again.
        The transaction stores ``write_id`` (random by default) as the topic's
        last write, which :meth:`last_write_id` returns. ``on_send`` receives
        what each transaction writes just before it is sent, so that a caller
        can keep it for a later process that finds ``write_id`` applied.
        """
        delay = _RETRY_BASE_S
        write_id = write_id or uuid.uuid4().hex
        sent: list[WriteResult] = []
        attempt = 0
        loads = 0
        while attempt < _RETRIES:
            attempt += 1
            try:
                result = self._write_once(
                    topic, chunk, write_id=write_id, sent=sent, on_send=on_send
                )
            except redis.WatchError as exc:
                # redis-py raises WatchError for a lost connection while
                # watching too; only a real conflict has no such cause.
                failure = exc.__context__
                if not isinstance(failure, redis.ConnectionError | redis.TimeoutError):
                    logger.info("Redis transaction not applied (%s); retrying", exc)
                    continue
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failure = exc
            except redis.exceptions.OutOfMemoryError as exc:
                raise redis_full(exc, self._settings.redis_url_redacted) from exc
            except redis.RedisError as exc:
                msg = f"Redis at {self._settings.redis_url_redacted} rejected the write: {exc}"
                raise SinkError(msg) from exc
            else:
                self.rely_on(topic, chunk.next_offsets)
                return result
            if (
                isinstance(failure, redis.exceptions.BusyLoadingError)
                and loads < _RETRIES
            ):
                # Redis restarted and loads its data. The write is tried again
                # once it has, and this attempt does not count.
                loads += 1
                attempt -= 1
                self._wait_until_loaded(failure)
                continue
            self._wait_before_retry(attempt, failure, delay)
            delay *= 2
        msg = (
            f"the Redis transaction at {self._settings.redis_url_redacted} was not "
            f"applied after {_RETRIES} attempts: another batch kept changing the "
            "offsets, or the connection kept dropping; rerun the batch"
        )
        raise SinkError(msg)

    def _wait_until_loaded(self, failure: redis.exceptions.BusyLoadingError) -> None:
        """Wait while Redis loads its data into memory, for up to :data:`LOADING_WAIT_S`.

        Returns once Redis serves a read of the offsets hash, or fails with
        another error, and raises SinkError when it still loads after that
        time or the write is cancelled.
        """
        url = self._settings.redis_url_redacted
        logger.warning(
            "Redis at %s is loading its data into memory; waiting up to %g s",
            url,
            LOADING_WAIT_S,
        )
        deadline = time.monotonic() + LOADING_WAIT_S
        while time.monotonic() < deadline:
            if self._cancelled.wait(_LOADING_POLL_S):
                msg = f"writing to Redis at {url} was cancelled while Redis loaded its data"
                raise WriteCancelled(msg) from failure
            try:
                self.client.exists(self._settings.redis_offsets_key)
                return
            except redis.exceptions.BusyLoadingError as exc:
                failure = exc
            except redis.RedisError:
                return
        info = redis_cli_command(self._settings, "INFO", "persistence")
        msg = (
            f"Redis at {url} was still loading its data into memory after "
            f"{LOADING_WAIT_S:g} s, as it does after a restart ({failure}). Wait "
            f"until {info} shows loading:0, then rerun the batch"
        )
        raise RedisLoading(msg) from failure

    def _wait_before_retry(
        self,
        attempt: int,
        failure: redis.ConnectionError | redis.TimeoutError,
        delay: float,
    ) -> None:
        """Sleep before the next attempt; raise SinkError after the last one or on cancel."""
        if attempt < _RETRIES and not self._cancelled.is_set():
            logger.warning(
                "Redis write attempt %s failed (%s); retrying in %.1f s",
                attempt,
                type(failure).__name__,
                delay,
            )
            if not self._cancelled.wait(delay):
                return
        url = self._settings.redis_url_redacted
        attempts = f"{attempt} attempt{'s' if attempt > 1 else ''}"
        caveat = ""
        if isinstance(failure, redis.TimeoutError):
            caveat = (
                " (Redis may still apply the last transaction, which stores "
                "the chunk's rows together with its offsets)"
            )
        if self._cancelled.is_set():
            msg = f"writing to Redis at {url} was cancelled after {attempts}: {failure}{caveat}"
            raise WriteCancelled(msg) from failure
        msg = f"writing to Redis at {url} failed after {attempts}: {failure}{caveat}"
        raise SinkError(msg) from failure

    def rely_on(self, topic: str, offsets: dict[int, int]) -> None:
        """Check at every later write that Redis stores at least ``offsets``.

        The batch passes the offsets stored when it started, so a partition
        whose offset moves back while the batch drains another one is named
        by the first check that fails, with the others. Each write passes
        the offsets it stored.
        """
        relied_on = self._relied_on.setdefault(topic, {})
        for partition, offset in offsets.items():
            relied_on[partition] = max(offset, relied_on.get(partition, 0))

    def check_offsets_kept(self, topic: str) -> dict[int, int]:
        """Return the stored offsets, raising OffsetConflict if one this sink wrote is gone."""
        stored = self.stored_offsets(topic)
        self._check_still_stored(topic, self._relied_on.get(topic, {}), stored)
        return stored

    def _check_still_stored(
        self, topic: str, relied_on: dict[int, int], stored: Mapping[int, int | None]
    ) -> None:
        """Raise OffsetConflict when Redis lost offsets that this batch relies on.

        ``relied_on`` maps each partition to the offset that the batch stored or
        found, and ``stored`` to what Redis stores now. The message names every
        partition whose offset vanished or, when none did, moved back.
        """
        relied_on = dict(sorted(relied_on.items()))
        vanished = {
            p: offset for p, offset in relied_on.items() if stored.get(p) is None
        }
        if vanished:
            positions = _and_list([f"{p} ({offset})" for p, offset in vanished.items()])
            subject = (
                f"offset of partition {positions}"
                if len(vanished) == 1
                else f"offsets of partitions {positions}"
            )
            msg = (
                f"the stored {subject} vanished from "
                "Redis during the batch (FLUSHDB, a restart without persistence, "
                "eviction, a deleted field, or 'etl services start' after the local "
                "broker restarted without its topics), and the rows written before "
                "it may be gone too; "
                "Kafka's committed offsets follow Redis, so read docs/operations.md "
                "(The delivery guarantee) before rerunning"
            )
            raise OffsetConflict(msg)
        moved = {
            p: offset for p, offset in relied_on.items() if (stored[p] or 0) < offset
        }
        if not moved:
            return
        restore = set_offsets_command(self._settings, topic, moved)
        if len(moved) == 1:
            ((partition, offset),) = moved.items()
            now = stored[partition]
            msg = (
                f"stored offset of partition {partition} moved back from {offset} "
                f"to {now} during the batch (offsets reset?). The next batch reads "
                f"the partition from {now}, so it writes "
                f"{_readings_between(now, offset)} again. If the reset was a "
                f"mistake, put the offset back with {restore}; then rerun the batch"
            )
            raise OffsetConflict(msg)
        moves = _and_list(
            [
                f"partition {p} from {offset} to {stored[p]}"
                for p, offset in moved.items()
            ]
        )
        again = _and_list(
            [
                f"{_readings_between(stored[p], offset)} of partition {p}"
                for p, offset in moved.items()
            ]
        )
        msg = (
            f"stored offsets moved back during the batch (offsets reset?): {moves}. "
            "The next batch reads each partition from its stored offset, so it "
            f"writes {again} again. If the reset was a mistake, put the offsets "
            f"back with {restore}; then rerun the batch"
        )
        raise OffsetConflict(msg)

    def _check_key_types(self) -> None:
        """Raise ConfigurationError if a key that the batch writes has another type.

        Redis still applies the other commands of a transaction when one of
        them fails, so a string under the list's name would let the offsets
        move past rows that were never stored. The offsets hash and the
        reports stream are checked too, so that every key of the wrong type
        gets the same settings error, not Redis's WRONGTYPE reply.
        """
        settings = self._settings
        with self.client.pipeline(transaction=False) as pipe:
            for field in _KEY_TYPES:
                pipe.type(getattr(settings, field))
            found = [_decoded(kind) for kind in pipe.execute()]
        wrong = [
            f"{getattr(settings, field)!r} ({ENV_PREFIX}{field.upper()}) is a "
            f"{kind}, not a {wanted}"
            for (field, wanted), kind in zip(_KEY_TYPES.items(), found, strict=True)
            if kind not in (wanted, "none")
        ]
        if wrong:
            msg = (
                f"Redis at {settings.redis_url_redacted} has keys of another type "
                f"under the names this batch writes: {'; '.join(wrong)}. Rename or "
                "delete them, or set other VITALS_REDIS_*_KEY names"
            )
            # A settings error, not an outage: a retry would fail the same way.
            raise ConfigurationError(msg)

    def _write_once(
        self,
        topic: str,
        chunk: Chunk,
        *,
        write_id: str,
        sent: list[WriteResult],
        on_send: Callable[[WriteResult], None] | None,
    ) -> WriteResult:
        """Write the chunk in one transaction; ``sent`` collects what each attempt sent."""
        settings = self._settings
        self._check_key_types()
        earlier = {
            p: offset
            for p, offset in self._relied_on.get(topic, {}).items()
            if p not in chunk.next_offsets
        }
        partitions = [*chunk.next_offsets, *earlier]
        fields = [offset_field(topic, p) for p in partitions]
        topic_id = self._topic_ids.get(topic)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(settings.redis_offsets_key)  # type: ignore[no-untyped-call]
            *raw, last_write, stored_id, stored_mark = pipe.hmget(
                settings.redis_offsets_key,
                [
                    *fields,
                    write_id_field(topic),
                    topic_id_field(topic),
                    lists_from_field(topic),
                ],
            )
            _check_same_topic_id(topic, topic_id, stored_id)
            if sent and last_write in (write_id, write_id.encode()):
                logger.warning(
                    "The previous write attempt of this chunk was applied although "
                    "its reply was lost; not writing it again"
                )
                return sent[-1]
            found = {
                p: (int(value) if value is not None else None)
                for p, value in zip(partitions, raw, strict=True)
            }
            expected = {p: e for p, e in chunk.expected.items() if e is not None}
            self._check_still_stored(topic, {**earlier, **expected}, found)
            stored = {p: found[p] for p in chunk.next_offsets}
            floors, concurrent = self._floors(topic, chunk, stored)
            # After the checks of each stored offset, which name the partition.
            if topic in self._known_topics and stored_id is None and last_write is None:
                msg = (
                    f"the topic id and last write id of topic {topic} vanished from "
                    "Redis since the batch started (FLUSHDB, a restart without "
                    "persistence, eviction, or deleted fields of the offsets hash), "
                    "and the rows written before may be gone too; Kafka's committed "
                    "offsets follow Redis, so read "
                    "docs/operations.md (The delivery guarantee) before rerunning"
                )
                raise OffsetConflict(msg)

            rows = _after(chunk.rows, floors)
            rejects = _after(chunk.rejects, floors)
            alerts = _after(chunk.alerts, floors)
            advance: dict[str, int | str] = {
                offset_field(topic, p): next_offset
                for p, next_offset in chunk.next_offsets.items()
                if stored[p] is None or next_offset > (stored[p] or 0)
            }
            advance[write_id_field(topic)] = write_id
            if topic_id is not None:
                advance[topic_id_field(topic)] = topic_id
            mark = _marked_after_write(
                topic,
                topic_id,
                stored_mark,
                {settings.redis_list_key: rows, settings.redis_rejects_key: rejects},
            )
            if mark is not None:
                advance[lists_from_field(topic)] = mark

            counts = counters(rows, rejects)
            # WATCH took a connection from the pool; the transaction uses it too.
            connection: Any = pipe.connection
            pack = connection.pack_command
            commands = [
                *rpush_commands(settings.redis_list_key, rows),
                *rpush_commands(settings.redis_rejects_key, rejects),
                *rpush_commands(settings.redis_alerts_key, alerts),
                pack("HSET", settings.redis_offsets_key, *_pairs(advance)),
                *(
                    pack("HINCRBY", settings.redis_stats_key, name, amount)
                    for name, amount in counts.items()
                ),
            ]
            skipped = (
                chunk.rows.height + chunk.rejects.height - rows.height - rejects.height
            )
            result = WriteResult(
                rows.height,
                rejects.height,
                alerts.height,
                skipped,
                concurrent,
                counts,
            )
            sent.append(result)
            if on_send is not None:
                on_send(result)
            try:
                _exec_transaction(connection, commands)
            finally:
                # EXEC ends the WATCH, and an error drops the connection, so the
                # pipeline must not send UNWATCH (it would wait on a stuck Redis).
                pipe.watching = False
        return result

    def _floors(
        self, topic: str, chunk: Chunk, stored: dict[int, int | None]
    ) -> tuple[dict[int, int], bool]:
        """Return the lowest offset still to write per partition, and whether another batch wrote.

        The stored offsets must have passed :meth:`_check_still_stored`.
        """
        floors: dict[int, int] = {}
        concurrent = False
        for partition, expected in chunk.expected.items():
            now = stored.get(partition)
            if now is None:
                floors[partition] = 0
            elif now == expected:
                # Records below the stored offset were written before. A chunk
                # contains them only when Kafka delivered them again.
                floors[partition] = now
            else:
                # Another batch wrote this partition meanwhile: skip what it wrote.
                floors[partition] = now
                concurrent = True
        return floors, concurrent

    def write_report(
        self, report: dict[str, Any], fields: dict[str, str | int | float]
    ) -> None:
        """Append a batch report to the capped reports stream."""
        import json

        entry: dict[str, str | int | float] = {**fields, "report": json.dumps(report)}
        self.client.xadd(
            self._settings.redis_reports_key,
            entry,  # type: ignore[arg-type]
            maxlen=self._settings.redis_reports_maxlen,
            approximate=True,
        )

    def close(self) -> None:
        try:
            self.client.close()
        except redis.RedisError:
            logger.warning("Closing the Redis client failed", exc_info=True)


def with_connection_advice(message: str, error: Exception, settings: Settings) -> str:
    """Return ``message`` with what to check added when ``error`` shows that no Redis replied.

    Nothing may reply within the settings' timeout, or another service
    (an HTTP server, a Kafka broker) may reply with bytes that are not RESP.
    Other errors leave ``message`` as it is.
    """
    if isinstance(error, redis.TimeoutError):
        return (
            f"{message}. Nothing replied within {settings.redis_timeout_s:g} s "
            "(VITALS_REDIS_TIMEOUT_S): check the address and port. The host may "
            "drop the connection, or the process listening there may hang or be "
            "another service than Redis"
        )
    if isinstance(error, redis.exceptions.InvalidResponse):
        return (
            f"{message}. The reply is not in the Redis protocol: another service "
            "than Redis listens there. Check the address and port of VITALS_REDIS_URL"
        )
    return message


def redis_cli_command(settings: Settings, *arguments: str) -> str:
    """Return a shell command that runs ``arguments`` with redis-cli on the Redis of ``settings``.

    The command names the host and port (or socket), TLS, user and database
    of VITALS_REDIS_URL, because redis-cli's defaults (127.0.0.1:6379,
    database 0) may be another server or another database. It never contains
    the password: with a user or password, ``--askpass`` makes redis-cli
    prompt for it.
    """
    options: dict[str, Any] = parse_url(settings.redis_url.get_secret_value())  # type: ignore[no-untyped-call]
    command = ["redis-cli"]
    if "path" in options:
        command += ["-s", options["path"]]
    else:
        command += ["-h", options["host"]]
        if "port" in options:
            command += ["-p", str(options["port"])]
    if options.get("connection_class") is SSLConnection:
        command.append("--tls")
        for name, flag in _REDIS_CLI_TLS_OPTIONS.items():
            if name in options:
                command += [flag, str(options[name])]
        if str(options.get("ssl_cert_reqs", "")).lower() == "none":
            command.append("--insecure")
    if options.get("username"):
        command += ["--user", options["username"]]
    if options.get("username") or options.get("password"):
        command.append("--askpass")
    command += ["-n", str(settings.redis_database), *arguments]
    return shlex.join(command)


def reset_offsets_command(
    settings: Settings, topic: str, partitions: Iterable[int]
) -> str:
    """Return the redis-cli HDEL that deletes the offsets of ``topic`` from the offsets hash.

    The fields are the next offset of each of ``partitions`` and the id of
    the last write. The topic id stays, so that the next batch, finding
    another id and no offsets, stores the earliest offset of every partition
    instead of reading the group's commits in Kafka, which may be the old
    topic's. Without a topic id, it starts each partition at the group's
    committed offset, or at the earliest.
    """
    fields = [offset_field(topic, p) for p in sorted(partitions)]
    fields += [write_id_field(topic)]
    return redis_cli_command(settings, "HDEL", settings.redis_offsets_key, *fields)


def set_offsets_command(settings: Settings, topic: str, offsets: dict[int, int]) -> str:
    """Return the redis-cli HSET that stores ``offsets`` (partition to next offset) of ``topic``.

    The fields follow the order of ``offsets``.
    """
    pairs = [
        item
        for partition, offset in offsets.items()
        for item in (offset_field(topic, partition), str(offset))
    ]
    return redis_cli_command(settings, "HSET", settings.redis_offsets_key, *pairs)


def missing_database(
    error: Exception, url: str, database: int
) -> ConfigurationError | None:
    """Return a settings error when ``error`` is Redis's reply to SELECT of a database it lacks.

    ``url`` is the URL to show, with its password masked.
    """
    if not isinstance(error, redis.ResponseError) or _DB_OUT_OF_RANGE not in str(error):
        return None
    msg = (
        f"Redis at {url} has no database {database}: the database number in "
        "VITALS_REDIS_URL (under Airflow, the 'db' extra of the connection "
        "redis_default when it is defined) must be below the server's "
        "'databases' setting (16 by default)"
    )
    return ConfigurationError(msg)


def redis_full(
    error: redis.exceptions.OutOfMemoryError,
    url: str,
    *,
    still_stored: str = (
        "Nothing of the rejected chunk was written, and the chunks written "
        "before it stay in Redis with their offsets, so the next batch resumes "
        "after them"
    ),
) -> RedisFull:
    """Return the error for Redis's OOM reply to a transaction, with the fix.

    While its used memory is above ``maxmemory``, Redis rejects each write
    command, and then discards the whole transaction (the sink tests check
    this on Redis 7.0.15). ``url`` is the URL to show, with its password
    masked, and ``still_stored`` is the sentence on what Redis still contains.
    """
    reply = str(error).rstrip(".")
    msg = (
        f"Redis at {url} is full and rejected the write ({reply}). Raise its "
        "maxmemory (CONFIG SET maxmemory, and in its configuration file), or "
        "free memory, for example by archiving then trimming the lists, then "
        f"rerun. {still_stored}"
    )
    return RedisFull(msg)


def _check_same_topic_id(
    topic: str, topic_id: str | None, stored_id: bytes | str | None
) -> None:
    """Raise OffsetConflict when the offsets in Redis belong to another topic id.

    Another batch that read the topic after it was recreated stored them, so
    the records of this chunk, read before, are not those of its offsets.
    """
    stored = _decoded(stored_id)
    if topic_id is not None and stored is not None and stored != topic_id:
        msg = (
            f"the offsets of topic {topic} in Redis now belong to the topic with id "
            f"{stored}, while this batch read the topic with id {topic_id}: the topic "
            "was recreated and its records were read again since; this batch's "
            "records are not written. Rerun the batch"
        )
        raise OffsetConflict(msg)


def _decoded(value: bytes | str | None) -> str | None:
    """Return a hash field or value from Redis as text."""
    return value.decode() if isinstance(value, bytes) else value


def _source_of(entry: bytes | str) -> tuple[str, int, int] | None:
    """Return the (topic, partition, offset) of a row or reject, or None for another value."""
    try:
        source = orjson.loads(entry).get("source")
        return str(source["topic"]), int(source["partition"]), int(source["offset"])
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def _lists_from_mark(
    topic: str, topic_id: str | None, text: bytes | str | None
) -> dict[str, list[int] | None] | None:
    """Return the first entry per list key that the mark of ``topic`` holds for ``topic_id``.

    Returns None when there is no mark, or it was written for another id. A
    mark that is not of the expected shape is logged and ignored.
    """
    if topic_id is None or text is None:
        return None
    try:
        mark = json.loads(text)
    except (ValueError, RecursionError):
        mark = None
    if not (isinstance(mark, dict) and isinstance(mark.get("topic_id"), str)):
        mark = None
    sources = {k: v for k, v in (mark or {}).items() if k != "topic_id"}
    if mark is None or not all(v is None or _is_source(v) for v in sources.values()):
        logger.warning(
            "Field %s of the offsets hash is not a valid mark, so it is ignored "
            "until the next write replaces it",
            lists_from_field(topic),
        )
        return None
    if mark["topic_id"] != topic_id:
        return None
    return sources


def _is_source(value: Any) -> bool:
    """Tell whether ``value`` is ``[partition, offset, copies]``, with ``copies`` at least 1."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(type(v) is int and v >= 0 for v in value)
        and value[2] >= 1
    )


def _marked_after_write(
    topic: str,
    topic_id: str | None,
    stored: bytes | str | None,
    pushed: dict[str, pl.DataFrame],
) -> str | None:
    """Return the new mark of where ``topic_id``'s entries begin, or None to keep the stored one.

    ``pushed`` maps each list key to the entries that this write appends.
    The first write under an id, or after the mark was lost, starts a new
    mark. Each list gets the source of the first entry that a write under
    the id pushes to it, and counts the entries pushed again with it.
    """
    # NOTE: writes without a topic id (the broker did not describe the topic)
    # count no copies, and entries removed other than from the head of a list
    # are still counted, so the scan may stop too late or too early.
    if topic_id is None:
        return None
    mark = _lists_from_mark(topic, topic_id, stored)
    changed = mark is None
    sources: dict[str, list[int] | None] = {key: None for key in pushed}
    sources.update(mark or {})
    for key, frame in pushed.items():
        if frame.is_empty():
            continue
        source = sources.get(key)
        if source is None:
            source = [int(frame["partition"][0]), int(frame["offset"][0]), 0]
        partition, offset, copies = source
        again = frame.filter(
            (pl.col("partition") == partition) & (pl.col("offset") == offset)
        ).height
        if again:
            sources[key] = [partition, offset, copies + again]
            changed = True
    if not changed:
        return None
    return json.dumps({"topic_id": topic_id, **sources})


def _after(frame: pl.DataFrame, floors: dict[int, int]) -> pl.DataFrame:
    if frame.is_empty() or not any(floors.values()):
        return frame
    floor = pl.col("partition").replace_strict(floors, default=0, return_dtype=pl.Int64)
    return frame.filter(pl.col("offset") >= floor)


def _readings_between(first: int | None, stop: int) -> str:
    """Name the readings from offset ``first`` up to ``stop``, which is excluded."""
    first = first or 0
    if first == stop - 1:
        return f"the reading at offset {first}"
    return f"the readings from {first} to {stop - 1}"


def _and_list(items: list[str]) -> str:
    """Join ``items`` as an English list: "a", "a and b", "a, b and c"."""
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _pairs(mapping: dict[str, int | str]) -> list[str | int]:
    return [item for pair in mapping.items() for item in pair]


def rpush_commands(key: str, frame: pl.DataFrame) -> list[list[bytes]]:
    """Encode ``RPUSH key payload...`` commands in the Redis protocol (RESP2).

    Polars frames every payload as a bulk string (``$<length>\\r\\n<bytes>\\r\\n``)
    and joins them, :data:`VALUES_PER_COMMAND` per command. redis-py would
    encode each value in Python, which cost more client CPU than all of
    Redis's work on the same values. Payloads that are not UTF-8 take
    an encoder in Python; a null payload raises ValueError.
    """
    if frame.is_empty():
        return []
    if frame["payload"].null_count():
        msg = f"a payload for {key!r} is null; every row, reject and alert needs one"
        raise ValueError(msg)
    try:
        text = frame["payload"].cast(pl.String)
    except pl.exceptions.ComputeError:  # not UTF-8
        return _rpush_commands_per_value(key, frame["payload"].to_list())
    name = key.encode()
    payload = pl.col("payload")
    bulk = pl.concat_str(
        pl.lit("$"),
        payload.str.len_bytes().cast(pl.String),
        pl.lit("\r\n"),
        payload,
        pl.lit("\r\n"),
    )
    payloads = text.to_frame("payload")
    commands = []
    for start in range(0, payloads.height, VALUES_PER_COMMAND):
        part = payloads.slice(start, VALUES_PER_COMMAND)
        # Cast as a Series, outside the query, the joined text needs one copy
        # fewer: inside a query, Polars 2.1 copies a one-value result to cast it.
        joined = part.select(bulk.str.join("")).to_series()
        values = joined.cast(pl.Binary)[0]
        commands.append([_rpush_header(name, part.height), values])
    return commands


def _rpush_commands_per_value(key: str, payloads: list[bytes]) -> list[list[bytes]]:
    """Encode the same commands as :func:`rpush_commands` in Python, for any bytes."""
    name = key.encode()
    commands = []
    for start in range(0, len(payloads), VALUES_PER_COMMAND):
        part = payloads[start : start + VALUES_PER_COMMAND]
        values = b"".join(b"$%d\r\n%s\r\n" % (len(value), value) for value in part)
        commands.append([_rpush_header(name, len(part)), values])
    return commands


def _rpush_header(key: bytes, values: int) -> bytes:
    """Encode the start of an RPUSH command of ``values`` values, up to the first one."""
    return b"*%d\r\n$5\r\nRPUSH\r\n$%d\r\n%s\r\n" % (values + 2, len(key), key)


def _exec_transaction(connection: Any, commands: list[list[bytes]]) -> list[Any]:
    """Send ``MULTI``, the packed ``commands`` and ``EXEC`` at once; return EXEC's replies.

    The connection must hold the ``WATCH``. A transaction that Redis discarded
    raises ``WatchError``, as in redis-py's pipeline. After any error while
    the replies are read, the connection is dropped, so that no reply of this
    transaction is left for a later command.
    """
    packed = [
        *connection.pack_command("MULTI"),
        *(part for command in commands for part in command),
        *connection.pack_command("EXEC"),
    ]
    try:
        connection.send_packed_command(packed, check_health=False)
        # +OK for MULTI, +QUEUED for each command, then EXEC's own reply.
        for _ in range(len(commands) + 1):
            connection.read_response()
        result = connection.read_response()
    except redis.RedisError:
        connection.disconnect()
        raise
    if result is None:
        msg = "Watched variable changed."
        raise redis.WatchError(msg)
    failed = [reply for reply in result if isinstance(reply, redis.ResponseError)]
    if failed:
        raise failed[0]
    return list(result)


def counters(rows: pl.DataFrame, rejects: pl.DataFrame) -> dict[str, int]:
    """Count rows by label and rejects by reason, as fields of the stats hash."""
    found: dict[str, int] = {}
    if rows.height:
        found["written"] = rows.height
    if rejects.height:
        found["rejected"] = rejects.height
    for frame, column, prefix in (
        (rows, "blood_pressure_status", "bp_status"),
        (rows, "news2_risk", "news2_risk"),
        (rejects, "reason", "reject_reason"),
    ):
        if frame.is_empty():
            continue
        for label, amount in frame.group_by(column).len().iter_rows():
            found[f"{prefix}:{label if label is not None else 'none'}"] = amount
    return found
