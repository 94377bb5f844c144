"""Help of the ``etl`` command and its subcommands."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from etl.cli import main


def command_paths(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Yield the arguments that name each subcommand of ``group``, nested groups included."""
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if isinstance(command, click.Group):
            yield from command_paths(command, path)


COMMANDS = [(), *command_paths(main)]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "etl")
def test_short_help_option_matches_long(path: tuple[str, ...]) -> None:
    runner = CliRunner()

    short = runner.invoke(main, [*path, "-h"])
    long = runner.invoke(main, [*path, "--help"])

    assert short.exit_code == 0, short.output
    assert short.stdout == long.stdout
    assert "-h, --help" in short.stdout
