"""Send rejected readings back to the Kafka topic, after their cause was fixed.

A reject (an element of ``liste-patients:rejects``) keeps the raw Kafka value:
as text when it was UTF-8, else as base64, cut at 4096 bytes. It keeps the
Kafka key the same way. This module produces those values again with their
keys, read from Redis or from a file of reject JSON lines that an operator
has corrected. The next batch then reads them as new
records, with new offsets; the old rejects stay in place as the audit trail.

Each replayed reject's source (``topic:partition:offset``, then ``:topic id``
when the reject contains one) goes into the set ``<rejects key>:replayed``,
and later replays skip it unless forced. A truncated value, or a tombstone,
cannot be replayed and is counted apart. One replay of a rejects list runs
at a time: it holds the lock ``<rejects key>:replaying``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shlex
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from etl.cli_options import HELP_SETTINGS
from etl.config import is_topic_name
from etl.reasons import Reason
from etl.terminal import counted

if TYPE_CHECKING:
    import redis

    from etl.config import Settings

logger = logging.getLogger(__name__)

REPLAYED_SUFFIX: Final = ":replayed"
#: Suffix of the lock key that lets one replay of a rejects list run at a time.
LOCK_SUFFIX: Final = ":replaying"
#: Seconds after which the lock of a replay that died without releasing it expires.
LOCK_TIMEOUT_S: Final = 900
#: Kafka header that names the record a replayed value was first read from.
REPLAY_HEADER: Final = "vitals-replayed-from"
_PAGE: Final = 1000
#: Most sources named on the command line of the SADD printed after a failure.
_MARKERS_INLINE: Final = 500


class ReplayError(RuntimeError):
    """A reject cannot be read, or the broker did not accept the replayed values."""


class InvalidReject(ReplayError):
    """A line of the ``--file`` file or an element of the rejects list that is not a reject."""


@dataclass
class ReplayReport:
    """Counts of one replay."""

    selected: int = 0
    produced: int = 0
    #: Values a dry run would have produced.
    would_produce: int = 0
    #: Rejects whose value or key was cut at 4096 bytes.
    skipped_truncated: int = 0
    skipped_tombstone: int = 0
    skipped_already_replayed: int = 0
    #: Rejects whose source came earlier in the same replay, as after a
    #: partition was read again. Only the first of them is sent.
    skipped_repeated_source: int = 0
    #: Rejects read from another topic than the one the replay produces to.
    skipped_other_topic: int = 0


def reject_value(reject: dict[str, Any]) -> bytes | None:
    """Return the raw Kafka value kept in a reject, or None when it cannot be replayed."""
    if reject.get("payload_truncated"):
        return None
    if reject.get("payload") is not None:
        return str(reject["payload"]).encode("utf-8")
    if reject.get("payload_base64") is not None:
        return base64.b64decode(reject["payload_base64"], validate=True)
    return None


def reject_key(reject: dict[str, Any]) -> bytes | None:
    """Return the Kafka key kept in a reject, or None when it had none (or null)."""
    if reject.get("key") is not None:
        return str(reject["key"]).encode("utf-8")
    if reject.get("key_base64") is not None:
        return base64.b64decode(reject["key_base64"], validate=True)
    return None


def source_marker(reject: dict[str, Any]) -> str:
    """Return ``topic:partition:offset`` of the record a reject came from.

    The topic id follows as ``:topic id`` when the reject contains one. A
    topic deleted and created again numbers its records from 0 again, so its
    new rejects share offsets with the old topic's but not the id. Kafka
    topic names contain no colon, so the parts of a marker stay apart.
    """
    source = reject["source"]
    marker = f"{source['topic']}:{source['partition']}:{source['offset']}"
    topic_id = source.get("topic_id")
    return marker if topic_id is None else f"{marker}:{topic_id}"


def _replayed_before(client: redis.Redis, key: str, reject: dict[str, Any]) -> bool:
    """Return whether the set ``key`` marks the source of ``reject`` as replayed.

    A marker without the topic id counts too, because earlier releases
    wrote only that form, so a record read again after an upgrade is not
    replayed twice.
    """
    marker = source_marker(reject)
    if client.sismember(key, marker):
        return True
    plain = _plain_marker(reject)
    # NOTE: such a marker may also come from a deleted topic of the same name.
    # The reject is then skipped, and the warning about skipped rejects names --force.
    return plain != marker and bool(client.sismember(key, plain))


class _Sources:
    """The sources of the rejects chosen so far in one replay.

    A source with a topic id matches the same source, or that source
    without an id, as :func:`_replayed_before` does. A source without an id
    matches the same source with any id or none.
    """

    def __init__(self) -> None:
        #: The marker of each source, with its topic id when it has one.
        self._markers: set[str] = set()
        #: The marker of each source without its id.
        self._plain: set[str] = set()

    def seen(self, reject: dict[str, Any]) -> bool:
        plain = _plain_marker(reject)
        if reject["source"].get("topic_id") is None:
            return plain in self._plain
        return source_marker(reject) in self._markers or plain in self._markers

    def add(self, reject: dict[str, Any]) -> None:
        self._markers.add(source_marker(reject))
        self._plain.add(_plain_marker(reject))


def _plain_marker(reject: dict[str, Any]) -> str:
    """Return the marker of ``reject`` without its topic id."""
    return source_marker({"source": {**reject["source"], "topic_id": None}})


def rejects_from_redis(client: redis.Redis, key: str) -> Iterator[dict[str, Any]]:
    """Yield the rejects of the list ``key``, oldest first, a page at a time."""
    start = 0
    while True:
        page = client.lrange(key, start, start + _PAGE - 1)
        for index, raw in enumerate(page, start=start):
            yield _read_reject(raw, f"element {index} of the Redis list {key!r}")
        if len(page) < _PAGE:
            return
        start += _PAGE


def rejects_from_file(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the rejects of a file with one reject JSON object per line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = data[: exc.start].count(b"\n") + 1
        msg = f"{path}:{number} is not a reject JSON object: not UTF-8"
        raise InvalidReject(msg) from None
    # Universal newlines, as when the file is read as text: \n, \r\n or \r.
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        yield _read_reject(line, f"{path}:{number}")


def _read_reject(raw: str | bytes, where: str) -> dict[str, Any]:
    """Decode one reject; raise :class:`InvalidReject` naming ``where`` when it is not one."""
    problem: str | None
    try:
        reject: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON, {exc.msg.lower()} at column {exc.colno}"
    except UnicodeDecodeError as exc:
        problem = str(exc).partition(":")[0]
    except ValueError:
        # An integer longer than sys.get_int_max_str_digits() digits.
        problem = "a number too long to read"
    except RecursionError:
        problem = "arrays or objects nested too deep to read"
    else:
        problem = _reject_problem(reject)
    if problem:
        msg = f"{where} is not a reject JSON object: {problem}"
        raise InvalidReject(msg) from None
    return reject


def _reject_problem(reject: Any) -> str | None:
    """Return what a reject lacks for a replay, or None."""
    if not isinstance(reject, dict):
        return "expected an object as in the rejects list"
    source = reject.get("source")
    if not isinstance(source, dict) or not {"topic", "partition", "offset"} <= set(
        source
    ):
        return "'source' needs 'topic', 'partition' and 'offset'"
    if not isinstance(source["topic"], str) or not is_topic_name(source["topic"]):
        return "'source.topic' must be a Kafka topic name"
    for field in ("partition", "offset"):
        number = source[field]
        # bool is a subclass of int, so true would pass for 1.
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            return f"'source.{field}' must be a whole number of 0 or more"
    topic_id = source.get("topic_id")
    # Python's isprintable() is false for every whitespace but the space.
    if topic_id is not None and not (
        isinstance(topic_id, str)
        and topic_id
        and topic_id.isprintable()
        and " " not in topic_id
    ):
        return "'source.topic_id' must be a string without spaces, or null"
    payload = reject.get("payload")
    if payload is not None and not isinstance(payload, str):
        return "'payload' must be a string"
    has_value = payload is not None or reject.get("payload_base64") is not None
    if not has_value and reject.get("reason") != Reason.TOMBSTONE.value:
        return (
            "'payload' or 'payload_base64' is missing, and only a tombstone has neither"
        )
    for field in ("payload_base64", "key_base64"):
        if reject.get(field) is not None:
            try:
                base64.b64decode(reject[field], validate=True)
            except (TypeError, ValueError):
                return f"'{field}' is not valid base64"
    if reject.get("key") is not None and not isinstance(reject["key"], str):
        return "'key' must be a string or null"
    if reject.get("key") is not None and reject.get("key_base64") is not None:
        return "'key' and 'key_base64' cannot both be set"
    return None


def replay_rejects(
    settings: Settings,
    *,
    reasons: Iterable[str] = (),
    path: Path | None = None,
    dry_run: bool = False,
    force: bool = False,
    all_topics: bool = False,
) -> ReplayReport:
    """Produce the values of the selected rejects to ``settings.kafka_topic`` again, with their keys.

    ``reasons`` limits the replay to these reason codes (all when empty);
    ``path`` reads the rejects from a file instead of Redis. Only rejects read
    from ``settings.kafka_topic`` are replayed, unless ``all_topics``. With
    ``dry_run`` nothing is produced or recorded. Whether or not anything is
    to be sent, the topic must exist on the broker (:func:`_require_topic`).
    """
    import redis as redis_lib

    selected_reasons = set(reasons)
    client = redis_lib.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=settings.redis_timeout_s
    )
    replayed_key = settings.redis_rejects_key + REPLAYED_SUFFIX
    report = ReplayReport()
    lock = None
    # Sources of the values produced that the set of replayed sources lacks.
    unmarked: list[str] = []
    try:
        if not dry_run:
            lock = _lock_replay(client, settings)
        source = (
            rejects_from_file(path)
            if path
            else rejects_from_redis(client, settings.redis_rejects_key)
        )
        batch: list[tuple[str, bytes, bytes | None]] = []
        chosen = _Sources()
        for read, reject in enumerate(source, start=1):
            if lock is not None and read % _PAGE == 0:
                _renew_lock(lock)
            if selected_reasons and reject.get("reason") not in selected_reasons:
                continue
            report.selected += 1
            if not all_topics and reject["source"]["topic"] != settings.kafka_topic:
                report.skipped_other_topic += 1
                continue
            marker = source_marker(reject)
            # A cut value is not the record, and a cut key could send it to
            # another partition.
            if reject.get("payload_truncated") or reject.get("key_truncated"):
                report.skipped_truncated += 1
                continue
            value = reject_value(reject)
            if value is None:
                report.skipped_tombstone += 1
                continue
            if chosen.seen(reject):
                report.skipped_repeated_source += 1
                continue
            if not force and _replayed_before(client, replayed_key, reject):
                report.skipped_already_replayed += 1
                continue
            chosen.add(reject)
            batch.append((marker, value, reject_key(reject)))
        _require_topic(settings)
        if lock is not None:
            _renew_lock(lock)
        if batch and not dry_run:
            _produce(settings, batch)
            unmarked = [marker for marker, _, _ in batch]
            client.sadd(replayed_key, *unmarked)
        if dry_run:
            report.would_produce = len(batch)
        else:
            report.produced = len(batch)
    except redis_lib.ResponseError as exc:
        from etl.sink import missing_database

        missing = missing_database(
            exc, settings.redis_url_redacted, settings.redis_database
        )
        if missing is not None:
            raise missing from exc
        if unmarked or not str(exc).startswith("WRONGTYPE"):
            raise ReplayError(_redis_failed(settings, exc, unmarked)) from exc
        msg = (
            f"the key {settings.redis_rejects_key!r} is not a list, or "
            f"{replayed_key!r} is not a set; check VITALS_REDIS_REJECTS_KEY"
        )
        raise InvalidReject(msg) from exc
    except redis_lib.RedisError as exc:
        raise ReplayError(_redis_failed(settings, exc, unmarked)) from exc
    finally:
        if lock is not None:
            _unlock_replay(lock)
        client.close()
    logger.info("Replay of rejects done: %s", asdict(report))
    return report


def _lock_replay(client: redis.Redis, settings: Settings) -> Any:
    """Take the lock of the rejects list, or raise ReplayError when another replay holds it.

    Two replays at once would both send the rejects that neither had marked
    as replayed yet.
    """
    from etl.sink import redis_cli_command

    key = settings.redis_rejects_key + LOCK_SUFFIX
    lock = client.lock(key, timeout=LOCK_TIMEOUT_S, blocking=False)
    if lock.acquire():
        return lock
    msg = (
        f"another replay of {settings.redis_rejects_key} is running, as the lock "
        f"{key} shows (it expires within {LOCK_TIMEOUT_S} s). Wait for it to end "
        "and run the replay again. If no replay runs, the lock is left by one "
        f"that was killed: remove it with {redis_cli_command(settings, 'DEL', key)}"
    )
    raise ReplayError(msg)


def _renew_lock(lock: Any) -> None:
    """Reset the lock's expiry; raise ReplayError when the lock expired meanwhile."""
    import redis as redis_lib

    try:
        lock.reacquire()
    except redis_lib.exceptions.LockError as exc:
        msg = (
            f"the replay lock {lock.name} expired after {LOCK_TIMEOUT_S} s before "
            "the replay produced anything, so another replay may have started. "
            "Nothing was produced or marked as replayed; run the replay again"
        )
        raise ReplayError(msg) from exc


