"""Blood-pressure labels checked against the guideline tables, cell by cell.

The tables below are copied from the guideline tables, not imported from
etl.rules, so that a transcription error in the module fails here.
"""

from __future__ import annotations

import functools
from typing import get_args

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl.config import RuleSet
from etl.rules import (
    BP_CRISIS,
    BP_ELEVATED,
    BP_GRADE_1,
    BP_GRADE_2,
    BP_GRADE_3,
    BP_HIGH_NORMAL,
    BP_HYPOTENSION,
    BP_ISOLATED_SYSTOLIC_GRADE_1,
    BP_ISOLATED_SYSTOLIC_GRADE_2,
    BP_ISOLATED_SYSTOLIC_GRADE_3,
    BP_LABEL_RANK,
    BP_LEGACY_HIGH,
    BP_LEGACY_LOW,
    BP_LEGACY_NORMAL,
    BP_NORMAL,
    BP_OPTIMAL,
    BP_PAEDIATRIC_ABOVE,
    BP_PAEDIATRIC_BELOW,
    BP_STAGE_1,
    BP_STAGE_2,
    RULE_SETS,
    bp_status,
)

ADULT_AGE = 45


BP_SCHEMA = {"sbp": pl.Int64, "dbp": pl.Int64, "age": pl.Int64, "sex": pl.String}


@functools.cache
def label_expr(rule_set: str) -> pl.Expr:
    """Build the label expression once per rule set, as building takes milliseconds."""
    return bp_status(
        rule_set,
        systolic=pl.col("sbp"),
        diastolic=pl.col("dbp"),
        age=pl.col("age"),
        sex=pl.col("sex"),
    )


def classify_frame(rule_set: str, df: pl.DataFrame) -> list[str | None]:
    """Return the label of each row of a frame with sbp, dbp, age and sex."""
    labels: list[str | None] = df.select(label_expr(rule_set)).to_series().to_list()
    return labels


def classify(
    rule_set: str,
    systolic: int | None,
    diastolic: int | None,
    age: int | None = ADULT_AGE,
    sex: str | None = None,
) -> str | None:
    """Return the label of one reading."""
    df = pl.DataFrame(
        {"sbp": [systolic], "dbp": [diastolic], "age": [age], "sex": [sex]},
        schema=BP_SCHEMA,
    )
    return classify_frame(rule_set, df)[0]


# 2017 ACC/AHA, categories of BP in adults: 5 rows x (SBP, DBP) = 10 cells, each
# tested on both sides of its bounds.
ACC_AHA_2017_CASES = [
    # Normal: SBP < 120 and DBP < 80.
    pytest.param(119, 79, BP_NORMAL, id="normal-upper-edge"),
    pytest.param(90, 60, BP_NORMAL, id="normal-lower-edge"),
    # Elevated: SBP 120-129 and DBP < 80.
    pytest.param(120, 79, BP_ELEVATED, id="elevated-sbp-120"),
    pytest.param(129, 79, BP_ELEVATED, id="elevated-sbp-129"),
    pytest.param(129, 80, BP_STAGE_1, id="elevated-left-by-dbp-80"),
    # Stage 1: SBP 130-139 or DBP 80-89. DBP alone never gives Elevated.
    pytest.param(130, 70, BP_STAGE_1, id="stage1-sbp-130"),
    pytest.param(139, 70, BP_STAGE_1, id="stage1-sbp-139"),
    pytest.param(110, 80, BP_STAGE_1, id="stage1-dbp-80"),
    pytest.param(110, 89, BP_STAGE_1, id="stage1-dbp-89"),
    pytest.param(115, 85, BP_STAGE_1, id="stage1-dbp-only"),
    # Stage 2: SBP >= 140 or DBP >= 90.
    pytest.param(140, 70, BP_STAGE_2, id="stage2-sbp-140"),
    pytest.param(110, 90, BP_STAGE_2, id="stage2-dbp-90"),
    pytest.param(180, 70, BP_STAGE_2, id="stage2-sbp-180"),
    pytest.param(110, 120, BP_STAGE_2, id="stage2-dbp-120"),
    pytest.param(180, 120, BP_STAGE_2, id="stage2-at-crisis-bounds"),
    # Hypertensive crisis: SBP > 180 and/or DBP > 120, strictly.
    pytest.param(181, 70, BP_CRISIS, id="crisis-sbp-181"),
    pytest.param(110, 121, BP_CRISIS, id="crisis-dbp-121"),
    pytest.param(181, 121, BP_CRISIS, id="crisis-both"),
    # Hypotension: SBP < 90 or DBP < 60, unless the other value is Stage 1 or higher.
    pytest.param(89, 70, BP_HYPOTENSION, id="low-sbp-89"),
    pytest.param(110, 59, BP_HYPOTENSION, id="low-dbp-59"),
    pytest.param(129, 59, BP_HYPOTENSION, id="low-dbp-wins-over-elevated"),
    pytest.param(89, 79, BP_HYPOTENSION, id="low-sbp-dbp-79"),
    pytest.param(130, 59, BP_STAGE_1, id="stage1-sbp-wins-over-low-dbp"),
    pytest.param(85, 95, BP_STAGE_2, id="stage2-dbp-wins-over-low-sbp"),
    pytest.param(150, 55, BP_STAGE_2, id="stage2-sbp-wins-over-low-dbp"),
    pytest.param(200, 55, BP_CRISIS, id="crisis-sbp-wins-over-low-dbp"),
]


