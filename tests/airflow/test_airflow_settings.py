"""Settings inside Airflow: connections ``kafka_default`` and ``redis_default``."""

from __future__ import annotations

import json
import os
from typing import Any
from unittest import mock

import pytest

from etl.airflow_settings import kafka_overrides, redis_url, settings_from_airflow
from etl.config import ConfigurationError, load_settings

KAFKA_SASL: dict[str, Any] = {
    "conn_type": "kafka",
    "extra": {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "group.id": "vitals-airflow",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "etl",
        "sasl.password": "kafka-secret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "client.id": "vitals-dag",
        "enable.auto.commit": True,
    },
}
REDIS_TLS: dict[str, Any] = {
    "conn_type": "redis",
    "host": "redis.internal",
    "port": 6390,
    "login": "etl",
    "password": "p@ss:word",
    "extra": {"db": 3, "ssl": True, "ssl_cert_reqs": "required"},
}


def connection_env(**connections: dict[str, Any]) -> dict[str, str]:
    """``AIRFLOW_CONN_<ID>`` variables in the JSON form, from connection dicts."""
    return {
        f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(value)
        for conn_id, value in connections.items()
    }


def clean_environ(**extra: str) -> dict[str, str]:
    """The current environment without VITALS_* and AIRFLOW_CONN_* variables."""
    unrelated = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VITALS_", "AIRFLOW_CONN_"))
    }
    return {**unrelated, **extra}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # The provider's own example: host name only.
        pytest.param(
            {"db": 0}, "redis://redis.internal:6379/0", id="defaults-db-from-extra"
        ),
        # The provider reads db from the extra, and a string is accepted.
        pytest.param({"db": "5"}, "redis://redis.internal:6379/5", id="db-as-string"),
        # TLS with verification options passed to redis-py as query arguments.
        pytest.param(
            {"ssl": "true", "ssl_cert_reqs": "none", "ssl_check_hostname": False},
            "rediss://redis.internal:6379/0?ssl_cert_reqs=none&ssl_check_hostname=false",
            id="tls-options",
        ),
        # TLS options without TLS: the provider passes them to Redis(), which ignores them.
        pytest.param(
            {"ssl": False, "ssl_cert_reqs": "none"},
            "redis://redis.internal:6379/0",
            id="tls-options-without-tls",
        ),
    ],
)
def test_redis_url_from_extra(extra: dict[str, Any], expected: str) -> None:
    url = redis_url(
        host="redis.internal", port=None, login=None, password=None, extra=extra
    )
    assert url == expected


@pytest.mark.parametrize(
    ("login", "password", "expected"),
    [
        # Reserved characters of a password are percent-encoded.
        pytest.param(
            "etl", "p@ss:w/rd", "redis://etl:p%40ss%3Aw%2Frd@r:6380/0", id="acl"
        ),
        # requirepass without a user name.
        pytest.param(None, "secret", "redis://:secret@r:6380/0", id="password-only"),
        # The Redis provider reads these strings as no password.
        pytest.param(None, "None", "redis://r:6380/0", id="password-none-string"),
        pytest.param(None, "", "redis://r:6380/0", id="password-empty"),
    ],
)
def test_redis_url_credentials(
    login: str | None, password: str | None, expected: str
) -> None:
    url = redis_url(host="r", port=6380, login=login, password=password, extra={})
    assert url == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param("::1", "redis://[::1]:6380/0", id="ipv6"),
        pytest.param("[::1]", "redis://[::1]:6380/0", id="ipv6-bracketed"),
        pytest.param("10.0.0.5", "redis://10.0.0.5:6380/0", id="ipv4"),
    ],
)
def test_redis_url_host_forms_pass_settings(host: str, expected: str) -> None:
    url = redis_url(host=host, port=6380, login=None, password=None, extra={})

    assert url == expected
    assert load_settings(redis_url=url).redis_url.get_secret_value() == expected


