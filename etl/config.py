"""Settings of the ETL, read from ``VITALS_*`` environment variables."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import available_timezones

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, ConnectionPool, parse_url
from redis.exceptions import RedisError

ENV_PREFIX: Final = "VITALS_"
logger = logging.getLogger(__name__)
#: SELECT takes a 32-bit signed index: Redis 7 replies "value is out of range" above it.
_MAX_DATABASE: Final = 2**31 - 1
#: Legal Kafka topic names, as the broker checks them (Apache Kafka's
#: ``org.apache.kafka.common.internals.Topic``).
_TOPIC_NAME: Final = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_MAX_PORT: Final = 65_535
#: One bootstrap server as librdkafka reads it: an optional protocol prefix, a
#: host name, IPv4 or bracketed IPv6 address, and an optional port (9092).
_BOOTSTRAP_SERVER: Final = re.compile(
    r"(?:(?P<protocol>PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)://)?"
    r"(?:\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9._-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
#: The settings that name Redis keys.
_REDIS_KEY_FIELDS: Final = (
    "redis_list_key",
    "redis_rejects_key",
    "redis_offsets_key",
    "redis_alerts_key",
    "redis_reports_key",
    "redis_stats_key",
)
#: Query options of a Redis URL that redis-py reads as seconds.
_URL_TIMEOUTS: Final = ("socket_timeout", "socket_connect_timeout")
#: Query options that redis-py hands to its connection class as text, where
#: text is what the class expects. redis-py converts the options of
#: ``URL_QUERY_ARGUMENT_PARSERS`` to numbers and booleans. Any other option
#: reaches the connection as a string in place of a mapping or a boolean:
#: ``socket_keepalive_options=x`` fails at connect, and the string
#: ``decode_responses=false`` counts as true.
_TEXT_URL_OPTIONS: Final = frozenset(
    {
        "client_name",
        "lib_name",
        "lib_version",
        "username",
        "password",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_password",
        "ssl_ciphers",
    }
)

_Client = TypeVar("_Client")

RuleSet = Literal["acc_aha_2017", "esc_esh_2018", "legacy_age_bands"]


def is_topic_name(value: str) -> bool:
    """Return whether ``value`` is a legal Kafka topic name."""
    return bool(_TOPIC_NAME.fullmatch(value)) and value not in {".", ".."}


class ConfigurationError(ValueError):
    """Invalid settings: the message names the variable and the expected value."""


@functools.cache
def iana_time_zones() -> frozenset[str]:
    """Return the IANA zone names that both zoneinfo and Polars accept.

    zoneinfo also opens other files of the zone folder ("localtime",
    "posixrules", "right/UTC", "posix/Europe/Paris") and the tzdata zone
    "Factory", all of which Polars' time-zone conversion rejects.
    """
    return frozenset(available_timezones() - {"Factory", "localtime"})


def _check_url_options(url: str, options: dict[str, Any]) -> None:
    """Reject query options of a Redis URL that redis-py would fail on or misuse.

    redis-py passes every query option to its connection class, which fails
    on an unknown name or an invalid value only when the first connection is
    made. So a connection object is built here, without connecting. Timeouts
    in the query replace ``VITALS_REDIS_TIMEOUT_S``, so they must be usable.
    """
    supported = _TEXT_URL_OPTIONS | URL_QUERY_ARGUMENT_PARSERS.keys()
    for name in parse_qs(urlsplit(url).query, keep_blank_values=True):
        if name not in supported:
            msg = (
                f"has the unsupported query option {name!r}; the supported "
                f"options are {', '.join(sorted(supported))}"
            )
            raise ValueError(msg)
    try:
        ConnectionPool.from_url(url).make_connection()
    except (TypeError, ValueError, RedisError):
        msg = (
            "has a query option or value that redis-py does not accept for this "
            "scheme (ssl_ options need rediss://); see the URL options of "
            "redis-py's Redis.from_url"
        )
        raise ValueError(msg) from None
    for name in _URL_TIMEOUTS:
        timeout = options.get(name)
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            msg = f"the query option {name} must be a finite number of seconds above 0"
            raise ValueError(msg)
    interval = options.get("health_check_interval")
    if interval is not None and not (math.isfinite(interval) and interval >= 0):
        msg = (
            "the query option health_check_interval must be a finite number of seconds"
        )
        raise ValueError(msg)


def kafka_client(
    factory: Callable[[dict[str, Any]], _Client], config: dict[str, Any]
) -> _Client:
    """Build a confluent-kafka client, raising a settings error for a property librdkafka rejects."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        return factory(config)
    except KafkaException as exc:
        error = exc.args[0]
        text = error.str() if isinstance(error, KafkaError) else str(error)
        msg = (
            f"invalid Kafka client settings: {text}. Check the VITALS_KAFKA_* "
            "variables: security protocol, SASL, SSL and VITALS_KAFKA_EXTRA (under "
            "Airflow, the extra of the connection kafka_default when it is defined)"
        )
        if "sasl.mechanism" not in config and "SASL mechanism GSSAPI" in text:
            msg += (
                f". {ENV_PREFIX}KAFKA_SASL_MECHANISM is not set, so librdkafka "
                "tried GSSAPI (Kerberos): set it, for example to PLAIN or SCRAM-SHA-512"
            )
        raise ConfigurationError(msg) from exc