@pytest.mark.parametrize(("systolic", "diastolic", "expected"), ACC_AHA_2017_CASES)
def test_acc_aha_2017_adult_table(systolic: int, diastolic: int, expected: str) -> None:
    assert classify("acc_aha_2017", systolic, diastolic) == expected


# 2018 ESC/ESH office BP classification: 7 rows x (SBP, DBP) = 14 cells.
ESC_ESH_2018_CASES = [
    # Optimal: SBP < 120 and DBP < 80.
    pytest.param(119, 79, BP_OPTIMAL, id="optimal-upper-edge"),
    pytest.param(90, 60, BP_OPTIMAL, id="optimal-lower-edge"),
    # Normal: SBP 120-129 and/or DBP 80-84.
    pytest.param(120, 79, BP_NORMAL, id="normal-sbp-120"),
    pytest.param(119, 80, BP_NORMAL, id="normal-dbp-80"),
    pytest.param(129, 84, BP_NORMAL, id="normal-upper-edge"),
    # High-normal: SBP 130-139 and/or DBP 85-89.
    pytest.param(130, 84, BP_HIGH_NORMAL, id="high-normal-sbp-130"),
    pytest.param(129, 85, BP_HIGH_NORMAL, id="high-normal-dbp-85"),
    pytest.param(139, 89, BP_HIGH_NORMAL, id="high-normal-upper-edge"),
    # Grade 1: SBP 140-159 and/or DBP 90-99.
    pytest.param(139, 90, BP_GRADE_1, id="grade1-dbp-90"),
    pytest.param(140, 90, BP_GRADE_1, id="grade1-both-at-bound"),
    pytest.param(159, 99, BP_GRADE_1, id="grade1-upper-edge"),
    # Grade 2: SBP 160-179 and/or DBP 100-109.
    pytest.param(160, 99, BP_GRADE_2, id="grade2-sbp-160"),
    pytest.param(159, 100, BP_GRADE_2, id="grade2-dbp-100"),
    pytest.param(179, 109, BP_GRADE_2, id="grade2-upper-edge"),
    # Grade 3: SBP >= 180 and/or DBP >= 110.
    pytest.param(180, 109, BP_GRADE_3, id="grade3-sbp-180"),
    pytest.param(179, 110, BP_GRADE_3, id="grade3-dbp-110"),
    pytest.param(180, 95, BP_GRADE_3, id="grade3-sbp-dbp-grade1"),
    # Isolated systolic hypertension: SBP >= 140 and DBP < 90, graded by SBP.
    pytest.param(140, 89, BP_ISOLATED_SYSTOLIC_GRADE_1, id="isolated-grade1-low-edge"),
    pytest.param(159, 89, BP_ISOLATED_SYSTOLIC_GRADE_1, id="isolated-grade1-high-edge"),
    pytest.param(160, 89, BP_ISOLATED_SYSTOLIC_GRADE_2, id="isolated-grade2-low-edge"),
    pytest.param(179, 70, BP_ISOLATED_SYSTOLIC_GRADE_2, id="isolated-grade2-high-edge"),
    pytest.param(180, 89, BP_ISOLATED_SYSTOLIC_GRADE_3, id="isolated-grade3"),
    pytest.param(220, 60, BP_ISOLATED_SYSTOLIC_GRADE_3, id="isolated-grade3-dbp-60"),
    pytest.param(139, 89, BP_HIGH_NORMAL, id="isolated-needs-sbp-140"),
    # Hypotension: SBP < 90 or DBP < 60, unless the other value is grade 1 or higher.
    pytest.param(89, 70, BP_HYPOTENSION, id="low-sbp-89"),
    pytest.param(110, 59, BP_HYPOTENSION, id="low-dbp-59"),
    pytest.param(139, 59, BP_HYPOTENSION, id="low-dbp-wins-over-high-normal"),
    pytest.param(140, 59, BP_ISOLATED_SYSTOLIC_GRADE_1, id="isolated-grade1-dbp-59"),
    pytest.param(165, 58, BP_ISOLATED_SYSTOLIC_GRADE_2, id="isolated-grade2-dbp-58"),
    pytest.param(200, 59, BP_ISOLATED_SYSTOLIC_GRADE_3, id="isolated-grade3-dbp-59"),
    pytest.param(85, 90, BP_GRADE_1, id="grade1-dbp-wins-over-low-sbp"),
]


