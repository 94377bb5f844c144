"""Terminal output of the ``etl`` command: results on stdout, errors on stderr.

Both consoles print text as it is, without Rich markup or emoji codes,
because messages and table cells carry values such as ``[::1]:9092``,
``[blink]vitals`` or ``icu:bed:patients`` that Rich would read as style tags
or as ``:bed:`` and change.
"""

from __future__ import annotations

from typing import Final

from rich.console import Console
from rich.text import Text

console: Final = Console(markup=False, emoji=False)
# Not wrapped: an error may end with a command to copy, such as a reset.
errors: Final = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


def print_error(label: str, message: object = "") -> None:
    """Print ``label`` in red, then ``message`` as it is, on stderr."""
    text = Text.assemble((label, "red"))
    if message != "":
        text.append(f" {message}")
    errors.print(text)