def _unlock_replay(lock: Any) -> None:
    """Release the replay's lock; log a warning when it expired or cannot be released."""
    import redis as redis_lib

    try:
        lock.release()
    except redis_lib.exceptions.LockError:
        logger.warning(
            "The replay lock %s expired before the replay ended (after %s s)",
            lock.name,
            LOCK_TIMEOUT_S,
        )
    except redis_lib.RedisError as exc:
        logger.warning(
            "Releasing the replay lock %s failed (%s); it expires within %s s",
            lock.name,
            exc,
            LOCK_TIMEOUT_S,
        )


def _redis_failed(settings: Settings, error: Exception, unmarked: list[str]) -> str:
    """Return the message of a Redis failure, with what the replay did before it.

    ``unmarked`` contains the sources of the values produced, which Redis
    failed to mark as replayed.
    """
    from etl.sink import with_connection_advice

    msg = f"Redis at {settings.redis_url_redacted} failed during the replay: {error}"
    msg = with_connection_advice(msg, error, settings).rstrip(".")
    if not unmarked:
        return f"{msg}. Nothing was produced or marked as replayed"
    mark = _mark_command(settings, unmarked)
    return (
        f"{msg}. The values of {counted(len(unmarked), 'reject')} were produced, "
        "but Redis did not mark them as replayed, so a later replay would send "
        f"them again. Once the cause is fixed, mark them with {mark}"
    )


