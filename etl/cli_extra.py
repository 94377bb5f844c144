"""Commands ``etl contracts``, ``etl validate-feed``, ``etl publish`` and ``etl reports``.

They are registered on the main group at the end of :mod:`etl.cli`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

import click
from rich.table import Table

from etl.cli_options import (
    HELP_SETTINGS,
    PARTITIONS_OPTION,
    TOPIC_OPTION,
    rate_option,
    redis_integer,
)
from etl.config import Settings
from etl.exit_codes import EXIT_FAILED
from etl.terminal import (
    console,
    counted,
    errors,
    print_error,
    print_table,
    stop_on_signals,
)

if TYPE_CHECKING:
    from etl.feed import FeedResult, PublishResult
    from etl.generate import ProduceStopped
    from etl.reports import ReportEntry


def _load_settings(topic: str | None = None) -> Settings:
    # etl.cli registers this module's commands at its end, so import it late.
    from etl.cli import settings_or_exit

    return settings_or_exit(kafka_topic=topic)


# etl contracts


@click.group(context_settings=HELP_SETTINGS)
def contracts() -> None:
    """Export the data contracts as files, or check the committed files for drift."""


DIRECTORY_OPTION: Final = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Folder of the artefacts (default: the contracts package folder).",
)


@contracts.command("export", context_settings=HELP_SETTINGS)
@DIRECTORY_OPTION
def contracts_export(directory: Path | None) -> None:
    """Write the message JSON Schema and the Pandera YAML of both models."""
    from etl.contracts_export import (
        CONTRACTS_DIR,
        ContractExportError,
        write_artefacts,
    )

    try:
        written = write_artefacts(directory or CONTRACTS_DIR)
    except ContractExportError as exc:
        print_error("cannot export the contracts:", exc)
        sys.exit(EXIT_FAILED)
    for path in written:
        click.echo(f"wrote {path}")


@contracts.command("check", context_settings=HELP_SETTINGS)
@DIRECTORY_OPTION
def contracts_check(directory: Path | None) -> None:
    """Exit 1 and print a diff when a committed artefact differs from a fresh export."""
    from etl.contracts_export import (
        CONTRACTS_DIR,
        ContractExportError,
        check_artefacts,
    )

    try:
        drifts = check_artefacts(directory or CONTRACTS_DIR)
    except ContractExportError as exc:
        print_error("cannot export the contracts:", exc)
        sys.exit(EXIT_FAILED)
    if not drifts:
        click.echo("contracts: every artefact matches the models")
        return
    for drift in drifts:
        click.echo(drift.diff, nl=not drift.diff.endswith("\n"))
    names = ", ".join(drift.name for drift in drifts)
    print_error(
        "contracts drifted from the models:",
        f"{names}. "
        "Run 'etl contracts export' and commit the files if the change is intended.",
    )
    sys.exit(EXIT_FAILED)


# etl validate-feed


@click.command("validate-feed", context_settings=HELP_SETTINGS)
@click.argument("feed", type=click.File("rb"))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Failures shown in the table; 0 shows all. --json always lists all.",
)
def validate_feed(feed: BinaryIO, as_json: bool, limit: int) -> None:
    """Check FEED (NDJSON, one message per line; '-' for stdin) as the batch would.

    Each line goes through the batch's parsing and input contract. Exits 1 when
    any line would be rejected. Blank lines are skipped.
    """
    from etl.feed import validate_feed as run_validation

    result = run_validation(feed, _load_settings())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_feed_result(result, limit=limit)
    if result.failures:
        sys.exit(EXIT_FAILED)


# etl publish


@click.command("publish", context_settings=HELP_SETTINGS)
@click.argument("feed", type=click.File("rb"))
@click.option(
    "--key-field",
    default="patient_id",
    show_default=True,
    help="JSON field whose string or whole-number value becomes the message key; "
    "'' sends no key.",
)
@PARTITIONS_OPTION
@rate_option("messages")
@click.option(
    "--from-line",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="First line to send, to go on after a failure.",
)
@TOPIC_OPTION
def publish(
    feed: BinaryIO,
    key_field: str,
    partitions: int,
    rate: float | None,
    from_line: int,
    topic: str | None,
) -> None:
    """Produce each line of FEED (NDJSON; '-' for stdin) to the topic, unchanged.

    The batch then checks every message as it checks any producer's: run
    'etl validate-feed FEED' first to see what it would reject. Blank lines
    are skipped.
    """
    from etl.config import ConfigurationError
    from etl.exit_codes import EXIT_CONFIG, EXIT_INFRASTRUCTURE
    from etl.feed import PublishError, publish_feed
    from etl.generate import ProduceStopped

    settings = _load_settings(topic)
    try:
        with stop_on_signals() as stop:
            try:
                result = publish_feed(
                    feed,
                    settings,
                    key_field=key_field,
                    partitions=partitions,
                    rate=rate,
                    from_line=from_line,
                    stop=stop,
                )
            except ProduceStopped as exc:
                # Still inside the signal handlers, so a second signal cannot interrupt
                # this message.
                _print_publish_stopped(stop.name, exc)
                sys.exit(128 + signal.Signals[stop.name].value)
    except ConfigurationError as exc:
        print_error("error:", exc)
        sys.exit(EXIT_CONFIG)
    except PublishError as exc:
        print_error("publish failed:", exc)
        if exc.failed_line is not None:
            line = exc.failed_line
            errors.print(
                f"Line {line} could not be produced, and every line before it was delivered. "
                f"'--from-line {line}' sends the rest once that line is fixed, "
                f"and '--from-line {line + 1}' skips it."
            )
        sys.exit(EXIT_INFRASTRUCTURE)
    if from_line > result.lines + 1:
        print_error(
            "error:",
            f"the feed has {counted(result.lines, 'line')}, so --from-line "
            f"{from_line} is past its end and nothing was sent",
        )
        sys.exit(EXIT_CONFIG)
    console.print(
        f"Published {counted(result.published, 'message')} to topic "
        f"{settings.kafka_topic}; {counted(result.blank, 'blank line')} skipped"
        f"{_unkeyed_summary(result, key_field)}"
    )
    if key_field and result.published and result.without_field == result.published:
        print_error(
            "warning:",
            f"no line has the field {key_field!r}, so every message was sent "
            "without a key, and librdkafka spread them over the partitions at "
            "random. Check --key-field (default: patient_id), or pass "
            "--key-field '' to send no key on purpose",
        )


def _unkeyed_summary(result: PublishResult, key_field: str) -> str:
    """Return the summary's part on messages sent without a key, or '' when all had one."""
    reasons = []
    if result.without_field:
        reasons.append(
            f"{result.without_field} not a JSON object with the field {key_field!r}"
        )
    if result.unusable_key:
        reasons.append(
            f"{result.unusable_key} with a {key_field!r} that is blank or neither "
            "a string nor a whole number"
        )
    if not reasons:
        return ""
    unkeyed = result.without_field + result.unusable_key
    return f"; {unkeyed} sent without a key ({', '.join(reasons)})"