@pytest.mark.parametrize(("systolic", "diastolic", "expected"), ESC_ESH_2018_CASES)
def test_esc_esh_2018_adult_table(systolic: int, diastolic: int, expected: str) -> None:
    assert classify("esc_esh_2018", systolic, diastolic) == expected


# 2017 AAP Table 6, ages 1 to 12: (boys SBP, boys DBP, girls SBP, girls DBP).
AAP_TABLE_6 = {
    1: (98, 52, 98, 54),
    2: (100, 55, 101, 58),
    3: (101, 58, 102, 60),
    4: (102, 60, 103, 62),
    5: (103, 63, 104, 64),
    6: (105, 66, 105, 67),
    7: (106, 68, 106, 68),
    8: (107, 69, 107, 69),
    9: (107, 70, 108, 71),
    10: (108, 72, 109, 72),
    11: (110, 74, 111, 74),
    12: (113, 75, 114, 75),
}
# Below every Table 6 value and at or above every PALS floor, so that the other
# value of the reading never decides the label.
CHILD_NEUTRAL_SYSTOLIC = 90
CHILD_NEUTRAL_DIASTOLIC = 40


def aap_table_6_cases() -> list[object]:
    """Build one case on each side of every Table 6 cell: 12 x 2 x 2 = 48 cells."""
    cases: list[object] = []
    for age, (boys_sbp, boys_dbp, girls_sbp, girls_dbp) in AAP_TABLE_6.items():
        for sex, systolic, diastolic in (
            ("M", boys_sbp, boys_dbp),
            ("F", girls_sbp, girls_dbp),
        ):
            for offset, expected, side in (
                (0, BP_PAEDIATRIC_ABOVE, "at"),
                (-1, BP_PAEDIATRIC_BELOW, "below"),
            ):
                cases.append(
                    pytest.param(
                        age,
                        sex,
                        systolic + offset,
                        CHILD_NEUTRAL_DIASTOLIC,
                        expected,
                        id=f"age{age}-{sex}-sbp-{side}",
                    )
                )
                cases.append(
                    pytest.param(
                        age,
                        sex,
                        CHILD_NEUTRAL_SYSTOLIC,
                        diastolic + offset,
                        expected,
                        id=f"age{age}-{sex}-dbp-{side}",
                    )
                )
    return cases


@pytest.mark.parametrize("rule_set", ["acc_aha_2017", "esc_esh_2018"])
@pytest.mark.parametrize(
    ("age", "sex", "systolic", "diastolic", "expected"), aap_table_6_cases()
)
def test_paediatric_table_6_cells(
    rule_set: str, age: int, sex: str, systolic: int, diastolic: int, expected: str
) -> None:
    assert classify(rule_set, systolic, diastolic, age=age, sex=sex) == expected