def _mark_command(settings: Settings, markers: list[str]) -> str:
    """Return a shell command that adds ``markers`` to the set of replayed sources.

    Past :data:`_MARKERS_INLINE` markers, which could exceed the length of a
    command line, the markers go to a file that ``xargs`` reads.
    """
    from etl.sink import redis_cli_command

    replayed_key = settings.redis_rejects_key + REPLAYED_SUFFIX
    if len(markers) <= _MARKERS_INLINE:
        return redis_cli_command(settings, "SADD", replayed_key, *markers)
    with tempfile.NamedTemporaryFile(
        "w", prefix="vitals-replayed-", suffix=".txt", delete=False
    ) as file:
        file.write("".join(f"{marker}\n" for marker in markers))
    command = redis_cli_command(settings, "SADD", replayed_key)
    # -o gives redis-cli the terminal, which --askpass reads the password from.
    # It fails where no terminal is, so it is only added for --askpass.
    xargs = "xargs -o" if "--askpass" in shlex.split(command) else "xargs"
    path = shlex.quote(file.name)
    return f"{xargs} -n {_MARKERS_INLINE} {command} < {path}, then delete {path}"


def _produce(settings: Settings, batch: list[tuple[str, bytes, bytes | None]]) -> None:
    from confluent_kafka import KafkaError, KafkaException, Producer

    from etl.config import kafka_client

    # Delivery errors meaning that no broker took the value: it timed out in
    # the producer's queue (message.timeout.ms), or every broker was down.
    no_broker = {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
    }
    producer = kafka_client(Producer, settings.kafka_config())
    failures: list[str] = []
    unreached = 0

    def on_delivery(error: Any, _message: Any) -> None:
        nonlocal unreached
        if error is not None:
            failures.append(str(error))
            if error.code() in no_broker:
                unreached += 1

    try:
        for marker, value, key in batch:
            producer.produce(
                settings.kafka_topic,
                value=value,
                key=key,
                headers={REPLAY_HEADER: marker},
                on_delivery=on_delivery,
            )
            producer.poll(0)
    except (KafkaException, BufferError) as exc:
        msg = f"producing to {settings.kafka_bootstrap_servers} failed: {exc}"
        raise ReplayError(msg) from exc
    timeout_s = settings.kafka_timeout_s * 3
    remaining = producer.flush(timeout_s)
    if remaining or failures:
        # NOTE: nothing is recorded as replayed then, so a rerun may produce
        # some values twice; the Kafka delivery reports name the failures.
        problems = []
        sent = counted(len(batch), "value")
        if remaining:
            problems.append(
                f"{remaining} of {sent} got no acknowledgement within {timeout_s:g} s"
            )
        if failures:
            problems.append(
                f"{len(failures)} of {sent} failed, the first with {failures[0]!r}"
            )
        if remaining or unreached:
            problems.append(
                "check that the broker runs and responds, and that "
                "VITALS_KAFKA_BOOTSTRAP_SERVERS points at it"
            )
        msg = (
            f"producing to the Kafka broker at {settings.kafka_bootstrap_servers}: "
            f"{'; '.join(problems)}. Nothing was marked as replayed"
        )
        raise ReplayError(msg)


