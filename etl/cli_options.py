"""Option types and callbacks that several ``etl`` commands share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, TypeVar

import click

_Command = TypeVar("_Command", bound=Callable[..., Any])


def finite_number(
    _context: click.Context, _parameter: click.Parameter, value: float | None
) -> float | None:
    """Reject NaN and infinity, which FloatRange lets through."""
    if value is not None and not math.isfinite(value):
        msg = f"{value} is not a finite number."
        raise click.BadParameter(msg)
    return value


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
