"""Faults against the real broker and redis-server: killed batches, lost connections, outages.

After each fault and a rerun, the (partition, offset) of the rows and rejects
in Redis must equal the produced set, with no offset twice.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis
from click.testing import CliRunner
from confluent_kafka import KafkaError
from pydantic import SecretStr
from redis.connection import AbstractConnection, parse_url

from etl.cli import main
from etl.config import Settings
from etl.pipeline import (
    ATTEMPTED,
    MANIFEST,
    BatchReport,
    drain_to_staging,
    load_staging,
    run_batch,
    transform_staging,
)
from etl.services import Service, forget_offsets, free_port, start_broker
from etl.sink import OffsetConflict, RedisSink, SinkError
from etl.source import KafkaSource, OffsetsOutOfRange, SourceError
from tests.conftest import Broker, create_topic, encode, make_settings, reading
from tests.integration.accounting import (
    Position,
    assert_accounted,
    assert_prefix_written,
    kafka_committed,
    produce_tracked,
    redis_positions,
    stored_offsets,
)
from tests.integration.faultpoints import (
    etl_argv,
    fault_argv,
    finish,
    run_child,
    settings_env,
    spawn,
)
from tests.unit.test_hostile_corpus import load_corpus

pytestmark = pytest.mark.integration

PARTITIONS = 3


def mixed_values(count: int) -> list[bytes | None]:
    """Good readings with a reject every 7th record and a tombstone every 50th."""
    values: list[bytes | None] = []
    for index in range(count):
        if index % 50 == 49:
            values.append(None)
        elif index % 7 == 6:
            values.append(encode(reading(patient_id=f"PT-{index}", age="old")))
        else:
            values.append(encode(reading(patient_id=f"PT-{index}")))
    return values


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        yield client
    finally:
        client.close()


# 1-3. The batch process is SIGKILLed at a named point, then a rerun completes it.


def test_kill_before_write_leaves_nothing(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Killed after draining and before any Redis write (C04): nothing written or committed."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))

    child = run_child(fault_argv("before_write"), settings, tmp_path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert redis_positions(redis_client, settings) == []
    assert stored_offsets(redis_client, settings) == {}
    assert kafka_committed(settings, PARTITIONS) == {}
    report = run_batch(settings)
    assert report.read == len(produced)
    assert_accounted(redis_client, settings, produced)


def test_kill_after_exec_before_commit(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Killed after EXEC and before the Kafka commit: Redis offsets win on the rerun."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})

    child = run_child(fault_argv("after_exec"), chunked, tmp_path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(redis_positions(redis_client, settings)) == 100
    first_chunk = assert_prefix_written(redis_client, settings)
    assert kafka_committed(settings, PARTITIONS) == {}
    report = run_batch(chunked)
    assert report.read == len(produced) - 100
    assert report.status == "ok"
    assert_accounted(redis_client, settings, produced)
    committed = kafka_committed(settings, PARTITIONS)
    assert committed == stored_offsets(redis_client, settings)
    assert all(committed[p] >= first_chunk[p] for p in first_chunk)


def test_kill_after_exec_then_empty_rerun_updates_lag(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A rerun with nothing new still brings Kafka's committed offsets up to Redis."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(60))

    child = run_child(fault_argv("after_exec"), settings, tmp_path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert kafka_committed(settings, PARTITIONS) == {}
    report = run_batch(settings)
    assert report.read == 0
    assert_accounted(redis_client, settings, produced)
    assert kafka_committed(settings, PARTITIONS) == stored_offsets(
        redis_client, settings
    )


def test_kill_between_chunks(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Killed after chunk 1 was written and committed, before chunk 2."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(500))
    chunked = settings.model_copy(update={"chunk_size": 120})

    child = run_child(fault_argv("between_chunks"), chunked, tmp_path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(redis_positions(redis_client, settings)) == 120
    first_chunk = assert_prefix_written(redis_client, settings)
    assert kafka_committed(settings, PARTITIONS) == first_chunk
    report = run_batch(chunked)
    assert report.read == len(produced) - 120
    assert_accounted(redis_client, settings, produced)


def test_kill_mid_transaction_discards_chunk(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Killed after MULTI and part of the queued commands: Redis drops the whole transaction."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))

    child = run_child(fault_argv("mid_transaction"), settings, tmp_path)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert redis_positions(redis_client, settings) == []
    assert redis_client.exists(settings.redis_offsets_key) == 0
    assert redis_client.exists(settings.redis_stats_key) == 0
    run_batch(settings)
    assert_accounted(redis_client, settings, produced)


def test_kill_repeatedly_then_rerun(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Several killed runs in a row, at different points, then one clean run."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(400))
    chunked = settings.model_copy(update={"chunk_size": 90})

    for point in ("between_chunks", "after_exec", "before_write", "between_chunks"):
        child = run_child(fault_argv(point), chunked, tmp_path)
        assert child.returncode == -signal.SIGKILL, (point, child.stderr)
        assert_prefix_written(redis_client, settings)

    run_batch(chunked)
    assert_accounted(redis_client, settings, produced)


# 4. Redis is down when the batch starts.


def test_run_redis_down_exits_3(
    settings: Settings, own_redis: Service, tmp_path: Path
) -> None:
    """A clear error naming the URL (password masked), exit code 3, nothing committed."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(20))
    port = own_redis.port
    own_redis.stop()
    password = "pw-never-printed"
    down = settings.model_copy(
        update={"redis_url": SecretStr(f"redis://:{password}@127.0.0.1:{port}/0")}
    )

    child = run_child(etl_argv("run"), down, tmp_path, timeout=60)

    output = " ".join((child.stdout + child.stderr).split())
    assert child.returncode == 3, output
    assert f"redis://:***@127.0.0.1:{port}/0" in output
    assert "unreachable" in output
    assert password not in output
    assert "Traceback" not in output
    assert child.elapsed_s < 30
    assert kafka_committed(settings, PARTITIONS) == {}


def test_run_missing_database_exits_2(settings: Settings, tmp_path: Path) -> None:
    """A URL naming a database the server lacks is a settings error, not a lost server."""
    url = settings.redis_url.get_secret_value().rsplit("/", 1)[0] + "/99"
    missing_database = settings.model_copy(update={"redis_url": SecretStr(url)})

    child = run_child(etl_argv("run", "--json"), missing_database, tmp_path, timeout=60)

    failure = json.loads(child.stdout)
    assert child.returncode == 2, child.stderr
    assert failure["error"] == "ConfigurationError"
    assert "has no database 99" in failure["message"]
    assert "unreachable" not in failure["message"]
    assert "Traceback" not in child.stderr


@pytest.mark.parametrize("command", ["show", "reports", "replay-rejects"])
def test_read_commands_missing_database_exit_2(
    settings: Settings, command: str
) -> None:
    env = settings_env(settings)
    env["VITALS_REDIS_URL"] = env["VITALS_REDIS_URL"].rsplit("/", 1)[0] + "/99"

    result = CliRunner().invoke(main, [command], env=env)

    assert result.exit_code == 2, result.output
    assert "has no database 99" in result.stderr


@pytest.mark.parametrize(
    ("command", "key_setting", "kind"),
    [("show", "redis_list_key", "list"), ("reports", "redis_reports_key", "stream")],
)
def test_read_commands_wrong_key_type_exit_2(
    settings: Settings,
    redis_client: redis.Redis,
    command: str,
    key_setting: str,
    kind: str,
) -> None:
    key = getattr(settings, key_setting)
    redis_client.hset(key, "field", "value")

    result = CliRunner().invoke(main, [command], env=settings_env(settings))

    assert result.exit_code == 2, result.output
    assert f"the key {key!r}" in result.stderr
    assert f"is not a {kind}" in result.stderr


