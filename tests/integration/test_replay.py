"""Replay of rejects: corrected values go back to the topic and become rows once."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from pydantic import SecretStr

from etl import replay
from etl.config import Settings
from etl.pipeline import (
    drain_to_staging,
    load_staging,
    run_batch,
    transform_staging,
)
from etl.replay import (
    LOCK_SUFFIX,
    REPLAYED_SUFFIX,
    InvalidReject,
    ReplayError,
    reject_key,
    reject_value,
    rejects_from_file,
    replay_rejects,
    replay_rejects_command,
    source_marker,
)
from etl.services import free_port
from tests.conftest import create_topic, encode, reading
from tests.integration.accounting import produce_tracked

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        yield client
    finally:
        client.close()


def rejects(client: redis.Redis, settings: Settings) -> list[dict[str, object]]:
    return [json.loads(v) for v in client.lrange(settings.redis_rejects_key, 0, -1)]


def cli_env(settings: Settings, *, topic: str | None = None) -> dict[str, str]:
    """Return the variables that point the replay command at the test's servers and keys."""
    return {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "VITALS_KAFKA_TOPIC": topic or settings.kafka_topic,
        "VITALS_REDIS_URL": settings.redis_url.get_secret_value(),
        "VITALS_REDIS_REJECTS_KEY": settings.redis_rejects_key,
    }


