"""Batch reports read back from the Redis stream that run_batch appends to."""

from __future__ import annotations

import json
import re
from typing import Any
from unittest import mock

import pytest
import redis
from click.testing import CliRunner

from etl import pipeline
from etl.cli import main
from etl.config import Settings
from etl.explore import load_reports, reject_reasons_by_run, settings_env
from etl.pipeline import BatchReport, run_batch
from etl.reports import ReportEntry, parse_entry, read_reports
from etl.services import free_port
from etl.sink import OffsetConflict, RedisSink, SinkError
from etl.source import KafkaSource, SourceError
from tests.conftest import create_topic, encode, produce, reading


def two_batches(settings: Settings) -> list[BatchReport]:
    """Run two batches: five readings with one reject, then three with two rejects."""
    create_topic(settings, partitions=1)
    produce(
        settings, [encode(reading(patient_id=f"PT-{i}")) for i in range(4)] + [b"{"]
    )
    first = run_batch(settings)
    produce(settings, [encode(reading(age=200)), None, encode(reading())])
    second = run_batch(settings)
    return [first, second]


@pytest.mark.integration
def test_reports_read_back_oldest_first(
    settings: Settings, redis_client: redis.Redis
) -> None:
    batches = two_batches(settings)

    entries = read_reports(redis_client, settings.redis_reports_key, last=10)

    assert [entry.status for entry in entries] == ["ok", "ok"]
    assert [(e.read, e.written, e.rejected) for e in entries] == [
        (5, 4, 1),
        (3, 1, 2),
    ]
    assert [entry.tombstones for entry in entries] == [0, 1]
    assert entries[0].time <= entries[1].time
    assert entries[1].rejected_by_reason == {"out_of_range": 1, "tombstone": 1}
    assert entries[1].report["offsets"] == batches[1].to_dict()["offsets"]


@pytest.mark.integration
def test_reports_last_keeps_newest(
    settings: Settings, redis_client: redis.Redis
) -> None:
    two_batches(settings)

    entries = read_reports(redis_client, settings.redis_reports_key, last=1)

    assert [(entry.read, entry.rejected) for entry in entries] == [(3, 2)]


@pytest.mark.integration
def test_reports_cli_prints_table(settings: Settings) -> None:
    two_batches(settings)

    # A wide console, so rich does not wrap the headers.
    env = {**settings_env(settings), "COLUMNS": "160"}

    result = CliRunner().invoke(main, ["reports", "--last", "10"], env=env)

    assert result.exit_code == 0, result.output
    assert "Last 2 batch reports" in result.output
    headers = ("topic", "status", "read", "written", "rejected", "duplicates", "alerts")
    for header in headers:
        assert header in result.output
    assert f" {settings.kafka_topic} " in result.output


def test_reports_title_single_report(
    settings: Settings, redis_client: redis.Redis
) -> None:
    add_report(redis_client, settings, "vitals", read=42)
    env = {**settings_env(settings), "COLUMNS": "160"}

    result = CliRunner().invoke(main, ["reports"], env=env)

    assert result.exit_code == 0, result.output
    assert "Last 1 batch report (" in result.output


def add_report(
    client: redis.Redis, settings: Settings, topic: str, **counts: Any
) -> None:
    """Append a report to the stream as the batch does, without running one."""
    report = BatchReport(topic=topic, started_at="2024-06-10T06:13:20+00:00", **counts)
    client.xadd(
        settings.redis_reports_key,
        {**report.stream_fields(), "report": json.dumps(report.to_dict())},
    )


def big_reports(client: redis.Redis, settings: Settings) -> None:
    """Two reports of different topics, whose values need more than 80 columns."""
    add_report(
        client,
        settings,
        "icu.vitals.ward-7.bedside-monitors",
        read=1_234_567,
        written=1_234_000,
        rejected=567,
        duration_s=196.74,
    )
    add_report(client, settings, "vitals", status="concurrent_batch", read=42)


def plain_lines(output: str) -> list[str]:
    """Return the lines of ``output`` without ANSI escape sequences."""
    return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.splitlines()]


