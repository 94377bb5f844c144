"""Tables and counts printed by the etl command."""

from __future__ import annotations

import pytest
from rich.table import Table

from etl.terminal import counted, print_table


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 blank lines"), (1, "1 blank line"), (2, "2 blank lines")]
)
def test_counted_singular_and_plural(count: int, text: str) -> None:
    assert counted(count, "blank line") == text


@pytest.mark.parametrize("columns", [30, 40])
def test_print_table_keeps_indented_words(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    """On a narrow terminal, an indented value wraps but keeps its words whole."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich reads this as a terminal
    monkeypatch.setenv("COLUMNS", str(columns))
    table = Table(title="Batch on topic vitals", show_header=False)
    table.add_row("rejected", "12 -> hospital:north-wing:liste-patients:rejects")
    table.add_row("  diastolic_not_below_systolic", "7")
    table.add_row("  invalid_json", "5")

    print_table(table)

    output = capsys.readouterr().out
    assert "diastolic_not_below_systolic" in output
    assert "invalid_json" in output
    assert "…" not in output
