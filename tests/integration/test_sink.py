"""The sink's transactions against a real redis-server."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from etl.cli import main
from etl.config import ConfigurationError, Settings
from etl.services import free_port, redis_server_binary, start_redis
from etl.sink import (
    VALUES_PER_COMMAND,
    Chunk,
    RedisFull,
    RedisSink,
    SinkError,
    WriteCancelled,
    _exec_transaction,
    topic_id_field,
)
from tests.conftest import Broker, make_settings

pytestmark = pytest.mark.integration

TOPIC = "vitals"


def payload_frame(offsets: range, partition: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "partition": [partition] * len(offsets),
            "offset": list(offsets),
            "payload": [
                json.dumps({"offset": o, "name": "Zoé Ñúñez\r\n"}).encode()
                for o in offsets
            ],
            "blood_pressure_status": ["Normal"] * len(offsets),
            "news2_risk": ["Low"] * len(offsets),
        },
        schema_overrides={"partition": pl.Int32, "payload": pl.Binary},
    )


def rows_chunk(offsets: range, expected: int | None = None) -> Chunk:
    rows = payload_frame(offsets)
    return Chunk(
        rows=rows,
        rejects=pl.DataFrame(
            schema={
                "partition": pl.Int32,
                "offset": pl.Int64,
                "payload": pl.Binary,
                "reason": pl.String,
            }
        ),
        alerts=rows.head(0),
        expected={0: expected},
        next_offsets={0: offsets.stop},
    )


def test_write_chunk_keeps_payload_bytes_and_order(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """More rows than one RPUSH carries: every payload arrives byte for byte, in order."""
    offsets = range(VALUES_PER_COMMAND * 2 + 3)
    chunk = rows_chunk(offsets)
    sink = RedisSink(settings)
    try:
        result = sink.write_chunk(TOPIC, chunk)
    finally:
        sink.close()

    assert result.written == len(offsets)
    stored = redis_client.lrange(settings.redis_list_key, 0, -1)
    assert stored == chunk.rows["payload"].to_list()
    offsets_hash = redis_client.hgetall(settings.redis_offsets_key)
    assert offsets_hash[f"{TOPIC}:0".encode()] == str(offsets.stop).encode()
    stats = redis_client.hgetall(settings.redis_stats_key)
    assert stats[b"written"] == str(len(offsets)).encode()
    assert stats[b"bp_status:Normal"] == str(len(offsets)).encode()


def test_exec_transaction_discarded_when_watched_key_changes(
    settings: Settings, redis_client: redis.Redis
) -> None:
    key = settings.redis_offsets_key
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch(key)  # type: ignore[no-untyped-call]
        redis_client.hset(key, "other", 1)
        connection = pipe.connection
        assert connection is not None
        with pytest.raises(redis.WatchError):
            _exec_transaction(
                connection,
                [connection.pack_command("RPUSH", settings.redis_list_key, b"x")],
            )

    assert redis_client.llen(settings.redis_list_key) == 0


def test_exec_transaction_queue_error_applies_nothing(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A command Redis refuses to queue aborts EXEC; the connection is dropped."""
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch(settings.redis_offsets_key)  # type: ignore[no-untyped-call]
        connection = pipe.connection
        assert connection is not None
        commands = [
            connection.pack_command("RPUSH", settings.redis_list_key, b"x"),
            connection.pack_command("NOSUCHCOMMAND"),
        ]
        with pytest.raises(redis.ResponseError, match="unknown command"):
            _exec_transaction(connection, commands)
        assert connection._sock is None

    assert redis_client.llen(settings.redis_list_key) == 0
    assert redis_client.ping()


#: Each key a batch writes, and the type it must have.
KEY_TYPES = [
    ("offsets", "hash"),
    ("list", "list"),
    ("rejects", "list"),
    ("alerts", "list"),
    ("stats", "hash"),
    ("reports", "stream"),
]


