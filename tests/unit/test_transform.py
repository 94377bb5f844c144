"""Name split, timestamp formatting and the output columns built from them."""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl import rules
from etl.transform import (
    _first_and_last_names,
    _split_names,
    collapse_whitespace,
    compose_marks,
    format_timestamp,
    split_name,
    transform,
)


def split(names: list[str]) -> list[tuple[str | None, str | None]]:
    first, last = split_name(pl.col("name"))
    frame = pl.DataFrame({"name": names}, schema={"name": pl.String})
    return frame.select(first.alias("first"), last.alias("last")).rows()


def split_in_batch(names: list[str]) -> list[tuple[str | None, str | None]]:
    """Split ``names`` with transform(), after the whitespace clean-up of etl.parse.to_typed."""
    readings = readings_named(names).with_columns(
        collapse_whitespace(pl.col("name").str.strip_chars())
    )
    derived = transform(
        readings, topic="vitals", rule_set="acc_aha_2017", time_zone="UTC"
    )
    return derived.select("first_name", "last_name").rows()


def readings_named(names: list[str]) -> pl.DataFrame:
    """Return one valid reading per name, in the columns that transform() reads."""
    return pl.DataFrame({"name": names}, schema={"name": pl.String}).with_columns(
        patient_id=pl.lit("PT-1"),
        age=pl.lit(40, pl.Int64),
        respiratory_rate=pl.lit(16.0),
        spo2=pl.lit(97.0),
        on_oxygen=pl.lit(False),
        heart_rate=pl.lit(70.0),
        temperature=pl.lit(37.0),
        consciousness=pl.lit("A"),
        spo2_scale=pl.lit(1, pl.Int64),
        systolic=pl.lit(120, pl.Int64),
        diastolic=pl.lit(80, pl.Int64),
        sex=pl.lit("F"),
        measured_at=pl.lit(datetime(2024, 6, 10, tzinfo=UTC)),
        partition=pl.lit(0, pl.Int32),
        offset=pl.int_range(pl.len(), dtype=pl.Int64),
    )


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
        # Decomposed accents are composed first, as transform() does.
        pytest.param(
            "DUBOIS E\u0301lodie", ("Élodie", "DUBOIS"), id="decomposed-first-name"
        ),
        pytest.param(
            "Marie E\u0301TIENNE", ("Marie", "ÉTIENNE"), id="decomposed-family-name"
        ),
        # One comma: family name first, as in many admission exports.
        pytest.param("DUPONT, Jean", ("Jean", "DUPONT"), id="comma-upper-case"),
        pytest.param("Dupont,Jean Paul", ("Jean Paul", "Dupont"), id="comma-no-space"),
        pytest.param("Smith, John III", ("John", "Smith III"), id="comma-suffix"),
        # VI is a Vietnamese given and family name, not a generational suffix.
        pytest.param("NGUYEN, VI", ("VI", "NGUYEN"), id="comma-given-name-vi"),
        pytest.param("Nguyen Thi VI", ("Nguyen Thi", "VI"), id="family-name-vi"),
        pytest.param("A, B, C", ("A,", "B, C"), id="two-commas-split-at-space"),
        pytest.param("Smith, John Jr.", ("John", "Smith Jr."), id="comma-suffix-dot"),
        pytest.param(
            "Martin Luther King, Jr.",
            ("Martin", "Luther King, Jr."),
            id="comma-before-suffix-only",
        ),
        # A second comma may set off a generational suffix.
        pytest.param("Smith, John, Jr.", ("John", "Smith Jr."), id="two-commas-suffix"),
        pytest.param(
            "SMITH, JOHN, JR", ("JOHN", "SMITH JR"), id="two-commas-suffix-capitals"
        ),
        pytest.param(
            "King, Martin Luther, Jr.",
            ("Martin Luther", "King Jr."),
            id="two-commas-given-names",
        ),
        pytest.param(
            "Smith, John, Jr., MD",
            ("John", "Smith Jr., MD"),
            id="two-commas-suffix-credential",
        ),
        pytest.param(
            "Smith, , Jr.", ("Smith,", ", Jr."), id="two-commas-no-given-name"
        ),
        # Lower-case particles join the upper-case family name after them.
        pytest.param("Charles de GAULLE", ("Charles", "de GAULLE"), id="particle"),
        pytest.param("Anne de la TOUR", ("Anne", "de la TOUR"), id="two-particles"),
        pytest.param(
            "Ludwig van BEETHOVEN", ("Ludwig", "van BEETHOVEN"), id="dutch-particle"
        ),
        pytest.param(
            "José ORTEGA y GASSET", ("José", "ORTEGA y GASSET"), id="connector-in-run"
        ),
        pytest.param("Luis de los SANTOS", ("Luis", "de los SANTOS"), id="de-los"),
        pytest.param("Ahmad bin ABDULLAH", ("Ahmad", "bin ABDULLAH"), id="bin"),
        pytest.param(
            "JEAN PIERRE de la FONTAINE",
            ("JEAN PIERRE", "de la FONTAINE"),
            id="upper-case-given-names-before-particles",
        ),
        pytest.param("MARIA e SILVA", ("MARIA e", "SILVA"), id="connector-not-first"),
        pytest.param(
            "Marie DUBOIS épouse MARTIN",
            ("Marie", "DUBOIS épouse MARTIN"),
            id="connector-married-name",
        ),
        pytest.param(
            "Marie DUBOIS ép. MARTIN",
            ("Marie", "DUBOIS ép. MARTIN"),
            id="connector-abbreviated",
        ),
        pytest.param(
            "Marie MARTIN née DUBOIS",
            ("Marie", "MARTIN née DUBOIS"),
            id="connector-birth-name",
        ),
        pytest.param(
            "Jeanne DUPONT veuve DURAND",
            ("Jeanne", "DUPONT veuve DURAND"),
            id="connector-widow",
        ),
        pytest.param(
            "Jeanne DUPONT vve DURAND",
            ("Jeanne", "DUPONT vve DURAND"),
            id="connector-widow-abbreviated",
        ),
        # The full stop of "ép." is literal, not any character.
        pytest.param(
            "Marie DUBOIS épx MARTIN",
            ("Marie DUBOIS épx", "MARTIN"),
            id="connector-full-stop-literal",
        ),
        # Irish surname prefixes join the upper-case family name after them.
        pytest.param("Seán Ó BRIAIN", ("Seán", "Ó BRIAIN"), id="irish-o"),
        pytest.param("Máire Ní BHRIAIN", ("Máire", "Ní BHRIAIN"), id="irish-ni"),
        pytest.param("Seán Mac DIARMADA", ("Seán", "Mac DIARMADA"), id="irish-mac"),
        # Particles may start a leading upper-case family name.
        pytest.param(
            "de GAULLE Charles", ("Charles", "de GAULLE"), id="leading-particle"
        ),
        pytest.param(
            "van den BROEK Pieter", ("Pieter", "van den BROEK"), id="leading-particles"
        ),
        pytest.param("Ó BRIAIN Seán", ("Seán", "Ó BRIAIN"), id="leading-irish-o"),
        pytest.param(
            "de GAULLE Charles JR",
            ("Charles", "de GAULLE JR"),
            id="leading-particle-suffix",
        ),
        pytest.param(
            "de la Tour Jean", ("de", "la Tour Jean"), id="particle-no-upper-case"
        ),
        # Credentials stay after the family name.
        pytest.param("Jane Doe, PhD", ("Jane", "Doe, PhD"), id="credential"),
        pytest.param(
            "Jean DUPONT, RN", ("Jean", "DUPONT, RN"), id="credential-upper-case"
        ),
        pytest.param(
            "Jane Doe, M.D.", ("Jane", "Doe, M.D."), id="credential-full-stops"
        ),
        pytest.param(
            "Jane Doe, MD, PhD", ("Jane", "Doe, MD, PhD"), id="two-credentials"
        ),
        pytest.param("John Smith MD", ("John", "Smith MD"), id="credential-no-comma"),
        pytest.param(
            "Doe, Jane, PhD", ("Jane", "Doe, PhD"), id="comma-name-credential"
        ),
        pytest.param(
            "de GAULLE Charles, MD",
            ("Charles", "de GAULLE, MD"),
            id="credential-leading",
        ),
        pytest.param("NGUYEN, Do", ("Do", "NGUYEN"), id="given-name-not-credential"),
        pytest.param("Jane Doe, MDx", ("MDx", "Jane Doe"), id="not-a-credential"),
        pytest.param("JANE DOE, PHD", ("JANE", "DOE, PHD"), id="credential-capitals"),
        pytest.param(
            "Jane Doe, Ph. D.", ("Jane", "Doe, Ph. D."), id="credential-spaced"
        ),
        pytest.param("Jane Doe, MD, FACP", ("Jane", "Doe, MD, FACP"), id="fellowship"),
        pytest.param("Jane , MD", ("MD", "Jane"), id="one-word-comma-credential"),
        # Known limits of docs/names.md: a title before a comma, and a
        # one-word family name before a suffix.
        pytest.param("Dr, Smith", ("Smith", "Dr"), id="title-before-comma"),
        pytest.param("Smith, Jr.", ("Smith,", "Jr."), id="one-word-comma-suffix"),
        pytest.param(
            "Jane Doe, RN, CNM", ("Jane", "Doe, RN, CNM"), id="credential-midwife"
        ),
        pytest.param(
            "John Smith, MD FACC",
            ("John", "Smith, MD FACC"),
            id="credentials-space-separated",
        ),
        pytest.param("Jane Doe, MSc", ("Jane", "Doe, MSc"), id="credential-degree"),
        pytest.param(
            "Jane Doe, M.Sc.", ("Jane", "Doe, M.Sc."), id="credential-degree-stops"
        ),
        pytest.param(
            "JOHN DOE, PSYD", ("JOHN", "DOE, PSYD"), id="credential-psyd-capitals"
        ),
        pytest.param(
            "Jean Paul MBA", ("Jean Paul", "MBA"), id="family-name-not-credential"
        ),
        pytest.param("Wei Ling MA", ("Wei Ling", "MA"), id="ma-not-credential"),
        pytest.param("Dr Jane Doe", ("Dr Jane", "Doe"), id="title"),
        pytest.param("Dr. Jane Doe", ("Dr. Jane", "Doe"), id="title-full-stop"),
        pytest.param("Mrs Smith", ("Mrs", "Smith"), id="title-and-family-name"),
        pytest.param("Mme DUBOIS Marie", ("Mme Marie", "DUBOIS"), id="title-leading"),
        pytest.param("M. Jean DUPONT", ("M. Jean", "DUPONT"), id="title-monsieur"),
        pytest.param(
            "Prof Dr Hans MÜLLER", ("Prof Dr Hans", "MÜLLER"), id="two-titles"
        ),
        pytest.param("Dr Jane Doe, MD", ("Dr Jane", "Doe, MD"), id="title-credential"),
        pytest.param("Dr Doe, Jane", ("Dr Jane", "Doe"), id="title-comma"),
        pytest.param("DR. JANE DOE", ("DR. JANE", "DOE"), id="title-capitals"),
        # Before a family name alone, the titles are the first name.
        pytest.param(
            "Mrs van der Merwe", ("Mrs", "van der Merwe"), id="title-particles"
        ),
        pytest.param(
            "Dr Van Dijk", ("Dr", "Van Dijk"), id="title-capitalised-particle"
        ),
        pytest.param("Mr Du Plessis", ("Mr", "Du Plessis"), id="title-du"),
        pytest.param("Dr Do Nguyen", ("Dr Do", "Nguyen"), id="title-do-given-name"),
        pytest.param(
            "Dr Van Dijk Anna", ("Dr Van", "Dijk Anna"), id="title-three-words"
        ),
        pytest.param(
            "Frau von der Leyen", ("Frau", "von der Leyen"), id="title-von-der"
        ),
        pytest.param("Dr. de GAULLE", ("Dr.", "de GAULLE"), id="title-particle-upper"),
        pytest.param("M. de VILLEPIN", ("M.", "de VILLEPIN"), id="title-monsieur-de"),
        pytest.param("Mme le PEN", ("Mme", "le PEN"), id="title-le"),
        pytest.param("Mr Ó BRIAIN", ("Mr", "Ó BRIAIN"), id="title-irish-prefix"),
        pytest.param(
            "Prof. Dr. von der Leyen",
            ("Prof. Dr.", "von der Leyen"),
            id="two-titles-particles",
        ),
        pytest.param(
            "Dr. med. von Weizsäcker",
            ("Dr. med.", "von Weizsäcker"),
            id="degree-particle",
        ),
        pytest.param(
            "Dr Jean de la TOUR", ("Dr Jean", "de la TOUR"), id="title-given-particles"
        ),
        pytest.param(
            "Mme de GAULLE Marie",
            ("Mme Marie", "de GAULLE"),
            id="title-leading-particle",
        ),
        pytest.param(
            "Mr Ó BRIAIN Seán", ("Mr Seán", "Ó BRIAIN"), id="title-leading-irish"
        ),
        pytest.param(
            "Dr de Gaulle, Charles",
            ("Dr Charles", "de Gaulle"),
            id="title-particle-comma",
        ),
        # German doctoral degrees stay with the title before them.
        pytest.param(
            "Dr. med. Anna Schmidt", ("Dr. med. Anna", "Schmidt"), id="degree-med"
        ),
        pytest.param(
            "Prof. Dr. med. Hans Müller",
            ("Prof. Dr. med. Hans", "Müller"),
            id="degree-after-two-titles",
        ),
        pytest.param(
            "Dr. rer. nat. Eva Weber",
            ("Dr. rer. nat. Eva", "Weber"),
            id="degree-rer-nat",
        ),
        pytest.param("Dr. phil. Jan Koch", ("Dr. phil. Jan", "Koch"), id="degree-phil"),
        pytest.param("Dr. jur. Paul Wolf", ("Dr. jur. Paul", "Wolf"), id="degree-jur"),
        pytest.param(
            "Dr. med. dent. Lena Braun",
            ("Dr. med. dent. Lena", "Braun"),
            id="degree-med-dent",
        ),
        pytest.param(
            "Dr. h.c. Otto Fischer", ("Dr. h.c. Otto", "Fischer"), id="degree-hc"
        ),
        pytest.param(
            "Dr. h. c. Otto Fischer",
            ("Dr. h. c. Otto", "Fischer"),
            id="degree-hc-spaced",
        ),
        pytest.param("Dr. med. Schmidt", ("Dr. med.", "Schmidt"), id="degree-one-word"),
        pytest.param(
            "med. Anna Schmidt", ("med.", "Anna Schmidt"), id="degree-no-title"
        ),
        pytest.param(
            "Sister Mary Joseph", ("Sister Mary", "Joseph"), id="title-sister"
        ),
        pytest.param(
            "Brother Roger Schutz", ("Brother Roger", "Schutz"), id="title-brother"
        ),
        pytest.param(
            "SISTER MARY JOSEPH", ("SISTER MARY", "JOSEPH"), id="title-sister-capitals"
        ),
        # Two capitals without a full stop may be initials.
        pytest.param(
            "MS Swaminathan Iyer",
            ("MS", "Swaminathan Iyer"),
            id="initials-not-title",
        ),
        pytest.param("Drake Bell", ("Drake", "Bell"), id="not-a-title"),
        pytest.param("John A. Smith", ("John A.", "Smith"), id="middle-initial"),
        pytest.param("J. K. Rowling", ("J. K.", "Rowling"), id="initials"),
        pytest.param("Anna B Smith", ("Anna B", "Smith"), id="initial-no-stop"),
        pytest.param(
            "John A. Smith III", ("John A.", "Smith III"), id="initial-and-suffix"
        ),
        pytest.param("John A.", ("John", "A."), id="initial-last"),
        pytest.param(
            "Madame Marie Dubois", ("Madame Marie", "Dubois"), id="title-madame"
        ),
        pytest.param("Pr Jean Dupont", ("Pr Jean", "Dupont"), id="title-pr"),
        pytest.param(
            "Señora María López", ("Señora María", "López"), id="title-senora"
        ),
        pytest.param("Fr. John Smith", ("Fr. John", "Smith"), id="title-father"),
        pytest.param("Don Johnson", ("Don", "Johnson"), id="don-given-name"),
        pytest.param("Jane Doe, CCRN", ("Jane", "Doe, CCRN"), id="credential-ccrn"),
        pytest.param(
            "John Smith, PA-C", ("John", "Smith, PA-C"), id="credential-hyphen"
        ),
        pytest.param(
            "Marie DUBOIS Vve MARTIN",
            ("Marie", "DUBOIS Vve MARTIN"),
            id="connector-capitalised",
        ),
        # Connectors join a leading upper-case family name too.
        pytest.param(
            "GARCÍA y LÓPEZ María José",
            ("María José", "GARCÍA y LÓPEZ"),
            id="leading-connector",
        ),
        pytest.param(
            "DUBOIS épouse MARTIN Marie",
            ("Marie", "DUBOIS épouse MARTIN"),
            id="leading-connector-married-name",
        ),
        # A parenthesised part stays with the word before it, or at the start
        # with the word after it.
        pytest.param(
            "Jean (Johnny) Martin", ("Jean (Johnny)", "Martin"), id="parenthesised"
        ),
        pytest.param(
            "(Johnny) Jean Martin",
            ("(Johnny) Jean", "Martin"),
            id="parenthesised-at-start",
        ),
        pytest.param(
            "Jean Martin (Johnny)",
            ("Jean", "Martin (Johnny)"),
            id="parenthesised-at-end",
        ),
        pytest.param(
            "Jean-Pierre (JP) DUPONT",
            ("Jean-Pierre (JP)", "DUPONT"),
            id="parenthesised-before-upper-case",
        ),
        pytest.param(
            "Robert ( Bob Jr ) Smith",
            ("Robert ( Bob Jr )", "Smith"),
            id="parenthesised-spaces",
        ),
        pytest.param(
            "Jean (Johnny) (JJ) Martin",
            ("Jean (Johnny) (JJ)", "Martin"),
            id="parenthesised-twice",
        ),
        pytest.param(
            "Jean (Johnny) A. Martin",
            ("Jean (Johnny) A.", "Martin"),
            id="parenthesised-initial",
        ),
        pytest.param(
            "John (Jack) Smith III",
            ("John (Jack)", "Smith III"),
            id="parenthesised-suffix",
        ),
        pytest.param(
            "John Smith III (Jack)",
            ("John", "Smith III (Jack)"),
            id="suffix-parenthesised",
        ),
        pytest.param(
            "Jean Martin MD (Johnny)",
            ("Jean", "Martin MD (Johnny)"),
            id="credential-parenthesised",
        ),
        pytest.param(
            "Ali Khan MBBS (locum)",
            ("Ali", "Khan MBBS (locum)"),
            id="credential-parenthesised-note",
        ),
        pytest.param(
            "Jean Martin MD FACS (Johnny)",
            ("Jean", "Martin MD FACS (Johnny)"),
            id="credentials-parenthesised",
        ),
        pytest.param(
            "John Smith III MD (Jack)",
            ("John", "Smith III MD (Jack)"),
            id="suffix-credential-parenthesised",
        ),
        pytest.param(
            "Marie Claire DUBOIS (Mimi)",
            ("Marie Claire", "DUBOIS (Mimi)"),
            id="upper-case-last-parenthesised",
        ),
        pytest.param(
            "DUBOIS (MARTIN) Marie",
            ("Marie", "DUBOIS (MARTIN)"),
            id="upper-case-first-parenthesised",
        ),
        pytest.param(
            "DUBOIS Marie (Mimi)",
            ("Marie (Mimi)", "DUBOIS"),
            id="upper-case-first-given-parenthesised",
        ),
        pytest.param(
            "DUPONT, Jean (Johnny)",
            ("Jean (Johnny)", "DUPONT"),
            id="comma-parenthesised",
        ),
        pytest.param(
            "Dr Jean (Johnny) Martin",
            ("Dr Jean (Johnny)", "Martin"),
            id="title-parenthesised",
        ),
        pytest.param(
            "Jane Doe (Janie), MD",
            ("Jane", "Doe (Janie), MD"),
            id="parenthesised-credential",
        ),
        # A parenthesis without its pair, or inside another pair, is an
        # ordinary character.
        pytest.param(
            "Jean (Johnny Martin",
            ("Jean", "(Johnny Martin"),
            id="parenthesis-not-closed",
        ),
        pytest.param(
            "Jean Johnny) Martin",
            ("Jean", "Johnny) Martin"),
            id="parenthesis-not-opened",
        ),
        pytest.param(
            "Jean ((Johnny)) Martin",
            ("Jean", "((Johnny)) Martin"),
            id="parentheses-nested",
        ),
        # Known limits: after a one-word name, the parenthesised part is the
        # last name. A birth name in parentheses reads as a nickname, and a
        # comma in parentheses as the comma of "family, given".
        pytest.param(
            "Jean (Johnny)", ("Jean", "(Johnny)"), id="parenthesised-one-word"
        ),
        pytest.param(
            "Mrs Smith (Jo)", ("Mrs Smith", "(Jo)"), id="title-one-word-parenthesised"
        ),
        pytest.param(
            "Mary (Smith) Jones",
            ("Mary (Smith)", "Jones"),
            id="parenthesised-birth-name",
        ),
        pytest.param(
            "Jean (Jo, JJ) Martin",
            ("JJ) Martin", "Jean (Jo"),
            id="comma-in-parentheses",
        ),
        # Commas at the start or the end set no family name apart.
        pytest.param(", Jean", ("Jean", None), id="comma-at-start"),
        pytest.param(",Jean", ("Jean", None), id="comma-at-start-no-space"),
        pytest.param(", , Jean", ("Jean", None), id="commas-at-start"),
        pytest.param(", Jean Paul", ("Jean", "Paul"), id="comma-at-start-two-words"),
        pytest.param("Smith,", ("Smith", None), id="comma-at-end"),
        pytest.param("John Smith,", ("John", "Smith"), id="comma-at-end-two-words"),
        pytest.param(
            "Smith, John, Jr.,", ("John", "Smith Jr."), id="comma-at-end-suffix"
        ),
        pytest.param(
            "Jane Doe, MD,", ("Jane", "Doe, MD"), id="comma-at-end-credential"
        ),
        # Known limit: a second given name in mixed case reads as a family name.
        pytest.param("Mary Ann Smith", ("Mary", "Ann Smith"), id="second-given-name"),
        pytest.param(
            "Juan Carlos García López",
            ("Juan", "Carlos García López"),
            id="second-given-name-two-surnames",
        ),
        pytest.param(
            "Mary Ann SMITH", ("Mary Ann", "SMITH"), id="second-given-name-capitals"
        ),
        pytest.param(
            "Smith, Mary Ann", ("Mary Ann", "Smith"), id="second-given-name-comma"
        ),
        pytest.param("Anna\u200bBerg", ("Anna", "Berg"), id="zero-width-space"),
        pytest.param(
            "Berg,\u200bAnna", ("Anna", "Berg"), id="zero-width-space-after-comma"
        ),
    ],
)
def test_split_name_cases(name: str, expected: tuple[str, str | None]) -> None:
    """split_name and the batch, transform(), give the expected parts."""
    assert split([name]) == [expected]
    assert split_in_batch([name]) == [expected]


