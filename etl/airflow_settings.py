"""Settings inside Airflow: ``VITALS_*`` variables overridden by Airflow connections.

Airflow is imported inside :func:`settings_from_airflow` only, so the rest of
``etl`` stays importable and testable without Airflow.

``kafka_default`` (conn_type ``kafka``) keeps librdkafka properties in its
extra JSON, as the Apache Kafka provider reads them::

    {"bootstrap.servers": "kafka:9092", "group.id": "vitals-etl",
     "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
     "sasl.username": "etl", "sasl.password": "..."}

``redis_default`` (conn_type ``redis``) uses host, port, login and password,
and, as the Redis provider does, reads the database number and TLS options
from the extra (``db``, ``ssl``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ...),
never from the URI path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode

from etl.config import ConfigurationError, Settings, load_settings

if TYPE_CHECKING:
    from airflow.sdk import Connection

logger = logging.getLogger(__name__)

KAFKA_CONN_ID: Final = "kafka_default"
REDIS_CONN_ID: Final = "redis_default"

#: librdkafka properties of the connection that have their own Settings field.
KAFKA_FIELDS: Final = {
    "bootstrap.servers": "kafka_bootstrap_servers",
    "group.id": "kafka_group_id",
    "security.protocol": "kafka_security_protocol",
    "sasl.mechanism": "kafka_sasl_mechanism",
    # librdkafka accepts both spellings.
    "sasl.mechanisms": "kafka_sasl_mechanism",
    "sasl.username": "kafka_sasl_username",
    "sasl.password": "kafka_sasl_password",
    "ssl.ca.location": "kafka_ssl_ca_location",
}

#: Consumer properties the batch sets itself: a connection that changed them
#: would break the end-of-partition drain, commit offsets before Redis has the
#: rows, or jump over records when a stored offset is outside the topic.
KAFKA_RESERVED: Final = frozenset(
    {
        "enable.auto.commit",
        "enable.auto.offset.store",
        "enable.partition.eof",
        "auto.offset.reset",
    }
)

#: TLS options of the Redis provider, passed to redis-py as URL query arguments.
REDIS_SSL_OPTIONS: Final = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_check_hostname",
)


def settings_from_airflow() -> Settings:
    """Build the settings from ``VITALS_*`` variables and the Airflow connections.

    Each of ``kafka_default`` and ``redis_default`` that is defined overrides
    the matching settings. An undefined one leaves the environment's values.

    Raises
    ------
    ConfigurationError
        When a connection has a missing or invalid value; the message names
        the connection.
    """
    base = load_settings()
    overrides: dict[str, Any] = {}
    # The VITALS_* variable of each overridden setting, with its connection
    # and its place there, so that an error names what the user set.
    sources: dict[str, tuple[str, str]] = {}

    kafka = _connection(KAFKA_CONN_ID)
    if kafka is not None:
        extra = kafka.extra_dejson
        overrides.update(kafka_overrides(extra, base=base))
        for key in extra:
            field = KAFKA_FIELDS.get(key, "kafka_extra")
            sources[f"VITALS_{field.upper()}"] = (KAFKA_CONN_ID, f"extra {key!r}")
    redis = _connection(REDIS_CONN_ID)
    if redis is not None:
        overrides["redis_url"] = redis_url(
            host=redis.host,
            port=redis.port,
            login=redis.login,
            password=redis.password,
            extra=redis.extra_dejson,
        )
        sources["VITALS_REDIS_URL"] = (REDIS_CONN_ID, "URL")
    if not overrides:
        return base

    try:
        return load_settings(**overrides)
    except ConfigurationError as exc:
        raise ConfigurationError(_connection_error(str(exc), sources)) from None


def _connection_error(message: str, sources: dict[str, tuple[str, str]]) -> str:
    """Reword a settings error so that it names the connection values, not VITALS_*."""
    named: set[str] = set()
    for variable, (conn_id, place) in sources.items():
        if f"{variable}=" in message:
            message = message.replace(f"{variable}=", f"the {place} of {conn_id} = ")
            named.add(conn_id)
    message = message.removeprefix("invalid settings: ")
    if len(named) == 1:
        return f"Airflow connection {named.pop()} is invalid: {message}"
    return (
        f"Airflow connection {KAFKA_CONN_ID} or {REDIS_CONN_ID} is invalid: {message}"
    )


def _connection(conn_id: str) -> Connection | None:
    """Return the Airflow connection ``conn_id``, or None when it is not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        found: Connection = Connection.get(conn_id)
    except AirflowNotFoundException:
        logger.info("Airflow connection %s is not defined, so VITALS_* apply", conn_id)
        return None
    logger.info("Using Airflow connection %s", conn_id)
    return found