def _require_topic(settings: Settings) -> None:
    """Raise :class:`ReplayError` unless the broker has the topic to replay to.

    A broker that creates topics on first use (``auto.create.topics.enable``)
    would otherwise take a misspelt ``--topic`` as a new topic. A misspelt
    topic without ``--all-topics`` would select no reject and end with exit
    code 0. The request names no topic, because a request for one can create
    it on such a broker.
    """
    from confluent_kafka import KafkaException, Producer

    from etl.config import kafka_client

    servers = settings.kafka_bootstrap_servers
    producer = kafka_client(Producer, settings.kafka_config())
    try:
        metadata = producer.list_topics(timeout=settings.kafka_timeout_s)
    except KafkaException as exc:
        msg = (
            f"Kafka broker at {servers} is unreachable or did not answer within "
            f"{settings.kafka_timeout_s:g} s (VITALS_KAFKA_TIMEOUT_S): {exc.args[0]}. "
            "Check that the broker runs and responds, and that "
            "VITALS_KAFKA_BOOTSTRAP_SERVERS points at it. Nothing was produced or "
            "marked as replayed"
        )
        raise ReplayError(msg) from exc
    if settings.kafka_topic not in metadata.topics:
        msg = (
            f"topic {settings.kafka_topic!r} does not exist on the Kafka broker at "
            f"{servers}: check the topic name (VITALS_KAFKA_TOPIC, or --topic). "
            "Nothing was produced or marked as replayed"
        )
        raise ReplayError(msg)