@pytest.mark.parametrize(
    ("key_setting", "kind"),
    [
        ("redis_offsets_key", "hash"),
        ("redis_list_key", "list"),
        ("redis_stats_key", "hash"),
        ("redis_reports_key", "stream"),
    ],
)
def test_run_wrong_key_type_exits_2(
    settings: Settings, redis_client: redis.Redis, key_setting: str, kind: str
) -> None:
    """A string under any key the batch writes: the same settings error, nothing written."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(20))
    key = getattr(settings, key_setting)
    redis_client.set(key, "not ours")

    result = CliRunner().invoke(main, ["run", "--json"], env=settings_env(settings))

    failure = json.loads(result.stdout)
    assert result.exit_code == 2, result.output
    assert failure["error"] == "ConfigurationError"
    expected = f"{key!r} (VITALS_{key_setting.upper()}) is a string, not a {kind}"
    assert expected in failure["message"]
    assert "WRONGTYPE" not in result.stderr
    assert redis_client.keys(f"{key.split(':')[0]}*") == [key.encode()]
    assert kafka_committed(settings, PARTITIONS) == {}


def test_run_redis_full_names_fix(settings: Settings, own_redis: Service) -> None:
    """Above maxmemory the batch exits 3 with the fix for a full Redis only."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(20))
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    full = settings.model_copy(update={"redis_url": SecretStr(url)})
    client = redis.Redis.from_url(url)
    try:
        # One byte under noeviction, redis-server's default: every write is rejected.
        client.config_set("maxmemory", 1)
        result = CliRunner().invoke(main, ["run"], env=settings_env(full))
        rows = client.llen(full.redis_list_key)
    finally:
        client.close()

    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 3, result.output
    assert f"Redis at {url} is full and rejected the write" in stderr
    assert "Raise its maxmemory" in stderr
    assert "then rerun" in stderr
    assert "start the service" not in stderr
    assert "Traceback" not in result.output
    assert rows == 0
    assert kafka_committed(settings, PARTITIONS) == {}


def test_ping_error_reply_is_named(settings: Settings) -> None:
    """An error reply to PING other than a missing database, such as a missing ACL right."""
    sink = RedisSink(settings)
    no_permission = redis.ResponseError(
        "NOPERM this user has no permissions to run 'ping'"
    )
    try:
        with (
            mock.patch.object(sink.client, "ping", side_effect=no_permission),
            pytest.raises(
                SinkError, match="replied with an error on connecting: NOPERM"
            ),
        ):
            sink.check()
    finally:
        sink.close()


# 5. The Redis connection drops in the middle of a chunk's transaction (C23, C26).