def kafka_overrides(extra: dict[str, Any], *, base: Settings) -> dict[str, Any]:
    """Map the librdkafka properties of ``kafka_default`` to Settings fields.

    Properties without a field of their own go to ``kafka_extra``, on top of
    the ``VITALS_KAFKA_EXTRA`` ones. Reserved consumer properties and callbacks
    given as strings are dropped with a warning.
    """
    if not extra.get("bootstrap.servers"):
        msg = (
            f"Airflow connection {KAFKA_CONN_ID} has no 'bootstrap.servers' in its "
            'extra; set it, e.g. {"bootstrap.servers": "kafka:9092"}'
        )
        raise ConfigurationError(msg)

    overrides: dict[str, Any] = {}
    rest = dict(base.kafka_extra)
    for key, value in extra.items():
        if key in KAFKA_FIELDS:
            overrides[KAFKA_FIELDS[key]] = value
        elif key in KAFKA_RESERVED or key.endswith("_cb"):
            logger.warning(
                "Ignoring %s from Airflow connection %s: the batch sets it itself",
                key,
                KAFKA_CONN_ID,
            )
        else:
            rest[key] = value
    overrides["kafka_extra"] = rest
    return overrides


def redis_url(
    *,
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    extra: dict[str, Any],
) -> str:
    """Build a ``redis://`` or ``rediss://`` URL from the fields of ``redis_default``.

    Examples
    --------
    >>> redis_url(host="redis", port=None, login=None, password=None, extra={"db": 2})
    'redis://redis:6379/2'
    >>> redis_url(host="r", port=6380, login="etl", password="p@ss",
    ...           extra={"ssl": True, "ssl_cert_reqs": "required"})
    'rediss://etl:p%40ss@r:6380/0?ssl_cert_reqs=required'
    """
    if not host:
        msg = f"Airflow connection {REDIS_CONN_ID} has no host; set the Redis host name"
        raise ConfigurationError(msg)
    scheme = "rediss" if _truthy(extra.get("ssl", False)) else "redis"
    # The Redis provider treats these password strings as "no password".
    if password is not None and password.lower() in {"", "none", "false"}:
        password = None

    credentials = ""
    if login or password:
        credentials = quote(login or "", safe="")
        if password:
            credentials += ":" + quote(password, safe="")
        credentials += "@"

    db = _database(extra.get("db", 0))
    # Without TLS, redis-py ignores these options when given to Redis(), as the
    # provider does, but rejects them in a redis:// URL.
    query = {
        name: str(extra[name]).lower() if isinstance(extra[name], bool) else extra[name]
        for name in REDIS_SSL_OPTIONS
        if extra.get(name) is not None and scheme == "rediss"
    }
    # An IPv6 address needs brackets in a URL (RFC 3986, section 3.2.2).
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"{scheme}://{credentials}{host}:{port or 6379}/{db}"
    return f"{url}?{urlencode(query)}" if query else url


def _database(value: Any) -> int:
    try:
        db = int(value)
    except (TypeError, ValueError):
        db = -1
    if db < 0:
        msg = (
            f"Airflow connection {REDIS_CONN_ID} has db={value!r} in its extra, "
            "which is invalid; use an integer of 0 or more"
        )
        raise ConfigurationError(msg)
    return db


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)