def report_times(client: redis.Redis, settings: Settings) -> list[str]:
    return [
        entry.time.strftime("%Y-%m-%d %H:%M:%S")
        for entry in read_reports(client, settings.redis_reports_key)
    ]


@pytest.mark.integration
def test_reports_piped_prints_whole_values(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Off a terminal the table is as wide as its values, whatever the value of COLUMNS."""
    big_reports(redis_client, settings)
    env = {**settings_env(settings), "COLUMNS": "80"}

    result = CliRunner().invoke(main, ["reports"], env=env)
    lines = plain_lines(result.stdout)

    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert max(len(line) for line in lines) > 80
    [big_row] = [line for line in lines if "1234567" in line]
    for value in ("icu.vitals.ward-7.bedside-monitors", "1234000", " 567 ", "196.74 s"):
        assert value in big_row
    assert "6,275/s" in big_row
    [small_row] = [line for line in lines if "concurrent_batch" in line]
    assert " vitals " in small_row
    for time in report_times(redis_client, settings):
        assert time in result.stdout


@pytest.mark.integration
def test_reports_table_adds_skipped_to_duplicates(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The duplicates column counts what etl run's "duplicates skipped" line counts."""
    add_report(
        redis_client,
        settings,
        "vitals",
        status="concurrent_batch",
        read=90,
        written=80,
        rejected=3,
        duplicates=2,
        skipped=5,
    )

    result = CliRunner().invoke(main, ["reports"], env=settings_env(settings))
    [row] = [line for line in plain_lines(result.stdout) if "concurrent_batch" in line]

    assert result.exit_code == 0, result.output
    assert row.split("│")[7].strip() == "7"


@pytest.mark.integration
@pytest.mark.parametrize("columns", [80, 100])
def test_reports_terminal_fits_width(
    settings: Settings, redis_client: redis.Redis, columns: int
) -> None:
    """On a terminal the table fits by folding headers and text, not numbers."""
    add_report(redis_client, settings, "vitals", read=500, written=490, duration_s=0.18)
    env = {**settings_env(settings), "TTY_COMPATIBLE": "1", "COLUMNS": str(columns)}

    result = CliRunner().invoke(main, ["reports"], env=env)
    lines = plain_lines(result.stdout)

    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert max(len(line) for line in lines) == columns
    [date, clock] = report_times(redis_client, settings)[0].split()
    assert date in result.stdout
    assert clock in result.stdout
    for value in (" 500 ", " 490 ", "0.18", "2,778/s"):
        assert value in result.stdout


@pytest.mark.integration
def test_reports_narrow_terminal_keeps_numbers(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Numbers that do not fit the terminal widen the table rather than being cut."""
    big_reports(redis_client, settings)
    env = {**settings_env(settings), "TTY_COMPATIBLE": "1", "COLUMNS": "40"}

    result = CliRunner().invoke(main, ["reports"], env=env)
    lines = plain_lines(result.stdout)

    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert max(len(line) for line in lines) > 40
    for value in ("1234567", "1234000", "6,275/s", "196.74"):
        assert value in result.stdout
    for time in report_times(redis_client, settings):
        for part in time.split():
            assert part in result.stdout


@pytest.mark.integration
def test_reports_cli_json(settings: Settings) -> None:
    two_batches(settings)

    result = CliRunner().invoke(
        main, ["reports", "--last", "1", "--json"], env=settings_env(settings)
    )

    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert (entry["status"], entry["read"], entry["written"]) == ("ok", 3, 1)
    assert entry["report"]["rejected_by_reason"] == {
        "out_of_range": 1,
        "tombstone": 1,
    }


def only_report(settings: Settings) -> ReportEntry:
    """Return the one report in the test's stream."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        [entry] = read_reports(client, settings.redis_reports_key)
    finally:
        client.close()
    return entry


@pytest.mark.integration
def test_failed_batch_reported_with_error(settings: Settings) -> None:
    """A batch that Kafka fails (here a missing topic) still appends its report."""
    with pytest.raises(SourceError, match="does not exist"):
        run_batch(settings)

    entry = only_report(settings)

    assert entry.status == "failed"
    assert entry.report["stop_reason"] == "failed"
    assert entry.error is not None
    assert f"topic {settings.kafka_topic!r} does not exist" in entry.error


@pytest.mark.integration
def test_reports_cli_prints_batch_errors(settings: Settings) -> None:
    two_batches(settings)
    settings = settings.model_copy(update={"kafka_topic": "vitals-missing"})
    with pytest.raises(SourceError):
        run_batch(settings)
    env = {**settings_env(settings), "COLUMNS": "160"}

    result = CliRunner().invoke(main, ["reports"], env=env)

    assert result.exit_code == 0, result.output
    assert " failed " in result.output
    [error_line] = [line for line in result.output.splitlines() if "failed:" in line]
    assert "failed: topic 'vitals-missing' does not exist" in error_line


@pytest.mark.integration
@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        pytest.param(
            OffsetConflict("stored offset moved back"),
            "offset_conflict",
            "stored offset moved back",
        ),
        pytest.param(RuntimeError("unexpected"), "failed", "unexpected", id="other"),
        pytest.param(AssertionError(), "failed", "AssertionError", id="no-message"),
    ],
)
def test_ended_batch_status_reported(
    settings: Settings, error: Exception, status: str, message: str
) -> None:
    create_topic(settings, partitions=1)
    with (
        mock.patch.object(KafkaSource, "assign", side_effect=error),
        pytest.raises(type(error)),
    ):
        run_batch(settings)

    entry = only_report(settings)

    assert entry.status == status
    assert entry.error == message