def test_replay_after_rule_change_writes_rows_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Readings rejected for a future timestamp (clock skew) become rows after a replay."""
    create_topic(settings)
    # Two hours ahead: past the default VITALS_MAX_FUTURE_SKEW_S of one hour.
    ahead = time.time() + 7_200
    skewed = [encode(reading(patient_id=f"PT-{i}", timestamp=ahead)) for i in range(5)]
    produce_tracked(settings, [*skewed, encode(reading()), None])
    first = run_batch(settings)
    assert first.rejected_by_reason == {"timestamp_invalid": 5, "tombstone": 1}

    report = replay_rejects(settings, reasons=["timestamp_invalid"])
    again = replay_rejects(settings, reasons=["timestamp_invalid"])
    tolerant = settings.model_copy(update={"max_future_skew_s": 86_400.0})
    second = run_batch(tolerant)

    assert (report.selected, report.produced) == (5, 5)
    assert (again.produced, again.skipped_already_replayed) == (0, 5)
    assert second.read == 5
    assert second.written == 5
    assert redis_client.scard(settings.redis_rejects_key + REPLAYED_SUFFIX) == 5
    # The old rejects stay as the audit trail.
    assert len(rejects(redis_client, settings)) == 6


def test_replay_corrected_file(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """An operator exports rejects, fixes the values, and replays the file."""
    create_topic(settings)
    produce_tracked(settings, [encode(reading(temperature=98.6))])
    run_batch(settings)
    (reject,) = rejects(redis_client, settings)
    fixed = json.loads(str(reject["payload"]))
    fixed["temperature"] = 37.0
    reject["payload"] = json.dumps(fixed)
    corrected = tmp_path / "corrected.jsonl"
    corrected.write_text(json.dumps(reject) + "\n")

    report = replay_rejects(settings, path=corrected)
    batch = run_batch(settings)

    assert report.produced == 1
    assert batch.written == 1
    (row,) = [
        json.loads(v) for v in redis_client.lrange(settings.redis_list_key, 0, -1)
    ]
    assert row["temperature"] == 37.0


def test_replay_dry_run_and_unreplayable(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    huge = encode(reading(note="x" * 70_000))
    produce_tracked(settings, [huge, None, b"\xe9\xe8 not utf-8"])
    run_batch(settings)

    report = replay_rejects(settings, dry_run=True)

    assert report.selected == 3
    assert report.skipped_truncated == 1
    assert report.skipped_tombstone == 1
    assert report.produced == 0
    assert report.would_produce == 1
    assert redis_client.exists(settings.redis_rejects_key + REPLAYED_SUFFIX) == 0


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        pytest.param(
            {"kafka_timeout_s": 0.5},
            "1 of 1 value got no acknowledgement within 1.5 s",
            id="flush-timeout",
        ),
        pytest.param(
            {"kafka_timeout_s": 2.0, "kafka_extra": {"message.timeout.ms": 500}},
            "1 of 1 value failed, the first with",
            id="message-timeout",
        ),
    ],
)
def test_replay_without_broker_names_it(
    settings: Settings,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    update: dict[str, object],
    problem: str,
) -> None:
    """The broker goes away after the topic check: the error points at the broker."""
    monkeypatch.setattr(replay, "_require_topic", lambda settings: None)
    create_topic(settings)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    unreachable = settings.model_copy(
        update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}", **update}
    )

    with pytest.raises(ReplayError) as failure:
        replay_rejects(unreachable, reasons=["timestamp_invalid"])

    message = str(failure.value)
    assert problem in message
    assert "VITALS_KAFKA_BOOTSTRAP_SERVERS" in message
    assert "Nothing was marked as replayed" in message
    assert redis_client.exists(settings.redis_rejects_key + REPLAYED_SUFFIX) == 0


def test_replay_unreachable_broker_fails_topic_check(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    unreachable = settings.model_copy(
        update={
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
            "kafka_timeout_s": 0.5,
        }
    )

    with pytest.raises(ReplayError) as failure:
        replay_rejects(unreachable)

    message = str(failure.value)
    assert "is unreachable or did not answer within 0.5 s" in message
    assert "VITALS_KAFKA_BOOTSTRAP_SERVERS" in message
    assert "Nothing was produced or marked as replayed" in message
    assert redis_client.exists(settings.redis_rejects_key + REPLAYED_SUFFIX) == 0


@pytest.mark.parametrize(
    "options",
    [["--all-topics"], ["--all-topics", "--dry-run"], []],
    ids=["all-topics", "dry-run", "own-topic"],
)
def test_replay_to_missing_topic_fails(
    settings: Settings, redis_client: redis.Redis, options: list[str]
) -> None:
    """A misspelt --topic creates no topic, even on a broker that creates topics on use."""
    from confluent_kafka.admin import AdminClient

    create_topic(settings)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    misspelt = f"{settings.kafka_topic}-x"
    arguments = [*options, "--topic", misspelt]

    result = CliRunner().invoke(
        replay_rejects_command, arguments, env=cli_env(settings)
    )

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    assert result.exit_code == 3
    assert f"topic '{misspelt}' does not exist" in result.stderr
    assert misspelt not in admin.list_topics(timeout=10).topics
    assert redis_client.exists(settings.redis_rejects_key + REPLAYED_SUFFIX) == 0


def test_replay_counts_marker_of_earlier_release(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A marker without the topic id, as earlier releases wrote, still counts."""
    create_topic(settings, partitions=1)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    replayed_key = settings.redis_rejects_key + REPLAYED_SUFFIX
    redis_client.sadd(replayed_key, f"{settings.kafka_topic}:0:0")

    report = replay_rejects(settings, dry_run=True)

    (reject,) = rejects(redis_client, settings)
    assert reject["source"]["topic_id"]
    assert (report.would_produce, report.skipped_already_replayed) == (0, 1)


@pytest.mark.parametrize(
    ("element", "problem"),
    [
        (b"not json", "invalid JSON, expecting value at column 1"),
        (b'{"reason": "invalid_json"}', "'source' needs"),
        (b"\xff", "codec can't decode"),
        (b'{"source": ' + b"7" * 5_000 + b"}", "a number too long to read"),
    ],
)
def test_replay_bad_list_element_fails(
    settings: Settings, redis_client: redis.Redis, element: bytes, problem: str
) -> None:
    redis_client.rpush(settings.redis_rejects_key, element)

    with pytest.raises(InvalidReject, match=problem) as caught:
        replay_rejects(settings)

    assert "element 0 of the Redis list" in str(caught.value)


