"""Settings: environment variables, validation errors and secret masking."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from etl.cli import main
from etl.config import (
    ConfigurationError,
    iana_time_zones,
    load_settings,
    redact_invalid_url,
    redact_url,
)
from etl.services import free_port
from etl.terminal import console, print_error


def test_settings_defaults_point_at_localhost() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers.startswith("127.0.0.1:")
    assert settings.redis_list_key == "liste-patients"
    assert settings.rule_set == "acc_aha_2017"


def test_settings_read_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALS_KAFKA_TOPIC", "ward-7")
    monkeypatch.setenv("VITALS_CHUNK_SIZE", "1234")
    monkeypatch.setenv("VITALS_KAFKA_EXTRA", '{"fetch.wait.max.ms": 5}')
    settings = load_settings()
    assert settings.kafka_topic == "ward-7"
    assert settings.chunk_size == 1234
    assert settings.kafka_config()["fetch.wait.max.ms"] == 5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        pytest.param(
            "VITALS_TIME_ZONE", "Mars/Base", "VITALS_TIME_ZONE='Mars/Base'", id="zone"
        ),
        pytest.param(
            "VITALS_TIME_ZONE", "localtime", "unknown time zone", id="zone-localtime"
        ),
        pytest.param(
            "VITALS_TIME_ZONE", "right/UTC", "unknown time zone", id="zone-right"
        ),
        pytest.param(
            "VITALS_TIME_ZONE", "Factory", "unknown time zone", id="zone-factory"
        ),
        pytest.param("VITALS_CHUNK_SIZE", "0", "VITALS_CHUNK_SIZE", id="chunk-zero"),
        pytest.param(
            "VITALS_MAX_MESSAGE_BYTES",
            "1048577",
            "less than or equal to 1048576",
            id="message-bytes-above-kafka-default",
        ),
        pytest.param("VITALS_RULE_SET", "who_1999", "VITALS_RULE_SET", id="rule-set"),
        pytest.param(
            "VITALS_REDIS_URL", "http://x", "VITALS_REDIS_URL", id="redis-scheme"
        ),
        pytest.param(
            "VITALS_KAFKA_TOPIC", "  ", "VITALS_KAFKA_TOPIC", id="blank-topic"
        ),
        pytest.param(
            "VITALS_DEADLINE_S", "-1", "VITALS_DEADLINE_S", id="negative-deadline"
        ),
        pytest.param(
            "VITALS_DEADLINE_S", "inf", "finite number", id="infinite-deadline"
        ),
        pytest.param(
            "VITALS_REDIS_TIMEOUT_S", "nan", "finite number", id="nan-timeout"
        ),
        pytest.param(
            "VITALS_REDIS_URL",
            "redis://127.0.0.1:6380/abc",
            "database part is not a number",
            id="redis-database-text",
        ),
        pytest.param(
            "VITALS_REDIS_URL",
            "redis://127.0.0.1:6380/-1",
            "database part is not a number",
            id="redis-database-negative",
        ),
        pytest.param(
            "VITALS_REDIS_URL",
            "redis://127.0.0.1:6380/99999999999999999999",
            "database part is not a number",
            id="redis-database-huge",
        ),
        pytest.param(
            "VITALS_REDIS_URL",
            "unix:///run/redis.sock?db=x",
            "not a valid Redis URL",
            id="redis-database-query",
        ),
        pytest.param(
            "VITALS_REDIS_URL",
            "redis://127.0.0.1:99999/0",
            "port is not a number from 1 to 65535",
            id="redis-port-range",
        ),
        pytest.param(
            "VITALS_KAFKA_TIMEOUT_S", "301", "less than or equal to 300", id="kafka-301"
        ),
        pytest.param(
            "VITALS_KAFKA_TIMEOUT_S",
            "0.001",
            "greater than or equal to 0.01",
            id="kafka-1ms",
        ),
        pytest.param(
            "VITALS_KAFKA_BOOTSTRAP_SERVERS",
            "127.0.0.1:9092,127.0.0.1:99999",
            "'127.0.0.1:99999' is not host:port with a port from 1 to 65535",
            id="bootstrap-port",
        ),
        pytest.param(
            "VITALS_KAFKA_BOOTSTRAP_SERVERS",
            "127.0.0.1:abc",
            "'127.0.0.1:abc' is not host:port",
            id="bootstrap-port-word",
        ),
        pytest.param(
            "VITALS_KAFKA_BOOTSTRAP_SERVERS",
            ":9092",
            "':9092' is not host:port",
            id="bootstrap-no-host",
        ),
        pytest.param(
            "VITALS_KAFKA_BOOTSTRAP_SERVERS",
            ",,",
            "empty entry",
            id="bootstrap-empty-entries",
        ),
        *(
            pytest.param(
                "VITALS_KAFKA_BOOTSTRAP_SERVERS",
                server,
                re.escape(f"{server!r} is not host:port"),
                id=f"bootstrap-{name}",
            )
            for name, server in (
                ("arabic-indic-digits", "127.0.0.1:\u0669\u0660\u0669\u0662"),
                ("unknown-scheme", "http://127.0.0.1:9092"),
                ("unclosed-bracket", "[::1:9092"),
                ("space-in-host", "a b:9092"),
                ("two-ports", "127.0.0.1:9092:9093"),
            )
        ),
        pytest.param(
            "VITALS_KAFKA_TOPIC", "bad topic!", "Kafka topic name", id="topic-chars"
        ),
        pytest.param("VITALS_KAFKA_TOPIC", "t" * 250, "1 to 249", id="topic-long"),
        pytest.param("VITALS_KAFKA_TOPIC", "..", "not '.' or '..'", id="topic-dots"),
        pytest.param("VITALS_REDIS_LIST_KEY", "", "must not be empty", id="empty-key"),
        pytest.param(
            "VITALS_KAFKA_EXTRA",
            '{"bootstrap.servers": "other:9092"}',
            "use VITALS_KAFKA_BOOTSTRAP_SERVERS",
            id="extra-bootstrap",
        ),
    ],
)
def test_settings_invalid_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message):
        load_settings()


def test_settings_error_hides_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALS_REDIS_URL", "http://user:hunter2@host")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_settings_duplicate_keys_rejected() -> None:
    with pytest.raises(ConfigurationError, match="must all differ"):
        load_settings(redis_rejects_key="liste-patients")


def test_settings_redacted_masks_secrets() -> None:
    settings = load_settings(
        redis_url="redis://etl:s3cret@127.0.0.1:6380/0",
        kafka_sasl_password="k4fka",
        kafka_extra={"ssl.key.password": "pem-pass", "linger.ms": 5},
    )
    shown = str(settings.redacted())
    assert "s3cret" not in shown
    assert "k4fka" not in shown
    assert "pem-pass" not in shown
    assert "linger.ms" in shown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0", id="no-password"
        ),
        pytest.param("redis://:pw@h:1/0", "redis://:***@h:1/0", id="password-only"),
        pytest.param("rediss://etl:pw@h/2", "rediss://etl:***@h/2", id="user-and-tls"),
        pytest.param(
            "rediss://h/0?ssl_password=pp&ssl_keyfile=/k.pem&PASSWORD=x",
            "rediss://h/0?ssl_password=***&ssl_keyfile=/k.pem&PASSWORD=***",
            id="secret-query-parameters",
        ),
        pytest.param(
            "redis://h:6379/0?password=p@ss",
            "redis://h:***",
            id="at-in-query-password",
        ),
        pytest.param(
            "redis://h/0?pass%77ord=pw&%70assword=pw",
            "redis://h/0?pass%77ord=***&%70assword=***",
            id="encoded-query-name",
        ),
        pytest.param(
            "redis://u:pw@h:1/0?client_name=ops@site",
            "redis://u:***",
            id="at-in-query-value",
        ),
        pytest.param("redis://secret@h/3", "redis://***@h/3", id="lone-user-info"),
        # An '&' and '=' in the user info must not hide the real parameters.
        pytest.param(
            "rediss://u:k&J=9@h:6380/0?ssl_password=s3",
            "rediss://u:***@h:6380/0?ssl_password=***",
            id="ampersand-in-password",
        ),
        pytest.param(
            "unix:///tmp/a&b=c.sock?password=s3",
            "unix:///tmp/a&b=c.sock?password=***",
            id="ampersand-in-socket-path",
        ),
        pytest.param(
            "redis://h:6379/0?pass\nword=s3",
            "redis://h:6379/0?password=***",
            id="newline",
        ),
        pytest.param(
            "redis://secret@h:6379/0?&client_name=a@b",
            "redis://***",
            id="lone-user-info-and-at-in-query",
        ),
        # Unencoded '/', '?' or '#' in a password after a valid-looking port.
        pytest.param("redis://u:12/ab@h", "redis://u:***@h", id="slash-after-port"),
        pytest.param("redis://u:12?ab@h", "redis://u:***@h", id="question-after-port"),
        pytest.param("redis://u:12#ab@h/0", "redis://u:***@h/0", id="hash-after-port"),
        pytest.param(
            "redis://:a?password=b@h/0", "redis://:***", id="query-in-user-info"
        ),
        pytest.param("redis://etl:@h/0", "redis://etl:***@h/0", id="empty-password"),
    ],
)
def test_redact_url_cases(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "http://127.0.0.1:26380/0", "'http://127.0.0.1:26380/0'", id="no-secret"
        ),
        pytest.param("http://etl:hunter2@h:1/0", "'http://etl:***@h:1/0'", id="user"),
        pytest.param("redis://:hun/ter2@h/0", "'redis://:***@h/0'", id="bare-slash"),
        pytest.param("redis://hunter2@h/0#x", "'redis://***@h/0#x'", id="lone-user"),
        pytest.param(":hunter2@h:6379", "':***@h:6379'", id="no-scheme"),
        pytest.param(
            "redis://h/0?password=hunter2&sokcet_timeout=1",
            "'redis://h/0?password=***&sokcet_timeout=1'",
            id="query-password",
        ),
    ],
)
def test_invalid_redis_url_shown_without_password(
    monkeypatch: pytest.MonkeyPatch, url: str, shown: str
) -> None:
    monkeypatch.setenv("VITALS_REDIS_URL", url)

    with pytest.raises(ConfigurationError) as failure:
        load_settings()

    message = str(failure.value)
    assert f"VITALS_REDIS_URL={shown}: " in message
    assert "Value error" not in message
    assert "hunter2" not in message


@given(
    st.text(
        st.characters(codec="ascii", exclude_characters="\x00\r\n:"),
        min_size=6,
        max_size=30,
    )
)
def test_redact_invalid_url_never_shows_password(password: str) -> None:
    """A password without ':' is masked alone, after a user name, or in a query."""
    assume(password not in "http://etl:***@cache:6380/0?password=***")
    host = "cache:6380/0"
    for url in (
        f"http://{password}@{host}",
        f"http://etl:{password}@{host}",
        f"etl:{password}@{host}",
        f"http://{host}?password={password.replace('&', '')}",
    ):
        shown = redact_invalid_url(url)
        assert password.replace("&", "") not in shown.replace(host, ""), url


def test_settings_key_clash_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check across fields receives every setting; its error shows none of them."""
    monkeypatch.setenv("VITALS_REDIS_URL", "redis://:redis-Secret-1@127.0.0.1:6380/0")
    monkeypatch.setenv("VITALS_KAFKA_SASL_PASSWORD", "sasl-Secret-2")
    monkeypatch.setenv("VITALS_REDIS_OFFSETS_KEY", "liste-patients")

    with pytest.raises(ConfigurationError) as failure:
        load_settings()

    message = str(failure.value)
    assert "Secret" not in message
    assert (
        "VITALS_REDIS_LIST_KEY and VITALS_REDIS_OFFSETS_KEY are both 'liste-patients'"
        in message
    )