class _KafkaClientLog:
    """Pass librdkafka's log lines to the ``etl.kafka_client`` logger at DEBUG.

    Without a logger, librdkafka writes each failed connection attempt to
    stderr, many lines a second while a broker is down. The batch reports such
    failures itself in one message, so these lines only help with ``-vv``.
    """

    _logger = logging.getLogger("etl.kafka_client")

    def log(self, _level: int, message: str, *args: Any) -> None:
        self._logger.debug(message, *args)


KAFKA_CLIENT_LOG: Final = _KafkaClientLog()


class Settings(BaseSettings):
    """Every setting of the ETL, with defaults that work on a local machine.

    Each field is read from the environment variable ``VITALS_<FIELD>``; for
    example ``kafka_topic`` comes from ``VITALS_KAFKA_TOPIC``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic: str = "vitals"
    kafka_group_id: str = "vitals-etl"
    kafka_security_protocol: Literal[
        "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"
    ] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra librdkafka properties as a JSON object; they win over ours.",
    )
    #: librdkafka 2.16 rejects a ``socket.timeout.ms`` outside 10 to 300000.
    kafka_timeout_s: float = Field(
        10.0,
        ge=0.01,
        le=300,
        allow_inf_nan=False,
        description="Broker metadata timeout.",
    )

    # Redis
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6380/0")
    redis_list_key: str = "liste-patients"
    redis_rejects_key: str = "liste-patients:rejects"
    redis_offsets_key: str = "liste-patients:offsets"
    redis_alerts_key: str = "liste-patients:alerts"
    redis_reports_key: str = "liste-patients:reports"
    redis_stats_key: str = "liste-patients:stats"
    redis_reports_maxlen: int = Field(1000, ge=1)
    redis_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)

    # Rules and output
    rule_set: RuleSet = "acc_aha_2017"
    time_zone: str = "UTC"

    # Batch limits
    chunk_size: int = Field(50_000, ge=1, le=1_000_000)
    max_records: int = Field(2_000_000, ge=1)
    deadline_s: float = Field(180.0, gt=0, allow_inf_nan=False)
    #: At most 1 MiB, about Kafka's default largest record (message.max.bytes):
    #: a reading is a few hundred bytes, and a larger limit would make the
    #: batch parse values of many megabytes, a chunk of which fills memory.
    max_message_bytes: int = Field(65_536, ge=256, le=1_048_576)
    #: At most 366 days, so that the latest accepted time stays far below
    #: year 10000, which the output's timestamp cannot show in any time zone.
    max_future_skew_s: float = Field(3600.0, ge=0, le=31_622_400, allow_inf_nan=False)
    #: From 1972-01-08T00:00:00Z: before it, Africa/Monrovia's offset was
    #: -00:44:30 (tz database), which the output's ``+HH:MM`` offset cannot
    #: show, and since then every zone's offset is whole minutes. Up to
    #: 9999-12-31T23:59:59Z, the last second Python's datetime can show. An
    #: epoch in milliseconds by mistake (1.7e12) is beyond it.
    min_timestamp: float = Field(
        946_684_800.0,
        ge=63_676_800,
        le=253_402_300_799,
        allow_inf_nan=False,
        description="2000-01-01T00:00:00Z",
    )

    @field_validator("time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        if value not in iana_time_zones():
            msg = (
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Paris'"
            )
            raise ValueError(msg)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        # Messages quote no part of the URL: a password with a bare '/', '?' or
        # '#' is split into the other parts of the URL.
        url = value.get_secret_value()
        scheme = url.partition("://")[0]
        if scheme not in {"redis", "rediss", "unix"}:
            msg = "must start with redis://, rediss:// (TLS) or unix://"
            raise ValueError(msg)
        unreadable = (
            "is not a valid Redis URL: it names no host (or socket path), a port or "
            "query value is not a number, or the user name or password has a '/', "
            "'?', '#', '@' or '[' that is not percent-encoded"
        )
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ValueError(unreadable) from None
        try:
            port_valid = parts.port is None or parts.port >= 1
        except ValueError:  # Not a number, or above 65535.
            port_valid = False
        if not port_valid:
            msg = (
                f"the port is not a number from 1 to {_MAX_PORT}, or the user name "
                "or password has a '/', '?', '#', '@' or '[' that is not "
                "percent-encoded"
            )
            raise ValueError(msg)
        try:
            options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError:
            raise ValueError(unreadable) from None
        # Without a host, redis-py connects to localhost:6379. A Redis URL has no
        # fragment either, so both mean a password that split the URL.
        missing = "path" not in options if scheme == "unix" else not parts.hostname
        if missing or "#" in url:
            raise ValueError(unreadable)
        # parse_url drops every '/' of the path and reads the rest with int(),
        # which takes "+1" and "1_0" too. It skips a path that is not a number,
        # and database 0 is then used.
        path = unquote(parts.path).strip("/")
        database = options.get("db", 0)
        path_read = scheme == "unix" or not path or "db" in parse_qs(parts.query)
        if not (path_read or (path.isascii() and path.isdigit())) or not (
            0 <= database <= _MAX_DATABASE
        ):
            msg = (
                "the database part is not a number from 0 to the server's "
                "'databases' setting minus 1, as in redis://host:port/0; "
                "percent-encode any '/', '?' or '#' in the password"
            )
            raise ValueError(msg)
        _check_url_options(url, options)
        return value

    @field_validator("kafka_topic", "kafka_group_id", "kafka_bootstrap_servers")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator(*_REDIS_KEY_FIELDS)
    @classmethod
    def _key_not_blank(cls, value: str) -> str:
        # Not stripped, because a Redis key name may contain spaces.
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("kafka_topic")
    @classmethod
    def _legal_topic(cls, value: str) -> str:
        if not is_topic_name(value):
            msg = (
                "a Kafka topic name has 1 to 249 characters among ASCII letters, "
                "digits, '.', '_' and '-', and is not '.' or '..'"
            )
            raise ValueError(msg)
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        for server in (part.strip() for part in value.split(",")):
            if not server:
                msg = "the list has an empty entry; separate servers with one comma"
                raise ValueError(msg)
            match = _BOOTSTRAP_SERVER.fullmatch(server)
            port = match and match["port"]
            if match is None or (port and not 1 <= int(port) <= _MAX_PORT):
                msg = (
                    f"{server!r} is not host:port with a port from 1 to {_MAX_PORT} "
                    "([IPv6]:port for an IPv6 address)"
                )
                raise ValueError(msg)
        return value

    @field_validator("kafka_extra")
    @classmethod
    def _no_bootstrap_in_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "bootstrap.servers" in value or "metadata.broker.list" in value:
            msg = (
                "must not set bootstrap.servers or metadata.broker.list; "
                "use VITALS_KAFKA_BOOTSTRAP_SERVERS"
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _prefixes_match_protocol(self) -> Settings:
        # VITALS_KAFKA_EXTRA overrides the other settings (see kafka_config).
        protocol = str(
            self.kafka_extra.get("security.protocol", self.kafka_security_protocol)
        ).upper()
        for server in self.kafka_bootstrap_servers.split(","):
            # The field validator has matched every server already.
            match = _BOOTSTRAP_SERVER.fullmatch(server.strip())
            prefix = match["protocol"] if match else None
            if prefix and prefix.upper() != protocol:
                msg = (
                    f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS names {server.strip()!r}, "
                    f"but the security protocol is {protocol}, and librdkafka "
                    "skips a broker whose prefix names another protocol. Drop the "
                    f"prefix or set {ENV_PREFIX}KAFKA_SECURITY_PROTOCOL to match"
                )
                raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _distinct_keys(self) -> Settings:
        by_key: dict[str, list[str]] = {}
        for field in _REDIS_KEY_FIELDS:
            by_key.setdefault(getattr(self, field), []).append(
                f"{ENV_PREFIX}{field.upper()}"
            )
        shared = [(key, names) for key, names in by_key.items() if len(names) > 1]
        if shared:
            clashes = "; ".join(
                f"{' and '.join(names)} are {'both' if len(names) == 2 else 'all'} "
                f"{key!r}"
                for key, names in shared
            )
            raise ValueError(f"the Redis key names must all differ: {clashes}")
        return self

    def kafka_config(self) -> dict[str, Any]:
        """Return the librdkafka properties shared by consumers and producers."""
        config: dict[str, Any] = {
            "logger": KAFKA_CLIENT_LOG,
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
            "socket.timeout.ms": int(self.kafka_timeout_s * 1000),
        }
        if self.kafka_sasl_mechanism:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            config["ssl.ca.location"] = self.kafka_ssl_ca_location
        config.update(self.kafka_extra)
        return config

    def redacted(self) -> dict[str, Any]:
        """Return the settings as a dict with every secret masked, for printing."""
        data = self.model_dump(mode="json")
        data["redis_url"] = redact_url(self.redis_url.get_secret_value())
        if self.kafka_sasl_password is not None:
            data["kafka_sasl_password"] = "***"
        data["kafka_extra"] = {
            key: ("***" if _is_secret_key(key) else value)
            for key, value in self.kafka_extra.items()
        }
        return data

    @property
    def redis_database(self) -> int:
        """The database number that ``redis_url`` selects."""
        options = parse_url(self.redis_url.get_secret_value())  # type: ignore[no-untyped-call]
        return int(options.get("db", 0))

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url.get_secret_value())


#: Words that mark a librdkafka property as secret. ``sasl.oauthbearer.config``
#: may hold a client secret although its name says nothing of it.
_SECRET_WORDS: Final = ("password", "secret", "key", "token", "credential")
_SECRET_PROPERTIES: Final = frozenset({"sasl.oauthbearer.config"})
#: A query parameter, matched at every '?' and '&' (a lookahead, so that a
#: match starting at an '&' inside a password cannot swallow the next real
#: parameter). Its name is percent-decoded before the check for secret words,
#: as redis-py decodes it (``pass%77ord`` is ``password``). A value runs to
#: the next '&', past any '#', which an unencoded password may contain.
_QUERY_PARAMETER: Final = re.compile(r"(?=[?&](?P<name>[^=&#]*)=(?P<value>[^&]*))")
#: The secret words of a query parameter's name. "key" is not one, because
#: ``ssl_keyfile`` names a file path.
_QUERY_SECRET_WORDS: Final = ("password", "secret", "token", "credential")
#: Characters that ``urlsplit``, and so redis-py, removes from a URL before parsing it.
_URL_CONTROLS: Final = str.maketrans("", "", "\t\r\n")


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_PROPERTIES or any(w in lowered for w in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """Mask the secrets of a URL: ``redis://user:pw@host`` -> ``redis://user:***@host``.

    The password is masked whole even when it contains an unencoded '@', '/'
    or '?'. Query parameters whose decoded name contains a secret word, such as
    ``password`` and ``ssl_password``, are masked too. A user info without
    ':' is masked whole, because redis-cli reads ``redis://secret@host`` as
    a password while redis-py reads it as a user name. Tabs and line breaks
    are dropped first, as ``urlsplit`` drops them.
    """
    if "://" not in url:
        return url
    return redact_invalid_url(url)


def _redact_after_scheme(rest: str) -> str:
    """Mask the user info and the secret query parameters of a URL without its scheme.

    The user info ends at the last '@' of the text, because a password may
    contain an unencoded '@', '/', '?' or '#'. When ``urlsplit`` reads a valid
    port and no '@' follows the network location, it is the user info of
    the network location, as redis-py reads it. An '@' inside a query value
    (``?client_name=ops@site``) may close the user info of a password that
    contains '?': everything from the password on is then masked, so that no
    other text is shown as the host. Secret query parameters are searched
    after the network location, or in the whole text when there is none.
    """
    netloc_end = _network_location_end(rest)
    query_from = 0 if netloc_end is None else netloc_end
    parameters = [
        (query_from + match.start("value"), query_from + match.end("value"), match)
        for match in _QUERY_PARAMETER.finditer(rest[query_from:])
    ]
    spans = [
        (start, end)
        for start, end, match in parameters
        if any(word in unquote(match["name"]).lower() for word in _QUERY_SECRET_WORDS)
    ]
    last_at = rest.rfind("@")
    if netloc_end is not None and last_at < netloc_end:
        last_at = rest.rfind("@", 0, netloc_end)
    if last_at < 0:
        return _mask_spans(rest, spans)
    user_info = rest[:last_at]
    in_query_value = any(
        start <= last_at < end and match["name"] for start, end, match in parameters
    )
    mask_end = len(rest) if in_query_value else last_at
    user, colon, _ = user_info.partition(":")
    if colon and not re.search(r"[@/?#\[\]]", user):
        spans.append((len(user) + 1, mask_end))
    else:
        # No user name can be separated from it: the whole user info is masked.
        spans.append((0, mask_end))
    return _mask_spans(rest, spans)


def _network_location_end(rest: str) -> int | None:
    """Return where ``urlsplit``'s network location ends in ``rest``, or None if it has no valid port."""
    try:
        _ = urlsplit(f"redis://{rest}").port  # raises ValueError on a bad port
    except ValueError:
        return None
    end = re.search(r"[/?#]", rest)
    return end.start() if end else len(rest)