def test_replay_command_wrong_key_type_exits_2(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        client.set(settings.redis_rejects_key, "not a list")
    finally:
        client.close()
    env = {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "VITALS_REDIS_URL": settings.redis_url.get_secret_value(),
        "VITALS_REDIS_REJECTS_KEY": settings.redis_rejects_key,
    }
    result = CliRunner().invoke(replay_rejects_command, ["--dry-run"], env=env)

    assert result.exit_code == 2
    assert "is not a list" in result.stderr


def test_replay_command_warns_of_replayed_sources(settings: Settings) -> None:
    create_topic(settings)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    env = cli_env(settings)
    first = CliRunner().invoke(replay_rejects_command, [], env=env)
    again = CliRunner().invoke(replay_rejects_command, [], env=env)

    assert first.exit_code == 0, first.output
    assert "warning" not in first.stderr
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["skipped_already_replayed"] == 1
    assert "1 reject was not sent because its source is in" in again.stderr
    assert "pass --force to send it again" in again.stderr


def test_reject_value_decodes_base64() -> None:
    assert reject_value({"payload_base64": "6eg=", "payload_truncated": False}) == (
        b"\xe9\xe8"
    )
    assert reject_value({"payload": "é", "payload_truncated": False}) == "é".encode()
    assert reject_value({"payload": "x", "payload_truncated": True}) is None
    assert reject_value({"reason": "tombstone"}) is None


def test_reject_key_decodes_text_and_base64() -> None:
    assert reject_key({"key": "PT-7"}) == b"PT-7"
    assert reject_key({"key_base64": "/w=="}) == b"\xff"
    assert reject_key({"payload": "{}"}) is None
    assert reject_key({"key": None}) is None


def test_source_marker_adds_topic_id() -> None:
    source = {"topic": "vitals", "partition": 2, "offset": 17}
    assert source_marker({"source": source}) == "vitals:2:17"
    assert source_marker({"source": {**source, "topic_id": None}}) == "vitals:2:17"
    marked = source_marker({"source": {**source, "topic_id": "AAAAAAAAAAAAAAAAAAAAAQ"}})
    assert marked == "vitals:2:17:AAAAAAAAAAAAAAAAAAAAAQ"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"reason": "invalid_json"', "invalid JSON, expecting"),
        ('{"reason": "not_utf8", "payload": "\udcff"}', "not UTF-8"),
        ("[1, 2]", "expected an object"),
        ('{"reason": "invalid_json", "payload": "x"}', "'source' needs"),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"payload_base64": "%%%"}',
            "not valid base64",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"payload": "{}", "key_base64": "%%%"}',
            "'key_base64' is not valid base64",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"payload": "{}", "key": 123}',
            "'key' must be a string or null",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"payload": "{}", "key": "A", "key_base64": "Qg=="}',
            "cannot both be set",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1, '
            '"topic_id": 7}, "payload": "{}"}',
            "'source.topic_id' must be a string without spaces, or null",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1, '
            '"topic_id": ""}, "payload": "{}"}',
            "'source.topic_id' must be a string without spaces, or null",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1, '
            '"topic_id": " "}, "payload": "{}"}',
            "'source.topic_id' must be a string without spaces, or null",
        ),
        (
            '{"source": {"topic": "t", "partition": "zero", "offset": 1}, '
            '"payload": "{}"}',
            "'source.partition' must be a whole number of 0 or more",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": -5}, "payload": "{}"}',
            "'source.offset' must be a whole number of 0 or more",
        ),
        (
            '{"source": {"topic": "t", "partition": null, "offset": null}, '
            '"payload": "{}"}',
            "'source.partition' must be a whole number of 0 or more",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": true}, '
            '"payload": "{}"}',
            "'source.offset' must be a whole number of 0 or more",
        ),
        (
            '{"source": {"topic": 7, "partition": 0, "offset": 1}, "payload": "{}"}',
            "'source.topic' must be a Kafka topic name",
        ),
        (
            '{"source": {"topic": "bad topic", "partition": 0, "offset": 1}, '
            '"payload": "{}"}',
            "'source.topic' must be a Kafka topic name",
        ),
        ("[" * 100_000 + "]" * 100_000, "nested too deep"),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, "payload": 42}',
            "'payload' must be a string",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"reason": "wrong_type"}',
            "'payload' or 'payload_base64' is missing",
        ),
        (
            '{"source": {"topic": "t", "partition": 0, "offset": 1}, '
            '"reason": "wrong_type", "payload": null}',
            "'payload' or 'payload_base64' is missing",
        ),
    ],
)
def test_replay_bad_file_line_fails(
    settings: Settings, tmp_path: Path, line: str, problem: str
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(f"{line}\n".encode("utf-8", errors="surrogateescape"))
    with pytest.raises(
        ReplayError, match=rf"broken.jsonl:1 is not a reject.*{problem}"
    ):
        replay_rejects(settings, path=broken)


def test_replay_command_bad_file_exits_2(settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text("[1, 2]\n")
    env = {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "VITALS_REDIS_URL": settings.redis_url.get_secret_value(),
    }
    result = CliRunner().invoke(
        replay_rejects_command, ["--file", str(broken)], env=env
    )

    assert result.exit_code == 2
    assert "broken.jsonl:1 is not a reject JSON object" in result.stderr


def test_replay_rejected_kafka_property_exits_2(
    settings: Settings, tmp_path: Path
) -> None:
    corrected = tmp_path / "corrected.jsonl"
    corrected.write_text(
        '{"source": {"topic": "vitals", "partition": 0, "offset": 1}, "payload": "{}"}\n'
    )
    env = {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "VITALS_REDIS_URL": settings.redis_url.get_secret_value(),
        "VITALS_KAFKA_EXTRA": '{"bogus.prop": 1}',
    }
    result = CliRunner().invoke(
        replay_rejects_command, ["--file", str(corrected)], env=env
    )

    assert result.exit_code == 2
    assert "No such configuration property" in result.stderr


def test_replay_command_unknown_reason_is_usage_error() -> None:
    result = CliRunner().invoke(replay_rejects_command, ["--reason", "nosuchreason"])

    assert result.exit_code == 2
    assert "'nosuchreason' is not one of" in result.stderr


def test_replay_command_prints_counts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_topic(settings)
    for name, value in cli_env(settings).items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(replay_rejects_command, ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["selected"] == 0


def test_replay_file_reads_universal_newlines(tmp_path: Path) -> None:
    """CR, CRLF and LF end lines as in text mode; U+2028 inside a string does not."""
    line = json.dumps(
        {"source": {"topic": "t", "partition": 0, "offset": 1}, "payload": "x\u2028y"},
        ensure_ascii=False,
    )
    path = tmp_path / "rejects.jsonl"
    path.write_bytes(f"{line}\r{line}\r\n\u00a0\n{line}\n".encode())

    rejects = list(rejects_from_file(path))

    assert len(rejects) == 3
    assert rejects[0]["payload"] == "x\u2028y"


def test_replay_sends_original_key(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Each replayed value goes back with the key of the record it came from."""
    from confluent_kafka import Consumer, TopicPartition

    create_topic(settings, partitions=1)
    skewed = encode(reading(patient_id="PT-7", timestamp=2e9))
    produce_tracked(settings, [skewed, b"not json"], keys=[b"PT-7", b"\xff"])
    run_batch(settings)

    report = replay_rejects(settings)
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "keys"}
    )
    try:
        consumer.assign([TopicPartition(settings.kafka_topic, 0, 2)])
        replayed = consumer.consume(num_messages=2, timeout=10)
    finally:
        consumer.close()

    assert report.produced == 2
    assert sorted(message.key() for message in replayed) == [b"PT-7", b"\xff"]


def test_replay_skips_truncated_key(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings, partitions=1)
    produce_tracked(settings, [b"not json"], keys=[b"k" * 5000])
    run_batch(settings)

    report = replay_rejects(settings)

    (reject,) = rejects(redis_client, settings)
    assert reject["key_truncated"] is True
    assert (report.skipped_truncated, report.produced) == (1, 0)


def test_replay_skips_rejects_of_other_topics(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    produce_tracked(settings, [encode(reading(temperature=98.6))])
    run_batch(settings)
    other = {
        "reason": "out_of_range",
        "source": {"topic": "other-ward", "partition": 0, "offset": 4},
        "payload": json.dumps(reading()),
        "payload_truncated": False,
    }
    redis_client.rpush(settings.redis_rejects_key, json.dumps(other))
    env = cli_env(settings)

    own = CliRunner().invoke(replay_rejects_command, ["--dry-run"], env=env)
    every = replay_rejects(settings, dry_run=True, all_topics=True)

    assert own.exit_code == 0, own.output
    counts = json.loads(own.stdout)
    assert counts["topic"] == settings.kafka_topic
    assert counts["would_produce"] == 1
    assert counts["skipped_other_topic"] == 1
    assert every.would_produce == 2
    assert every.skipped_other_topic == 0


def test_replay_topic_option_picks_rejects(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    produce_tracked(settings, [encode(reading(temperature=98.6))])
    run_batch(settings)
    env = cli_env(settings, topic="another-ward")
    arguments = ["--dry-run", "--topic", settings.kafka_topic]

    result = CliRunner().invoke(replay_rejects_command, arguments, env=env)

    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["topic"] == settings.kafka_topic
    assert counts["would_produce"] == 1


def test_replay_tells_recreated_topic_rejects_apart(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A recreated topic numbers its records from 0 again, and its rejects are still replayed."""
    from confluent_kafka.admin import AdminClient

    create_topic(settings, partitions=1)
    produce_tracked(settings, [encode(reading(temperature=98.6))])
    run_batch(settings)
    assert replay_rejects(settings).produced == 1
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.delete_topics([settings.kafka_topic])[settings.kafka_topic].result(10)
    create_topic(settings, partitions=1)
    # As the printed reset of a recreated topic does: forget the old offsets.
    redis_client.delete(settings.redis_offsets_key)
    produce_tracked(settings, [encode(reading(patient_id="PT-2", temperature=98.7))])
    run_batch(settings)

    report = replay_rejects(settings, dry_run=True)

    old, new = rejects(redis_client, settings)
    assert (old["source"]["offset"], new["source"]["offset"]) == (0, 0)
    assert old["source"]["topic_id"] != new["source"]["topic_id"]
    assert (report.would_produce, report.skipped_already_replayed) == (1, 1)


def test_staged_rejects_carry_topic_id(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The DAG's staged tasks write the drained topic's id into each reject."""
    create_topic(settings, partitions=1)
    produce_tracked(settings, [encode(reading(temperature=98.6))])

    manifest = drain_to_staging(settings, tmp_path)
    transform_staging(settings, tmp_path)
    load_staging(settings, tmp_path)

    (reject,) = rejects(redis_client, settings)
    assert manifest["topic_id"]
    assert reject["source"]["topic_id"] == manifest["topic_id"]


def test_replay_sends_repeated_source_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A partition read again gives two rejects of one record: one value goes out."""
    create_topic(settings, partitions=1)
    produce_tracked(settings, [encode(reading(timestamp=2e9))])
    run_batch(settings)
    redis_client.hset(settings.redis_offsets_key, f"{settings.kafka_topic}:0", 0)
    run_batch(settings)
    assert len(rejects(redis_client, settings)) == 2

    report = replay_rejects(settings)

    assert (report.produced, report.skipped_repeated_source) == (1, 1)
    assert redis_client.scard(settings.redis_rejects_key + REPLAYED_SUFFIX) == 1


def test_replay_file_repeats_source_without_id(
    settings: Settings, tmp_path: Path
) -> None:
    create_topic(settings, partitions=1)
    source = {"topic": settings.kafka_topic, "partition": 0, "offset": 3}
    lines = [
        {"source": {**source, "topic_id": "AAAAAAAAAAAAAAAAAAAAAQ"}, "payload": "{}"},
        {"source": source, "payload": "{}"},
    ]
    corrected = tmp_path / "corrected.jsonl"
    corrected.write_text("".join(json.dumps(line) + "\n" for line in lines))

    report = replay_rejects(settings, path=corrected, dry_run=True)

    assert (report.would_produce, report.skipped_repeated_source) == (1, 1)


def test_replay_fails_while_another_runs(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A second replay of the same rejects list fails and sends nothing."""
    create_topic(settings)
    produce_tracked(settings, [b"not json"])
    run_batch(settings)
    running = redis_client.lock(settings.redis_rejects_key + LOCK_SUFFIX, timeout=60)
    assert running.acquire(blocking=False)

    with pytest.raises(ReplayError, match=r"another replay of .* is running") as raised:
        replay_rejects(settings)
    dry = replay_rejects(settings, dry_run=True)
    running.release()
    report = replay_rejects(settings)

    assert f"DEL {settings.redis_rejects_key}{LOCK_SUFFIX}" in str(raised.value)
    assert redis_client.scard(settings.redis_rejects_key + REPLAYED_SUFFIX) == 1
    assert dry.would_produce == 1
    assert report.produced == 1
    assert redis_client.exists(settings.redis_rejects_key + LOCK_SUFFIX) == 0


def test_replay_command_locked_exits_3(
    settings: Settings, redis_client: redis.Redis
) -> None:
    create_topic(settings)
    redis_client.set(settings.redis_rejects_key + LOCK_SUFFIX, "other", ex=60)

    result = CliRunner().invoke(replay_rejects_command, [], env=cli_env(settings))

    assert result.exit_code == 3
    assert "another replay" in result.stderr


def test_replay_releases_lock_after_failure(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text("[1, 2]\n")

    with pytest.raises(InvalidReject):
        replay_rejects(settings, path=broken)

    assert redis_client.exists(settings.redis_rejects_key + LOCK_SUFFIX) == 0


def replay_losing_marks(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> str:
    """Replay while Redis fails to store the replayed sources, and return the error message."""

    def lost(*_args: object) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(redis.Redis, "sadd", lost)
        with pytest.raises(ReplayError) as failure:
            replay_rejects(settings)
    return " ".join(str(failure.value).split())


def test_replay_without_redis_sends_nothing(settings: Settings) -> None:
    create_topic(settings)
    unreachable = settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}
    )

    with pytest.raises(ReplayError) as failure:
        replay_rejects(unreachable)

    message = str(failure.value)
    assert "failed during the replay" in message
    assert "Nothing was produced or marked as replayed" in message


def test_replay_lost_marks_print_sadd(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails once the values are produced: the error prints the SADD that marks them."""
    create_topic(settings)
    produce_tracked(settings, [b"not json", b"[1]"])
    run_batch(settings)

    message = replay_losing_marks(settings, monkeypatch)
    mark = shlex.split(message.split("mark them with ", 1)[1])
    redis_client.execute_command(*mark[mark.index("SADD") :])
    again = replay_rejects(settings)

    assert "The values of 2 rejects were produced" in message
    assert again.skipped_already_replayed == 2
    assert again.produced == 0


def test_replay_wrong_type_prints_sadd(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """With --force the replayed set is read only after the values were produced."""
    create_topic(settings)
    produce_tracked(settings, [b"not json"])
    run_batch(settings)
    redis_client.set(settings.redis_rejects_key + REPLAYED_SUFFIX, "not a set")

    with pytest.raises(ReplayError) as failure:
        replay_rejects(settings, force=True)

    message = " ".join(str(failure.value).split())
    assert "WRONGTYPE" in message
    assert "The values of 1 reject were produced" in message
    assert "SADD" in message


def test_replay_many_unmarked_go_to_file(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the inline limit, the sources to mark are in a file that xargs reads."""
    create_topic(settings)
    produce_tracked(settings, [b"not json", b"[1]", b"{"])
    run_batch(settings)
    monkeypatch.setattr(replay, "_MARKERS_INLINE", 2)

    message = replay_losing_marks(settings, monkeypatch)
    command = shlex.split(message.split("mark them with ", 1)[1].split(", then", 1)[0])
    markers = Path(command[-1]).read_text().split()
    with Path(command[-1]).open() as sources:
        xargs = subprocess.run(
            command[:-2], stdin=sources, capture_output=True, check=False
        )
    Path(command[-1]).unlink()

    assert command[:3] == ["xargs", "-n", "2"]
    assert command[-2] == "<"
    assert xargs.returncode == 0, xargs.stderr
    assert redis_client.smembers(settings.redis_rejects_key + REPLAYED_SUFFIX) == {
        marker.encode() for marker in markers
    }
    assert sorted(markers) == sorted(
        source_marker(r) for r in rejects(redis_client, settings)
    )


def test_replay_expired_lock_sends_nothing(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_topic(settings)
    produce_tracked(settings, [b"not json"])
    run_batch(settings)
    lock_key = settings.redis_rejects_key + LOCK_SUFFIX
    check = replay._require_topic

    def expire_lock(checked: Settings) -> None:
        check(checked)
        redis_client.delete(lock_key)

    monkeypatch.setattr(replay, "_require_topic", expire_lock)
    with pytest.raises(ReplayError, match="expired") as failure:
        replay_rejects(settings)

    assert "Nothing was produced" in str(failure.value)
    assert redis_client.exists(settings.redis_rejects_key + REPLAYED_SUFFIX) == 0
