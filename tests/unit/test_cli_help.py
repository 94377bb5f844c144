"""Help of the ``etl`` command and its subcommands."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.cli_options import INT64_MAX, INT64_MIN, redis_integer


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


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", COMMANDS[1:], ids=" ".join)
def test_short_help_after_invocation_alone(path: tuple[str, ...]) -> None:
    """Click keeps a command's help option once built, so order must not matter."""
    runner = CliRunner()

    alone = runner.invoke(command_at(path), ["-h"])
    in_group = runner.invoke(main, [*path, "-h"])

    assert alone.exit_code == 0, alone.output
    assert in_group.exit_code == 0, in_group.output


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "etl")
def test_short_help_option_matches_long(path: tuple[str, ...]) -> None:
    runner = CliRunner()

    short = runner.invoke(main, [*path, "-h"])
    long = runner.invoke(main, [*path, "--help"])

    assert short.exit_code == 0, short.output
    assert short.stdout == long.stdout
    assert "-h, --help" in short.stdout


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "etl")
def test_help_leaves_out_64_bit_bounds(path: tuple[str, ...]) -> None:
    """Help shows an option's own bound, not the limit of Redis's integers."""
    result = CliRunner().invoke(main, [*path, "--help"])

    assert str(INT64_MAX) not in result.stdout
    assert str(INT64_MIN) not in result.stdout


def test_reports_help_shows_lower_bound() -> None:
    result = CliRunner().invoke(main, ["reports", "--help"])

    assert "[default: 10; x>=1]" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "arguments",
    [
        ["reports", "--last", str(INT64_MAX + 1)],
        ["show", "--start", str(INT64_MAX + 1)],
        ["show", "--stop", str(INT64_MIN - 1)],
    ],
)
def test_integer_past_64_bits_rejected(arguments: list[str]) -> None:
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert "is not in the range of the signed 64-bit integers" in result.stderr


@pytest.mark.parametrize("value", [INT64_MIN, -1, 0, INT64_MAX])
def test_redis_integer_accepts_64_bit_values(value: int) -> None:
    assert redis_integer(click.Context(main), click.Option(["--start"]), value) == value
