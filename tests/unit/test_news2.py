"""NEWS2 scores checked against RCP 2017 Chart 1 and the Chart 3 risk bands.

The expected scores below are copied from the chart, not imported from
etl.rules, so that a transcription error in the module fails here.
"""

from __future__ import annotations

import functools
from typing import Any

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl.rules import (
    NEWS2_RISK_HIGH,
    NEWS2_RISK_INCOMPLETE,
    NEWS2_RISK_LOW,
    NEWS2_RISK_LOW_MEDIUM,
    NEWS2_RISK_MEDIUM,
    NEWS2_RISK_NOT_APPLICABLE,
    news2,
    news2_alert_from_code,
    news2_code,
    news2_parameter_scores,
)

SCHEMA = {
    "respiratory_rate": pl.Float64,
    "spo2": pl.Float64,
    "on_oxygen": pl.Boolean,
    "systolic": pl.Int64,
    "heart_rate": pl.Float64,
    "consciousness": pl.String,
    "temperature": pl.Float64,
    "age": pl.Int64,
    "spo2_scale": pl.Int64,
}
# An adult on air whose every parameter scores 0.
BASELINE: dict[str, Any] = {
    "respiratory_rate": 16.0,
    "spo2": 98.0,
    "on_oxygen": False,
    "systolic": 120,
    "heart_rate": 70.0,
    "consciousness": "A",
    "temperature": 37.0,
    "age": 50,
    "spo2_scale": None,
}
PARAMETERS = (
    "respiratory_rate",
    "spo2",
    "air_or_oxygen",
    "systolic",
    "heart_rate",
    "consciousness",
    "temperature",
)


def inputs() -> dict[str, pl.Expr]:
    return {name: pl.col(name) for name in SCHEMA}


@functools.cache
def score_exprs() -> tuple[pl.Expr, ...]:
    """Build the expressions once, as building takes milliseconds."""
    parts = news2_parameter_scores(**inputs())
    score, risk = news2(**inputs())
    code = news2_code(
        **{name: expr for name, expr in inputs().items() if name != "age"}
    )
    alert = news2_alert_from_code(code, age=pl.col("age"))
    return (*parts.values(), score, risk, alert)