@pytest.mark.parametrize(("kind", "wanted"), KEY_TYPES)
def test_write_chunk_wrong_type_key_writes_nothing(
    settings: Settings, redis_client: redis.Redis, kind: str, wanted: str
) -> None:
    """A foreign string under a name the batch writes: a settings error, no write."""
    key = getattr(settings, f"redis_{kind}_key")
    redis_client.set(key, "not ours")
    sink = RedisSink(settings)
    try:
        with pytest.raises(ConfigurationError) as failure:
            sink.write_chunk(TOPIC, rows_chunk(range(5)))
        assert sink.client.ping()
    finally:
        sink.close()

    variable = f"VITALS_REDIS_{kind.upper()}_KEY"
    assert f"{key!r} ({variable}) is a string, not a {wanted}" in str(failure.value)
    others = [
        getattr(settings, f"redis_{name}_key") for name, _ in KEY_TYPES if name != kind
    ]
    assert redis_client.exists(*others) == 0
    assert redis_client.get(key) == b"not ours"


def sink_check_error(settings: Settings) -> str:
    """Return the message of the SinkError that ``RedisSink.check`` raises."""
    sink = RedisSink(settings)
    try:
        with pytest.raises(SinkError) as failure:
            sink.check()
    finally:
        sink.close()
    return str(failure.value)


def test_sink_check_on_broker_port(broker: Broker) -> None:
    """A Kafka broker accepts the connection but never replies to the PING."""
    url = f"redis://{broker.bootstrap}/0"

    error = sink_check_error(make_settings(broker.bootstrap, url, redis_timeout_s=1.0))

    assert f"Redis at {url} is unreachable" in error
    assert "Nothing replied within 1 s (VITALS_REDIS_TIMEOUT_S)" in error
    assert "another service than Redis" in error


@pytest.mark.parametrize("command", ["show", "reports"])
def test_readers_on_broker_port(broker: Broker, command: str) -> None:
    """The readers give the same advice as the batch when Redis does not reply."""
    url = f"redis://{broker.bootstrap}/0"
    settings = make_settings(broker.bootstrap, url, redis_timeout_s=1.0)
    env = {
        "VITALS_REDIS_URL": url,
        "VITALS_REDIS_TIMEOUT_S": "1",
        "VITALS_REDIS_LIST_KEY": settings.redis_list_key,
        "VITALS_REDIS_REPORTS_KEY": settings.redis_reports_key,
    }

    result = CliRunner().invoke(main, [command], env=env)

    assert result.exit_code == 3, result.output
    assert "Nothing replied within 1 s" in " ".join(result.stderr.split())


@pytest.fixture
def http_url() -> Iterator[str]:
    """A Redis URL at the port of an HTTP server, which replies with an HTTP error."""
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()


def test_sink_check_on_http_port(broker: Broker, http_url: str) -> None:
    """A reply in another protocol than RESP gets the advice to check the port."""
    settings = make_settings(broker.bootstrap, http_url, redis_timeout_s=5.0)

    error = sink_check_error(settings)

    assert "The reply is not in the Redis protocol" in error
    assert "address and port of VITALS_REDIS_URL" in error


@pytest.mark.parametrize("command", ["show", "replay-rejects"])
def test_reader_on_http_port(http_url: str, command: str) -> None:
    env = {"VITALS_REDIS_URL": http_url, "VITALS_REDIS_TIMEOUT_S": "5"}

    result = CliRunner().invoke(main, [command], env=env)

    assert result.exit_code == 3, result.output
    assert "not in the Redis protocol" in " ".join(result.stderr.split())


