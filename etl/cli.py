"""Command line: ``etl run``, ``etl generate``, ``etl show``, ``etl services``, ``etl settings``."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Final, NoReturn

import click
from rich.table import Table

from etl.cli_options import (
    HELP_SETTINGS,
    PARTITIONS_OPTION,
    TOPIC_OPTION,
    TOPIC_OPTION_NAME,
    finite_number,
    rate_option,
    redis_integer,
)
from etl.cohort import MAX_COHORT_SIZE
from etl.config import ConfigurationError, Settings, load_settings
from etl.exit_codes import EXIT_CONFIG, EXIT_INFRASTRUCTURE
from etl.terminal import (
    console,
    counted,
    errors,
    print_error,
    print_table,
    stop_on_signals,
)

#: A TCP port to listen on.
PORT: Final = click.IntRange(1, 65535)


def redis_read_failed(
    error: Exception, settings: Settings, name: str, kind: str = "list"
) -> NoReturn:
    """Print why ``name`` could not be read from Redis, then exit 2 for a settings error, else 3."""
    from etl.sink import missing_database, with_connection_advice

    url = settings.redis_url_redacted
    missing = missing_database(error, url, settings.redis_database)
    if missing is not None:
        print_error("error:", missing)
        sys.exit(EXIT_CONFIG)
    if str(error).startswith("WRONGTYPE"):
        print_error(
            "error:", f"the key {name!r} at {url} is not a {kind}; check the key name"
        )
        sys.exit(EXIT_CONFIG)
    detail = with_connection_advice(str(error), error, settings)
    print_error(f"cannot read {name} from {url}:", detail)
    sys.exit(EXIT_INFRASTRUCTURE)


def settings_or_exit(**overrides: Any) -> Settings:
    """Build the settings, or print the error and exit with code 2.

    ``overrides`` that are None are left out. A ``kafka_topic`` override
    comes from ``--topic``, so the error of an invalid name shows that option.
    """
    try:
        return load_settings(
            option_names=TOPIC_OPTION_NAME,
            **{k: v for k, v in overrides.items() if v is not None},
        )
    except ConfigurationError as exc:
        print_error("error:", exc)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings=HELP_SETTINGS)
@click.option("-v", "--verbose", count=True, help="Log more (-v INFO, -vv DEBUG).")
def main(verbose: int) -> None:
    """Patient vital-signs ETL: Kafka -> Polars/Pandera -> Redis list liste-patients.

    Settings come from VITALS_* environment variables; see 'etl settings'.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