def test_split_name_comma_only() -> None:
    """A comma alone gives an empty first name. The input contract rejects such a name."""
    assert split([","]) == [("", None)]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
@example("")
@example("   ")
def test_split_name_never_loses_words(name: str) -> None:
    """The two parts hold every word of the name, each once."""
    ((first, last),) = split([name])
    # split_name composes the name to NFC, which may join a mark to a letter,
    # and drops commas at the start and the end.
    # A zero width space counts as a space.
    name = unicodedata.normalize("NFC", name).replace("\u200b", " ")
    name = " ".join(name.split()).strip(", ")
    words = name.split()
    if not words:
        assert first in (None, "")
        return
    parts = " ".join(part for part in (first, last) if part)
    if "," in name and "," not in parts:
        # "Family, Given" drops its commas, the one before a suffix included.
        words = name.replace(",", " ").split()
    # A leading family name and a suffix change the order of the words, not the words.
    assert sorted(parts.split()) == sorted(words)


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


#: Words that exercise the rules of the name split, for names built from them.
NAME_WORDS = (
    "Jane", "DOE", "de", "Ó", "MD", "Ph.D.", "RN,", ",", "JR", "Dr", "M.", "MRS",
    "CNM", "MSc", "MARTIN", "épouse", "ép.", "née", "Jr.", "med.", "Sister",
    "van", "Merwe", "Van", "A.", "K", "Madame", "Vve", "PA-C", "(Jo)", "(JP)",
    "(Jo", "K)", "(A. B)",
)  # fmt: skip
NAMES = st.text(
    alphabet=st.sampled_from(
        ["A", "é", "Z", "b", "I", "J", "R", "-", "'", ",", " ", "(", ")"]
    ),
    max_size=24,
).map(lambda name: " ".join(name.split())) | st.lists(
    st.sampled_from(NAME_WORDS),
    max_size=6,
).map(" ".join)
OPTIONAL_RATES = st.none() | st.floats(0, 300, allow_nan=False)