@click.command("replay-rejects", context_settings=HELP_SETTINGS)
@click.option(
    "--reason",
    "reasons",
    multiple=True,
    type=click.Choice([reason.value for reason in Reason]),
    help="Replay only rejects with this reason code (repeatable; default: all).",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read corrected rejects from this JSON-lines file instead of Redis.",
)
@click.option(
    "--dry-run", is_flag=True, help="Count what would be replayed; send nothing."
)
@click.option("--force", is_flag=True, help="Replay rejects that were replayed before.")
@click.option(
    "--all-topics",
    is_flag=True,
    help="Also replay rejects read from other topics (default: the topic only).",
)
@click.option(
    "--topic",
    help="Topic whose rejects are replayed, and that receives them "
    "(default: VITALS_KAFKA_TOPIC). It must exist.",
)
def replay_rejects_command(
    reasons: tuple[str, ...],
    path: Path | None,
    dry_run: bool,
    force: bool,
    all_topics: bool,
    topic: str | None,
) -> None:
    """Produce rejected values to the topic again, for the next batch to read."""
    from etl.cli import settings_or_exit
    from etl.config import ConfigurationError
    from etl.exit_codes import EXIT_CONFIG, EXIT_INFRASTRUCTURE
    from etl.terminal import print_error

    settings = settings_or_exit(kafka_topic=topic)
    try:
        report = replay_rejects(
            settings,
            reasons=reasons,
            path=path,
            dry_run=dry_run,
            force=force,
            all_topics=all_topics,
        )
    except (InvalidReject, ConfigurationError) as exc:
        print_error("replay failed:", exc)
        raise SystemExit(EXIT_CONFIG) from None
    except ReplayError as exc:
        print_error("replay failed:", exc)
        raise SystemExit(EXIT_INFRASTRUCTURE) from None
    click.echo(json.dumps({"topic": settings.kafka_topic, **asdict(report)}, indent=2))
    skipped = report.skipped_already_replayed
    if skipped:
        rejects, pronoun = (
            ("1 reject was not sent because its source is", "it")
            if skipped == 1
            else (f"{skipped} rejects were not sent because their sources are", "them")
        )
        print_error(
            "warning:",
            f"{rejects} in "
            f"{settings.redis_rejects_key}{REPLAYED_SUFFIX}; pass --force to send "
            f"{pronoun} again",
        )