def test_run_json_invalid_settings_on_stdout() -> None:
    result = CliRunner().invoke(main, ["run", "--json"], env={"VITALS_CHUNK_SIZE": "0"})

    failure = json.loads(result.stdout)
    assert result.exit_code == 2
    assert failure["error"] == "ConfigurationError"
    assert failure["exit_code"] == 2
    assert "VITALS_CHUNK_SIZE" in failure["message"]


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        (["--topic", "bad topic"], "--topic='bad topic': "),
        (["--max-records", "5", "--topic", "."], "--topic='.': "),
    ],
)
def test_run_invalid_option_named_as_typed(arguments: list[str], shown: str) -> None:
    """A value that passes Click but not the settings is reported under its option."""
    result = CliRunner().invoke(main, ["run", *arguments])

    assert result.exit_code == 2
    assert f"error: invalid settings: {shown}" in result.stderr
    assert "VITALS_" not in result.stderr


@pytest.mark.parametrize(
    "command", [["generate"], ["publish", "-"], ["replay-rejects", "--dry-run"]]
)
def test_topic_option_error_names_option(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--topic", "bad topic"], input="")

    assert result.exit_code == 2
    assert "error: invalid settings: --topic='bad topic': " in result.stderr
    assert "VITALS_" not in result.stderr


def test_run_chunk_size_range_in_option() -> None:
    """The option checks the settings' range itself, and its help shows it."""
    result = CliRunner().invoke(main, ["run", "--chunk-size", "2000000"])
    shown = CliRunner().invoke(main, ["run", "--help"])

    assert result.exit_code == 2
    assert "'--chunk-size': 2000000 is not in the range 1<=x<=1000000" in result.stderr
    assert "1<=x<=1000000" in shown.stdout


def test_run_invalid_variable_named_as_set() -> None:
    """The same value from the environment is still reported under the variable."""
    result = CliRunner().invoke(
        main, ["run", "--max-records", "5"], env={"VITALS_CHUNK_SIZE": "2000000"}
    )

    assert result.exit_code == 2
    assert "VITALS_CHUNK_SIZE='2000000': " in result.stderr
    assert "--chunk-size" not in result.stderr


def test_option_names_apply_to_overrides_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALS_KAFKA_TOPIC", "bad topic")
    names = {"kafka_topic": "--topic", "chunk_size": "--chunk-size"}

    with pytest.raises(ConfigurationError) as failure:
        load_settings(option_names=names, chunk_size=0)

    message = str(failure.value)
    assert "--chunk-size=0: " in message
    assert "VITALS_KAFKA_TOPIC='bad topic': " in message
    assert "--topic" not in message


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        (["--chunk-size", "0", "--json"], "'--chunk-size': 0 is not in the range"),
        (["--json", "--unknown"], "No such option '--unknown'"),
    ],
)
def test_run_json_invalid_argument_on_stdout(arguments: list[str], detail: str) -> None:
    result = CliRunner().invoke(main, ["run", *arguments])

    failure = json.loads(result.stdout)
    assert result.exit_code == 2
    assert failure["status"] == "failed"
    assert failure["exit_code"] == 2
    assert detail in failure["message"]
    assert "Usage:" in result.stderr