@pytest.mark.integration
@pytest.mark.parametrize(
    "error",
    [
        pytest.param(KeyboardInterrupt(), id="ctrl-c"),
        pytest.param(SystemExit(143), id="exit"),
        pytest.param(SinkError("lost"), id="redis-error"),
    ],
)
def test_stop_or_redis_error_unreported(
    settings: Settings, error: BaseException
) -> None:
    """A stop must end the batch at once, and after a Redis error a write would wait again."""
    create_topic(settings, partitions=1)
    with (
        mock.patch.object(KafkaSource, "assign", side_effect=error),
        mock.patch.object(RedisSink, "write_report") as write_report,
        pytest.raises(type(error)),
    ):
        run_batch(settings)

    write_report.assert_not_called()


@pytest.mark.integration
def test_failed_write_skips_failure_report(settings: Settings) -> None:
    """The writer's Redis error, logged at close, means Redis may hang: no report."""
    create_topic(settings, partitions=1)
    produce(settings, [encode(reading())])
    close = pipeline._WriteBehind.close

    def close_after_failed_write(writer: pipeline._WriteBehind) -> None:
        close(writer)
        writer.unraised = SinkError("Redis timed out")

    with (
        mock.patch.object(
            pipeline, "_process_ahead", side_effect=SourceError("broker lost")
        ),
        mock.patch.object(pipeline._WriteBehind, "close", close_after_failed_write),
        mock.patch.object(RedisSink, "write_report") as write_report,
        pytest.raises(SourceError),
    ):
        run_batch(settings)

    write_report.assert_not_called()


@pytest.mark.integration
def test_reports_cli_empty_stream(settings: Settings) -> None:
    result = CliRunner().invoke(main, ["reports"], env=settings_env(settings))

    assert result.exit_code == 0, result.output
    assert "No batch reports" in result.output


