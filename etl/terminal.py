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
from typing import Any, Final

from rich.console import Console
from rich.text import Text

console: Final = Console(soft_wrap=True, markup=False, emoji=False)
# Not wrapped: an error may end with a command to copy, such as a reset.
errors: Final = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


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