@pytest.mark.parametrize(("kind", "wanted"), KEY_TYPES)
def test_check_wrong_type_key_is_settings_error(
    settings: Settings, redis_client: redis.Redis, kind: str, wanted: str
) -> None:
    """The check at the start of a batch finds it before anything is read or written."""
    key = getattr(settings, f"redis_{kind}_key")
    if wanted == "list":
        redis_client.set(key, "not ours")
        found = "string"
    else:
        redis_client.rpush(key, "not ours")
        found = "list"
    sink = RedisSink(settings)
    try:
        with pytest.raises(ConfigurationError) as failure:
            sink.check()
    finally:
        sink.close()

    assert f"{key!r} " in str(failure.value)
    assert f"is a {found}, not a {wanted}" in str(failure.value)


@contextmanager
def maxmemory_policy(client: redis.Redis, policy: str) -> Iterator[None]:
    """Set the ``maxmemory-policy`` of the shared test Redis, then restore the default."""
    client.config_set("maxmemory-policy", policy)
    try:
        yield
    finally:
        client.config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_check_rejects_evicting_policy(
    settings: Settings, redis_client: redis.Redis, policy: str
) -> None:
    """A Redis that may evict any key could drop rows and offsets: no batch starts."""
    sink = RedisSink(settings)
    try:
        with (
            maxmemory_policy(redis_client, policy),
            pytest.raises(SinkError) as failure,
        ):
            sink.check()
    finally:
        sink.close()

    assert f"has maxmemory-policy {policy}," in str(failure.value)
    assert "'maxmemory-policy noeviction'" in str(failure.value)


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru", "volatile-ttl"])
def test_check_accepts_policy_sparing_persistent_keys(
    settings: Settings, redis_client: redis.Redis, policy: str
) -> None:
    """The batch's keys have no expiry, so the volatile policies never evict them."""
    sink = RedisSink(settings)
    try:
        with maxmemory_policy(redis_client, policy):
            sink.check()
    finally:
        sink.close()