@pytest.mark.parametrize("age", sorted(AAP_TABLE_6))
def test_paediatric_unknown_sex_uses_lower_value(age: int) -> None:
    boys_sbp, boys_dbp, girls_sbp, girls_dbp = AAP_TABLE_6[age]
    systolic = min(boys_sbp, girls_sbp)
    diastolic = min(boys_dbp, girls_dbp)
    neutral_dbp = CHILD_NEUTRAL_DIASTOLIC
    neutral_sbp = CHILD_NEUTRAL_SYSTOLIC
    for sex in (None, "X"):
        assert (
            classify("acc_aha_2017", systolic, neutral_dbp, age, sex)
            == BP_PAEDIATRIC_ABOVE
        )
        assert (
            classify("acc_aha_2017", systolic - 1, neutral_dbp, age, sex)
            == BP_PAEDIATRIC_BELOW
        )
        assert (
            classify("acc_aha_2017", neutral_sbp, diastolic, age, sex)
            == BP_PAEDIATRIC_ABOVE
        )
        assert (
            classify("acc_aha_2017", neutral_sbp, diastolic - 1, age, sex)
            == BP_PAEDIATRIC_BELOW
        )


# The Table 6 row for 13 and over is 120/80 for both sexes (4 cells). From 13 the
# adult ACC/AHA table applies, where 120 starts Elevated and 80 starts Stage 1.
@pytest.mark.parametrize("sex", ["M", "F"])
def test_paediatric_age_13_uses_adult_table(sex: str) -> None:
    assert classify("acc_aha_2017", 119, 79, age=13, sex=sex) == BP_NORMAL
    assert classify("acc_aha_2017", 120, 79, age=13, sex=sex) == BP_ELEVATED
    assert classify("acc_aha_2017", 119, 80, age=13, sex=sex) == BP_STAGE_1


def pals_floor(age: int) -> int:
    return 70 + 2 * age if age < 10 else 90


@pytest.mark.parametrize("rule_set", ["acc_aha_2017", "esc_esh_2018"])
@pytest.mark.parametrize("age", range(1, 13))
def test_paediatric_hypotension_pals_floor(rule_set: str, age: int) -> None:
    floor = pals_floor(age)
    assert classify(rule_set, floor - 1, 40, age=age) == BP_HYPOTENSION
    assert classify(rule_set, floor, 40, age=age) == BP_PAEDIATRIC_BELOW


def test_paediatric_has_no_diastolic_low() -> None:
    assert classify("acc_aha_2017", 95, 30, age=4, sex="F") == BP_PAEDIATRIC_BELOW


@pytest.mark.parametrize("rule_set", ["acc_aha_2017", "esc_esh_2018"])
@pytest.mark.parametrize("age", [0, -1])
def test_bp_status_under_one_is_null(rule_set: str, age: int) -> None:
    assert classify(rule_set, 100, 60, age=age) is None


@pytest.mark.parametrize(
    ("age", "systolic", "diastolic", "expected"),
    [
        pytest.param(13, 119, 79, BP_OPTIMAL, id="age13-optimal"),
        pytest.param(14, 120, 80, BP_NORMAL, id="age14-normal"),
        pytest.param(15, 140, 89, BP_ISOLATED_SYSTOLIC_GRADE_1, id="age15-isolated"),
    ],
)
def test_esc_esh_2018_teens_use_adult_table(
    age: int, systolic: int, diastolic: int, expected: str
) -> None:
    assert classify("esc_esh_2018", systolic, diastolic, age=age) == expected


