"""Name split and timestamp formatting."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from etl.transform import format_timestamp, split_name


def split(names: list[str]) -> list[tuple[str | None, str | None]]:
    first, last = split_name(pl.col("name"))
    frame = pl.DataFrame({"name": names}, schema={"name": pl.String})
    return frame.select(first.alias("first"), last.alias("last")).rows()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("Amara Okafor", ("Amara", "Okafor"), id="two-words"),
        pytest.param("Teodora", ("Teodora", None), id="one-word"),
        # Particles stay with the family name.
        pytest.param(
            "Pieter van den Broek", ("Pieter", "van den Broek"), id="dutch-particles"
        ),
        pytest.param(
            "Jeanne de la Tour", ("Jeanne", "de la Tour"), id="french-particles"
        ),
        pytest.param(
            "Ludwig van Beethoven", ("Ludwig", "van Beethoven"), id="one-particle"
        ),
        # Hyphens never split.
        pytest.param(
            "Jean-Pierre Morel", ("Jean-Pierre", "Morel"), id="hyphenated-first"
        ),
        pytest.param(
            "Anne-Sophie Duval-Roche",
            ("Anne-Sophie", "Duval-Roche"),
            id="hyphenated-both",
        ),
        # A trailing upper-case run is the family name, as in French records.
        pytest.param(
            "Marie Claire DUBOIS", ("Marie Claire", "DUBOIS"), id="upper-case-last"
        ),
        pytest.param(
            "José María GARCÍA LÓPEZ",
            ("José María", "GARCÍA LÓPEZ"),
            id="upper-case-accents",
        ),
        pytest.param("Ève D'ARC", ("Ève", "D'ARC"), id="upper-case-apostrophe"),
        # A leading upper-case run is the family name too, in the order NOM Prénom.
        pytest.param(
            "DUBOIS Marie Claire", ("Marie Claire", "DUBOIS"), id="upper-case-first"
        ),
        pytest.param(
            "LE GALL Anne-Sophie", ("Anne-Sophie", "LE GALL"), id="upper-case-two-words"
        ),
        pytest.param("AJ Smith", ("AJ", "Smith"), id="initials-stay-first-name"),
        # A generational suffix stays with the family name.
        pytest.param("John Smith III", ("John", "Smith III"), id="suffix-iii"),
        pytest.param("Marie DUBOIS JR", ("Marie", "DUBOIS JR"), id="suffix-jr"),
        pytest.param(
            "Marie Claire DUBOIS II",
            ("Marie Claire", "DUBOIS II"),
            id="suffix-after-upper-case-last",
        ),
        pytest.param(
            "DUBOIS Marie Claire JR",
            ("Marie Claire", "DUBOIS JR"),
            id="suffix-after-upper-case-first",
        ),
        pytest.param("John III", ("John", "III"), id="suffix-only"),
        pytest.param("  Ana   Lima  ", ("Ana", "Lima"), id="extra-whitespace"),
        pytest.param("Ana\tLima", ("Ana", "Lima"), id="tab"),
        pytest.param("O'Brien Seán", ("O'Brien", "Seán"), id="apostrophe-first"),
        pytest.param("李 小龍", ("李", "小龍"), id="cjk"),
    ],
)
def test_split_name_cases(name: str, expected: tuple[str, str | None]) -> None:
    assert split([name]) == [expected]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
@example("")
@example("   ")
def test_split_name_never_loses_words(name: str) -> None:
    """The two parts hold every word of the name, each once."""
    ((first, last),) = split([name])
    words = name.split()
    if not words:
        assert first in (None, "")
        return
    parts = [part for part in (first, last) if part]
    # A leading family name and a suffix change the order of the words, not the words.
    assert sorted(" ".join(parts).split()) == sorted(words)


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        pytest.param("UTC", "2024-06-10T06:13:20.123+00:00", id="utc"),
        pytest.param(
            "Europe/Paris", "2024-06-10T08:13:20.123+02:00", id="paris-summer"
        ),
        pytest.param(
            "America/New_York", "2024-06-10T02:13:20.123-04:00", id="new-york"
        ),
        pytest.param(
            "Asia/Kolkata", "2024-06-10T11:43:20.123+05:30", id="half-hour-offset"
        ),
    ],
)
def test_format_timestamp_zones(zone: str, expected: str) -> None:
    moment = datetime(2024, 6, 10, 6, 13, 20, 123000, tzinfo=UTC)
    frame = pl.DataFrame({"t": [moment]}, schema={"t": pl.Datetime("us", "UTC")})
    assert frame.select(format_timestamp(pl.col("t"), zone)).item() == expected


def test_format_timestamp_winter_offset() -> None:
    moment = datetime(2024, 1, 10, 6, 13, 20, tzinfo=UTC)
    frame = pl.DataFrame({"t": [moment]}, schema={"t": pl.Datetime("us", "UTC")})
    assert (
        frame.select(format_timestamp(pl.col("t"), "Europe/Paris")).item()
        == "2024-01-10T07:13:20.000+01:00"
    )