@settings(max_examples=50)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "name": NAMES,
                "age": st.integers(0, 130),
                "respiratory_rate": OPTIONAL_RATES,
                "spo2": st.none() | st.floats(50, 100, allow_nan=False),
                "on_oxygen": st.none() | st.booleans(),
                "heart_rate": st.floats(20, 250, allow_nan=False),
                "temperature": st.floats(25, 45, allow_nan=False),
                "consciousness": st.none() | st.sampled_from("ACVPU"),
                "spo2_scale": st.none() | st.sampled_from([1, 2]),
            }
        ),
        min_size=1,
        max_size=30,
    )
)
def test_transform_matches_single_expressions(rows: list[dict[str, Any]]) -> None:
    """transform() stores shared parts as columns; its output is the same as without."""
    readings = pl.DataFrame(
        rows,
        schema={
            "name": pl.String,
            "age": pl.Int64,
            "respiratory_rate": pl.Float64,
            "spo2": pl.Float64,
            "on_oxygen": pl.Boolean,
            "heart_rate": pl.Float64,
            "temperature": pl.Float64,
            "consciousness": pl.String,
            "spo2_scale": pl.Int64,
        },
    ).with_columns(
        patient_id=pl.lit("PT-1"),
        systolic=pl.lit(120, pl.Int64),
        diastolic=pl.lit(80, pl.Int64),
        sex=pl.lit("F"),
        measured_at=pl.lit(datetime(2024, 6, 10, tzinfo=UTC)),
        partition=pl.lit(0, pl.Int32),
        offset=pl.int_range(pl.len(), dtype=pl.Int64),
    )
    first, last = split_name(pl.col("name"), normalised=True)
    score, risk = rules.news2(
        **{
            field: pl.col(field)
            for field in (
                "respiratory_rate",
                "spo2",
                "on_oxygen",
                "systolic",
                "heart_rate",
                "consciousness",
                "temperature",
                "age",
                "spo2_scale",
            )
        }
    )
    expected = readings.select(
        first.alias("first_name"), last.alias("last_name"), score, risk
    )
    derived = transform(
        readings, topic="vitals", rule_set="acc_aha_2017", time_zone="UTC"
    )
    assert derived.select(expected.columns).equals(expected)