def test_check_without_info_permission_warns(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A user without INFO still runs batches; the log names the check it skipped."""
    sink = RedisSink(settings)
    denied = redis.exceptions.NoPermissionError(
        "no permissions to run the 'info' command"
    )
    try:
        with mock.patch.object(sink.client, "info", side_effect=denied):
            sink.check()
    finally:
        sink.close()

    assert "maxmemory-policy was not checked" in caplog.text
    assert "allow +info" in caplog.text


@dataclass
class FillableRedis:
    """A sink on a redis-server of the test's own, with a client to fill it."""

    url: str
    settings: Settings
    client: redis.Redis
    sink: RedisSink


@pytest.fixture
def noeviction_redis(broker: Broker, tmp_path: Path) -> Iterator[FillableRedis]:
    """A redis-server of the test's own that rejects writes once full."""
    service = start_redis(
        port=free_port(),
        state_dir=tmp_path / "redis",
        extra_args=("--maxmemory-policy", "noeviction"),
    )
    url = f"redis://127.0.0.1:{service.port}/0"
    settings = make_settings(broker.bootstrap, url)
    client = redis.Redis.from_url(url)
    sink = RedisSink(settings)
    try:
        yield FillableRedis(url, settings, client, sink)
    finally:
        sink.close()
        client.close()
        service.stop()


def test_write_chunk_redis_full_names_fix(noeviction_redis: FillableRedis) -> None:
    """Above maxmemory, the rejected chunk writes nothing and the chunk before stays."""
    settings = noeviction_redis.settings
    client = noeviction_redis.client
    sink = noeviction_redis.sink
    sink.write_chunk(TOPIC, rows_chunk(range(0, 100)))
    # One byte, far below the used memory, so Redis rejects every write.
    client.config_set("maxmemory", 1)
    with pytest.raises(RedisFull) as failure:
        sink.write_chunk(TOPIC, rows_chunk(range(100, 200), expected=100))
    rows = client.llen(settings.redis_list_key)
    offset = client.hget(settings.redis_offsets_key, f"{TOPIC}:0")
    written = client.hget(settings.redis_stats_key, "written")

    message = str(failure.value)
    assert "command not allowed when used memory > 'maxmemory'" in message
    assert "Raise its maxmemory" in message
    assert "free memory" in message
    assert noeviction_redis.url in message
    assert rows == 100
    assert offset == b"100"
    assert written == b"100"


def test_adopt_topic_redis_full_names_fix(noeviction_redis: FillableRedis) -> None:
    """Above maxmemory, the offsets of a recreated topic stay those of the old one."""
    settings = noeviction_redis.settings
    client = noeviction_redis.client
    sink = noeviction_redis.sink
    client.hset(settings.redis_offsets_key, topic_id_field(TOPIC), "old-id")
    sink.set_topic_id(TOPIC, "new-id")
    client.config_set("maxmemory", 1)
    with pytest.raises(RedisFull) as failure:
        sink.adopt_topic(TOPIC, {0: 0, 1: 0}, replaced="old-id")
    stored = client.hgetall(settings.redis_offsets_key)

    message = str(failure.value)
    assert "Raise its maxmemory" in message
    assert f"the offsets of topic {TOPIC} are as before" in message
    assert stored == {topic_id_field(TOPIC).encode(): b"old-id"}


def test_write_chunk_cancel_stops_retries(settings: Settings) -> None:
    """A write that waits to retry gives up at once when the sink is cancelled."""
    sink = RedisSink(settings)
    attempts: list[float] = []

    def fail_and_cancel(*args: object, **kwargs: object) -> None:
        attempts.append(time.monotonic())
        sink.cancel()
        raise redis.ConnectionError("injected: connection reset")

    try:
        with (
            mock.patch.object(sink, "_write_once", fail_and_cancel),
            pytest.raises(SinkError, match="after 1 attempt:"),
        ):
            sink.write_chunk(TOPIC, rows_chunk(range(3)))
    finally:
        sink.close()

    assert len(attempts) == 1


def test_write_chunk_watch_lost_connection_backs_off(settings: Settings) -> None:
    """redis-py reports a lost connection under WATCH as WatchError: retried with back-off."""
    sink = RedisSink(settings)

    def lose_connection_while_watching(*args: object, **kwargs: object) -> None:
        try:
            raise redis.ConnectionError("injected: connection reset")
        except redis.ConnectionError:
            msg = "A ConnectionError occurred while watching one or more keys"
            raise redis.WatchError(msg) from None

    try:
        with (
            mock.patch.object(sink, "_write_once", lose_connection_while_watching),
            mock.patch.object(sink._cancelled, "wait", return_value=False) as waits,
            pytest.raises(SinkError, match="after 5 attempts: injected"),
        ):
            sink.write_chunk(TOPIC, rows_chunk(range(3)))
    finally:
        sink.close()

    assert [call.args[0] for call in waits.call_args_list] == [0.2, 0.4, 0.8, 1.6]


def entry(topic: str, partition: int, offset: int) -> bytes:
    source = {"topic": topic, "partition": partition, "offset": offset}
    return json.dumps({"patient_id": "PT-1", "source": source}).encode()


def test_last_written_highest_of_both_lists(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Rows and rejects of two topics: each partition gets its highest offset in either list."""
    rows = [entry(TOPIC, p, o) for o in range(0, 30) for p in (0, 1)]
    rows += [entry("other", 0, 500), b"not json", b'{"source": null}']
    # Rejects of one chunk in the order an older version wrote them.
    rejects = [entry(TOPIC, 1, 41), entry(TOPIC, 1, 35), entry(TOPIC, 0, 12)]
    redis_client.rpush(settings.redis_list_key, *rows)
    redis_client.rpush(settings.redis_rejects_key, *rejects)
    sink = RedisSink(settings)
    try:
        found = sink.last_written(TOPIC, [0, 1, 2])
    finally:
        sink.close()

    # Both lists were read whole, so partition 2 has no entry at all.
    assert found == {0: 29, 1: 41}


def test_last_written_stops_one_chunk_past_each_partition(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A long list is read only from its end, so the failure path stays quick."""
    small = settings.model_copy(update={"chunk_size": 100})
    old = [entry(TOPIC, 0, o) for o in range(30_000)]
    redis_client.rpush(small.redis_list_key, *old, entry(TOPIC, 0, 30_000))
    sink = RedisSink(small)
    try:
        with mock.patch.object(
            sink.client, "lrange", wraps=sink.client.lrange
        ) as lrange:
            found = sink.last_written(TOPIC, [0])
        calls = lrange.call_count
        # Partition 5 is in no entry of the first page: a scan cut there
        # cannot tell whether an older one contains it, but partition 0 is known.
        cut_short = sink.last_written(TOPIC, [0, 5], max_scan=VALUES_PER_COMMAND)
    finally:
        sink.close()

    assert found == {0: 30_000}
    # One page of the rows list, and the whole (empty) rejects list.
    assert calls == 2
    assert cut_short == {0: 30_000}


def source_chunk(offsets: range, partition: int = 0) -> Chunk:
    """Return a chunk of rows of ``partition`` whose payloads name their source."""
    chunk = rows_chunk(offsets)
    payloads = [entry(TOPIC, partition, o) for o in offsets]
    chunk.rows = chunk.rows.with_columns(
        pl.lit(partition, pl.Int32).alias("partition"),
        pl.Series("payload", payloads, dtype=pl.Binary),
    )
    chunk.expected = {partition: None}
    chunk.next_offsets = {partition: offsets.stop}
    return chunk


def test_last_written_skips_earlier_topic(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Entries of a deleted topic of the same name, before the new topic's first write, are not counted."""
    redis_client.rpush(
        settings.redis_list_key, *[entry(TOPIC, 0, o) for o in range(3_000)]
    )
    redis_client.rpush(settings.redis_rejects_key, entry(TOPIC, 0, 2_990))
    sink = RedisSink(settings)
    try:
        sink.set_topic_id(TOPIC, "id-of-the-new-topic")
        sink.write_chunk(TOPIC, source_chunk(range(100)))
        after_first = sink.last_written(TOPIC, [0])
        sink.write_chunk(TOPIC, source_chunk(range(100, 150)))
        after_second = sink.last_written(TOPIC, [0])
        # An operator trims the oldest entries: the mark does not depend on indices.
        redis_client.ltrim(settings.redis_list_key, 1_000, -1)
        after_trim = sink.last_written(TOPIC, [0])
    finally:
        sink.close()

    mark = redis_client.hget(settings.redis_offsets_key, f"{TOPIC}:lists_from")
    assert json.loads(mark or "") == {
        "topic_id": "id-of-the-new-topic",
        settings.redis_list_key: [0, 0, 1],
        settings.redis_rejects_key: None,
    }
    assert after_first == {0: 99}
    assert after_second == {0: 149}
    assert after_trim == {0: 149}


def test_mark_of_other_topic_id_replaced(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A mark left by an earlier topic id is replaced at the next write."""
    old_mark = {"topic_id": "old-id", settings.redis_list_key: [0, 0, 1]}
    redis_client.hset(
        settings.redis_offsets_key,
        mapping={
            f"{TOPIC}:lists_from": json.dumps(old_mark),
            f"{TOPIC}:topic_id": "new-id",
        },
    )
    redis_client.rpush(settings.redis_list_key, entry(TOPIC, 0, 500))
    sink = RedisSink(settings)
    try:
        sink.set_topic_id(TOPIC, "new-id")
        sink.write_chunk(TOPIC, source_chunk(range(20)))
        found = sink.last_written(TOPIC, [0])
    finally:
        sink.close()

    assert found == {0: 19}


@pytest.mark.parametrize(
    ("mark", "expected"),
    [
        pytest.param('{"topic_id": "id-1", "LIST": [0, 3, 1]}', {0: 3}, id="valid"),
        pytest.param("[0, 3, 1]", {0: 7}, id="not-an-object"),
        pytest.param("not json", {0: 7}, id="not-json"),
        pytest.param("[" * 5_000, {0: 7}, id="nested-too-deep"),
        pytest.param('{"LIST": [0, 3, 1]}', {0: 7}, id="no-topic-id"),
        pytest.param('{"topic_id": "id-1", "LIST": [0, 3]}', {0: 7}, id="no-copies"),
        pytest.param(
            '{"topic_id": "id-1", "LIST": [0, 3, 0]}', {0: 7}, id="zero-copies"
        ),
        pytest.param('{"topic_id": "id-1", "LIST": [false, 3, 1]}', {0: 7}, id="bool"),
        pytest.param('{"topic_id": "id-1", "LIST": [0, 3.0, 1]}', {0: 7}, id="float"),
        pytest.param('{"topic_id": "id-1", "LIST": [0, -3, 1]}', {0: 7}, id="negative"),
        pytest.param('{"topic_id": "id-1", "LIST": 3}', {0: 7}, id="number"),
    ],
)
def test_last_written_reads_mark_of_valid_shape(
    settings: Settings, redis_client: redis.Redis, mark: str, expected: dict[int, int]
) -> None:
    """A mark stops the scan at its entry; a mark of another shape is ignored."""
    # Offset 3 after offset 7: the partition was read again from 3.
    redis_client.rpush(settings.redis_list_key, entry(TOPIC, 0, 7), entry(TOPIC, 0, 3))
    redis_client.hset(
        settings.redis_offsets_key,
        mapping={
            f"{TOPIC}:lists_from": mark.replace("LIST", settings.redis_list_key),
            f"{TOPIC}:topic_id": "id-1",
        },
    )
    sink = RedisSink(settings)
    try:
        found = sink.last_written(TOPIC, [0])
    finally:
        sink.close()

    assert found == expected


def test_mark_counts_first_entry_read_again(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A partition read again from the first entry: the scan stops at the first copy."""
    redis_client.rpush(settings.redis_list_key, entry(TOPIC, 1, 900))
    sink = RedisSink(settings)
    try:
        sink.set_topic_id(TOPIC, "id-1")
        sink.write_chunk(TOPIC, source_chunk(range(5), partition=2))
        sink.write_chunk(TOPIC, source_chunk(range(5), partition=1))
        # An operator moves partition 2 back to its first offset.
        redis_client.hset(settings.redis_offsets_key, f"{TOPIC}:2", 0)
        sink.write_chunk(TOPIC, source_chunk(range(5), partition=2))
        found = sink.last_written(TOPIC, [1, 2])
    finally:
        sink.close()

    mark = redis_client.hget(settings.redis_offsets_key, f"{TOPIC}:lists_from")
    assert json.loads(mark or "")[settings.redis_list_key] == [2, 0, 2]
    assert found == {1: 4, 2: 4}


@dataclass
class LoadingRedis:
    """A redis-server that replies LOADING for a few seconds after it starts."""

    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def loading_redis(tmp_path: Path) -> Iterator[LoadingRedis]:
    """Start Redis on a snapshot of 20,000 keys that it loads with a delay per key.

    ``key-load-delay`` (microseconds per key, a Redis debugging setting) makes
    the load last about 5 s, as a large append-only file would.
    """
    folder = tmp_path / "loading"
    service = start_redis(
        port=free_port(),
        state_dir=folder,
        extra_args=("--enable-debug-command", "yes"),
    )
    try:
        writer = redis.Redis(host="127.0.0.1", port=service.port, socket_timeout=30)
        writer.execute_command("DEBUG", "POPULATE", "20000")
        writer.save()
        writer.close()
    finally:
        service.stop()
    port = free_port()
    process = subprocess.Popen(
        [
            str(redis_server_binary()),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--save", "", "--appendonly", "no", "--key-load-delay", "200"),
            # Replies while loading, not only at its end.
            *("--loading-process-events-interval-bytes", "1024"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.exists("any")
                pytest.fail("Redis loaded the snapshot before the test began")
            except redis.exceptions.BusyLoadingError:
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        probe.close()
        yield LoadingRedis(f"redis://127.0.0.1:{port}/0", process)
    finally:
        process.terminate()
        process.wait(timeout=10)


def loading_sink(broker: Broker, loading: LoadingRedis) -> RedisSink:
    """Return a sink whose client makes no retries of its own, so each LOADING reply reaches it."""
    settings = make_settings(broker.bootstrap, loading.url)
    client = redis.Redis.from_url(loading.url, retry=Retry(NoBackoff(), 0))
    return RedisSink(settings, client=client)


def test_check_waits_for_loading_redis(
    broker: Broker, loading_redis: LoadingRedis, caplog: pytest.LogCaptureFixture
) -> None:
    sink = loading_sink(broker, loading_redis)

    with caplog.at_level(logging.WARNING, logger="etl.sink"):
        sink.check()

    assert "is loading its data into memory" in caplog.text


def test_write_waits_for_loading_redis(
    broker: Broker, loading_redis: LoadingRedis
) -> None:
    sink = loading_sink(broker, loading_redis)

    result = sink.write_chunk(TOPIC, rows_chunk(range(3)))

    assert result.written == 3
    assert sink.client.llen(sink.settings.redis_list_key) == 3


def test_loading_past_wait_fails(
    broker: Broker, loading_redis: LoadingRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("etl.sink.LOADING_WAIT_S", 0.3)
    sink = loading_sink(broker, loading_redis)

    with pytest.raises(SinkError) as failure:
        sink.check()

    assert "was still loading its data into memory after 0.3 s" in str(failure.value)
    assert "INFO persistence" in str(failure.value)
    assert "loading:0" in str(failure.value)


def test_loading_after_last_retry_still_writes(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LOADING reply does not use up an attempt, even after four lost connections."""
    monkeypatch.setattr("etl.sink._RETRY_BASE_S", 0.001)
    sink = RedisSink(settings)
    write_once = sink._write_once
    failures: list[Exception] = [
        *(redis.ConnectionError("Connection refused") for _ in range(4)),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    ]

    def flaky_write_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return write_once(*args, **kwargs)

    monkeypatch.setattr(sink, "_write_once", flaky_write_once)
    monkeypatch.setattr(sink, "_wait_until_loaded", lambda _failure: None)

    result = sink.write_chunk(TOPIC, rows_chunk(range(3)))

    assert failures == []
    assert result.written == 3
    assert redis_client.llen(settings.redis_list_key) == 3


@pytest.mark.parametrize(("setting", "warned"), [("yes", True), ("no", False)])
def test_check_warns_of_truncated_aof_loading(
    broker: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    warned: bool,
) -> None:
    service = start_redis(
        port=free_port(),
        state_dir=tmp_path,
        persistent=True,
        extra_args=("--aof-load-truncated", setting),
    )
    try:
        url = f"redis://127.0.0.1:{service.port}/0"
        sink = RedisSink(make_settings(broker.bootstrap, url))
        with caplog.at_level(logging.WARNING, logger="etl.sink"):
            sink.check()
    finally:
        service.stop()

    assert ("aof-load-truncated yes" in caplog.text) == warned


@pytest.mark.parametrize("attempt", [1, 5])
def test_cancel_after_failed_attempt_is_cancelled(
    settings: Settings, attempt: int
) -> None:
    """A stop that came during an attempt that then failed is reported as a cancel."""
    sink = RedisSink(settings)
    sink.cancel()

    with pytest.raises(WriteCancelled) as stopped:
        sink._wait_before_retry(attempt, redis.TimeoutError("Timeout"), 0.2)

    assert f"was cancelled after {attempt} attempt" in str(stopped.value)
    assert "Redis may still apply the last transaction" in str(stopped.value)