def _mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """Replace each span of ``text`` with ``***``, overlapping or touching spans as one.

    An empty span, such as an empty password, becomes ``***`` too, so the
    output does not reveal whether a secret was set.
    """
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts = []
    shown_from = 0
    for start, end in merged:
        parts.append(text[shown_from:start])
        parts.append("***")
        shown_from = end
    parts.append(text[shown_from:])
    return "".join(parts)


def redact_invalid_url(url: str) -> str:
    """Mask the secrets of a Redis URL that failed validation, showing the rest.

    It masks what :func:`redact_url` masks, and also the user info of a text
    without a scheme (``:secret@host:6379``), which :func:`redact_url`
    returns as it is.
    """
    url = url.translate(_URL_CONTROLS)
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    return f"{scheme}{separator}{_redact_after_scheme(rest)}"


#: Pydantic's error types for a value outside a ``Field`` bound.
_RANGE_ERRORS: Final = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
)
#: The reason for each setting's bounds, added to its range errors.
_RANGE_REASONS: Final = {
    "min_timestamp": (
        "63676800 is 1972-01-08T00:00:00Z, from when every time zone's offset "
        "is whole minutes, as the output's +HH:MM offset needs, and "
        "253402300799 is 9999-12-31T23:59:59Z"
    ),
    "max_future_skew_s": (
        "366 days at most, so that accepted timestamps stay far below year 10000"
    ),
}