@settings(max_examples=100)
@given(
    pool=st.lists(
        NAMES
        | st.sampled_from(
            [None, "", "E\u0301mile Zola", "\u212bngstr\u00f6m Lund", ", Jean"]
        ),
        min_size=1,
        max_size=4,
    ),
    picks=st.lists(st.integers(0, 3), min_size=2, max_size=30),
)
def test_names_joined_back_match_direct_split(
    pool: list[str | None], picks: list[int]
) -> None:
    """Splitting each distinct name once gives the parts of splitting every row."""
    names = pl.Series("name", [pool[pick % len(pool)] for pick in picks], pl.String)
    first, last = _first_and_last_names(names)
    direct = _split_names(names)

    assert first.equals(direct["first_name"])
    assert last.equals(direct["last_name"])


@settings(max_examples=100, deadline=None)
@given(
    pool=st.lists(NAMES, min_size=1, max_size=5),
    picks=st.lists(st.integers(0, 4), min_size=1, max_size=40),
)
def test_transform_repeated_names_match_split_name(
    pool: list[str], picks: list[int]
) -> None:
    """Names sent many times in a chunk, split once each, get the parts of split_name."""
    readings = readings_named([pool[pick % len(pool)] for pick in picks])
    first, last = split_name(pl.col("name"), normalised=True)
    expected = readings.select(first.alias("first_name"), last.alias("last_name"))
    derived = transform(
        readings, topic="vitals", rule_set="acc_aha_2017", time_zone="UTC"
    )
    assert derived.select(expected.columns).equals(expected)