def _print_publish_stopped(signal_name: str, error: ProduceStopped) -> None:
    print_error("publish stopped:", f"{signal_name} received. {error}.")
    if error.line is not None and error.sent and error.delivered == error.sent:
        errors.print(
            f"Every line before line {error.line} was delivered, and "
            f"'--from-line {error.line}' goes on from there."
        )


def _print_feed_result(result: FeedResult, *, limit: int) -> None:
    if result.failures:
        shown = result.failures if limit == 0 else result.failures[:limit]
        table = Table(title="Lines the batch would reject")
        for column in ("line", "reason", "field", "detail"):
            table.add_column(column, justify="right" if column == "line" else "left")
        for failure in shown:
            table.add_row(
                str(failure.line),
                failure.reason,
                failure.field or "",
                failure.detail or "",
            )
        print_table(table)
        if len(shown) < len(result.failures):
            console.print(
                f"... and {len(result.failures) - len(shown)} more (use --limit 0 or --json)"
            )
        summary = Table(title="Failures by reason")
        summary.add_column("reason")
        summary.add_column("lines", justify="right")
        for reason, amount in result.by_reason.items():
            summary.add_row(reason, str(amount))
        print_table(summary)
    valid = result.checked - len(result.failures)
    console.print(
        f"{counted(result.checked, 'message')} checked: {valid} valid, "
        f"{len(result.failures)} invalid; {counted(result.blank, 'blank line')} "
        "skipped"
    )


# etl reports


@click.command("reports", context_settings=HELP_SETTINGS)
@click.option(
    "--last",
    type=click.IntRange(min=1),
    callback=redis_integer,
    default=10,
    show_default=True,
    help="Number of most recent batch reports to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def reports(last: int, as_json: bool) -> None:
    """Print the last batch reports from the Redis reports stream, oldest first."""
    import redis

    from etl.reports import read_reports

    settings = _load_settings()
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    try:
        entries = read_reports(client, settings.redis_reports_key, last=last)
    except redis.RedisError as exc:
        from etl.cli import redis_read_failed

        redis_read_failed(exc, settings, settings.redis_reports_key, "stream")
    finally:
        client.close()

    if as_json:
        click.echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return
    if not entries:
        console.print(
            f"No batch reports in {settings.redis_reports_key} yet; run 'etl run' first."
        )
        return
    print_table(_reports_table(entries, key=settings.redis_reports_key))
    for entry in entries:
        if entry.error is not None:
            time = entry.time.strftime("%Y-%m-%d %H:%M:%S")
            console.print(
                f"{time} {_printable(entry.status)}: {_printable(entry.error)}"
            )


def _printable(text: str) -> str:
    """Return ``text``, or its Python literal when it has control characters.

    So an escape sequence in a damaged stream entry cannot drive the terminal.
    """
    return text if text.isprintable() else ascii(text)


def _reports_table(entries: list[ReportEntry], *, key: str) -> Table:
    table = Table(title=f"Last {counted(len(entries), 'batch report')} ({key})")
    table.add_column("time (UTC)")
    # Topics and statuses fold where a narrow terminal needs it.
    table.add_column("topic", overflow="fold")
    table.add_column("status", overflow="fold")
    for name in ("read", "written", "rejected", "duplicates", "alerts"):
        table.add_column(name, justify="right")
    table.add_column("duration", justify="right")
    table.add_column("rate", justify="right")
    for entry in entries:
        table.add_row(
            entry.time.strftime("%Y-%m-%d %H:%M:%S"),
            _printable(entry.topic or "unknown"),
            _printable(entry.status),
            str(entry.read),
            str(entry.written),
            str(entry.rejected),
            # As in the summary of etl run: records delivered twice, and records
            # that another batch had written first.
            str(entry.duplicates + entry.skipped),
            str(entry.alerts),
            f"{entry.duration_s:.2f} s",
            f"{entry.rate_per_s:,.0f}/s",
        )
    return table