class _JsonFailureCommand(click.Command):
    """A command that also prints invalid arguments as a JSON failure under ``--json``.

    Click rejects a bad option value before the command runs. Its usage text
    stays on stderr and its exit code stays 2.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Tokens are matched without parsing, so the value in "--topic --json" counts too.
        wants_json = any(arg == "--json" or arg.startswith("--json=") for arg in args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if wants_json:
                click.echo(json.dumps(_failure(exc, exc.exit_code), indent=2))
            raise


#: The setting that each option of ``etl run`` overrides.
RUN_OPTION_NAMES: Final = {
    "kafka_topic": "--topic",
    "chunk_size": "--chunk-size",
    "max_records": "--max-records",
    "deadline_s": "--deadline",
}


@main.command(cls=_JsonFailureCommand, context_settings=HELP_SETTINGS)
@TOPIC_OPTION
@click.option(
    "--chunk-size",
    type=click.IntRange(1, 1_000_000),
    help="Records per chunk and Redis transaction.",
)
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    help="Stop the batch after this many records.",
)
@click.option(
    "--deadline",
    "deadline_s",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_number,
    help="Stop the batch after this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def run(
    topic: str | None,
    chunk_size: int | None,
    max_records: int | None,
    deadline_s: float | None,
    as_json: bool,
) -> None:
    """Drain the topic once and append the readings to Redis exactly once."""
    # A stop request (SIGTERM from a scheduler, or Ctrl-C) ends the batch through
    # its cleanup, which lets a transaction in flight finish. The handlers come
    # before the imports of the batch, which took about 0.2 s on a 2-vCPU
    # machine.
    # NOTE: a signal while Python loads this module (about 0.3 s after the
    # start) still ends the process by its default action, before any read.
    signal.signal(signal.SIGTERM, _raise_stop_request)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_stop_request)
    overrides = {
        "kafka_topic": topic,
        "chunk_size": chunk_size,
        "max_records": max_records,
        "deadline_s": deadline_s,
    }
    try:
        try:
            from etl.pipeline import run_batch
            from etl.sink import OffsetConflict, RedisFull, RedisLoading, SinkError
            from etl.source import OffsetsOutOfRange, SourceError

            settings = load_settings(
                option_names=RUN_OPTION_NAMES,
                **{k: v for k, v in overrides.items() if v is not None},
            )
            report = run_batch(settings)
        finally:
            # Once the batch has ended there is nothing left to stop, so a
            # signal while the outcome prints is ignored until the exit.
            _ignore_stop_signals()
    except (StopRequested, KeyboardInterrupt) as exc:
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print_error(
            "batch stopped:",
            f"{name} received. Redis keeps the rows and "
            "offsets of every chunk written before, so the next batch resumes from "
            "there.",
        )
        code = 128 + signal.Signals[name].value
        if as_json:
            stop = StopRequested(f"{name} received")
            click.echo(json.dumps(_failure(stop, code, status="stopped"), indent=2))
        sys.exit(code)
    except ConfigurationError as exc:
        print_error("error:", exc)
        _exit_with_json(as_json, exc, EXIT_CONFIG)
    except (SourceError, SinkError, OffsetConflict) as exc:
        print_error("batch failed:", exc)
        # These messages end with their own fix.
        if not isinstance(
            exc, OffsetConflict | OffsetsOutOfRange | RedisFull | RedisLoading
        ):
            errors.print(
                "Fix the cause above (start the service, correct its address in "
                "the settings, or run the commands given), then rerun. Chunks "
                "written before the failure, if any, stay in Redis with their "
                "offsets, so the next batch resumes after them."
            )
        _exit_with_json(as_json, exc, EXIT_INFRASTRUCTURE)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"Batch on topic {report.topic}", show_header=False)
    table.add_row("status", report.status)
    table.add_row("read", f"{report.read:,}")
    table.add_row("written", f"{report.written:,} -> {settings.redis_list_key}")
    table.add_row("rejected", f"{report.rejected:,} -> {settings.redis_rejects_key}")
    for reason, amount in sorted(report.rejected_by_reason.items()):
        table.add_row(f"  {reason}", f"{amount:,}")
    table.add_row("duplicates skipped", f"{report.duplicates + report.skipped:,}")
    table.add_row("alerts", f"{report.alerts:,} -> {settings.redis_alerts_key}")
    table.add_row("chunks", f"{report.chunks:,}")
    table.add_row("ended by", report.stop_reason)
    table.add_row("duration", f"{report.duration_s:.2f} s")
    table.add_row("rate", f"{report.rate_per_s:,.0f} readings/s")
    print_table(table)


class StopRequested(BaseException):
    """Stop request from a signal. A BaseException, so that no ``except Exception`` swallows it."""


def _raise_stop_request(signal_number: int, _frame: Any) -> None:
    """Raise the first SIGTERM or SIGINT as a stop request, and ignore later ones.

    A second signal would interrupt the cleanup of the batch, even inside a C
    call such as closing the Kafka consumer, and end it with a traceback.
    SIG_IGN, unlike a Python handler, stays in place while the interpreter
    shuts down.
    """
    _ignore_stop_signals()
    if signal_number == signal.SIGINT:
        raise KeyboardInterrupt
    raise StopRequested(signal.Signals(signal_number).name)


def _ignore_stop_signals() -> None:
    """Set SIG_IGN for SIGTERM and SIGINT wherever :func:`_raise_stop_request` handles them."""
    for number in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(number) is _raise_stop_request:
            signal.signal(number, signal.SIG_IGN)


def _exit_with_json(as_json: bool, error: Exception, code: int) -> NoReturn:
    """Exit with ``code``; with ``--json``, print the failure as JSON on stdout first."""
    if as_json:
        click.echo(json.dumps(_failure(error, code), indent=2))
    sys.exit(code)


def _failure(
    error: BaseException, code: int, *, status: str = "failed"
) -> dict[str, Any]:
    message = (
        error.format_message()
        if isinstance(error, click.ClickException)
        else str(error)
    )
    return {
        "status": status,
        "error": type(error).__name__,
        "message": message,
        "exit_code": code,
    }


@main.command(context_settings=HELP_SETTINGS)
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Readings to produce.",
)
@rate_option("readings")
@click.option(
    "--malformed-rate",
    type=click.FloatRange(0, 1),
    callback=finite_number,
    default=0.0,
    show_default=True,
    help="Share of deliberately malformed messages.",
)
@click.option(
    "--cohort-size",
    type=click.IntRange(1, MAX_COHORT_SIZE),
    default=200,
    show_default=True,
    help="Number of distinct patients.",
)
@PARTITIONS_OPTION
@click.option("--seed", type=int, help="Seed for reproducible readings.")
@TOPIC_OPTION
def generate(
    count: int,
    rate: float | None,
    malformed_rate: float,
    cohort_size: int,
    partitions: int,
    seed: int | None,
    topic: str | None,
) -> None:
    """Produce realistic synthetic readings to the Kafka topic."""
    from etl.generate import ProduceStopped, produce_readings

    settings = settings_or_exit(kafka_topic=topic)
    try:
        with stop_on_signals() as stop:
            try:
                delivered = produce_readings(
                    settings,
                    count=count,
                    rate=rate,
                    seed=seed,
                    cohort_size=cohort_size,
                    malformed_rate=malformed_rate,
                    partitions=partitions,
                    progress=count >= 10_000,
                    stop=stop,
                )
            except ProduceStopped as exc:
                # Still inside the signal handlers, so a second signal cannot interrupt
                # this message.
                print_error("generate stopped:", f"{stop.name} received. {exc}.")
                sys.exit(128 + signal.Signals[stop.name].value)
    except ConfigurationError as exc:
        print_error("error:", exc)
        sys.exit(EXIT_CONFIG)
    except RuntimeError as exc:
        print_error("generate failed:", exc)
        sys.exit(EXIT_INFRASTRUCTURE)
    console.print(
        f"Produced {counted(delivered, 'reading')} to topic {settings.kafka_topic}"
    )


@main.command(context_settings=HELP_SETTINGS)
@click.option(
    "--start",
    type=int,
    callback=redis_integer,
    default=0,
    show_default=True,
    help="Index of the first element; negative counts from the end.",
)
@click.option(
    "--stop",
    type=int,
    callback=redis_integer,
    default=9,
    show_default=True,
    help="Index of the last element, included; -1 is the last.",
)
@click.option("--key", help="Redis list (default: VITALS_REDIS_LIST_KEY).")
def show(start: int, stop: int, key: str | None) -> None:
    """Print list elements numbered like 'redis-cli LRANGE key start stop', as UTF-8 text.

    redis-cli escapes quotes and non-ASCII bytes (\\xc3\\xa9). This command
    prints them as they are, so accented names stay readable.
    """
    import redis

    settings = settings_or_exit()
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=5
    )
    name = key or settings.redis_list_key
    try:
        values = client.lrange(name, start, stop)
    except redis.RedisError as exc:
        redis_read_failed(exc, settings, name)
    if not values:
        click.echo("(empty list or set)")
    for index, value in enumerate(values, start=1):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        click.echo(f'{index}) "{text}"')


@main.command("settings", context_settings=HELP_SETTINGS)
def show_settings() -> None:
    """Print the effective settings, secrets masked."""
    click.echo(json.dumps(settings_or_exit().redacted(), indent=2))


@main.group(context_settings=HELP_SETTINGS)
def services() -> None:
    """Start or stop the local Kafka-protocol broker and Redis (127.0.0.1)."""


def _folder_or_new(
    _context: click.Context, _parameter: click.Parameter, value: Path
) -> Path:
    """Reject a path that exists and is no folder, such as /dev/null."""
    if value.exists() and not value.is_dir():
        msg = f"{value} exists and is not a folder."
        raise click.BadParameter(msg)
    return value


STATE_DIR_OPTION: Final = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    callback=_folder_or_new,
    default=Path(".local"),
    show_default=True,
    help="Folder for pid files and logs; a relative path starts at the current folder.",
)


@services.command("start", context_settings=HELP_SETTINGS)
@STATE_DIR_OPTION
@click.option(
    "--kafka-port",
    type=PORT,
    help="Broker port (default: the port of its last start, else 9092).",
)
@click.option(
    "--redis-port",
    type=PORT,
    help="Redis port (default: the port of its last start, else 6380).",
)
@TOPIC_OPTION
def services_start(
    state_dir: Path,
    kafka_port: int | None,
    redis_port: int | None,
    topic: str | None,
) -> None:
    """Start both services unless they run; print the variables that point at them.

    A service that already runs stays as it is, and its port is printed.
    When it runs on another port than --kafka-port or --redis-port requests,
    nothing starts and the command exits 3. A service suspended by SIGSTOP
    is resumed, one that exits while it is checked starts again, and one
    that does not respond within 10 s makes the command exit 3 (a Redis that
    still loads its data gets 60 s more). After the
    broker starts again, the command removes the stored offsets of --topic
    from Redis, because the broker starts without topics.
    """
    from redis import RedisError

    from etl.services import (
        ServiceError,
        check_database,
        forget_stale_offsets,
        start_local_stack,
    )
    from etl.sink import missing_database

    # Settings first, so that an invalid one stops the command before anything starts.
    settings = settings_or_exit(kafka_topic=topic)
    try:
        # The local Redis gets the database of VITALS_REDIS_URL, where batches keep offsets.
        env = start_local_stack(
            state_dir,
            kafka_port=kafka_port,
            redis_port=redis_port,
            redis_database=settings.redis_database,
        )
    except OSError as exc:
        where = exc.filename or state_dir
        print_error(
            "error:",
            f"cannot write to the state folder: {where}: "
            f"{exc.strerror or exc}. Choose another one with --state-dir",
        )
        sys.exit(EXIT_CONFIG)
    except ServiceError as exc:
        print_error("error:", exc)
        sys.exit(EXIT_INFRASTRUCTURE)
    try:
        check_database(env["VITALS_REDIS_URL"])
    except RedisError as exc:
        missing = missing_database(
            exc, env["VITALS_REDIS_URL"], settings.redis_database
        )
        if missing is not None:
            print_error(
                "error:",
                f"{missing}. Both services run; fix the URL, then run "
                "'etl services start' again",
            )
            sys.exit(EXIT_CONFIG)
        print_error(
            "error:",
            f"the local Redis at {env['VITALS_REDIS_URL']} failed: {exc}. Both "
            "services run; run 'etl services start' again once it responds",
        )
        sys.exit(EXIT_INFRASTRUCTURE)
    try:
        forgotten = forget_stale_offsets(
            state_dir,
            env["VITALS_REDIS_URL"],
            settings.redis_offsets_key,
            settings.kafka_topic,
        )
    except RedisError as exc:
        # The database was checked above.
        print_error(
            "error:",
            f"the local broker started again, but the offsets of "
            f"topic {settings.kafka_topic} in {settings.redis_offsets_key} at "
            f"{env['VITALS_REDIS_URL']} could not be removed: {exc}. Both "
            "services run; fix the key and run 'etl services start' again, which "
            "retries",
        )
        sys.exit(EXIT_INFRASTRUCTURE)
    if forgotten:
        errors.print(
            "The local broker starts with no topics, so the offsets of topic "
            f"{settings.kafka_topic} stored in the local Redis no longer apply: "
            f"removed {counted(forgotten, 'field')} of {settings.redis_offsets_key} "
            "(the offset of each partition, last_write and lists_from; the rows "
            "and the topic's id stay)."
        )
    for name, value in env.items():
        click.echo(f"export {name}={value}")


@services.command("stop", context_settings=HELP_SETTINGS)
@STATE_DIR_OPTION
def services_stop(state_dir: Path) -> None:
    """Stop the services started by 'etl services start'."""
    from etl.services import ServiceError, has_pid_files, stop_local_stack

    recorded = has_pid_files(state_dir)
    try:
        stopped = stop_local_stack(state_dir)
    except ServiceError as exc:
        print_error("error:", exc)
        sys.exit(EXIT_INFRASTRUCTURE)
    if stopped:
        click.echo(f"stopped: {', '.join(stopped)}")
    elif recorded:
        click.echo("stopped: nothing was running")
    else:
        click.echo(f"stopped: nothing, because {_no_pid_file(state_dir)}")


@services.command("status", context_settings=HELP_SETTINGS)
@STATE_DIR_OPTION
def services_status(state_dir: Path) -> None:
    """Show which local services run, with their ports; exit 3 unless both respond."""
    from etl.services import (
        has_pid_files,
        is_suspended,
        local_stack_ports,
        local_stack_status,
        not_responding,
        state_folder_locked,
    )

    if state_folder_locked(state_dir):
        click.echo(
            f"another 'etl services start' or 'stop' is running on "
            f"{state_dir.resolve()}, so the services below may be starting or "
            "stopping; run this command again once it ends"
        )
    ports = local_stack_ports(state_dir)
    statuses = local_stack_status(state_dir)
    usable = True
    for name, pid in statuses.items():
        if pid is None:
            usable = False
            click.echo(f"{name}: stopped (state folder {state_dir.resolve()})")
        elif is_suspended(pid):
            usable = False
            click.echo(
                f"{name}: suspended (pid {pid}, port {ports[name]}); it handles no "
                f"request until 'kill -CONT {pid}'"
            )
        else:
            port = ports[name]
            problem = None if port is None else not_responding(name, pid, port)
            if problem is None:
                click.echo(f"{name}: running (pid {pid}, port {port})")
            else:
                usable = False
                click.echo(
                    f"{name}: not responding (pid {pid}, port {port}): {problem}"
                )
    if not has_pid_files(state_dir):
        click.echo(_no_pid_file(state_dir))
    if not usable:
        sys.exit(EXIT_INFRASTRUCTURE)


def _no_pid_file(state_dir: Path) -> str:
    return (
        f"{state_dir.resolve()} holds no pid file of 'etl services start'; pass "
        "the --state-dir that the services were started with"
    )


from etl.cli_extra import contracts, publish, reports, validate_feed  # noqa: E402
from etl.replay import replay_rejects_command  # noqa: E402

main.add_command(contracts)
main.add_command(validate_feed)
main.add_command(publish)
main.add_command(reports)
main.add_command(replay_rejects_command)

if __name__ == "__main__":
    main()