def test_run_invalid_argument_without_json() -> None:
    result = CliRunner().invoke(main, ["run", "--chunk-size", "0"])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Invalid value for '--chunk-size'" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6380",
        "redis://127.0.0.1:6380/",
        "redis://127.0.0.1:6380/15",
        "rediss://user:secret@host:6380/0?db=3",
        "unix:///run/redis.sock?db=2",
        "redis://127.0.0.1:6380/%31",
        "redis://127.0.0.1:6380/path?db=2",
        "redis://[::1]:6380/0",
        "unix://:pw@/run/redis.sock?db=1",
        "redis://host",
        "redis://h/0?socket_timeout=2.5&health_check_interval=0",
        "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required",
        "redis://h/0?client_name=vitals-etl&socket_keepalive=true&protocol=3",
    ],
)
def test_settings_accept_redis_database_forms(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("VITALS_REDIS_URL", url)

    assert load_settings().redis_url.get_secret_value() == url


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_run_deadline_must_be_finite(value: str) -> None:
    result = CliRunner().invoke(main, ["run", "--deadline", value, "--json"])

    failure = json.loads(result.stdout)
    assert result.exit_code == 2
    assert "'--deadline'" in failure["message"]
    assert "is not a finite number" in failure["message"]


@pytest.mark.parametrize(
    "url",
    [
        "redis://:se/cret@127.0.0.1:6380/0",
        "redis://:se?db=cret@127.0.0.1:6380/0",
        "redis://:s#cret@127.0.0.1:6380/0",
        "redis://:6379?cret@redis:6380/0",
        "redis://alice:6380#cret@redis/0",
        "unix://:se?cret@/run/redis.sock",
        "redis://:se[cret@redis/0",
    ],
)
def test_settings_unencoded_password_not_shown(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A bare '/', '?' or '#' splits the password across the URL, and no part of it is shown."""
    monkeypatch.setenv("VITALS_REDIS_URL", url)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert "cret" not in str(caught.value)
    assert "percent-encode" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://", "names no host"),
        ("redis:///0", "names no host"),
        ("REDIS://redis:6379/0", "must start with redis://"),
        ("redis://h/0/1", "database part is not a number"),
        ("redis://h/1_0", "database part is not a number"),
        ("redis://h/+1", "database part is not a number"),
        ("redis://h/0?sokcet_timeout=5", "unsupported query option 'sokcet_timeout'"),
        ("redis://h/0?socket_keepalive_options=x", "unsupported query option"),
        ("redis://h/0?decode_responses=false", "unsupported query option"),
        ("rediss://h/0?ssl_validate_ocsp=false", "unsupported query option"),
        ("rediss://h/0?ssl_cert_reqs=bogus", "query option or value that redis-py"),
        ("redis://h/0?protocol=4", "query option or value that redis-py"),
        ("redis://h/0?timeout=5", "query option or value that redis-py"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "ssl_ options need rediss://"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout must be a finite number"),
        ("redis://h/0?socket_timeout=nan", "socket_timeout must be a finite number"),
        ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout must be"),
        ("redis://h/0?health_check_interval=-5", "health_check_interval must be"),
    ],
)
def test_settings_reject_redis_url_forms(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    """Forms redis-py would read as another host or another database."""
    monkeypatch.setenv("VITALS_REDIS_URL", url)

    with pytest.raises(ConfigurationError, match=message):
        load_settings()


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        (["services", "start", "--kafka-port", "70000"], "70000 is not in the range"),
        (["services", "start", "--redis-port", "0"], "0 is not in the range"),
        (["generate", "--rate", "inf"], "inf is not a finite number"),
        (["generate", "--cohort-size", "2000000"], "2000000 is not in the range"),
    ],
)
def test_out_of_range_option_usage_error(arguments: list[str], detail: str) -> None:
    """Rejected by Click before anything starts, with exit code 2 and no traceback."""
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert detail in result.stderr
    assert "Traceback" not in result.stderr


def test_time_zones_convert_in_polars() -> None:
    """Every zone the settings accept converts in Polars, as the transform needs."""
    instant = pl.Series([0]).cast(pl.Datetime("us", "UTC"))
    for zone in sorted(iana_time_zones()):
        assert instant.dt.convert_time_zone(zone).len() == 1, zone


def test_settings_warn_on_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VITALS_CHUNKSIZE", "10")
    monkeypatch.setenv("VITALS_DEMO_GENERATE", "false")

    settings = load_settings()

    assert settings.chunk_size == 50_000
    assert "Ignoring VITALS_CHUNKSIZE" in caplog.text
    assert "did you mean VITALS_CHUNK_SIZE?" in caplog.text
    assert "VITALS_DEMO_GENERATE" not in caplog.text


def test_settings_lower_case_variable_not_warned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pydantic-settings reads names in any case, so a lower-case one is no typo."""
    monkeypatch.setenv("VITALS_chunk_size", "123")

    settings = load_settings()

    assert settings.chunk_size == 123
    assert "Ignoring" not in caplog.text


def test_settings_keep_legal_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALS_KAFKA_TOPIC", "ward-3.vitals_v2")
    servers = (
        "[::1]:9092,kafka:65535,kafka,[::1],[fe80::1%lo]:9092,"
        "PLAINTEXT://kafka,plaintext://kafka:9093"
    )
    monkeypatch.setenv("VITALS_KAFKA_BOOTSTRAP_SERVERS", servers)
    monkeypatch.setenv("VITALS_REDIS_LIST_KEY", "ward 3 patients")

    settings = load_settings()

    assert settings.kafka_topic == "ward-3.vitals_v2"
    assert settings.kafka_bootstrap_servers == servers
    assert settings.redis_list_key == "ward 3 patients"


def test_generate_rejected_kafka_property_exits_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka rejects the property when the client is built, before any connection."""
    monkeypatch.setenv("VITALS_KAFKA_EXTRA", '{"bogus.prop": 1}')
    monkeypatch.setenv("VITALS_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")

    result = CliRunner().invoke(main, ["generate", "--count", "1"])

    assert result.exit_code == 2
    assert "No such configuration property" in result.stderr
    assert "Traceback" not in result.stderr


def test_rejected_sasl_mechanism_names_kafka_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITALS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("VITALS_KAFKA_SASL_MECHANISM", "FOO")
    monkeypatch.setenv("VITALS_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")

    result = CliRunner().invoke(main, ["generate", "--count", "1"])

    assert result.exit_code == 2
    assert "Unsupported SASL mechanism: FOO" in result.stderr
    assert "Check the VITALS_KAFKA_* variables" in result.stderr
    assert "KafkaError{" not in result.stderr


@pytest.mark.parametrize("value", ["-1", "0", "63676799", "1.7e12", "nan"])
def test_min_timestamp_outside_range_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError, match="VITALS_MIN_TIMESTAMP"):
        load_settings(min_timestamp=value)


def test_min_timestamp_first_whole_minute_offsets() -> None:
    """Africa/Monrovia, the last zone with offset seconds, has whole minutes from then on."""
    first = load_settings(min_timestamp="63676800").min_timestamp
    monrovia = datetime.fromtimestamp(first, ZoneInfo("Africa/Monrovia"))

    assert monrovia.utcoffset() == timedelta(0)
    earlier = datetime.fromtimestamp(first - 86_400 * 2, ZoneInfo("Africa/Monrovia"))
    assert earlier.utcoffset() == -timedelta(minutes=44, seconds=30)


@pytest.mark.parametrize("value", ["-1", "31622401", "1e12", "inf"])
def test_max_future_skew_outside_range_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError, match="VITALS_MAX_FUTURE_SKEW_S"):
        load_settings(max_future_skew_s=value)


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("min_timestamp", "0", "every time zone's offset is whole minutes"),
        ("max_future_skew_s", "31622401", "366 days at most"),
    ],
)
def test_timestamp_bound_error_gives_reason(
    setting: str, value: str, reason: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(**{setting: value})

    assert reason in str(raised.value)


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        (["generate", "--malformed-rate", "nan"], "nan is not a finite number"),
        (["publish", "-", "--rate", "inf"], "inf is not a finite number"),
        (["show", "--start", str(2**64)], "is not in the range"),
        (["reports", "--last", str(2**64)], "is not in the range"),
        (["services", "start", "--state-dir", "/dev/null"], "is not a folder"),
        (["services", "stop", "--state-dir", "/dev/null"], "is not a folder"),
        (
            [
                *("services", "start", "--state-dir", "/proc/1"),
                *("--kafka-port", str(free_port()), "--redis-port", str(free_port())),
            ],
            "cannot write",
        ),
    ],
)
def test_invalid_argument_exits_2_before_connecting(
    arguments: list[str], detail: str
) -> None:
    result = CliRunner().invoke(main, arguments, input="")

    assert result.exit_code == 2
    assert detail in result.stderr
    assert "Traceback" not in result.output


def test_sasl_without_mechanism_names_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITALS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("VITALS_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")

    result = CliRunner().invoke(main, ["generate", "--count", "1"])

    assert result.exit_code == 2
    assert "VITALS_KAFKA_SASL_MECHANISM is not set" in result.stderr


def test_error_shows_brackets_of_the_value() -> None:
    result = CliRunner().invoke(
        main, ["settings"], env={"VITALS_KAFKA_TOPIC": "[blink]vitals"}
    )

    assert result.exit_code == 2
    assert "VITALS_KAFKA_TOPIC='[blink]vitals'" in result.stderr


def test_bootstrap_prefix_must_match_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALS_KAFKA_BOOTSTRAP_SERVERS", "SSL://127.0.0.1:9093")

    with pytest.raises(ConfigurationError, match="security protocol is PLAINTEXT"):
        load_settings()

    monkeypatch.setenv("VITALS_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert load_settings().kafka_bootstrap_servers == "SSL://127.0.0.1:9093"

    # A security.protocol in VITALS_KAFKA_EXTRA is the one librdkafka uses.
    monkeypatch.setenv("VITALS_KAFKA_EXTRA", '{"security.protocol": "plaintext"}')
    with pytest.raises(ConfigurationError, match="security protocol is PLAINTEXT"):
        load_settings()


def test_print_error_keeps_brackets_and_colons(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_error("error:", "key icu:bed:patients at [::1]:6379 [bold]")

    assert (
        capsys.readouterr().err == "error: key icu:bed:patients at [::1]:6379 [bold]\n"
    )


def test_console_keeps_long_lines_whole(capsys: pytest.CaptureFixture[str]) -> None:
    """A summary printed into a pipe stays on one line, so grep finds it."""
    line = "Of the 100 messages sent, 100 were delivered; " * 4

    console.print(line)

    assert capsys.readouterr().out == line + "\n"