def load_settings(
    *, option_names: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build the settings from the environment, with keyword overrides on top.

    ``option_names`` maps a field to the command-line option that gave its
    override, such as ``{"chunk_size": "--chunk-size"}``. An invalid value of
    that field is then reported under the option, the name the user typed,
    and not under its environment variable.

    Raises
    ------
    ConfigurationError
        When a variable or an option has an invalid value; the message names
        each of them.
    """
    _warn_unknown_variables()
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        # Raised for a value that is not valid JSON, such as VITALS_KAFKA_EXTRA;
        # its message names the field, never the value.
        found = re.search(r'field "(\w+)"', str(exc))
        variable = f"{ENV_PREFIX}{found.group(1).upper()}" if found else "a variable"
        msg = (
            f"invalid settings: {variable} is not valid JSON; "
            """expected an object such as '{"security.protocol": "SSL"}'"""
        )
        raise ConfigurationError(msg) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            # Pydantic starts the message of a ValueError raised by a validator
            # with "Value error, ", which adds nothing for the reader.
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:
                # A check across fields: its input is every setting, secrets
                # included, so only its message is shown.
                problems.append(message)
                continue
            field = str(error["loc"][0])
            source = f"{ENV_PREFIX}{field.upper()}"
            if option_names and field in overrides and field in option_names:
                source = option_names[field]
            shown = _shown_input(field, error.get("input"))
            if error["type"] in _RANGE_ERRORS and field in _RANGE_REASONS:
                message += f" ({_RANGE_REASONS[field]})"
            problems.append(f"{source}={shown!r}: {message}")
        msg = "invalid settings: " + "; ".join(problems)
        raise ConfigurationError(msg) from None


#: VITALS_* variables read by the DAG file, not by the settings.
DAG_VARIABLES: Final = frozenset({"VITALS_DEMO_GENERATE", "VITALS_STAGING_DIR"})


def _warn_unknown_variables() -> None:
    """Log a warning for each VITALS_* variable that no setting reads, such as a typo."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for variable in sorted(os.environ):
        # pydantic-settings reads the names in any case, the DAG file only as written.
        name = variable.upper()
        if (
            not name.startswith(ENV_PREFIX)
            or name in known
            or variable in DAG_VARIABLES
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known | DAG_VARIABLES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logger.warning("Ignoring %s: no setting has this name%s", variable, hint)


def _shown_input(field: str, value: Any) -> Any:
    """Return the invalid ``value`` of ``field`` as an error message may show it.

    A Redis URL is shown with its password and secret query parameters
    masked (see :func:`redact_invalid_url`), so that the user sees which URL
    was read. The values of other fields that may contain a secret are
    masked whole.
    """
    if field == "redis_url" and isinstance(value, SecretStr):
        value = value.get_secret_value()
    if field == "redis_url" and isinstance(value, str):
        return redact_invalid_url(value)
    return "***" if _may_hold_secret(field) else value


def _may_hold_secret(field: str) -> bool:
    """Whether an invalid value of ``field`` must not be shown in an error."""
    return "password" in field or "url" in field or field == "kafka_extra"


def parse_json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object given in an environment variable or a CLI option."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ConfigurationError(f"expected a JSON object, got {type(value).__name__}")
    return value