def test_transform_writes_negative_zero_as_zero() -> None:
    """A monitor's -0.0 reads as 0 in the row, with no minus sign."""
    fields = ("heart_rate", "spo2", "respiratory_rate")
    readings = readings_named(["Jean Martin", "Anne Morel", "Lea Petit"]).with_columns(
        pl.Series(field, [-0.0, 72.0, -0.0]) for field in fields
    )

    derived = transform(
        readings, topic="vitals", rule_set="acc_aha_2017", time_zone="UTC"
    )

    for field in fields:
        signs = [math.copysign(1.0, value) for value in derived[field]]
        assert signs == [1.0, 1.0, 1.0], field
        assert derived[field].to_list() == [0.0, 72.0, 0.0], field


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=8))
@example(["E\u0301mond", "Jean"])
@example(["\u1100\u1161\u11a8"])
@example(["\u212b"])
def test_compose_marks_is_nfc_where_decomposed(texts: list[str]) -> None:
    """Text with a combining mark or a Hangul jamo comes out in NFC, any other text unchanged."""
    result = compose_marks(pl.Series(texts, dtype=pl.String)).to_list()
    for text, composed in zip(texts, result, strict=True):
        decomposed = re.search(
            r"[\u1100-\u11ff\ua960-\ua97f\ud7b0-\ud7ff]", text
        ) or any(unicodedata.category(char).startswith("M") for char in text)
        assert composed == (unicodedata.normalize("NFC", text) if decomposed else text)
