"""Secrets and access control: Redis passwords and ACLs, TLS, Kafka SASL, masked output."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from unittest import mock

import pytest
import redis
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from etl import explore
from etl.cli import main
from etl.config import ConfigurationError, Settings, load_settings, redact_url
from etl.pipeline import (
    drain_to_staging,
    load_staging,
    report_staging,
    run_batch,
    transform_staging,
)
from etl.services import Service, free_port, start_redis
from etl.sink import RedisSink, SinkError
from etl.source import KafkaSource
from tests.conftest import (
    OPERATIONS_DOC,
    Broker,
    create_topic,
    encode,
    make_settings,
    reading,
)
from tests.integration.accounting import assert_accounted, produce_tracked
from tests.integration.faultpoints import etl_argv, run_child, settings_env

pytestmark = pytest.mark.integration

ADMIN_PASSWORD: Final = "admin-Secret-7c1e"
ETL_PASSWORD: Final = "etl-Secret-93ab"

#: The commands a batch needs, found by running batches (plain and staged)
#: under an ACL user with ``-@all`` and adding what ``ACL LOG`` reported.
#: redis-py also sends CLIENT SETINFO on Redis 7.2 and later, and ignores its
#: failure, so it is left out. LRANGE serves the advice printed when a stored
#: offset is past the end of the log, which these batches do not reach,
#: SELECT a database other than 0, and INFO the check of maxmemory-policy.
ETL_COMMANDS: Final = (
    "ping",
    "hello",
    "hgetall",
    "hmget",
    "hset",
    "hincrby",
    "watch",
    "unwatch",
    "multi",
    "exec",
    "rpush",
    "xadd",
    "type",
    "lrange",
    "select",
    "info",
)
#: The commands that the readers need on top of ETL_COMMANDS: ``etl reports``
#: runs XREVRANGE, ``etl show`` LRANGE, ``etl replay-rejects`` LRANGE,
#: SISMEMBER and SADD, and for its lock (redis-py's Lock) SET, EVALSHA and
#: SCRIPT LOAD, whose scripts run GET, PEXPIRE and DEL. The loaders of
#: ``etl.explore`` run PING, LLEN, LRANGE, XRANGE and XREVRANGE.
READER_COMMANDS: Final = (
    "xrevrange", "xrange", "llen", "sismember", "sadd",
    "set", "evalsha", "script|load", "get", "pexpire", "del",
)  # fmt: skip


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[Service]:
    """A redis-server that requires ADMIN_PASSWORD (``requirepass``)."""
    service = start_redis(
        port=free_port(), state_dir=tmp_path / "redis", password=ADMIN_PASSWORD
    )
    try:
        yield service
    finally:
        service.stop()


def mixed_values(count: int) -> list[bytes | None]:
    return [
        encode(reading(patient_id=f"PT-{i}", age="old" if i % 5 == 0 else 58))
        for i in range(count)
    ]


def key_prefix(settings: Settings) -> str:
    """The prefix that every Redis key of the test settings starts with."""
    return settings.redis_list_key.split(":", 1)[0]


# Redis with a password.


def test_batch_with_password_url(broker: Broker, password_redis: Service) -> None:
    url = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)
    create_topic(settings)
    produced = produce_tracked(settings, mixed_values(50))

    report = run_batch(settings)

    assert report.read == 50
    client = redis.Redis.from_url(url)
    try:
        assert_accounted(client, settings, produced)
    finally:
        client.close()


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param("", id="no-password"),
        pytest.param(":wrong-Secret-55", id="wrong-password"),
        pytest.param("nobody:wrong-Secret-55", id="unknown-user"),
    ],
)
def test_sink_bad_credentials_fail_clearly(
    broker: Broker, password_redis: Service, credentials: str
) -> None:
    at = "@" if credentials else ""
    url = f"redis://{credentials}{at}127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)
    sink = RedisSink(settings)
    try:
        with pytest.raises(SinkError, match="rejected the user or password") as info:
            sink.check()
    finally:
        sink.close()
    message = str(info.value)
    assert f"127.0.0.1:{password_redis.port}" in message
    assert "wrong-Secret-55" not in message
    assert ADMIN_PASSWORD not in message


def test_run_wrong_password_exits_3_without_secret(
    broker: Broker, password_redis: Service, tmp_path: Path
) -> None:
    url = f"redis://:wrong-Secret-55@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)

    child = run_child(etl_argv("run"), settings, tmp_path, timeout=60)

    output = " ".join((child.stdout + child.stderr).split())
    assert child.returncode == 3, output
    assert f"redis://:***@127.0.0.1:{password_redis.port}/0" in output
    assert "wrong-Secret-55" not in output
    assert "Traceback" not in output


# An ACL user limited to the product's keys and commands.


def create_etl_user(
    admin: redis.Redis, settings: Settings, commands: tuple[str, ...] = ETL_COMMANDS
) -> None:
    admin.execute_command(
        "ACL",
        "SETUSER",
        "etl",
        "reset",
        "on",
        f">{ETL_PASSWORD}",
        f"~{key_prefix(settings)}:*",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in commands),
    )


def test_acl_user_runs_plain_and_staged_batches(
    broker: Broker, password_redis: Service, tmp_path: Path
) -> None:
    """The minimal command set suffices: no command is denied in either form of the batch."""
    admin = redis.Redis.from_url(
        f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    )
    url = f"redis://etl:{ETL_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url, chunk_size=40)
    create_etl_user(admin, settings)
    admin.execute_command("ACL", "LOG", "RESET")
    create_topic(settings)
    produced = produce_tracked(settings, mixed_values(100))
    try:
        run_batch(settings)
        produced += produce_tracked(settings, mixed_values(60))
        drain_to_staging(settings, tmp_path)
        transform_staging(settings, tmp_path)
        load_staging(settings, tmp_path)
        report_staging(settings, tmp_path)

        assert admin.execute_command("ACL", "LOG") == []
        assert_accounted(admin, settings, produced)
        assert admin.xlen(settings.redis_reports_key) == 2
    finally:
        admin.close()


def test_acl_user_runs_readers(broker: Broker, password_redis: Service) -> None:
    """The batch's commands and READER_COMMANDS suffice for every reader."""
    admin = redis.Redis.from_url(
        f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    )
    url = f"redis://etl:{ETL_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)
    create_etl_user(admin, settings, (*ETL_COMMANDS, *READER_COMMANDS))
    create_topic(settings)
    produce_tracked(settings, mixed_values(20))
    env = settings_env(settings)
    runner = CliRunner()
    try:
        run_batch(settings)
        admin.execute_command("ACL", "LOG", "RESET")

        reports_result = runner.invoke(main, ["reports"], env=env)
        show_result = runner.invoke(main, ["show"], env=env)
        replay_result = runner.invoke(main, ["replay-rejects"], env=env)
        rows = explore.load_rows(settings)
        rejects = explore.load_rejects(settings)
        every_report = explore.load_reports(settings)
        last_report = explore.load_reports(settings, last=1)

        assert reports_result.exit_code == 0, reports_result.output
        assert show_result.exit_code == 0, show_result.output
        assert replay_result.exit_code == 0, replay_result.output
        assert json.loads(replay_result.stdout)["produced"] == 4
        assert rows.height == 16
        assert rejects.height == 4
        assert every_report.height == 1
        assert last_report.height == 1
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        admin.close()