@pytest.mark.parametrize(
    ("host", "extra", "match"),
    [
        pytest.param(None, {}, "has no host", id="no-host"),
        pytest.param("r", {"db": "zero"}, "db='zero'", id="db-not-integer"),
        pytest.param("r", {"db": -1}, "db=-1", id="db-negative"),
    ],
)
def test_redis_url_rejects_invalid_connection(
    host: str | None, extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        redis_url(host=host, port=None, login=None, password=None, extra=extra)


def test_kafka_overrides_maps_fields_and_keeps_rest() -> None:
    base = load_settings(kafka_extra={"client.rack": "a", "client.id": "env"})
    overrides = kafka_overrides(KAFKA_SASL["extra"], base=base)
    assert overrides["kafka_bootstrap_servers"] == "kafka-1:9093,kafka-2:9093"
    assert overrides["kafka_group_id"] == "vitals-airflow"
    assert overrides["kafka_security_protocol"] == "SASL_SSL"
    assert overrides["kafka_sasl_mechanism"] == "SCRAM-SHA-512"
    assert overrides["kafka_sasl_username"] == "etl"
    assert overrides["kafka_sasl_password"] == "kafka-secret"
    assert overrides["kafka_ssl_ca_location"] == "/etc/ssl/ca.pem"
    # The connection wins over VITALS_KAFKA_EXTRA, and other env properties stay.
    assert overrides["kafka_extra"] == {"client.rack": "a", "client.id": "vitals-dag"}


@pytest.mark.parametrize(
    "key",
    [
        # Auto-commit would commit offsets before Redis has the rows.
        pytest.param("enable.auto.commit", id="auto-commit"),
        # Without end-of-partition events the drain runs to its deadline.
        pytest.param("enable.partition.eof", id="partition-eof"),
        # A reset would jump over records when a stored offset is outside the topic.
        pytest.param("auto.offset.reset", id="offset-reset"),
        # A callback given as a dotted string is not callable for confluent-kafka.
        pytest.param("error_cb", id="callback"),
    ],
)
def test_kafka_overrides_drops_reserved_property(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"bootstrap.servers": "k:9092", key: "value"}
    overrides = kafka_overrides(extra, base=load_settings())
    assert key not in overrides["kafka_extra"]
    assert key in caplog.text


def test_kafka_overrides_requires_bootstrap_servers() -> None:
    with pytest.raises(ConfigurationError, match=r"no 'bootstrap\.servers'"):
        kafka_overrides({"group.id": "g"}, base=load_settings())


@pytest.mark.airflow
def test_settings_from_airflow_without_connections_uses_env() -> None:
    pytest.importorskip("airflow")
    env = clean_environ(
        VITALS_KAFKA_BOOTSTRAP_SERVERS="env-kafka:9092",
        VITALS_REDIS_URL="redis://env-redis:6379/1",
    )
    with mock.patch.dict(os.environ, env, clear=True):
        settings = settings_from_airflow()
    assert settings.kafka_bootstrap_servers == "env-kafka:9092"
    assert settings.redis_url.get_secret_value() == "redis://env-redis:6379/1"


@pytest.mark.airflow
def test_settings_from_airflow_connections_override_env() -> None:
    pytest.importorskip("airflow")
    env = clean_environ(
        VITALS_KAFKA_BOOTSTRAP_SERVERS="env-kafka:9092",
        VITALS_KAFKA_TOPIC="vitals-ward-7",
        VITALS_REDIS_URL="redis://env-redis:6379/1",
        **connection_env(kafka_default=KAFKA_SASL, redis_default=REDIS_TLS),
    )
    with mock.patch.dict(os.environ, env, clear=True):
        settings = settings_from_airflow()
    assert settings.kafka_bootstrap_servers == "kafka-1:9093,kafka-2:9093"
    assert settings.kafka_group_id == "vitals-airflow"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "kafka-secret"
    assert settings.kafka_extra == {"client.id": "vitals-dag"}
    # Settings without a connection field still come from VITALS_*.
    assert settings.kafka_topic == "vitals-ward-7"
    assert (
        settings.redis_url.get_secret_value()
        == "rediss://etl:p%40ss%3Aword@redis.internal:6390/3?ssl_cert_reqs=required"
    )


@pytest.mark.airflow
def test_settings_from_airflow_redis_only() -> None:
    pytest.importorskip("airflow")
    redis_only = {"conn_type": "redis", "host": "redis", "port": 6379}
    env = clean_environ(
        VITALS_KAFKA_BOOTSTRAP_SERVERS="env-kafka:9092",
        **connection_env(redis_default=redis_only),
    )
    with mock.patch.dict(os.environ, env, clear=True):
        settings = settings_from_airflow()
    assert settings.kafka_bootstrap_servers == "env-kafka:9092"
    assert settings.redis_url.get_secret_value() == "redis://redis:6379/0"


@pytest.mark.airflow
@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        # The provider reads db from the extra and ignores the URI path.
        pytest.param("redis://redis:6379/3", "redis://redis:6379/0", id="path-ignored"),
        # Query arguments of a connection URI become its extra.
        pytest.param("redis://redis:6379?db=3", "redis://redis:6379/3", id="db-query"),
    ],
)
def test_settings_from_airflow_redis_uri_form(uri: str, expected: str) -> None:
    pytest.importorskip("airflow")
    env = clean_environ(AIRFLOW_CONN_REDIS_DEFAULT=uri)
    with mock.patch.dict(os.environ, env, clear=True):
        settings = settings_from_airflow()
    assert settings.redis_url.get_secret_value() == expected


@pytest.mark.airflow
def test_settings_from_airflow_names_invalid_connection() -> None:
    pytest.importorskip("airflow")
    bad_protocol = {
        "conn_type": "kafka",
        "extra": {"bootstrap.servers": "k:9092", "security.protocol": "TLS"},
    }
    env = clean_environ(**connection_env(kafka_default=bad_protocol))
    with (
        mock.patch.dict(os.environ, env, clear=True),
        pytest.raises(ConfigurationError) as raised,
    ):
        settings_from_airflow()
    message = str(raised.value)
    assert message.startswith("Airflow connection kafka_default is invalid: ")
    assert "the extra 'security.protocol' of kafka_default = 'TLS'" in message
    assert "VITALS_" not in message


@pytest.mark.airflow
def test_settings_from_airflow_names_invalid_redis_url() -> None:
    pytest.importorskip("airflow")
    bad_port = {"conn_type": "redis", "host": "redis", "port": 70000}
    env = clean_environ(**connection_env(redis_default=bad_port))
    with (
        mock.patch.dict(os.environ, env, clear=True),
        pytest.raises(ConfigurationError) as raised,
    ):
        settings_from_airflow()
    message = str(raised.value)
    assert message.startswith("Airflow connection redis_default is invalid: ")
    assert "the URL of redis_default = 'redis://redis:70000/0'" in message
    assert "VITALS_" not in message