# Legacy age bands: "High" if SBP >= x or DBP >= y, 3 bands x 2 values = 6 cells,
# and "Low" below 90/60, which wins over "High".
LEGACY_CASES = [
    # Under 40: 130/80.
    pytest.param(39, 129, 79, BP_LEGACY_NORMAL, id="under40-normal"),
    pytest.param(39, 130, 79, BP_LEGACY_HIGH, id="under40-sbp-130"),
    pytest.param(39, 129, 80, BP_LEGACY_HIGH, id="under40-dbp-80"),
    pytest.param(5, 129, 79, BP_LEGACY_NORMAL, id="child-uses-under40-band"),
    # 40 to 59: 140/90.
    pytest.param(40, 139, 89, BP_LEGACY_NORMAL, id="age40-normal"),
    pytest.param(40, 140, 89, BP_LEGACY_HIGH, id="age40-sbp-140"),
    pytest.param(59, 139, 90, BP_LEGACY_HIGH, id="age59-dbp-90"),
    pytest.param(59, 139, 89, BP_LEGACY_NORMAL, id="age59-normal"),
    # 60 and over: 150/90.
    pytest.param(60, 149, 89, BP_LEGACY_NORMAL, id="age60-normal"),
    pytest.param(60, 150, 89, BP_LEGACY_HIGH, id="age60-sbp-150"),
    pytest.param(90, 149, 90, BP_LEGACY_HIGH, id="age90-dbp-90"),
    # Low: SBP < 90 or DBP < 60.
    pytest.param(50, 90, 60, BP_LEGACY_NORMAL, id="low-edge-normal"),
    pytest.param(50, 89, 70, BP_LEGACY_LOW, id="low-sbp-89"),
    pytest.param(50, 100, 59, BP_LEGACY_LOW, id="low-dbp-59"),
    pytest.param(50, 85, 95, BP_LEGACY_LOW, id="low-wins-over-high"),
    pytest.param(0, 100, 60, BP_LEGACY_NORMAL, id="age0-classified"),
]


@pytest.mark.parametrize(("age", "systolic", "diastolic", "expected"), LEGACY_CASES)
def test_legacy_age_bands(
    age: int, systolic: int, diastolic: int, expected: str
) -> None:
    assert classify("legacy_age_bands", systolic, diastolic, age=age) == expected


@pytest.mark.parametrize("rule_set", RULE_SETS)
@pytest.mark.parametrize(
    ("systolic", "diastolic", "age"),
    [
        pytest.param(None, 80, 45, id="systolic"),
        pytest.param(120, None, 45, id="diastolic"),
        pytest.param(120, 80, None, id="age"),
    ],
)
def test_bp_status_null_input_gives_null(
    rule_set: str, systolic: int | None, diastolic: int | None, age: int | None
) -> None:
    assert classify(rule_set, systolic, diastolic, age=age) is None


def test_bp_status_rejects_invalid_rule_set() -> None:
    with pytest.raises(
        ValueError,
        match="invalid rule set 'jnc7'; expected one of acc_aha_2017, esc_esh_2018",
    ):
        bp_status(
            "jnc7",
            systolic=pl.col("sbp"),
            diastolic=pl.col("dbp"),
            age=pl.col("age"),
            sex=pl.col("sex"),
        )


def test_rule_sets_match_settings() -> None:
    assert get_args(RuleSet) == RULE_SETS


def test_bp_status_returns_named_string_column() -> None:
    df = pl.DataFrame(
        {"sbp": [120, 90], "dbp": [80, 50], "age": [30, 8], "sex": ["F", None]},
        schema={"sbp": pl.Int64, "dbp": pl.Int64, "age": pl.Int64, "sex": pl.String},
    )
    label = bp_status(
        "acc_aha_2017",
        systolic=pl.col("sbp"),
        diastolic=pl.col("dbp"),
        age=pl.col("age"),
        sex=pl.col("sex"),
    )
    out = df.select(label)
    assert out.schema == pl.Schema({"bp_status": pl.String})
    assert out.to_series().to_list() == [BP_STAGE_1, BP_PAEDIATRIC_BELOW]


# Property tests run on a frame of generated readings, which is much faster than
# one frame per reading. Polars queries can pass Hypothesis' 200 ms deadline on a
# loaded machine, so the deadline is off.


# A neutral reading has the lowest rank that is not low, so pairing one value of
# a reading with it gives the category of that value alone.
def neutral_reading(rule_set: str, age: int) -> tuple[int, int]:
    is_child = rule_set != "legacy_age_bands" and age < 13
    return (90, 0) if is_child else (90, 60)


#: Lowest rank of a hypertension range, which a low value does not override.
FIRST_HYPERTENSION_RANK = {
    "acc_aha_2017": BP_LABEL_RANK["acc_aha_2017"][BP_STAGE_1],
    "esc_esh_2018": BP_LABEL_RANK["esc_esh_2018"][BP_GRADE_1],
}