@pytest.mark.integration
def test_reports_cli_unreachable_redis_exits_3(settings: Settings) -> None:
    env = settings_env(settings)
    env["VITALS_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["VITALS_REDIS_TIMEOUT_S"] = "1"

    result = CliRunner().invoke(main, ["reports"], env=env)

    assert result.exit_code == 3
    assert "cannot read" in result.stderr


@pytest.mark.integration
def test_reports_frame_for_notebooks(settings: Settings) -> None:
    two_batches(settings)

    reports = load_reports(settings)
    reasons = reject_reasons_by_run(reports)

    assert reports["read"].to_list() == [5, 3]
    assert reasons.select("reason", "count").rows() == [
        ("invalid_json", 1),
        ("out_of_range", 1),
        ("tombstone", 1),
    ]


def test_reports_skipped_read_back() -> None:
    """Records that another batch wrote first stay in the account of the entry."""
    report = BatchReport(
        topic="vitals", started_at="2024-06-10T06:00:00+00:00", read=10, written=5
    )
    report.rejected, report.duplicates, report.skipped = 2, 1, 2
    fields = {name: str(value) for name, value in report.stream_fields().items()}

    entry = parse_entry(b"1718000000000-0", fields)

    assert entry.skipped == 2
    assert (
        entry.read == entry.written + entry.rejected + entry.duplicates + entry.skipped
    )


def test_reports_inf_nan_fields_zero() -> None:
    """Redis keeps any text in a stream field; such numbers must not stop `etl reports`."""
    entry = parse_entry(
        b"1718000000000-0",
        {b"status": b"ok", b"read": b"inf", b"written": b"nan", b"rate_per_s": b"-inf"},
    )

    assert entry.read == 0
    assert entry.written == 0
    assert entry.rate_per_s == 0.0


@pytest.mark.integration
def test_reports_table_escapes_controls(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """An escape sequence in a damaged entry reaches the terminal as text, not as a command."""
    add_report(redis_client, settings, "vitals\x1b[31mred", status="ok\x07", read=3)
    env = {**settings_env(settings), "TTY_COMPATIBLE": "1", "COLUMNS": "200"}

    result = CliRunner().invoke(main, ["reports"], env=env)

    assert result.exit_code == 0, result.output
    assert "\x1b[31mred" not in result.stdout
    assert "\x07" not in result.stdout
    assert "'vitals\\x1b[31mred'" in result.stdout
    assert "'ok\\x07'" in result.stdout


def test_reports_nan_document_empty() -> None:
    """A report document with NaN reads as empty, so `etl reports --json` prints JSON."""
    entry = parse_entry(
        b"1718000000000-0",
        {
            b"status": b"ok",
            b"report": b'{"topic": "t", "rejected_by_reason": {"a": NaN}}',
        },
    )

    assert entry.report == {}
    assert "NaN" not in json.dumps(entry.to_dict())


@pytest.mark.parametrize(
    "document",
    [
        pytest.param('{"topic": "t", "duration": 1e999}', id="float-overflow"),
        pytest.param('{"a": -1e400}', id="negative-overflow"),
        pytest.param('{"a": ' + "[" * 5000 + "]" * 5000 + "}", id="nested-too-deep"),
    ],
)
def test_reports_unreadable_document_empty(document: str) -> None:
    """Numbers a float cannot hold and nesting past Python's recursion limit."""
    entry = parse_entry(
        b"1718000000000-0", {b"status": b"ok", b"report": document.encode()}
    )

    assert entry.report == {}
    assert "Infinity" not in json.dumps(entry.to_dict())


def test_reports_nested_document_prints_json() -> None:
    """A report nested 500 levels deep, which Python's parser reads, prints as JSON."""
    document = '{"a": ' + "[" * 500 + "]" * 500 + "}"
    entry = parse_entry(
        b"1718000000000-0", {b"status": b"ok", b"report": document.encode()}
    )

    assert json.loads(json.dumps(entry.to_dict()))["report"] == json.loads(document)


def test_reports_entry_id_past_year_9999() -> None:
    """An id set by hand with XADD may lie past the dates Python can hold."""
    entry = parse_entry(b"99999999999999999-0", {b"status": b"ok"})

    assert entry.time.year == 9999
    assert entry.to_dict()["time"].startswith("9999-12-31T23:59:59")


def test_reports_parse_entry_tolerates_damaged_fields() -> None:
    entry = parse_entry(
        b"1718000000000-0",
        {b"status": b"ok", b"read": b"many", b"report": b"not json"},
    )

    assert entry.read == 0
    assert entry.report == {}
    assert entry.topic is None
    assert entry.time.isoformat() == "2024-06-10T06:13:20+00:00"
