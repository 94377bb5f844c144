"""Option types and callbacks that several ``etl`` commands share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, TypeVar

import click

_Command = TypeVar("_Command", bound=Callable[..., Any])

#: Context settings of every ``etl`` command: ``-h`` as well as ``--help``.
#: Each command sets them, because a subcommand inherits them from its group
#: only until Click builds its help option. Click 8.1.8 and later keep that
#: option on the command, so one invocation of the command alone would drop
#: ``-h`` for good.
HELP_SETTINGS: Final = {"help_option_names": ["-h", "--help"]}


def finite_number(
    _context: click.Context, _parameter: click.Parameter, value: float | None
) -> float | None:
    """Reject NaN and infinity, which FloatRange lets through."""
    if value is not None and not math.isfinite(value):
        msg = f"{value} is not a finite number."
        raise click.BadParameter(msg)
    return value


#: Bounds of the signed 64-bit integers that Redis reads counts and list indexes as.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def redis_integer(
    _context: click.Context, _parameter: click.Parameter, value: int | None
) -> int | None:
    """Reject an integer outside the signed 64-bit range, which Redis replies to with an error.

    A callback, not bounds of the option's type, so that help shows only the
    option's own bound (``x>=1``) and not these.
    """
    if value is not None and not INT64_MIN <= value <= INT64_MAX:
        msg = (
            f"{value} is not in the range of the signed 64-bit integers that Redis "
            f"reads, {INT64_MIN} to {INT64_MAX}."
        )
        raise click.BadParameter(msg)
    return value


#: ``--topic`` of the commands that read or write one topic.
TOPIC_OPTION: Final = click.option(
    "--topic", help="Kafka topic (default: VITALS_KAFKA_TOPIC)."
)
#: The setting that ``--topic`` overrides, so that errors show the option.
TOPIC_OPTION_NAME: Final = {"kafka_topic": "--topic"}

#: ``--partitions`` of the commands that create the topic.
PARTITIONS_OPTION: Final = click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Partitions of the topic when it is created.",
)


def rate_option(unit: str) -> Callable[[_Command], _Command]:
    """Return the ``--rate`` option of a command that produces ``unit`` per second."""
    return click.option(
        "--rate",
        type=click.FloatRange(min=0, min_open=True),
        callback=finite_number,
        help=f"Maximum {unit} per second (default: as fast as possible).",
    )