def evaluate(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Return the part scores, news2_score and news2_risk of each row."""
    df = pl.DataFrame([{**BASELINE, **row} for row in rows], schema=SCHEMA)
    return df.select(score_exprs())


def evaluate_one(**changes: Any) -> dict[str, Any]:
    """Return the scores of the baseline reading with ``changes`` applied."""
    return evaluate([changes]).row(0, named=True)


def part_score(parameter: str, **changes: Any) -> int | None:
    score: int | None = evaluate_one(**changes)[f"news2_{parameter}_score"]
    return score


# Chart 1, one case on each side of every band bound. Cells per row: respiration
# rate 5, SpO2 Scale 1 4, SpO2 Scale 2 7, air or oxygen 2, systolic BP 5, pulse 6,
# consciousness 2 and temperature 5, 36 cells in all.
RESPIRATORY_RATE_CASES = [
    pytest.param(8.0, 3, id="8-scores-3"),
    pytest.param(9.0, 1, id="9-scores-1"),
    pytest.param(11.0, 1, id="11-scores-1"),
    pytest.param(12.0, 0, id="12-scores-0"),
    pytest.param(20.0, 0, id="20-scores-0"),
    pytest.param(21.0, 2, id="21-scores-2"),
    pytest.param(24.0, 2, id="24-scores-2"),
    pytest.param(25.0, 3, id="25-scores-3"),
    pytest.param(40.0, 3, id="40-scores-3"),
    # Rates are rounded to whole breaths, and a half rounds up.
    pytest.param(8.4, 3, id="8.4-rounds-to-8"),
    pytest.param(8.5, 1, id="8.5-rounds-to-9"),
    pytest.param(20.4, 0, id="20.4-rounds-to-20"),
    pytest.param(20.5, 2, id="20.5-rounds-to-21"),
]


@pytest.mark.parametrize(("rate", "expected"), RESPIRATORY_RATE_CASES)
def test_news2_respiratory_rate(rate: float, expected: int) -> None:
    assert part_score("respiratory_rate", respiratory_rate=rate) == expected


SPO2_SCALE_1_CASES = [
    pytest.param(85.0, 3, id="85-scores-3"),
    pytest.param(91.0, 3, id="91-scores-3"),
    pytest.param(92.0, 2, id="92-scores-2"),
    pytest.param(93.0, 2, id="93-scores-2"),
    pytest.param(94.0, 1, id="94-scores-1"),
    pytest.param(95.0, 1, id="95-scores-1"),
    pytest.param(96.0, 0, id="96-scores-0"),
    pytest.param(100.0, 0, id="100-scores-0"),
    pytest.param(95.5, 0, id="95.5-rounds-to-96"),
    pytest.param(91.4, 3, id="91.4-rounds-to-91"),
]


@pytest.mark.parametrize("scale", [None, 1, 3], ids=["null", "one", "three"])
@pytest.mark.parametrize(("spo2", "expected"), SPO2_SCALE_1_CASES)
def test_news2_spo2_scale_1(spo2: float, expected: int, scale: int | None) -> None:
    # Only spo2_scale == 2 selects Scale 2, and oxygen does not change Scale 1.
    assert part_score("spo2", spo2=spo2, spo2_scale=scale) == expected
    assert part_score("spo2", spo2=spo2, spo2_scale=scale, on_oxygen=True) == expected


SPO2_SCALE_2_CASES = [
    pytest.param(80.0, False, 3, id="80-scores-3"),
    pytest.param(83.0, False, 3, id="83-scores-3"),
    pytest.param(84.0, False, 2, id="84-scores-2"),
    pytest.param(85.0, False, 2, id="85-scores-2"),
    pytest.param(86.0, False, 1, id="86-scores-1"),
    pytest.param(87.0, False, 1, id="87-scores-1"),
    pytest.param(88.0, False, 0, id="88-scores-0"),
    pytest.param(92.0, False, 0, id="92-scores-0"),
    pytest.param(92.0, True, 0, id="92-on-oxygen-scores-0"),
    pytest.param(83.0, True, 3, id="83-on-oxygen-scores-3"),
    # From 93% the score depends on air or oxygen.
    pytest.param(93.0, False, 0, id="93-on-air-scores-0"),
    pytest.param(100.0, False, 0, id="100-on-air-scores-0"),
    pytest.param(93.0, True, 1, id="93-on-oxygen-scores-1"),
    pytest.param(94.0, True, 1, id="94-on-oxygen-scores-1"),
    pytest.param(95.0, True, 2, id="95-on-oxygen-scores-2"),
    pytest.param(96.0, True, 2, id="96-on-oxygen-scores-2"),
    pytest.param(97.0, True, 3, id="97-on-oxygen-scores-3"),
    pytest.param(100.0, True, 3, id="100-on-oxygen-scores-3"),
    pytest.param(92.5, True, 1, id="92.5-on-oxygen-rounds-to-93"),
]


@pytest.mark.parametrize(("spo2", "on_oxygen", "expected"), SPO2_SCALE_2_CASES)
def test_news2_spo2_scale_2(spo2: float, on_oxygen: bool, expected: int) -> None:
    assert part_score("spo2", spo2=spo2, on_oxygen=on_oxygen, spo2_scale=2) == expected


def test_news2_scale_2_null_oxygen() -> None:
    assert part_score("spo2", spo2=92.0, on_oxygen=None, spo2_scale=2) == 0
    assert part_score("spo2", spo2=85.0, on_oxygen=None, spo2_scale=2) == 2
    assert part_score("spo2", spo2=93.0, on_oxygen=None, spo2_scale=2) is None


def test_news2_spo2_scale_defaults_to_1() -> None:
    df = pl.DataFrame([{**BASELINE, "spo2": 90.0}], schema=SCHEMA)
    without_scale = {
        name: expr for name, expr in inputs().items() if name != "spo2_scale"
    }
    parts = news2_parameter_scores(**without_scale)
    assert df.select(parts["spo2"]).item() == 3


@pytest.mark.parametrize(
    ("on_oxygen", "expected"),
    [
        pytest.param(True, 2, id="oxygen-scores-2"),
        pytest.param(False, 0, id="air-scores-0"),
        pytest.param(None, None, id="missing-not-taken-as-air"),
    ],
)
def test_news2_air_or_oxygen(on_oxygen: bool | None, expected: int | None) -> None:
    assert part_score("air_or_oxygen", on_oxygen=on_oxygen) == expected


SYSTOLIC_CASES = [
    pytest.param(70, 3, id="70-scores-3"),
    pytest.param(90, 3, id="90-scores-3"),
    pytest.param(91, 2, id="91-scores-2"),
    pytest.param(100, 2, id="100-scores-2"),
    pytest.param(101, 1, id="101-scores-1"),
    pytest.param(110, 1, id="110-scores-1"),
    pytest.param(111, 0, id="111-scores-0"),
    pytest.param(219, 0, id="219-scores-0"),
    pytest.param(220, 3, id="220-scores-3"),
    pytest.param(260, 3, id="260-scores-3"),
]


@pytest.mark.parametrize(("systolic", "expected"), SYSTOLIC_CASES)
def test_news2_systolic(systolic: int, expected: int) -> None:
    assert part_score("systolic", systolic=systolic) == expected


HEART_RATE_CASES = [
    pytest.param(30.0, 3, id="30-scores-3"),
    pytest.param(40.0, 3, id="40-scores-3"),
    pytest.param(41.0, 1, id="41-scores-1"),
    pytest.param(50.0, 1, id="50-scores-1"),
    pytest.param(51.0, 0, id="51-scores-0"),
    pytest.param(90.0, 0, id="90-scores-0"),
    pytest.param(91.0, 1, id="91-scores-1"),
    pytest.param(110.0, 1, id="110-scores-1"),
    pytest.param(111.0, 2, id="111-scores-2"),
    pytest.param(130.0, 2, id="130-scores-2"),
    pytest.param(131.0, 3, id="131-scores-3"),
    pytest.param(180.0, 3, id="180-scores-3"),
    pytest.param(90.5, 1, id="90.5-rounds-to-91"),
    pytest.param(40.4, 3, id="40.4-rounds-to-40"),
]


@pytest.mark.parametrize(("heart_rate", "expected"), HEART_RATE_CASES)
def test_news2_heart_rate(heart_rate: float, expected: int) -> None:
    assert part_score("heart_rate", heart_rate=heart_rate) == expected


@pytest.mark.parametrize(
    ("consciousness", "expected"),
    [
        pytest.param("A", 0, id="alert-scores-0"),
        pytest.param("C", 3, id="confusion-scores-3"),
        pytest.param("V", 3, id="voice-scores-3"),
        pytest.param("P", 3, id="pain-scores-3"),
        pytest.param("U", 3, id="unresponsive-scores-3"),
        pytest.param(None, None, id="missing-not-taken-as-alert"),
        pytest.param("a", None, id="lower-case-invalid"),
        pytest.param("X", None, id="unknown-letter-invalid"),
    ],
)
def test_news2_consciousness(consciousness: str | None, expected: int | None) -> None:
    assert part_score("consciousness", consciousness=consciousness) == expected


TEMPERATURE_CASES = [
    pytest.param(34.0, 3, id="34.0-scores-3"),
    pytest.param(35.0, 3, id="35.0-scores-3"),
    pytest.param(35.1, 1, id="35.1-scores-1"),
    pytest.param(36.0, 1, id="36.0-scores-1"),
    pytest.param(36.1, 0, id="36.1-scores-0"),
    pytest.param(38.0, 0, id="38.0-scores-0"),
    pytest.param(38.1, 1, id="38.1-scores-1"),
    pytest.param(39.0, 1, id="39.0-scores-1"),
    # The RCP chart gives 2, not 3, from 39.1 C up.
    pytest.param(39.1, 2, id="39.1-scores-2"),
    pytest.param(41.5, 2, id="41.5-scores-2"),
    # Temperature is rounded to 0.1 C, and a half rounds up.
    pytest.param(35.04, 3, id="35.04-rounds-to-35.0"),
    pytest.param(35.05, 1, id="35.05-rounds-to-35.1"),
    pytest.param(38.05, 1, id="38.05-rounds-to-38.1"),
    pytest.param(39.04, 1, id="39.04-rounds-to-39.0"),
    pytest.param(39.05, 2, id="39.05-rounds-to-39.1"),
]


@pytest.mark.parametrize(("temperature", "expected"), TEMPERATURE_CASES)
def test_news2_temperature(temperature: float, expected: int) -> None:
    assert part_score("temperature", temperature=temperature) == expected


def test_news2_temperature_39_1_scores_2() -> None:
    result = evaluate_one(temperature=39.1)
    assert result["news2_temperature_score"] == 2
    assert result["news2_score"] == 2
    assert result["news2_risk"] == NEWS2_RISK_LOW


# Chart 3 thresholds and triggers, with precedence High, Medium, Low-medium, Low.
RISK_CASES = [
    pytest.param({}, 0, NEWS2_RISK_LOW, id="0-low"),
    pytest.param(
        {"respiratory_rate": 22.0, "heart_rate": 95.0, "temperature": 38.5},
        4,
        NEWS2_RISK_LOW,
        id="4-low",
    ),
    pytest.param(
        {
            "respiratory_rate": 22.0,
            "heart_rate": 95.0,
            "temperature": 38.5,
            "spo2": 95.0,
        },
        5,
        NEWS2_RISK_MEDIUM,
        id="5-medium",
    ),
    pytest.param(
        {
            "respiratory_rate": 22.0,
            "heart_rate": 95.0,
            "temperature": 38.5,
            "spo2": 95.0,
            "systolic": 105,
        },
        6,
        NEWS2_RISK_MEDIUM,
        id="6-medium",
    ),
    pytest.param(
        {
            "respiratory_rate": 22.0,
            "heart_rate": 115.0,
            "temperature": 38.5,
            "on_oxygen": True,
        },
        7,
        NEWS2_RISK_HIGH,
        id="7-high",
    ),
    pytest.param(
        {"consciousness": "V"}, 3, NEWS2_RISK_LOW_MEDIUM, id="red-3-low-medium"
    ),
    pytest.param(
        {"consciousness": "C", "heart_rate": 95.0},
        4,
        NEWS2_RISK_LOW_MEDIUM,
        id="red-4-low-medium",
    ),
    pytest.param(
        {"systolic": 85, "respiratory_rate": 22.0},
        5,
        NEWS2_RISK_MEDIUM,
        id="red-5-medium",
    ),
    pytest.param(
        {"consciousness": "U", "systolic": 85, "heart_rate": 95.0},
        7,
        NEWS2_RISK_HIGH,
        id="two-red-7-high",
    ),
    pytest.param(
        {
            "respiratory_rate": 30.0,
            "spo2": 85.0,
            "on_oxygen": True,
            "systolic": 80,
            "heart_rate": 150.0,
            "consciousness": "U",
            "temperature": 34.0,
        },
        20,
        NEWS2_RISK_HIGH,
        id="maximum-20",
    ),
]


@pytest.mark.parametrize(("changes", "expected_score", "expected_risk"), RISK_CASES)
def test_news2_risk(
    changes: dict[str, Any], expected_score: int, expected_risk: str
) -> None:
    result = evaluate_one(**changes)
    assert result["news2_score"] == expected_score
    assert result["news2_risk"] == expected_risk


@pytest.mark.parametrize(
    "column",
    [
        "respiratory_rate",
        "spo2",
        "on_oxygen",
        "systolic",
        "heart_rate",
        "consciousness",
        "temperature",
    ],
)
def test_news2_missing_parameter_incomplete(column: str) -> None:
    # The other parameters alone would reach High, which a gap must not hide.
    changes = {"respiratory_rate": 30.0, "heart_rate": 150.0, column: None}
    result = evaluate_one(**changes)
    assert result["news2_score"] is None
    assert result["news2_risk"] == NEWS2_RISK_INCOMPLETE


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, False, id="low"),
        pytest.param({"consciousness": "V"}, False, id="low-medium"),
        pytest.param(
            {"respiratory_rate": 24.0, "heart_rate": 115.0, "temperature": 38.5},
            True,
            id="medium-5",
        ),
        pytest.param({"respiratory_rate": 30.0, "heart_rate": 150.0}, True, id="high"),
        pytest.param(
            {"respiratory_rate": 30.0, "heart_rate": 150.0, "consciousness": None},
            True,
            id="incomplete-recorded-6",
        ),
        pytest.param(
            {"respiratory_rate": 24.0, "heart_rate": 115.0, "spo2": None},
            False,
            id="incomplete-recorded-4",
        ),
        pytest.param(
            {"respiratory_rate": 30.0, "heart_rate": 150.0, "age": 15},
            False,
            id="under-16",
        ),
        pytest.param(
            {"respiratory_rate": 30.0, "heart_rate": 150.0, "age": None},
            True,
            id="null-age-as-adult",
        ),
    ],
)
def test_news2_alert(changes: dict[str, Any], expected: bool) -> None:
    assert evaluate_one(**changes)["news2_alert"] is expected


@pytest.mark.parametrize(
    ("age", "expected_score", "expected_risk"),
    [
        pytest.param(15, None, NEWS2_RISK_NOT_APPLICABLE, id="15-not-applicable"),
        pytest.param(0, None, NEWS2_RISK_NOT_APPLICABLE, id="0-not-applicable"),
        pytest.param(16, 3, NEWS2_RISK_LOW_MEDIUM, id="16-scored"),
        pytest.param(None, 3, NEWS2_RISK_LOW_MEDIUM, id="null-age-scored-as-adult"),
    ],
)
def test_news2_age_limit(
    age: int | None, expected_score: int | None, expected_risk: str
) -> None:
    # Voice is the only part that scores, so its part score equals the total.
    result = evaluate_one(age=age, consciousness="V")
    assert result["news2_score"] == expected_score
    assert result["news2_risk"] == expected_risk
    assert result["news2_consciousness_score"] == expected_score


def test_news2_under_16_ignores_missing_parameters() -> None:
    result = evaluate_one(age=12, consciousness=None)
    assert result["news2_risk"] == NEWS2_RISK_NOT_APPLICABLE


def test_news2_output_names_and_types() -> None:
    out = evaluate([{}])
    assert out.schema["news2_score"] == pl.Int64
    assert out.schema["news2_risk"] == pl.String
    for parameter in PARAMETERS:
        assert out.schema[f"news2_{parameter}_score"] == pl.Int64


# Property tests run on a frame of generated readings. Polars queries can pass
# Hypothesis' 200 ms deadline on a loaded machine, so the deadline is off.
complete_reading = st.fixed_dictionaries(
    {
        "respiratory_rate": st.floats(min_value=0, max_value=70),
        "spo2": st.floats(min_value=50, max_value=100),
        "on_oxygen": st.booleans(),
        "systolic": st.integers(min_value=40, max_value=300),
        "heart_rate": st.floats(min_value=0, max_value=300),
        "consciousness": st.sampled_from(["A", "C", "V", "P", "U"]),
        "temperature": st.floats(min_value=25, max_value=45),
        "age": st.integers(min_value=16, max_value=110),
        "spo2_scale": st.sampled_from([None, 1, 2]),
    }
)
INPUT_PARAMETERS = [
    "respiratory_rate",
    "spo2",
    "on_oxygen",
    "systolic",
    "heart_rate",
    "consciousness",
    "temperature",
]


def expected_risk(total: int, parts: list[int]) -> str:
    if total >= 7:
        return NEWS2_RISK_HIGH
    if total >= 5:
        return NEWS2_RISK_MEDIUM
    if 3 in parts:
        return NEWS2_RISK_LOW_MEDIUM
    return NEWS2_RISK_LOW


@settings(deadline=None)
@given(rows=st.lists(complete_reading, min_size=1, max_size=50))
@example(rows=[BASELINE])
@example(rows=[{**BASELINE, "temperature": 39.1}])
def test_news2_total_is_sum_of_parts(rows: list[dict[str, Any]]) -> None:
    out = pl.DataFrame(rows, schema=SCHEMA).select(score_exprs())

    for row in out.iter_rows(named=True):
        parts = [row[f"news2_{parameter}_score"] for parameter in PARAMETERS]
        total = row["news2_score"]
        assert None not in parts, f"part missing for a complete reading: {row}"
        assert total == sum(parts), f"total is not the sum of its parts: {row}"
        assert 0 <= total <= 20, f"total out of range: {row}"
        assert row["news2_risk"] == expected_risk(total, parts), f"wrong risk: {row}"


@settings(deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            complete_reading, st.sets(st.sampled_from(INPUT_PARAMETERS), min_size=1)
        ),
        min_size=1,
        max_size=50,
    )
)
def test_news2_any_missing_input_incomplete(
    rows: list[tuple[dict[str, Any], set[str]]],
) -> None:
    readings = [{**row, **dict.fromkeys(missing)} for row, missing in rows]
    out = pl.DataFrame(readings, schema=SCHEMA).select(score_exprs())

    for row in out.iter_rows(named=True):
        assert row["news2_score"] is None, f"score despite a missing input: {row}"
        assert row["news2_risk"] == NEWS2_RISK_INCOMPLETE, f"wrong risk: {row}"


@settings(deadline=None)
@given(
    rows=st.lists(
        st.tuples(complete_reading, st.sets(st.sampled_from(INPUT_PARAMETERS))),
        min_size=1,
        max_size=50,
    )
)
def test_news2_alert_from_recorded_scores(
    rows: list[tuple[dict[str, Any], set[str]]],
) -> None:
    """Complete readings alert at Medium or High, others when recorded scores reach 5."""
    readings = [{**row, **dict.fromkeys(missing)} for row, missing in rows]
    out = pl.DataFrame(readings, schema=SCHEMA).select(score_exprs())

    for row in out.iter_rows(named=True):
        parts = [row[f"news2_{parameter}_score"] for parameter in PARAMETERS]
        recorded = sum(part for part in parts if part is not None)
        assert row["news2_alert"] is (recorded >= 5), f"wrong alert: {row}"
        if None not in parts:
            medium_or_high = row["news2_risk"] in (NEWS2_RISK_MEDIUM, NEWS2_RISK_HIGH)
            assert row["news2_alert"] is medium_or_high, f"alert off its risk: {row}"