def test_reports_needs_xrevrange(broker: Broker, password_redis: Service) -> None:
    admin = redis.Redis.from_url(
        f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    )
    url = f"redis://etl:{ETL_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)
    create_etl_user(admin, settings)
    try:
        result = CliRunner().invoke(main, ["reports"], env=settings_env(settings))
    finally:
        admin.close()

    assert result.exit_code == 3
    assert "no permissions to run the 'xrevrange' command" in result.stderr


def test_operations_doc_lists_acl_commands() -> None:
    """The ACL line and the readers' additions in docs/operations.md match the tested sets."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    line = next(row for row in text.splitlines() if "ACL SETUSER etl" in row)
    granted = [word[1:] for word in line.split() if word.startswith("+")]
    added = re.search(r"`((?:\+[a-z|]+ ?)+)` added to that line", text)

    assert granted == list(ETL_COMMANDS)
    assert added is not None
    assert added.group(1).split() == [f"+{command}" for command in READER_COMMANDS]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("GET", "other-app:secret"), id="other-key"),
        pytest.param(("LRANGE", "liste-patients-other", "0", "-1"), id="other-list"),
        pytest.param(("FLUSHALL",), id="flushall"),
        pytest.param(("CONFIG", "GET", "requirepass"), id="config"),
        pytest.param(("KEYS", "*"), id="keys"),
        pytest.param(("DEL", "{prefix}:offsets"), id="delete-offsets"),
    ],
)
def test_acl_user_denied_outside_its_scope(
    broker: Broker, password_redis: Service, command: tuple[str, ...]
) -> None:
    admin = redis.Redis.from_url(
        f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    )
    url = f"redis://etl:{ETL_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    settings = make_settings(broker.bootstrap, url)
    create_etl_user(admin, settings)
    client = redis.Redis.from_url(url)
    args = [part.replace("{prefix}", key_prefix(settings)) for part in command]
    try:
        with pytest.raises(redis.exceptions.NoPermissionError, match="permission"):
            client.execute_command(*args)
    finally:
        client.close()
        admin.close()


# TLS and other URL schemes reach redis-py's connection classes.


@pytest.mark.parametrize(
    ("url", "connection_class"),
    [
        pytest.param(
            "rediss://etl:pw@cache.example.internal:6380/0",
            redis.SSLConnection,
            id="rediss",
        ),
        pytest.param("redis://127.0.0.1:6380/0", redis.Connection, id="redis"),
        pytest.param(
            "unix:///run/redis/redis.sock?db=0",
            redis.UnixDomainSocketConnection,
            id="unix",
        ),
    ],
)
def test_redis_url_scheme_selects_connection(
    url: str, connection_class: type[Any]
) -> None:
    """No connection is opened: the client is only built from the URL."""
    sink = RedisSink(load_settings(redis_url=url))
    assert sink.client.connection_pool.connection_class is connection_class


def test_rediss_url_passes_tls_options() -> None:
    url = (
        "rediss://etl:pw@cache.example.internal:6380/0"
        "?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/certs/ca.pem"
    )
    sink = RedisSink(load_settings(redis_url=url))
    kwargs = sink.client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/certs/ca.pem"
    assert kwargs["password"] == "pw"


# Kafka SASL and TLS settings reach librdkafka.

KAFKA_SECURITY: Final[dict[str, Any]] = {
    "kafka_bootstrap_servers": "broker.example.internal:9093",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "etl",
    "kafka_sasl_password": "sasl-Secret-4d2f",
    "kafka_ssl_ca_location": "/etc/ssl/certs/kafka-ca.pem",
}
LIBRDKAFKA_SECURITY: Final = {
    "bootstrap.servers": "broker.example.internal:9093",
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "etl",
    "sasl.password": "sasl-Secret-4d2f",
    "ssl.ca.location": "/etc/ssl/certs/kafka-ca.pem",
}


def test_kafka_security_settings_reach_consumer_and_admin() -> None:
    """Both the draining consumer and the admin client that commits get them."""
    settings = load_settings(**KAFKA_SECURITY)
    assert LIBRDKAFKA_SECURITY.items() <= settings.kafka_config().items()

    with (
        mock.patch("etl.source.Consumer") as consumer,
        mock.patch("etl.source.AdminClient") as admin,
    ):
        admin.return_value.alter_consumer_group_offsets.return_value = {}
        source = KafkaSource(settings)
        source.commit({0: 1})
        source.close()

    (consumer_config,), _ = consumer.call_args
    (admin_config,), _ = admin.call_args
    assert LIBRDKAFKA_SECURITY.items() <= consumer_config.items()
    assert LIBRDKAFKA_SECURITY.items() <= admin_config.items()


def test_kafka_extra_wins_over_settings() -> None:
    settings = load_settings(
        **KAFKA_SECURITY, kafka_extra={"ssl.endpoint.identification.algorithm": "none"}
    )
    assert settings.kafka_config()["ssl.endpoint.identification.algorithm"] == "none"


# Secrets never printed.

SECRET_ENV: Final = {
    "VITALS_REDIS_URL": "rediss://etl:redis-Secret-11aa@cache.example.internal:6380/0",
    "VITALS_KAFKA_SASL_PASSWORD": "sasl-Secret-22bb",
    "VITALS_KAFKA_EXTRA": json.dumps(
        {
            "ssl.key.password": "key-Secret-33cc",
            "sasl.oauthbearer.client.secret": "oauth-Secret-44dd",
            "sasl.oauthbearer.config": "clientSecret=oauth-Secret-55ee",
            "ssl.key.pem": "pem-Secret-66ff",
            "client.id": "vitals-etl",
        }
    ),
}
SECRETS: Final = (
    "redis-Secret-11aa",
    "sasl-Secret-22bb",
    "key-Secret-33cc",
    "oauth-Secret-44dd",
    "oauth-Secret-55ee",
    "pem-Secret-66ff",
)


def test_settings_redacted_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()

    shown = json.dumps(settings.redacted())

    for secret in SECRETS:
        assert secret not in shown
    assert settings.redacted()["kafka_extra"]["client.id"] == "vitals-etl"
    assert "rediss://etl:***@cache.example.internal:6380/0" in shown
    assert settings.kafka_config()["sasl.password"] == "sasl-Secret-22bb"


def test_cli_settings_never_prints_secrets(tmp_path: Path) -> None:
    child = run_child(
        etl_argv("settings"),
        load_settings(),
        tmp_path,
        timeout=60,
        extra_env=SECRET_ENV,
    )

    assert child.returncode == 0, child.stderr
    for secret in SECRETS:
        assert secret not in child.stdout + child.stderr
    assert json.loads(child.stdout)["kafka_sasl_password"] == "***"


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(
            {"VITALS_REDIS_URL": "http://etl:redis-Secret-11aa@cache:6380/0"},
            id="bad-url-scheme",
        ),
        pytest.param(
            {"VITALS_KAFKA_EXTRA": '{"sasl.password": "sasl-Secret-22bb"'},
            id="extra-not-json",
        ),
        pytest.param(
            {"VITALS_KAFKA_EXTRA": '["sasl.password", "sasl-Secret-22bb"]'},
            id="extra-not-object",
        ),
        pytest.param(
            {
                "VITALS_KAFKA_SASL_PASSWORD": "sasl-Secret-22bb",
                "VITALS_CHUNK_SIZE": "0",
            },
            id="other-field-invalid",
        ),
    ],
)
def test_cli_invalid_settings_exit_2_without_secrets(
    tmp_path: Path, env: dict[str, str]
) -> None:
    child = run_child(
        etl_argv("run"), load_settings(), tmp_path, timeout=60, extra_env=env
    )

    output = child.stdout + child.stderr
    assert child.returncode == 2, output
    assert "invalid settings" in output
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output


def test_load_settings_extra_not_json_names_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITALS_KAFKA_EXTRA", "{not json")
    with pytest.raises(
        ConfigurationError, match="VITALS_KAFKA_EXTRA is not valid JSON"
    ):
        load_settings()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis://:pw@127.0.0.1:6380/0",
            "redis://:***@127.0.0.1:6380/0",
            id="password",
        ),
        pytest.param(
            "redis://etl:pw@host:6379/1", "redis://etl:***@host:6379/1", id="user"
        ),
        # Unencoded @, / and ? in the password: the user part ends at the last @.
        pytest.param("rediss://etl:p@ss@host/0", "rediss://etl:***@host/0", id="at"),
        pytest.param(
            "redis://:pa/ss@host:6379/0", "redis://:***@host:6379/0", id="slash"
        ),
        pytest.param("redis://:pa?ss@host/0", "redis://:***@host/0", id="question"),
        pytest.param("redis://:p%40ss@host/0", "redis://:***@host/0", id="encoded"),
        pytest.param(
            "redis://host:6379/0?password=pw&db=1",
            "redis://host:6379/0?password=***&db=1",
            id="query-password",
        ),
        pytest.param(
            "unix://:pw@/run/redis.sock?db=0",
            "unix://:***@/run/redis.sock?db=0",
            id="unix",
        ),
        pytest.param("redis://etl@host/0", "redis://***@host/0", id="user-only"),
        pytest.param("redis://host:6379/0", "redis://host:6379/0", id="no-secret"),
    ],
)
def test_redact_url_masks_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@given(
    st.text(
        st.characters(codec="ascii", exclude_characters="\x00\r\n"),
        min_size=6,
        max_size=30,
    )
)
def test_redact_url_never_shows_password(password: str) -> None:
    assume(password not in "redis://etl:***@")
    url = f"redis://etl:{password}@cache.example.internal:6380/0"
    shown = redact_url(url)
    assert password not in shown.replace("cache.example.internal:6380/0", "")
