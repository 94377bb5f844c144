"""Terminal output of the ``etl`` command: results on stdout, errors on stderr.

Both consoles print text as it is, without Rich markup or emoji codes,
because messages and table cells carry values such as ``[::1]:9092``,
``[blink]vitals`` or ``icu:bed:patients`` that Rich would read as style tags
or as ``:bed:`` and change.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text


def _plain_console(**options: Any) -> Console:
    return Console(soft_wrap=True, markup=False, emoji=False, **options)


console: Final = _plain_console()
# Not wrapped: an error may end with a command to copy, such as a reset.
errors: Final = _plain_console(stderr=True)


def print_table(table: Table) -> None:
    """Print ``table`` on stdout without cutting any value.

    Off a terminal (a pipe or a file) every column takes the width of its
    widest cell, as ``ls`` and ``git`` print full values there. On a
    terminal a table wider than the terminal is narrowed to fit, no column
    below half the width of its header. Headers and the cells of columns
    with ``overflow="fold"`` fold first, then other cells wrap between
    words, and no word is cut. A table that still does not fit is printed
    wider than the terminal. Sets the width of every column and makes
    headers fold.
    """
    layouts = [_column_layout(column, table.show_header) for column in table.columns]
    widths = [layout.natural for layout in layouts]
    if console.is_terminal:
        _set_widths(table, widths)
        available = console.width - (_table_width(table) - sum(widths))
        one_line = [layout.one_line for layout in layouts]
        widths = _fit_widths(widths, one_line, available)
        wrapped = [layout.wrapped for layout in layouts]
        widths = _fit_widths(widths, wrapped, available)
    _set_widths(table, widths)
    for column in table.columns:
        if isinstance(column.header, str):
            column.header = Text(column.header, overflow="fold")
    width = _table_width(table)
    if width <= console.width:
        console.print(table)
    else:
        _plain_console(width=width).print(table)


#: The width that tables are measured against: wider than any table printed
#: here, so that the measure narrows no column.
_UNLIMITED_WIDTH: Final = 1_000_000


@dataclass(frozen=True)
class _ColumnLayout:
    """Widths of a column's content, without padding.

    ``natural`` fits every cell on one line. ``one_line`` keeps each value
    on one line, and ``wrapped`` wraps values between words. Both let the
    header fold to half its width, and the values of a folding column too.
    """

    natural: int
    one_line: int
    wrapped: int


def _column_layout(column: Column, show_header: bool) -> _ColumnLayout:
    options = console.options.update(max_width=_UNLIMITED_WIDTH)
    values = [Measurement.get(console, options, cell) for cell in column.cells]
    header = 0
    if show_header:
        header = Measurement.get(console, options, column.header).maximum
    header_floor = max(1, -(-header // 2))
    natural = max([1, header, *(value.maximum for value in values)])
    if column.overflow == "fold":
        return _ColumnLayout(natural, header_floor, header_floor)
    one_line = max([header_floor, *(value.maximum for value in values)])
    narrowest = [
        max(value.minimum, _first_word_width(cell))
        for cell, value in zip(column.cells, values, strict=True)
    ]
    wrapped = max([header_floor, *narrowest])
    return _ColumnLayout(natural, one_line, wrapped)


def _first_word_width(cell: object) -> int:
    """Return the width of a text cell's first word with the spaces before it.

    Rich measures the longest word alone, but keeps the leading spaces of an
    indented value ("  invalid_json") when it wraps, so a column that narrow
    would cut the word.
    """
    if isinstance(cell, Text):
        cell = cell.plain
    if not isinstance(cell, str):
        return 0
    text = cell.lstrip(" ")
    words = text.split(maxsplit=1)
    indent = len(cell) - len(text)
    return indent + (cell_len(words[0]) if words else 0)


def _table_width(table: Table) -> int:
    options = console.options.update(max_width=_UNLIMITED_WIDTH)
    return Measurement.get(console, options, table).maximum


def _set_widths(table: Table, widths: list[int]) -> None:
    for column, width in zip(table.columns, widths, strict=True):
        column.width = width


def _fit_widths(widths: list[int], floors: list[int], available: int) -> list[int]:
    """Narrow ``widths`` to ``available`` in total, none below its floor.

    Each step narrows by one the column with the most room above its floor.
    """
    fitted = list(widths)
    excess = sum(fitted) - available
    while excess > 0:
        room = [width - floor for width, floor in zip(fitted, floors, strict=True)]
        roomiest = room.index(max(room))
        if room[roomiest] <= 0:
            break
        fitted[roomiest] -= 1
        excess -= 1
    return fitted


def counted(count: int, noun: str) -> str:
    """Return ``count`` and ``noun``, with an s unless the count is one: "1 message"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_error(label: str, message: object = "") -> None:
    """Print ``label`` in red, then ``message`` as it is, on stderr."""
    text = Text.assemble((label, "red"))
    if message != "":
        text.append(f" {message}")
    errors.print(text)


class StopSignal:
    """A stop request that SIGINT or SIGTERM makes; ``name`` is the first signal received.

    A plain attribute, not a ``threading.Event``: a signal handler that takes
    the event's lock could run again inside itself on a second signal and
    wait on that lock forever.
    """

    def __init__(self) -> None:
        self.name = ""

    def is_set(self) -> bool:
        return bool(self.name)


@contextmanager
def stop_on_signals() -> Iterator[StopSignal]:
    """Yield a stop request that SIGINT or SIGTERM sets, in place of their usual exit.

    A loop that checks it can stop between two steps. An exception raised by
    the signal inside a C call (librdkafka's poll) could not be handled
    cleanly there. A signal that the process ignores stays ignored.
    """
    stop = StopSignal()

    def request_stop(number: int, _frame: Any) -> None:
        if not stop.name:
            stop.name = signal.Signals(number).name

    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, request_stop)
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