@contextmanager
def drop_connection_mid_transaction(
    client: redis.Redis, *, times: int = 1
) -> Iterator[list[int]]:
    """Kill the writer's connection (CLIENT KILL) after half of its MULTI ... EXEC was sent."""
    original = AbstractConnection.send_packed_command
    killed: list[int] = []

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        items = [command] if isinstance(command, bytes | str) else list(command)
        data = b"".join(i.encode() if isinstance(i, str) else i for i in items)
        if len(killed) < times and data.startswith(b"*1\r\n$5\r\nMULTI\r\n"):
            host, port = self._sock.getsockname()[:2]
            self._sock.sendall(data[: len(data) // 2])
            killed.append(client.client_kill(f"{host}:{port}"))
            original(self, [data[len(data) // 2 :]], False)
            return
        original(self, command, check_health)

    with mock.patch.object(
        AbstractConnection, "send_packed_command", send_packed_command
    ):
        yield killed


@contextmanager
def lose_reply_after_exec(
    error: type[Exception], *, times: int = 1
) -> Iterator[list[int]]:
    """Let the whole transaction reach Redis, then fail reading its first reply."""
    original_send = AbstractConnection.send_packed_command
    original_read = AbstractConnection.read_response
    armed: list[Any] = []
    lost: list[int] = []

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        items = [command] if isinstance(command, bytes | str) else list(command)
        first = items[0] if items else b""
        original_send(self, command, check_health)
        if len(lost) < times and bytes(first).startswith(b"*1\r\n$5\r\nMULTI\r\n"):
            armed.append(self)

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        if armed and armed[-1] is self:
            armed.clear()
            # Give Redis time to run EXEC, so only the reply goes missing.
            time.sleep(0.1)
            lost.append(1)
            self.disconnect()
            raise error("injected: reply lost after EXEC was sent")
        return original_read(self, *args, **kwargs)

    with (
        mock.patch.object(
            AbstractConnection, "send_packed_command", send_packed_command
        ),
        mock.patch.object(AbstractConnection, "read_response", read_response),
    ):
        yield lost


def test_connection_killed_mid_transaction_writes_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """CLIENT KILL while the transaction is half sent: the retry writes the chunk once."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})

    with drop_connection_mid_transaction(redis_client, times=2) as killed:
        report = run_batch(chunked)

    assert killed == [1, 1]
    assert report.status == "ok"
    assert report.written + report.rejected == len(produced)
    assert_accounted(redis_client, settings, produced)
    stats = redis_client.hgetall(settings.redis_stats_key)
    assert int(stats[b"written"]) == redis_client.llen(settings.redis_list_key)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(redis.TimeoutError, id="timeout"),
        pytest.param(redis.ConnectionError, id="connection-reset"),
    ],
)
def test_reply_lost_after_exec_not_written_twice(
    settings: Settings, redis_client: redis.Redis, error: type[Exception]
) -> None:
    """EXEC ran but its reply was lost (C26 kind): the retry finds its own write id."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})

    with lose_reply_after_exec(error, times=2) as lost:
        report = run_batch(chunked)

    assert lost == [1, 1]
    assert report.status == "ok"
    assert report.chunks == 3
    assert report.written + report.rejected == len(produced)
    assert_accounted(redis_client, settings, produced)


def test_redis_pipeline_is_empty_after_connection_error(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """Why the sink builds a new pipeline per attempt: redis-py resets it after a failure (C23)."""
    key = settings.redis_list_key
    pipe = redis_client.pipeline(transaction=True)
    pipe.rpush(key, b"a", b"b")
    with (
        drop_connection_mid_transaction(redis_client),
        pytest.raises(redis.ConnectionError, match="Connection"),
    ):
        pipe.execute()

    assert pipe.command_stack == []
    assert pipe.execute() == []
    assert redis_client.llen(key) == 0


def staged_chunks(
    settings: Settings, tmp_path: Path
) -> tuple[Settings, list[Position]]:
    """Produce 250 records, then drain and process them into ``tmp_path`` in chunks of 100.

    Returns the settings with that chunk size, and the produced records.
    """
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(250))
    chunked = settings.model_copy(update={"chunk_size": 100})
    drain_to_staging(chunked, tmp_path)
    transform_staging(chunked, tmp_path)
    return chunked, produced


def test_staged_load_retried_after_timeout_writes_once(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The load task times out after Redis accepted the write and is retried (C26)."""
    chunked, produced = staged_chunks(settings, tmp_path)

    original = RedisSink.write_chunk
    calls = {"n": 0}

    def write_then_time_out(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        calls["n"] += 1
        if calls["n"] == 2:
            raise SinkError("injected: the task timed out after the write")
        return result

    with (
        mock.patch.object(RedisSink, "write_chunk", write_then_time_out),
        pytest.raises(SinkError, match="timed out"),
    ):
        load_staging(chunked, tmp_path)
    retried = load_staging(chunked, tmp_path)

    # The retry's report is the run's, so it counts the first attempt's chunks too.
    assert retried.written + retried.rejected == len(produced)
    assert retried.skipped == 0
    assert retried.written == redis_client.llen(settings.redis_list_key)
    assert retried.alerts == redis_client.llen(settings.redis_alerts_key)
    assert sum(retried.bp_status.values()) == retried.written
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert retried.duration_s >= manifest["drain_s"] + manifest["transform_s"]
    assert retried.status == "ok"
    assert_accounted(redis_client, settings, produced)


def fail_at_write(number: int, *, after: bool) -> Any:
    """A stand-in for RedisSink.write_chunk whose ``number``-th call fails, before or after writing."""
    original = RedisSink.write_chunk
    calls = {"n": 0}

    def write_chunk(self: RedisSink, topic: str, chunk: Any, **options: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == number and not after:
            raise SinkError("injected: the task timed out before the write")
        result = original(self, topic, chunk, **options)
        if calls["n"] == number:
            raise SinkError("injected: the task timed out after the write")
        return result

    return write_chunk


def test_staged_load_counts_write_of_attempt_before_last(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A write applied in the first attempt still counts after a second attempt replaced the last write id."""
    chunked, produced = staged_chunks(settings, tmp_path)
    # The second attempt's write of the first chunk replaces the last write
    # id, which was that of the first attempt's second chunk.
    for number, after in ((2, True), (1, True)):
        with (
            mock.patch.object(
                RedisSink, "write_chunk", fail_at_write(number, after=after)
            ),
            pytest.raises(SinkError, match="timed out"),
        ):
            load_staging(chunked, tmp_path)

    retried = load_staging(chunked, tmp_path)

    assert retried.written + retried.rejected == len(produced)
    assert retried.skipped == 0
    assert retried.status == "ok"
    assert_accounted(redis_client, settings, produced)


def test_staged_load_retry_keeps_other_batch_status(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A chunk that another batch wrote first keeps the status concurrent_batch in a retry."""
    chunked, produced = staged_chunks(settings, tmp_path)
    run_batch(chunked.model_copy(update={"max_records": 100}))
    with (
        mock.patch.object(RedisSink, "write_chunk", fail_at_write(3, after=True)),
        pytest.raises(SinkError, match="timed out"),
    ):
        load_staging(chunked, tmp_path)

    retried = load_staging(chunked, tmp_path)

    assert retried.status == "concurrent_batch"
    assert retried.skipped == 100
    assert retried.written + retried.rejected == len(produced) - 100
    assert_accounted(redis_client, settings, produced)


@pytest.mark.parametrize("earlier_attempt", [False, True])
def test_staged_load_reports_other_batch(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, earlier_attempt: bool
) -> None:
    """Another batch wrote every staged chunk before the load: concurrent_batch, no row twice.

    With ``earlier_attempt``, an attempt of the load had sent each chunk's write
    and failed before Redis applied it.
    """
    chunked, produced = staged_chunks(settings, tmp_path)
    if earlier_attempt:
        for processed in tmp_path.glob("chunk-*.json"):
            marker = processed.with_name(processed.stem + ATTEMPTED)
            marker.write_text("a-write-that-never-reached-redis")
    run_batch(chunked)

    loaded = load_staging(chunked, tmp_path)

    assert loaded.status == "concurrent_batch"
    assert loaded.written + loaded.rejected == 0
    assert_accounted(redis_client, settings, produced)


@pytest.mark.parametrize("produced_after_drain", [0, 90])
def test_staged_load_retry_keeps_later_commit(
    settings: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    produced_after_drain: int,
) -> None:
    """A retried load after another batch wrote the rest leaves Kafka's commit at Redis's offsets.

    The first attempt writes one chunk and fails before the next, another
    batch writes the other chunks (and the records produced after the
    staged drain) and commits their end, and the retry writes nothing.
    """
    chunked, produced = staged_chunks(settings, tmp_path)

    original = RedisSink.write_chunk
    calls = {"n": 0}

    def write_first_only(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise SinkError("injected: the task timed out before the second write")
        return original(self, topic, chunk, **options)

    with (
        mock.patch.object(RedisSink, "write_chunk", write_first_only),
        pytest.raises(SinkError, match="timed out"),
    ):
        load_staging(chunked, tmp_path)
    produced += produce_tracked(settings, mixed_values(produced_after_drain))
    run_batch(chunked)
    committed_by_batch = kafka_committed(settings, PARTITIONS)

    retried = load_staging(chunked, tmp_path)

    assert retried.status == "concurrent_batch"
    # The first chunk, of 100 records, which the first attempt wrote.
    assert retried.written + retried.rejected == 100
    assert retried.skipped == len(produced) - produced_after_drain - 100
    assert committed_by_batch == stored_offsets(redis_client, settings)
    assert kafka_committed(settings, PARTITIONS) == committed_by_batch
    assert_accounted(redis_client, settings, produced)


def test_staged_load_commit_never_moves_back(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A batch that commits further while a staged load ends keeps its commit.

    The other batch runs after the load read Redis's offsets and before it
    commits, and reads records produced after the staged drain.
    """
    chunked, produced = staged_chunks(settings, tmp_path)
    produced += produce_tracked(settings, mixed_values(60))
    original = RedisSink.check_offsets_kept
    other_batches: list[BatchReport] = []
    calls = {"n": 0}

    def then_other_batch(self: RedisSink, topic: str) -> dict[int, int]:
        stored = original(self, topic)
        calls["n"] += 1
        if calls["n"] == 1:  # The other batch calls this method too.
            other_batches.append(run_batch(chunked))
        return stored

    with mock.patch.object(RedisSink, "check_offsets_kept", then_other_batch):
        loaded = load_staging(chunked, tmp_path)

    assert loaded.status == "ok"
    assert [batch.written + batch.rejected for batch in other_batches] == [60]
    assert kafka_committed(settings, PARTITIONS) == stored_offsets(
        redis_client, settings
    )
    assert_accounted(redis_client, settings, produced)


def test_staged_load_commits_when_commit_lookup_fails(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Without the group's commits to compare, the load still commits Redis's offsets."""
    chunked, produced = staged_chunks(settings, tmp_path)
    lookup_failed = SourceError("injected: cannot read committed offsets")

    with mock.patch.object(KafkaSource, "committed", side_effect=lookup_failed):
        loaded = load_staging(chunked, tmp_path)

    assert loaded.status == "ok"
    assert kafka_committed(settings, PARTITIONS) == stored_offsets(
        redis_client, settings
    )
    assert_accounted(redis_client, settings, produced)


def spawn_paused_before_first_write(
    settings: Settings, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, Path, Path]:
    """Start a batch child that waits before its first write; return it, its outputs and the go file."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**settings_env(settings), "FAULT_READY": str(ready), "FAULT_GO": str(go)}
    process, out, err = spawn(fault_argv("pause_first_write"), env, tmp_path)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), err.read_text()
    return process, out, err, go


def records_for_own_redis(
    broker: Broker, own_redis: Service, *, redis_timeout_s: float
) -> tuple[Settings, list[Position]]:
    """Return settings on the test's own Redis (chunks of 100) and 400 produced records."""
    settings = make_settings(
        broker.bootstrap,
        f"redis://127.0.0.1:{own_redis.port}/0",
        chunk_size=100,
        redis_timeout_s=redis_timeout_s,
    )
    create_topic(settings, PARTITIONS)
    return settings, produce_tracked(settings, mixed_values(400))


def test_redis_restarted_mid_batch_fails_or_completes_cleanly(
    broker: Broker, own_redis: Service, tmp_path: Path
) -> None:
    """Redis killed and restarted on the same port during a batch: no loss, no duplicate."""
    from etl.services import start_redis

    settings, produced = records_for_own_redis(broker, own_redis, redis_timeout_s=2.0)
    process, out, err, go = spawn_paused_before_first_write(settings, tmp_path)
    started = time.monotonic()

    own_redis.kill()
    restarted = start_redis(port=own_redis.port, state_dir=tmp_path / "redis2")
    try:
        go.touch()
        child = finish(process, out, err, started=started)
        client = redis.Redis.from_url(settings.redis_url.get_secret_value())
        # Redis lost everything (no persistence); the child either failed with
        # exit 3 or wrote the rest; what is there is a gap-free prefix.
        assert child.returncode in (0, 3), child.stderr
        run_batch(settings)
        found = redis_positions(client, settings)
        assert len(found) == len(set(found))
        assert set(found) == set(produced)
        client.close()
    finally:
        restarted.stop()


def test_redis_frozen_mid_batch_fails_in_bounded_time(
    broker: Broker, own_redis: Service, tmp_path: Path
) -> None:
    """Redis stops replying (SIGSTOP) before a write: exit 3 after the retries, no hang."""
    settings, produced = records_for_own_redis(broker, own_redis, redis_timeout_s=1.0)
    process, out, err, go = spawn_paused_before_first_write(settings, tmp_path)
    started = time.monotonic()

    os.kill(own_redis.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    go.touch()
    try:
        child = finish(process, out, err, started=started, timeout=90)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    after_freeze = time.monotonic() - frozen_at

    assert child.returncode == 1, child.stderr[-3000:]
    assert "SinkError" in child.stderr
    assert "after 5 attempts" in child.stderr
    # Five attempts of one 1 s timeout each, plus 3 s of back-off between them.
    assert after_freeze < 5 * settings.redis_timeout_s + 3 + 10, child.stderr[-4000:]
    run_batch(settings)
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        assert_accounted(client, settings, produced)
    finally:
        client.close()


def test_stored_offsets_vanish_mid_batch_fail_loudly(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The offsets hash disappears between two chunks (FLUSHDB, a restart): OffsetConflict."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})
    original = RedisSink.write_chunk
    writes: list[int] = []

    def write_then_lose_offsets(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        writes.append(result.written + result.rejected)
        if len(writes) == 1:
            redis_client.delete(settings.redis_offsets_key)
        return result

    with (
        mock.patch.object(RedisSink, "write_chunk", write_then_lose_offsets),
        pytest.raises(OffsetConflict, match="vanished from Redis"),
    ):
        run_batch(chunked)

    assert writes == [100]
    assert (
        redis_client.llen(settings.redis_list_key)
        + redis_client.llen(settings.redis_rejects_key)
        == 100
    )


def test_offset_moved_back_mid_batch_gives_restore(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """An HSET back to 0 between two chunks stops the batch with the HSET that undoes it."""
    create_topic(settings, 1)
    produced = produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})
    field = f"{settings.kafka_topic}:0"
    original = RedisSink.write_chunk
    writes: list[int] = []

    def write_then_reset(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        writes.append(result.written + result.rejected)
        if len(writes) == 1:
            redis_client.hset(settings.redis_offsets_key, field, 0)
        return result

    with (
        mock.patch.object(RedisSink, "write_chunk", write_then_reset),
        pytest.raises(OffsetConflict) as raised,
    ):
        run_batch(chunked)
    message = str(raised.value)
    restore = shlex.split(message.split(" with ", 1)[1].split(";", 1)[0])
    redis_client.hset(settings.redis_offsets_key, restore[-2], restore[-1])
    run_batch(chunked)

    assert "moved back from 100 to 0" in message
    assert "writes the readings from 0 to 99 again" in message
    assert restore[-4:] == ["HSET", settings.redis_offsets_key, field, "100"]
    assert writes == [100]
    assert_accounted(redis_client, settings, produced)


def fail_on_reset(
    settings: Settings,
    redis_client: redis.Redis,
    lowered: Callable[[int], int],
    batch: Callable[[], object] | None = None,
) -> tuple[str, dict[str, str]]:
    """Run a batch that finds its stored offsets lowered after its first write.

    ``lowered`` maps each stored offset to the one set after that write, and
    ``batch`` runs the batch (``run_batch`` by default). Returns the error
    message and the offsets stored before they were lowered.
    """
    original = RedisSink.write_chunk
    reached: dict[str, str] = {}

    def write_then_reset(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        if not reached:
            stored = redis_client.hgetall(settings.redis_offsets_key)
            fields = {f"{topic}:{p}".encode() for p in range(PARTITIONS)}
            reached.update(
                {k.decode(): v.decode() for k, v in stored.items() if k in fields}
            )
            reset = {field: lowered(int(offset)) for field, offset in reached.items()}
            redis_client.hset(settings.redis_offsets_key, mapping=reset)
        return result

    with (
        mock.patch.object(RedisSink, "write_chunk", write_then_reset),
        pytest.raises(OffsetConflict) as raised,
    ):
        if batch is None:
            run_batch(settings)
        else:
            batch()
    return " ".join(str(raised.value).split()), reached


def restore_printed_offsets(redis_client: redis.Redis, message: str) -> dict[str, str]:
    """Run the HSET of a "moved back" message and return the fields it sets."""
    restore = shlex.split(message.split(" with ", 1)[1].split(";", 1)[0])
    fields = restore[restore.index("HSET") + 2 :]
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    redis_client.hset(restore[restore.index("HSET") + 1], mapping=pairs)
    return pairs


def test_reset_partitions_one_restore(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Every partition reset during the batch is named, and one HSET puts all back."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))

    message, reached = fail_on_reset(settings, redis_client, lambda _offset: 0)
    pairs = restore_printed_offsets(redis_client, message)
    run_batch(settings)

    assert pairs == reached
    for field, offset in reached.items():
        partition = field.rsplit(":", 1)[1]
        assert f"partition {partition} from {offset} to 0" in message
    assert len(reached) == PARTITIONS
    assert_accounted(redis_client, settings, produced)


@pytest.mark.parametrize("staged", [False, True], ids=["batch", "staged-load"])
def test_reset_before_partition_written(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, staged: bool
) -> None:
    """Partitions reset before the batch wrote them are named with the one it wrote."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    run_batch(settings)
    produced += produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 40})
    if staged:
        drain_to_staging(chunked, tmp_path)
        transform_staging(chunked, tmp_path)

    def batch() -> object:
        return load_staging(chunked, tmp_path) if staged else run_batch(chunked)

    message, reached = fail_on_reset(
        chunked, redis_client, lambda offset: offset - 10, batch
    )
    pairs = restore_printed_offsets(redis_client, message)
    batch()

    assert pairs == reached
    assert len(reached) == PARTITIONS
    for field, offset in reached.items():
        partition = field.rsplit(":", 1)[1]
        assert f"partition {partition} from {offset} to {int(offset) - 10}" in message
    assert_accounted(redis_client, settings, produced)


def test_staged_load_detects_offsets_lost_after_last_write(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The offsets hash disappears after the load's last write: OffsetConflict, no commit."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})
    drain_to_staging(chunked, tmp_path)
    chunks = transform_staging(chunked, tmp_path)["chunks"]
    original = RedisSink.write_chunk
    writes: list[int] = []

    def write_then_lose_offsets(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        writes.append(result.written + result.rejected)
        if len(writes) == chunks:
            redis_client.delete(settings.redis_offsets_key)
        return result

    with (
        mock.patch.object(RedisSink, "write_chunk", write_then_lose_offsets),
        pytest.raises(OffsetConflict, match="vanished from Redis"),
    ):
        load_staging(chunked, tmp_path)

    assert sum(writes) == 300
    assert kafka_committed(chunked, PARTITIONS) == {}


@pytest.fixture
def lost_redis_settings(broker: Broker, own_redis: Service) -> Settings:
    """Settings on a Redis of the test's own, which the test may flush."""
    return make_settings(broker.bootstrap, f"redis://127.0.0.1:{own_redis.port}/0")


def flush(settings: Settings) -> None:
    """Delete every key of the test's Redis database, as a lost Redis would."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        client.flushdb()
    finally:
        client.close()


def load_then_flush(settings: Settings) -> list[Position]:
    """Load 60 records, then delete every key of the database as a lost Redis would.

    Returns the records produced.
    """
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(60))
    run_batch(settings)
    assert kafka_committed(settings, PARTITIONS)
    flush(settings)
    return produced


@pytest.mark.parametrize(
    ("choice", "read_again"),
    [pytest.param(0, True, id="read-again"), pytest.param(1, False, id="resume")],
)
def test_lost_redis_commits_stop_batch(
    lost_redis_settings: Settings, choice: int, read_again: bool
) -> None:
    """After a FLUSHDB, the group's commits would skip records: exit 3 and both commands."""
    settings = lost_redis_settings
    first = load_then_flush(settings)
    second = produce_tracked(settings, mixed_values(30))

    with pytest.raises(OffsetsOutOfRange, match="Redis stores no offsets") as failure:
        run_batch(settings)
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        assert client.exists(settings.redis_list_key, settings.redis_offsets_key) == 0
        [(_, report)] = client.xrange(settings.redis_reports_key)
        assert report[b"status"] == b"failed"
        commands = re.findall(PRINTED_COMMAND, str(failure.value))
        assert len(commands) == 2, failure.value
        run_printed_command(settings, commands[choice])
        report = run_batch(settings)

        assert report.read == (90 if read_again else 30)
        assert_accounted(client, settings, first + second if read_again else second)
    finally:
        client.close()


def test_lost_redis_earliest_commits_read_all(
    lost_redis_settings: Settings,
) -> None:
    """Commits reset to the earliest offsets, as the rebuild steps do, skip nothing."""
    settings = lost_redis_settings
    produced = load_then_flush(settings)
    source = KafkaSource(settings)
    try:
        source.commit(dict.fromkeys(range(PARTITIONS), 0))
    finally:
        source.close()

    report = run_batch(settings)

    assert report.read == 60
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        assert_accounted(client, settings, produced)
    finally:
        client.close()


def reset_then_produce(settings: Settings) -> None:
    """Load 60 records, HDEL every partition field as "Resetting offsets" shows, add 30."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(60))
    run_batch(settings)
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        fields = [f"{settings.kafka_topic}:{p}" for p in range(PARTITIONS)]
        assert client.hdel(settings.redis_offsets_key, *fields) == PARTITIONS
    finally:
        client.close()
    produce_tracked(settings, mixed_values(30))


def test_lost_redis_before_write_stops(
    lost_redis_settings: Settings,
) -> None:
    """No partition has a stored offset to lose, so the topic's fields tell the loss."""
    settings = lost_redis_settings
    reset_then_produce(settings)
    original = RedisSink.write_chunk

    def flush_then_write(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        flush(settings)
        return original(self, topic, chunk, **options)

    with (
        mock.patch.object(RedisSink, "write_chunk", flush_then_write),
        pytest.raises(OffsetConflict, match="vanished from Redis since the batch"),
    ):
        run_batch(settings)

    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        assert client.exists(settings.redis_list_key) == 0
    finally:
        client.close()


def test_lost_redis_between_drain_load(
    lost_redis_settings: Settings, tmp_path: Path
) -> None:
    """A FLUSHDB between the DAG's drain and load fails the load, then stops the next drain."""
    settings = lost_redis_settings
    reset_then_produce(settings)
    committed = kafka_committed(settings, PARTITIONS)
    manifest = drain_to_staging(settings, tmp_path)
    flush(settings)
    transform_staging(settings, tmp_path)

    with pytest.raises(OffsetConflict, match="vanished from Redis since the batch"):
        load_staging(settings, tmp_path)

    assert manifest["redis_knew_topic"] is True
    assert kafka_committed(settings, PARTITIONS) == committed
    with pytest.raises(OffsetsOutOfRange, match="Redis stores no offsets"):
        drain_to_staging(settings, tmp_path / "next")


def test_offsets_deleted_keeping_topic_id_resume(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Partition fields deleted with the topic id kept: the batch resumes at the commits."""
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(60))
    run_batch(settings)
    forget_offsets(
        settings.redis_url.get_secret_value(),
        settings.redis_offsets_key,
        settings.kafka_topic,
    )
    second = produce_tracked(settings, mixed_values(30))

    report = run_batch(settings)

    assert report.read == 30
    found = redis_positions(redis_client, settings)
    assert set(second) <= set(found)


def test_hdel_without_topic_ids_resumes(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """On a broker that gives no topic id, the last write id shows Redis kept the topic."""
    topic = settings.kafka_topic
    with mock.patch.object(KafkaSource, "topic_id", return_value=None):
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(60))
        run_batch(settings)
        assert (
            redis_client.hget(settings.redis_offsets_key, f"{topic}:topic_id") is None
        )
        # "Resetting offsets" in docs/operations.md: HDEL starts each partition
        # at the group's commit.
        redis_client.hdel(
            settings.redis_offsets_key, *(f"{topic}:{p}" for p in range(PARTITIONS))
        )
        second = produce_tracked(settings, mixed_values(30))

        report = run_batch(settings)

    assert report.read == 30
    assert set(second) <= set(redis_positions(redis_client, settings))


# 6. The broker is down or dies during the drain.


def test_run_on_redis_port(redis_service: str) -> None:
    """A bootstrap address where Redis listens gets a hint to check the port."""
    port = parse_url(redis_service)["port"]
    settings = make_settings(f"127.0.0.1:{port}", redis_service, kafka_timeout_s=1.0)

    with pytest.raises(SourceError) as failure:
        run_batch(settings)

    assert f"Kafka broker at 127.0.0.1:{port} is unreachable" in str(failure.value)
    assert "another service than Kafka" in str(failure.value)


def test_run_broker_unreachable_fails_fast(redis_service: str, tmp_path: Path) -> None:
    """Nothing listens on the bootstrap port: exit 3 with a clear message, in bounded time."""
    port = free_port()
    settings = make_settings(f"127.0.0.1:{port}", redis_service, kafka_timeout_s=3.0)

    child = run_child(etl_argv("run"), settings, tmp_path, timeout=60)

    output = " ".join((child.stdout + child.stderr).split())
    assert child.returncode == 3, output
    assert f"127.0.0.1:{port}" in output
    assert "unreachable or did not answer within 3 s" in output
    assert "Traceback" not in output
    # librdkafka's own lines (one per connection attempt) go to the log at DEBUG.
    assert "rdkafka#" not in output
    # Interpreter start and imports take about 2 s on a 2-core machine.
    assert child.elapsed_s < 3.0 + 15


class StorelessBroker:
    """A broker for one test, which the test may kill or restart. A restart loses its topics."""

    def __init__(self, state_dir: Path) -> None:
        self.port = free_port()
        self._state_dir = state_dir
        self.service = start_broker(port=self.port, state_dir=state_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self) -> None:
        """Stop the broker and start it again on the same port, with no topics."""
        self.service.stop()
        self.service = start_broker(port=self.port, state_dir=self._state_dir)


@pytest.fixture
def storeless_broker(tmp_path: Path) -> Iterator[StorelessBroker]:
    broker = StorelessBroker(tmp_path / "kafka")
    try:
        yield broker
    finally:
        broker.service.stop()


#: A redis-cli command as an error prints it, up to the words that follow it.
PRINTED_COMMAND = r"redis-cli .+?(?=, then rerun| and redis-cli| and rerun| \(see)"


def run_printed_reset(settings: Settings, error: BaseException) -> None:
    """Run the redis-cli commands that precede "then rerun" in an error, as a user would."""
    text = str(error)
    commands = re.findall(PRINTED_COMMAND, text[: text.index("rerun") + 5])
    assert commands, error
    for command in commands:
        run_printed_command(settings, command)


def run_printed_command(settings: Settings, command: str) -> None:
    """Run one redis-cli command printed in an error and check that Redis applied it."""
    password = parse_url(settings.redis_url.get_secret_value()).get("password", "")
    assert password == "" or password not in command
    # redis-cli --askpass, printed when the URL has a password, reads it from stdin.
    done = subprocess.run(
        shlex.split(command),
        input=password,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # HDEL counts the deleted fields; HSET counts new fields, 0 for a change.
    assert "ERR" not in done.stdout, done.stdout
    if command.split()[command.split().index("-n") + 2] == "HDEL":
        assert int(done.stdout.split()[-1]) > 0, done.stdout


def test_offset_past_end_printed_reset_reads_on(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A stored offset past the log's end: the printed HDEL resets it, and nothing is skipped."""
    create_topic(settings, 1)
    produced = produce_tracked(settings, mixed_values(100))
    assert run_batch(settings).read == 100
    redis_client.hset(settings.redis_offsets_key, f"{settings.kafka_topic}:0", 150)
    quick = settings.model_copy(update={"kafka_timeout_s": 1.0})

    with pytest.raises(SourceError, match="neither records") as failure:
        run_batch(quick)
    committed = kafka_committed(settings, 1)
    run_printed_reset(settings, failure.value)
    produced += produce_tracked(settings, mixed_values(100))
    report = run_batch(settings)

    # The failed batch left Kafka's committed offset where the last good one put it.
    assert committed == {0: 100}
    assert report.read == 100
    assert_accounted(redis_client, settings, produced)


def reset_after_wrong_hset(
    settings: Settings, redis_client: redis.Redis, lagging: dict[int, int]
) -> tuple[str, dict[int, int], dict[int, int], list[Position]]:
    """Set partition 2 past its end with Kafka's commits at ``lagging``, then reset.

    Runs a batch of 300 readings, the failing batch, the printed commands
    and a last batch of 90 more readings. Returns the failure message, the
    stored offsets before and after the reset, and the produced records.
    """
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    assert run_batch(settings).read == 300
    stored = stored_offsets(redis_client, settings)
    # Kafka's commits lag behind Redis, as after a crash before a chunk's commit.
    source = KafkaSource(settings)
    try:
        source.commit(lagging)
    finally:
        source.close()
    redis_client.hset(settings.redis_offsets_key, f"{settings.kafka_topic}:2", 10**6)
    quick = settings.model_copy(update={"kafka_timeout_s": 1.0})

    with pytest.raises(SourceError, match="neither records") as failure:
        run_batch(quick)
    run_printed_reset(settings, failure.value)
    after_reset = stored_offsets(redis_client, settings)
    produced += produce_tracked(settings, mixed_values(90))
    assert run_batch(settings).read == 90
    return str(failure.value), stored, after_reset, produced


def test_down_error_mentions_frozen_broker(settings: Settings) -> None:
    """librdkafka reports a frozen broker as down, so the message adds that it may run."""
    create_topic(settings)
    source = KafkaSource(settings)
    # The error that librdkafka's error callback receives once its requests time out.
    source._errors.append(
        KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    )
    try:
        with pytest.raises(SourceError) as failure:
            source._check_stall(time.monotonic(), now=time.monotonic())
    finally:
        source.close()

    assert "failed: the client lost every broker connection" in str(failure.value)
    assert "runs but stopped responding" in str(failure.value)
    assert "(librdkafka error _ALL_BROKERS_DOWN)" in str(failure.value)
    assert "brokers are down" not in str(failure.value)


def test_one_bad_partition_reset_keeps_the_others(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Only the partition past its end is moved back, though Kafka's commits lag behind Redis."""
    message, stored, after_reset, produced = reset_after_wrong_hset(
        settings, redis_client, {0: 1, 1: 1}
    )

    assert f"{settings.kafka_topic}:0" not in message
    assert after_reset == stored
    assert_accounted(redis_client, settings, produced)
    assert kafka_committed(settings, PARTITIONS) == stored_offsets(
        redis_client, settings
    )


def test_reset_ignores_lagging_commit(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The partition past its end goes back to its last row or reject, not to its commit."""
    message, stored, after_reset, produced = reset_after_wrong_hset(
        settings, redis_client, {2: 1}
    )

    assert "last row or reject in Redis" in message
    # A tombstone leaves no row: the offset may go back to just after the last row.
    assert stored[2] - 1 <= after_reset[2] <= stored[2]
    assert_accounted(redis_client, settings, produced)


def test_wrong_hset_during_batch_is_not_committed(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """An offset set past the end while a batch runs: Kafka keeps what was written."""
    create_topic(settings, 1)
    produced = produce_tracked(settings, mixed_values(600))
    chunked = settings.model_copy(update={"chunk_size": 100, "kafka_timeout_s": 1.0})
    field = f"{settings.kafka_topic}:0"
    original = RedisSink.write_chunk

    def write_then_mistype(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        if chunk.next_offsets.get(0) == 200:
            redis_client.hset(settings.redis_offsets_key, field, 5_000_000)
        return result

    with mock.patch.object(RedisSink, "write_chunk", write_then_mistype):
        report = run_batch(chunked)
    committed = kafka_committed(settings, 1)
    with pytest.raises(SourceError, match="past the end of the log") as failure:
        run_batch(chunked)
    run_printed_reset(settings, failure.value)
    run_batch(chunked)

    assert report.status == "concurrent_batch"
    assert committed == {0: 200}
    assert_accounted(redis_client, settings, produced)


def restart_with_late_commit(
    settings: Settings, broker: StorelessBroker, *, forget: bool
) -> None:
    """Load 60 records, restart the broker, then produce 300 and commit offset 20 late.

    The commit is that of a batch that ran across the restart. With
    ``forget``, the topic's offsets leave Redis as 'etl services start'
    removes them after a restart.
    """
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(60))
    run_batch(settings)
    broker.restart()
    if forget:
        redis_url = settings.redis_url.get_secret_value()
        forget_offsets(redis_url, settings.redis_offsets_key, settings.kafka_topic)
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(300))
    late = KafkaSource(settings)
    try:
        late.commit(dict.fromkeys(range(PARTITIONS), 20))
    finally:
        late.close()


@pytest.mark.parametrize("staged", [False, True])
def test_stale_commit_after_broker_restart_ignored(
    redis_service: str,
    storeless_broker: StorelessBroker,
    tmp_path: Path,
    staged: bool,
) -> None:
    """A commit sent across a broker restart does not make the next batch skip records.

    A batch that ran while the broker restarted commits on the restarted
    broker, after 'etl services start' removed the topic's offsets from Redis.
    """
    settings = make_settings(storeless_broker.bootstrap, redis_service)
    restart_with_late_commit(settings, storeless_broker, forget=True)

    # The first batch reads part of the backlog only, so some partitions may
    # get no row. The next batch must not start them at the late commit either.
    first = settings.model_copy(update={"max_records": 50, "chunk_size": 50})
    reports = []
    committed = []
    client = redis.Redis.from_url(redis_service)
    try:
        for batch_settings in (first, settings):
            if staged:
                staging = tmp_path / f"staging-{len(reports)}"
                drain_to_staging(batch_settings, staging)
                transform_staging(batch_settings, staging)
                reports.append(load_staging(batch_settings, staging))
            else:
                reports.append(run_batch(batch_settings))
            # Kafka's commits follow Redis on every partition, read or not.
            committed.append(
                kafka_committed(settings, PARTITIONS)
                == stored_offsets(client, settings)
            )
        stored = stored_offsets(client, settings)
    finally:
        client.close()

    assert [report.read for report in reports] == [50, 250]
    assert sum(report.written + report.rejected for report in reports) == 300
    assert [report.status for report in reports] == ["ok", "ok"]
    assert sum(stored.values()) == 300
    assert committed == [True, True]


def test_recreated_topic_reset_ignores_stale_commits(
    redis_service: str, storeless_broker: StorelessBroker
) -> None:
    """The reset that a "was recreated" failure prints keeps the group's old commits unread."""
    settings = make_settings(storeless_broker.bootstrap, redis_service)
    restart_with_late_commit(settings, storeless_broker, forget=False)
    with pytest.raises(OffsetsOutOfRange, match="was recreated") as failure:
        run_batch(settings)
    run_printed_reset(settings, failure.value)

    report = run_batch(settings)

    assert report.read == 300
    assert report.written + report.rejected == 300


def test_recreated_topic_without_stored_id_fails(
    redis_service: str, storeless_broker: StorelessBroker
) -> None:
    """Offsets stored without a topic id (an older version): Kafka's lost commits tell."""
    settings = make_settings(storeless_broker.bootstrap, redis_service)
    client = redis.Redis.from_url(redis_service)
    id_field = f"{settings.kafka_topic}:topic_id"
    try:
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(60))
        run_batch(settings)
        client.hdel(settings.redis_offsets_key, id_field)
        # Same topic, commits still in Kafka: the batch goes on and records the id.
        produce_tracked(settings, mixed_values(30))
        assert run_batch(settings).read == 30
        assert client.hget(settings.redis_offsets_key, id_field) is not None
        client.hdel(settings.redis_offsets_key, id_field)
        storeless_broker.restart()
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(300))

        with pytest.raises(OffsetsOutOfRange, match="carry no topic id") as failure:
            run_batch(settings)
        stored = redis_positions(client, settings)
    finally:
        client.close()

    confirm = f"-n 0 HSET {settings.redis_offsets_key} {id_field} "
    assert confirm in str(failure.value)
    assert len(stored) == 90


@pytest.mark.parametrize("before_load", ["new-topic-read", "offsets-reset"])
def test_stale_staged_load_after_recreate_writes_nothing(
    redis_service: str,
    storeless_broker: StorelessBroker,
    tmp_path: Path,
    before_load: str,
) -> None:
    """Chunks drained before the topic was recreated are neither written nor committed."""
    settings = make_settings(storeless_broker.bootstrap, redis_service)
    client = redis.Redis.from_url(redis_service)
    try:
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(60))
        run_batch(settings)
        produce_tracked(settings, mixed_values(40))
        drain_to_staging(settings, tmp_path / "staging")
        transform_staging(settings, tmp_path / "staging")
        storeless_broker.restart()
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(150))
        with pytest.raises(OffsetsOutOfRange, match="was recreated") as failure:
            run_batch(settings)
        run_printed_reset(settings, failure.value)
        if before_load == "new-topic-read":
            assert run_batch(settings).read == 150

        with pytest.raises(OffsetsOutOfRange, match="after the staged drain"):
            load_staging(settings, tmp_path / "staging")
        committed = kafka_committed(settings, PARTITIONS)
        report = run_batch(settings)
        stored = redis_positions(client, settings)
    finally:
        client.close()

    if before_load == "offsets-reset":
        assert committed == {}
        assert report.read == 150
    assert len(stored) == 60 + 150


def test_recreate_before_staged_commit_commits_nothing(
    redis_service: str, storeless_broker: StorelessBroker, tmp_path: Path
) -> None:
    """The topic is recreated between the load's last write and its Kafka commit."""
    settings = make_settings(storeless_broker.bootstrap, redis_service, chunk_size=100)
    client = redis.Redis.from_url(redis_service)
    original = RedisSink.write_chunk

    def write_then_recreate(
        self: RedisSink, topic: str, chunk: Any, **options: Any
    ) -> Any:
        result = original(self, topic, chunk, **options)
        if chunk.next_offsets and max(chunk.next_offsets.values()) > 0:
            storeless_broker.restart()
            create_topic(settings, PARTITIONS)
            produce_tracked(settings, mixed_values(120))
        return result

    try:
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(60))
        drain_to_staging(settings, tmp_path / "staging")
        transform_staging(settings, tmp_path / "staging")
        with (
            mock.patch.object(RedisSink, "write_chunk", write_then_recreate),
            pytest.raises(OffsetsOutOfRange, match="nothing was committed"),
        ):
            load_staging(settings, tmp_path / "staging")
        committed = kafka_committed(settings, PARTITIONS)
        with pytest.raises(OffsetsOutOfRange, match="was recreated") as failure:
            run_batch(settings)
        run_printed_reset(settings, failure.value)
        report = run_batch(settings)
    finally:
        client.close()

    assert committed == {}
    assert report.read == 120


def test_run_json_failure_on_stdout(redis_service: str, tmp_path: Path) -> None:
    """With --json a failed batch still prints one JSON object, for schedulers that parse it."""
    port = free_port()
    settings = make_settings(f"127.0.0.1:{port}", redis_service, kafka_timeout_s=2.0)

    child = run_child(etl_argv("run", "--json"), settings, tmp_path, timeout=60)

    failure = json.loads(child.stdout)
    assert child.returncode == 3
    assert failure["status"] == "failed"
    assert failure["error"] == "SourceError"
    assert failure["exit_code"] == 3
    assert f"127.0.0.1:{port}" in failure["message"]
    assert "Fix the cause above (start the service" in child.stderr


def batch_runner(kind: str, staging: Path) -> Callable[[Settings], BatchReport]:
    """The plain batch, or the Airflow tasks' staged steps one after the other."""

    def staged(settings: Settings) -> BatchReport:
        drain_to_staging(settings, staging)
        transform_staging(settings, staging)
        return load_staging(settings, staging)

    return run_batch if kind == "plain" else staged


@pytest.mark.parametrize("kind", ["plain", "staged"])
def test_recreated_topic_fails_instead_of_skipping(
    redis_service: str, storeless_broker: StorelessBroker, tmp_path: Path, kind: str
) -> None:
    """A broker without storage restarts and new records arrive: exit 3 and a reset, no skip.

    The offsets are in database 5, so the printed reset only works if it names it.
    """
    redis_url = redis_service.rsplit("/", 1)[0] + "/5"
    settings = make_settings(storeless_broker.bootstrap, redis_url)
    run = batch_runner(kind, tmp_path / "staging")
    client = redis.Redis.from_url(redis_url)
    id_field = f"{settings.kafka_topic}:topic_id"
    try:
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(60))
        assert run(settings).read == 60
        first_id = client.hget(settings.redis_offsets_key, id_field)
        storeless_broker.restart()
        # The same name again, at offset 0, with more records than were stored.
        create_topic(settings, PARTITIONS)
        produce_tracked(settings, mixed_values(300))

        with pytest.raises(OffsetsOutOfRange, match="was recreated") as failure:
            run(settings)
        run_printed_reset(settings, failure.value)
        report = run(settings)
        second_id = client.hget(settings.redis_offsets_key, id_field)
        stored = redis_positions(client, settings)
    finally:
        client.close()

    assert first_id is not None
    assert second_id is not None
    assert second_id != first_id
    assert report.read == 300
    assert report.written + report.rejected == 300
    # The 60 records of the first topic stay, and none of the new topic is missing.
    assert len(stored) == 60 + 300


def test_reset_after_recreate_skips_old_rows(
    redis_service: str, storeless_broker: StorelessBroker
) -> None:
    """A wrong HSET after a recreated topic: the printed reset ignores the old topic's rows."""
    settings = make_settings(storeless_broker.bootstrap, redis_service)
    quick = settings.model_copy(update={"kafka_timeout_s": 1.0})
    client = redis.Redis.from_url(redis_service)
    try:
        create_topic(settings, 1)
        produce_tracked(settings, mixed_values(60))
        assert run_batch(settings).read == 60
        storeless_broker.restart()
        create_topic(settings, 1)
        produce_tracked(settings, mixed_values(20))
        with pytest.raises(OffsetsOutOfRange, match="was recreated") as recreated:
            run_batch(settings)
        run_printed_reset(settings, recreated.value)
        assert run_batch(settings).read == 20
        produce_tracked(settings, mixed_values(80))
        client.hset(settings.redis_offsets_key, f"{settings.kafka_topic}:0", 10**6)

        with pytest.raises(SourceError, match="neither records") as past_end:
            run_batch(quick)
        run_printed_reset(settings, past_end.value)
        produce_tracked(settings, mixed_values(50))
        report = run_batch(settings)
        stored = redis_positions(client, settings)
    finally:
        client.close()

    # The old topic's rows reach offset 59: resetting to 60 would skip 20 to 59.
    assert report.read == 80 + 50
    assert len(stored) == 60 + 150


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(signal.SIGKILL, id="broker-killed"),
        # A stopped process keeps its sockets open and replies to nothing, like
        # a hung broker or a network partition.
        pytest.param(signal.SIGSTOP, id="broker-frozen"),
    ],
)
def test_broker_lost_mid_drain_fails_in_bounded_time(
    storeless_broker: StorelessBroker,
    redis_service: str,
    tmp_path: Path,
    fault: signal.Signals,
) -> None:
    """The broker is lost while records are still to be fetched: an error, no hang, a clean prefix."""
    settings = make_settings(
        storeless_broker.bootstrap,
        redis_service,
        chunk_size=200,
        kafka_timeout_s=3.0,
        # A small prefetch queue, so most records are still on the broker.
        kafka_extra={
            "queued.max.messages.kbytes": 64,
            "queued.min.messages": 100,
            "max.partition.fetch.bytes": 16_384,
            "fetch.max.bytes": 32_768,
            "message.max.bytes": 32_768,
        },
    )
    create_topic(settings, PARTITIONS)
    produce_tracked(settings, mixed_values(6000))
    process, out, err, go = spawn_paused_before_first_write(settings, tmp_path)
    started = time.monotonic()

    os.kill(storeless_broker.service.pid, fault)
    killed_at = time.monotonic()
    go.touch()
    try:
        child = finish(process, out, err, started=started, timeout=90)
    finally:
        os.kill(storeless_broker.service.pid, signal.SIGCONT)
    after_kill = time.monotonic() - killed_at

    assert child.returncode == 1, child.stderr[-3000:]
    assert "SourceError" in child.stderr
    assert storeless_broker.bootstrap in child.stderr
    assert after_kill < settings.kafka_timeout_s + 15, child.stderr[-4000:]
    client = redis.Redis.from_url(redis_service)
    try:
        stored = assert_prefix_written(client, settings)
    finally:
        client.close()
    assert 0 < sum(stored.values()) < 6000


# 8. A backlog much larger than a chunk, with a producer still writing.


def _padded_values(count: int, pad: int) -> list[bytes | None]:
    return [encode(reading(patient_id=f"PT-{i}", note="x" * pad)) for i in range(count)]


#: A prefetch queue of 16 MB, with fetches of at most 4 MB: the test's
#: backlogs are larger than the queue, as they are for the product's caps.
SMALL_PREFETCH = {
    "queued.max.messages.kbytes": 16_384,
    "fetch.max.bytes": 4 * 1024 * 1024,
    "max.partition.fetch.bytes": 1024 * 1024,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kafka_extra", "max_growth_mb"),
    [
        # The batch keeps at most five chunks: 150,000 more records (180 MB)
        # add almost nothing.
        pytest.param(SMALL_PREFETCH, 50, id="small-prefetch"),
        # The product's settings (etl.source.CONSUMER_TUNING): librdkafka
        # prefetches at most its capped queue plus one fetch response,
        # however long the backlog.
        pytest.param({}, 64 + 40, id="default-prefetch"),
    ],
)
def test_backlog_memory_bounded_by_chunk(
    broker: Broker,
    redis_service: str,
    tmp_path: Path,
    kafka_extra: dict[str, Any],
    max_growth_mb: float,
) -> None:
    """Peak RSS of the batch process depends on the chunk and the prefetch queue, not the backlog.

    The smaller backlog is 25 chunks. A batch of 10 chunks ended before its
    RSS levelled off: its peak was 20 to 40 MB below that of 50 chunks.
    """
    peaks = {}
    for backlog in (50_000, 200_000):
        settings = make_settings(
            broker.bootstrap, redis_service, chunk_size=2_000, kafka_extra=kafka_extra
        )
        create_topic(settings, PARTITIONS)
        # About 1.2 kB per record: 200,000 records are about 240 MB of backlog.
        produce_tracked(settings, _padded_values(backlog, 1_000))
        child = run_child(fault_argv("none"), settings, tmp_path, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        report = child.report()
        assert report["read"] == backlog
        assert report["chunks"] == backlog // 2_000
        peaks[backlog] = report["peak_rss_mb"]

    assert peaks[200_000] - peaks[50_000] < max_growth_mb, peaks


@pytest.mark.slow
def test_backlog_with_live_producer_ends(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A producer keeps writing during the batch: the batch still ends, and no record is lost."""
    import threading

    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(20_000))
    chunked = settings.model_copy(update={"chunk_size": 2_000, "deadline_s": 20.0})
    stop = threading.Event()
    live: list[tuple[int, int]] = []

    def keep_producing() -> None:
        while not stop.is_set():
            live.extend(produce_tracked(settings, mixed_values(200)))

    producer = threading.Thread(target=keep_producing)
    producer.start()
    try:
        started = time.monotonic()
        report = run_batch(chunked)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        producer.join()

    assert report.stop_reason in ("end_of_partitions", "record_cap", "deadline")
    assert elapsed < chunked.deadline_s + 10
    assert report.read >= len(produced)
    run_batch(chunked)
    assert_accounted(redis_client, settings, produced + live)


# 9. A message larger than the consumer's fetch limit.


def test_message_over_fetch_limit_does_not_stall(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Records above max.partition.fetch.bytes are still delivered; later records are written."""
    small_fetch = settings.model_copy(
        update={"kafka_extra": {"max.partition.fetch.bytes": 1024}}
    )
    create_topic(settings, 1)
    values: list[bytes | None] = [
        encode(reading(patient_id="PT-before")),
        encode(reading(patient_id="PT-big", note="x" * 20_000)),
        encode(reading(patient_id="PT-huge", note="x" * 100_000)),
        encode(reading(patient_id="PT-after")),
    ]
    produced = produce_tracked(
        settings, values, extra_config={"message.max.bytes": 1_000_000}
    )

    report = run_batch(small_fetch)

    assert report.read == 4
    assert report.rejected_by_reason == {"too_large": 1}
    assert report.written == 3
    assert_accounted(redis_client, settings, produced)


# C01: a long batch is not evicted, and the deadline ends it cleanly.


def test_slow_batch_not_evicted_with_assign(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Writes slower than max.poll.interval.ms: assign() has no group membership to lose (C01)."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(200))
    slow = settings.model_copy(
        update={
            "chunk_size": 50,
            "kafka_extra": {"session.timeout.ms": 1000, "max.poll.interval.ms": 1000},
        }
    )
    original = RedisSink.write_chunk

    def slow_write(self: RedisSink, topic: str, chunk: Any) -> Any:
        time.sleep(1.5)
        return original(self, topic, chunk)

    with mock.patch.object(RedisSink, "write_chunk", slow_write):
        report = run_batch(slow)

    assert report.status == "ok"
    assert report.chunks == 4
    assert_accounted(redis_client, settings, produced)


def test_deadline_ends_batch_cleanly(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A batch that runs into its deadline stops between chunks; the next one continues (C01)."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(600))
    limited = settings.model_copy(update={"chunk_size": 50, "deadline_s": 1.0})
    original = RedisSink.write_chunk

    def slow_write(self: RedisSink, topic: str, chunk: Any) -> Any:
        time.sleep(0.3)
        return original(self, topic, chunk)

    started = time.monotonic()
    with mock.patch.object(RedisSink, "write_chunk", slow_write):
        report = run_batch(limited)
    elapsed = time.monotonic() - started

    assert report.stop_reason == "deadline"
    assert report.status == "ok"
    assert 0 < report.read < len(produced)
    assert elapsed < limited.deadline_s + 2
    assert_prefix_written(redis_client, settings)
    run_batch(settings)
    assert_accounted(redis_client, settings, produced)


# C05: the same partition and offset delivered twice.


def test_redelivered_records_written_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Kafka delivers chunks again (as after a seek or a rebalance): one row per offset (C05)."""
    create_topic(settings, PARTITIONS)
    produced = produce_tracked(settings, mixed_values(300))
    chunked = settings.model_copy(update={"chunk_size": 100})
    original = KafkaSource.chunks

    def chunks_twice(self: KafkaSource, **kwargs: Any) -> Iterator[Any]:
        seen = []
        for frame in original(self, **kwargs):
            seen.append(frame)
            yield frame
            # Redeliver everything so far in one frame, as a rewind would.
            yield frame.vstack(seen[0])

    with mock.patch.object(KafkaSource, "chunks", chunks_twice):
        report = run_batch(chunked)

    assert report.status == "ok"
    assert report.skipped > 0
    assert_accounted(redis_client, settings, produced)


# The hostile corpus through the real broker and Redis.


def test_hostile_corpus_through_kafka_and_redis(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Every kind is written as a row or a reject with its reason; the good ones around it are rows."""
    cases = load_corpus()
    create_topic(settings, PARTITIONS)
    values: list[bytes | None] = []
    for index, case in enumerate(cases):
        values += [case.value, encode(reading(patient_id=f"PT-{index}"))]
    produced = produce_tracked(settings, values)

    report = run_batch(settings.model_copy(update={"chunk_size": 64}))

    assert_accounted(redis_client, settings, produced)
    expected = Counter(case.expected_reason for case in cases if case.expected_reason)
    assert report.rejected_by_reason == dict(expected)
    accepted = sum(1 for case in cases if case.accepted_by)
    assert report.written == len(cases) + accepted
    stats = {
        k.decode(): int(v)
        for k, v in redis_client.hgetall(settings.redis_stats_key).items()
    }
    for reason, amount in expected.items():
        assert stats[f"reject_reason:{reason}"] == amount

    # Each reject keeps the raw value, as text or base64, for a replay.
    by_position = dict(zip(produced, values, strict=True))
    for raw in redis_client.lrange(settings.redis_rejects_key, 0, -1):
        reject = json.loads(raw)
        source = reject["source"]
        value = by_position[(source["partition"], source["offset"])]
        if value is None:
            assert "payload" not in reject
            assert "payload_base64" not in reject
        elif reject["payload_truncated"]:
            kept = reject.get("payload", "").encode() or base64.b64decode(
                reject["payload_base64"]
            )
            assert value.startswith(kept)
        elif "payload" in reject:
            assert reject["payload"].encode() == value, reject
        else:
            assert base64.b64decode(reject["payload_base64"]) == value


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_run_stopped_by_signal(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, signal_number: int
) -> None:
    """A scheduler's SIGTERM (or Ctrl-C) mid-batch: one clear line, exit 128 + signal."""
    small = settings.model_copy(update={"chunk_size": 50})
    create_topic(small, PARTITIONS)
    produced = produce_tracked(small, mixed_values(8_000))
    started = time.monotonic()
    process, out, err = spawn(etl_argv("run"), settings_env(small), tmp_path)
    deadline = time.monotonic() + 60
    while redis_client.llen(small.redis_list_key) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal_number)
    child = finish(process, out, err, started=started)

    name = signal.Signals(signal_number).name
    assert child.returncode == 128 + signal_number, child.stderr[-3000:]
    assert f"batch stopped: {name} received" in " ".join(child.stderr.split())
    assert "stopped before its end, after" in child.stderr
    assert "Traceback" not in child.stderr
    run_batch(small)
    assert_accounted(redis_client, small, produced)