def is_low(
    rule_set: str, systolic: int, diastolic: int, age: int, value_rank: int
) -> bool:
    """Tell whether a reading is in the low range; ``value_rank`` is the max of its value ranks."""
    if rule_set != "legacy_age_bands" and age < 13:
        return systolic < pals_floor(age)
    has_low_value = systolic < 90 or diastolic < 60
    if rule_set == "legacy_age_bands":
        return has_low_value
    return has_low_value and value_rank < FIRST_HYPERTENSION_RANK[rule_set]


def ranks(rule_set: str, rows: list[tuple[int, int, int, str | None]]) -> list[int]:
    """Return the rank of each ``(systolic, diastolic, age, sex)`` reading."""
    df = pl.DataFrame(rows, schema=BP_SCHEMA, orient="row")
    labels = classify_frame(rule_set, df)
    assert None not in labels
    return [BP_LABEL_RANK[rule_set][label] for label in labels if label is not None]


readings = st.lists(
    st.tuples(
        st.integers(min_value=40, max_value=260),
        st.integers(min_value=20, max_value=160),
        st.integers(min_value=1, max_value=110),
        st.sampled_from(["F", "M", None]),
    ),
    min_size=1,
    max_size=50,
)


@settings(deadline=None)
@given(
    rule_set=st.sampled_from(RULE_SETS),
    rows=readings,
    rise=st.integers(min_value=0, max_value=100),
)
@example(rule_set="acc_aha_2017", rows=[(85, 95, 45, None)], rise=10)
@example(rule_set="esc_esh_2018", rows=[(150, 85, 45, None)], rise=5)
@example(rule_set="acc_aha_2017", rows=[(79, 70, 5, None)], rise=1)
def test_bp_status_rise_never_lowers_rank(
    rule_set: str, rows: list[tuple[int, int, int, str | None]], rise: int
) -> None:
    before = ranks(rule_set, rows)
    after_systolic = ranks(rule_set, [(s + rise, d, a, x) for s, d, a, x in rows])
    after_diastolic = ranks(rule_set, [(s, d + rise, a, x) for s, d, a, x in rows])

    for row, old, new in zip(rows, before, after_systolic, strict=True):
        assert new >= old, f"raising SBP by {rise} lowered {row}"
    for row, old, new in zip(rows, before, after_diastolic, strict=True):
        assert new >= old, f"raising DBP by {rise} lowered {row}"


@settings(deadline=None)
@given(rule_set=st.sampled_from(RULE_SETS), rows=readings)
@example(rule_set="acc_aha_2017", rows=[(115, 85, 45, None)])
@example(rule_set="esc_esh_2018", rows=[(150, 95, 45, None)])
@example(rule_set="acc_aha_2017", rows=[(104, 50, 5, None)])
def test_bp_status_rank_is_max_of_values(
    rule_set: str, rows: list[tuple[int, int, int, str | None]]
) -> None:
    neutral = [neutral_reading(rule_set, a) for _, _, a, _ in rows]
    combined = ranks(rule_set, rows)
    systolic_only = ranks(
        rule_set,
        [(s, n[1], a, x) for (s, _, a, x), n in zip(rows, neutral, strict=True)],
    )
    diastolic_only = ranks(
        rule_set,
        [(n[0], d, a, x) for (_, d, a, x), n in zip(rows, neutral, strict=True)],
    )

    for row, rank, systolic_rank, diastolic_rank in zip(
        rows, combined, systolic_only, diastolic_only, strict=True
    ):
        systolic, diastolic, age, _ = row
        value_rank = max(systolic_rank, diastolic_rank)
        # A low value overrides the max rule below the hypertension ranges.
        if is_low(rule_set, systolic, diastolic, age, value_rank):
            assert rank == 0, f"low reading {row} not ranked 0"
        else:
            assert rank == value_rank, f"max rule broken for {row}"


@settings(deadline=None)
@given(rule_set=st.sampled_from(RULE_SETS), rows=readings)
def test_bp_label_rank_lists_every_label(
    rule_set: str, rows: list[tuple[int, int, int, str | None]]
) -> None:
    df = pl.DataFrame(rows, schema=BP_SCHEMA, orient="row")
    for label in classify_frame(rule_set, df):
        assert label in BP_LABEL_RANK[rule_set]
