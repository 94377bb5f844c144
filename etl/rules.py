"""Clinical rules: blood-pressure ranges and the NEWS2 early warning score.

Each rule is a threshold table kept as data and applied by vectorised Polars
expressions. A blood-pressure label states the range that one reading falls in. It
is not a diagnosis, because every guideline below defines its categories on the
average of office readings taken on two or more occasions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Final, NamedTuple

import polars as pl

from etl.config import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

RULE_SETS: Final[tuple[str, ...]] = ("acc_aha_2017", "esc_esh_2018", "legacy_age_bands")

# Blood-pressure labels. Labels that name a hypertension stage or grade end in
# "range" so that a single reading never reads as a diagnosis.
BP_HYPOTENSION: Final = "Hypotension range"
BP_NORMAL: Final = "Normal"
BP_ELEVATED: Final = "Elevated"
BP_STAGE_1: Final = "Stage 1 hypertension range"
BP_STAGE_2: Final = "Stage 2 hypertension range"
BP_CRISIS: Final = "Hypertensive crisis range"
BP_OPTIMAL: Final = "Optimal"
BP_HIGH_NORMAL: Final = "High-normal"
BP_GRADE_1: Final = "Grade 1 hypertension range"
BP_GRADE_2: Final = "Grade 2 hypertension range"
BP_GRADE_3: Final = "Grade 3 hypertension range"
BP_ISOLATED_SYSTOLIC_GRADE_1: Final = "Isolated systolic hypertension grade 1 range"
BP_ISOLATED_SYSTOLIC_GRADE_2: Final = "Isolated systolic hypertension grade 2 range"
BP_ISOLATED_SYSTOLIC_GRADE_3: Final = "Isolated systolic hypertension grade 3 range"
BP_PAEDIATRIC_BELOW: Final = "Below paediatric screening threshold"
BP_PAEDIATRIC_ABOVE: Final = "Above paediatric screening threshold"
# The legacy rule set keeps the labels of the system it replaces.
BP_LEGACY_LOW: Final = "Low"
BP_LEGACY_NORMAL: Final = "Normal"
BP_LEGACY_HIGH: Final = "High"

NEWS2_RISK_HIGH: Final = "High"
NEWS2_RISK_MEDIUM: Final = "Medium"
NEWS2_RISK_LOW_MEDIUM: Final = "Low-medium"
NEWS2_RISK_LOW: Final = "Low"
NEWS2_RISK_INCOMPLETE: Final = "Incomplete"
NEWS2_RISK_NOT_APPLICABLE: Final = "Not applicable"


@dataclass(frozen=True, slots=True)
class BpBand:
    """Row of a blood-pressure table, with the lower bounds of its range in mmHg.

    A reading is in this band or a higher one when its systolic or its diastolic
    value reaches the bound. ``None`` means that value alone never reaches the band.
    With ``strict`` the bound itself is excluded (value > bound).
    """

    label: str
    systolic_min: int | None
    diastolic_min: int | None
    strict: bool = False


# 2017 ACC/AHA guideline (Whelton et al., Hypertension 2018;71:e13), table
# "Categories of BP in Adults". Readings in two categories take the higher one.
ACC_AHA_2017_BANDS: Final[tuple[BpBand, ...]] = (
    BpBand(BP_NORMAL, None, None),
    # Elevated is SBP 120-129 *and* DBP < 80, so DBP alone never reaches it.
    BpBand(BP_ELEVATED, 120, None),
    BpBand(BP_STAGE_1, 130, 80),
    BpBand(BP_STAGE_2, 140, 90),
    # The guideline text reads "higher than 180 and/or higher than 120", so
    # 180/120 itself is Stage 2. Some AHA patient charts print ">= 180/120".
    BpBand(BP_CRISIS, 180, 120, strict=True),
)

# 2018 ESC/ESH guidelines (Williams et al., Eur Heart J 2018;39:3021), table
# "Classification of office BP". The category is set by the higher of SBP and DBP.
ESC_ESH_2018_BANDS: Final[tuple[BpBand, ...]] = (
    BpBand(BP_OPTIMAL, None, None),
    BpBand(BP_NORMAL, 120, 80),
    BpBand(BP_HIGH_NORMAL, 130, 85),
    BpBand(BP_GRADE_1, 140, 90),
    BpBand(BP_GRADE_2, 160, 100),
    BpBand(BP_GRADE_3, 180, 110),
)

# Isolated systolic hypertension (SBP >= 140 and DBP < 90) is graded 1, 2 or 3 by
# its SBP, as in the ESH-ESC 2007 footnote that the 2018 table carries forward.
ESC_ESH_2018_ISOLATED_SYSTOLIC_MIN: Final = 140
ESC_ESH_2018_ISOLATED_DIASTOLIC_BELOW: Final = 90
ESC_ESH_2018_ISOLATED_SYSTOLIC_LABELS: Final[Mapping[str, str]] = {
    BP_GRADE_1: BP_ISOLATED_SYSTOLIC_GRADE_1,
    BP_GRADE_2: BP_ISOLATED_SYSTOLIC_GRADE_2,
    BP_GRADE_3: BP_ISOLATED_SYSTOLIC_GRADE_3,
}

# Adult hypotension: NHLBI "lower than 90/60 mm Hg" (SBP < 90 or DBP < 60). No
# guideline defines hypotension as a category, so this is a convention.
HYPOTENSION_SYSTOLIC_BELOW: Final = 90
HYPOTENSION_DIASTOLIC_BELOW: Final = 60


class ScreeningValues(NamedTuple):
    """Row of AAP Table 6 in mmHg. A reading at or above either value is flagged."""

    boys_systolic: int
    boys_diastolic: int
    girls_systolic: int
    girls_diastolic: int


# 2017 AAP Clinical Practice Guideline (Flynn et al., Pediatrics 2017;140:e20171904),
# Table 6 "Screening BP values requiring further evaluation", ages 1 to 12. Each
# value is the 90th percentile for age and sex at the 5th height percentile.
AAP_2017_SCREENING_VALUES: Final[Mapping[int, ScreeningValues]] = {
    1: ScreeningValues(98, 52, 98, 54),
    2: ScreeningValues(100, 55, 101, 58),
    3: ScreeningValues(101, 58, 102, 60),
    4: ScreeningValues(102, 60, 103, 62),
    5: ScreeningValues(103, 63, 104, 64),
    6: ScreeningValues(105, 66, 105, 67),
    7: ScreeningValues(106, 68, 106, 68),
    8: ScreeningValues(107, 69, 107, 69),
    9: ScreeningValues(107, 70, 108, 71),
    10: ScreeningValues(108, 72, 109, 72),
    11: ScreeningValues(110, 74, 111, 74),
    12: ScreeningValues(113, 75, 114, 75),
}
# The Table 6 row for 13 and over is 120/80, the adult ACC/AHA thresholds, so
# from this age both guideline rule sets use their adult table.
ADULT_TABLE_MIN_AGE: Final = 13
# AAP gives no thresholds under 1 year, so those readings are not classified.
PAEDIATRIC_MIN_AGE: Final = 1

# Paediatric hypotension by the PALS rule: SBP < 70 + 2 x age in years up to age
# 10, then SBP < 90. The rule has no diastolic criterion.
PALS_SYSTOLIC_BASE: Final = 70
PALS_SYSTOLIC_PER_YEAR: Final = 2
PALS_MAX_AGE: Final = 10


class LegacyAgeBand(NamedTuple):
    """Age band of the legacy rule set, with its "High" thresholds in mmHg."""

    age_below: int | None
    systolic_high: int
    diastolic_high: int


# Thresholds of the system this ETL replaces. No single guideline defines them.
# 130/80 is the ACC/AHA 2017 Stage 1 threshold, while 140/90 and 150/90 are JNC8
# 2014 treatment goals for under and over 60 years.
LEGACY_AGE_BANDS: Final[tuple[LegacyAgeBand, ...]] = (
    LegacyAgeBand(40, 130, 80),
    LegacyAgeBand(60, 140, 90),
    LegacyAgeBand(None, 150, 90),
)


def _label_ranks(bands: Sequence[BpBand]) -> dict[str, int]:
    return {band.label: rank for rank, band in enumerate(bands, start=1)}


_ESC_ESH_2018_RANKS: Final = _label_ranks(ESC_ESH_2018_BANDS)

# Order of the labels of each rule set, lowest first, with the low label at 0.
# Ranks compare readings within one age group only, because children aged 1 to 12
# get just the two paediatric labels, ranked 1 and 2 like the first two adult ones.
BP_LABEL_RANK: Final[Mapping[str, Mapping[str, int]]] = {
    "acc_aha_2017": {
        BP_HYPOTENSION: 0,
        **_label_ranks(ACC_AHA_2017_BANDS),
        BP_PAEDIATRIC_BELOW: 1,
        BP_PAEDIATRIC_ABOVE: 2,
    },
    "esc_esh_2018": {
        BP_HYPOTENSION: 0,
        **_ESC_ESH_2018_RANKS,
        **{
            isolated: _ESC_ESH_2018_RANKS[grade]
            for grade, isolated in ESC_ESH_2018_ISOLATED_SYSTOLIC_LABELS.items()
        },
        BP_PAEDIATRIC_BELOW: 1,
        BP_PAEDIATRIC_ABOVE: 2,
    },
    "legacy_age_bands": {BP_LEGACY_LOW: 0, BP_LEGACY_NORMAL: 1, BP_LEGACY_HIGH: 2},
}


# Labels of each rule set, indexed by the integer code that the classification
# computes. Adult codes equal the ranks above, so the adult labels come first.
_ACC_AHA_2017_LABELS: Final[tuple[str, ...]] = (
    BP_HYPOTENSION,
    *(band.label for band in ACC_AHA_2017_BANDS),
    BP_PAEDIATRIC_BELOW,
    BP_PAEDIATRIC_ABOVE,
)
_ESC_ESH_2018_LABELS: Final[tuple[str, ...]] = (
    BP_HYPOTENSION,
    *(band.label for band in ESC_ESH_2018_BANDS),
    *ESC_ESH_2018_ISOLATED_SYSTOLIC_LABELS.values(),
    BP_PAEDIATRIC_BELOW,
    BP_PAEDIATRIC_ABOVE,
)
_LEGACY_LABELS: Final[tuple[str, ...]] = (
    BP_LEGACY_LOW,
    BP_LEGACY_NORMAL,
    BP_LEGACY_HIGH,
)


class ScoreBand(NamedTuple):
    """Row of a NEWS2 table: values up to ``upper`` (inclusive) score ``score``.

    ``upper`` is None on the last row, which takes every higher value.
    """

    upper: float | None
    score: int


# NEWS2 (Royal College of Physicians, 2017), Chart 1 "The NEWS scoring system".
# Bounds apply to rounded values, so every reading falls in exactly one band.
NEWS2_RESPIRATORY_RATE: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(8, 3),
    ScoreBand(11, 1),
    ScoreBand(20, 0),
    ScoreBand(24, 2),
    ScoreBand(None, 3),
)
NEWS2_SPO2_SCALE_1: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(91, 3),
    ScoreBand(93, 2),
    ScoreBand(95, 1),
    ScoreBand(None, 0),
)
# Scale 2 scores 93% and above as 0 on air, but as 1 to 3 on oxygen.
NEWS2_SPO2_SCALE_2_ON_AIR: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(83, 3),
    ScoreBand(85, 2),
    ScoreBand(87, 1),
    ScoreBand(None, 0),
)
NEWS2_SPO2_SCALE_2_ON_OXYGEN: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(83, 3),
    ScoreBand(85, 2),
    ScoreBand(87, 1),
    ScoreBand(92, 0),
    ScoreBand(94, 1),
    ScoreBand(96, 2),
    ScoreBand(None, 3),
)
# From this SpO2 up, the Scale 2 score depends on air or oxygen.
NEWS2_SPO2_SCALE_2_OXYGEN_MIN: Final = 93
NEWS2_OXYGEN_SCORE: Final = 2
NEWS2_AIR_SCORE: Final = 0
NEWS2_SYSTOLIC: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(90, 3),
    ScoreBand(100, 2),
    ScoreBand(110, 1),
    ScoreBand(219, 0),
    ScoreBand(None, 3),
)
NEWS2_HEART_RATE: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(40, 3),
    ScoreBand(50, 1),
    ScoreBand(90, 0),
    ScoreBand(110, 1),
    ScoreBand(130, 2),
    ScoreBand(None, 3),
)
# ACVPU: new confusion (C) scores 3 like V, P and U.
NEWS2_CONSCIOUSNESS: Final[Mapping[str, int]] = {"A": 0, "C": 3, "V": 3, "P": 3, "U": 3}
# 39.1 C and above scores 2, not 3. Some machine transcriptions of the RCP chart
# put 3 in this cell.
NEWS2_TEMPERATURE: Final[tuple[ScoreBand, ...]] = (
    ScoreBand(35.0, 3),
    ScoreBand(36.0, 1),
    ScoreBand(38.0, 0),
    ScoreBand(39.0, 1),
    ScoreBand(None, 2),
)

# NEWS2 Chart 3 thresholds and triggers, checked from the top down.
NEWS2_HIGH_MIN: Final = 7
NEWS2_MEDIUM_MIN: Final = 5
NEWS2_RED_SCORE: Final = 3
# NEWS2 "does not apply to children under 16 or pregnant women" (NICE MIB205).
NEWS2_MIN_AGE: Final = 16
NEWS2_MAX_SCORE: Final = 20


def _news2_risk(total: int, *, has_red_score: bool) -> str:
    if total >= NEWS2_HIGH_MIN:
        return NEWS2_RISK_HIGH
    if total >= NEWS2_MEDIUM_MIN:
        return NEWS2_RISK_MEDIUM
    if has_red_score:
        return NEWS2_RISK_LOW_MEDIUM
    return NEWS2_RISK_LOW


# news2_code() sums one code per parameter, which is its score plus this weight when
# the score is 3. The sum is total + weight x (number of red scores), and the
# total is below the weight, so one sum gives both the total and the risk.
_RED_SCORE_WEIGHT: Final = NEWS2_MAX_SCORE + 1
_NEWS2_PARAMETER_COUNT: Final = 7
# A missing parameter adds this weight to the sum instead of a code. It is above
# every sum of codes (at most 20 + 21 x 7 = 167), so the sum also contains the
# number of missing parameters and the codes of the recorded ones.
_MISSING_WEIGHT: Final = 1000
_NEWS2_RISK_BY_CODE: Final = {
    total + _RED_SCORE_WEIGHT * red_count: _news2_risk(
        total, has_red_score=red_count > 0
    )
    for total in range(NEWS2_MAX_SCORE + 1)
    for red_count in range(_NEWS2_PARAMETER_COUNT + 1)
}


def bp_status(
    rule_set: str,
    *,
    systolic: pl.Expr,
    diastolic: pl.Expr,
    age: pl.Expr,
    sex: pl.Expr,
) -> pl.Expr:
    """Build the blood-pressure label of each reading under one rule set.

    Parameters
    ----------
    rule_set
        One of :data:`RULE_SETS`.
    systolic, diastolic
        Int64 readings in mmHg.
    age
        Int64 age in whole years.
    sex
        String ``"F"`` or ``"M"``. Any other value, null included, is read as
        unknown and only matters for children aged 1 to 12.

    Returns
    -------
    pl.Expr
        String expression named ``bp_status``. It is null when the systolic,
        diastolic or age value is null, and under age 1 for the two guideline
        rule sets.

    Raises
    ------
    ConfigurationError
        A ``ValueError`` raised when ``rule_set`` is not in :data:`RULE_SETS`.

    Examples
    --------
    >>> df = pl.DataFrame({"sbp": [115, 185], "dbp": [85, 95], "age": [40, 40]})
    >>> label = bp_status(
    ...     "acc_aha_2017",
    ...     systolic=pl.col("sbp"),
    ...     diastolic=pl.col("dbp"),
    ...     age=pl.col("age"),
    ...     sex=pl.lit(None, dtype=pl.String),
    ... )
    >>> df.select(label).to_series().to_list()
    ['Stage 1 hypertension range', 'Hypertensive crisis range']
    """
    if rule_set not in RULE_SETS:
        msg = f"invalid rule set {rule_set!r}; expected one of {', '.join(RULE_SETS)}"
        raise ConfigurationError(msg)

    # Each branch computes an integer code, the index of the label in `labels`,
    # and one lookup at the end turns codes into strings. String columns are
    # slower to build, and eager Polars would build one per branch.
    if rule_set == "legacy_age_bands":
        # The legacy bands have no lower age bound, so children are classified by
        # the under-40 band, as in the system this rule set reproduces.
        labels = _LEGACY_LABELS
        code = _legacy_code(systolic=systolic, diastolic=diastolic, age=age)
    else:
        if rule_set == "acc_aha_2017":
            labels = _ACC_AHA_2017_LABELS
            adult = _band_rank(
                ACC_AHA_2017_BANDS,
                systolic=systolic,
                diastolic=diastolic,
                low_below=BP_STAGE_1,
            )
        else:
            labels = _ESC_ESH_2018_LABELS
            adult = _esc_esh_2018_code(systolic=systolic, diastolic=diastolic)
        # ESC/ESH 2018 classifies adults only. Children get the same AAP screening
        # as under acc_aha_2017, and ages 13 to 15 get the adult ESC/ESH table.
        # NOTE: the ESC/ESH 2018 table may have a footnote "from 16 years". No source
        # quoting it was found, so age 13 follows the AAP hand-over to adult values.
        child = _paediatric_code(
            systolic=systolic, diastolic=diastolic, age=age, sex=sex, labels=labels
        )
        code = (
            pl.when(age < PAEDIATRIC_MIN_AGE)
            .then(pl.lit(None, dtype=pl.Int64))
            .when(age < ADULT_TABLE_MIN_AGE)
            .then(child)
            .otherwise(adult)
        )

    is_missing = systolic.is_null() | diastolic.is_null() | age.is_null()
    code = pl.when(is_missing).then(pl.lit(None, dtype=pl.Int64)).otherwise(code)
    return code.replace_strict(
        dict(enumerate(labels)), default=None, return_dtype=pl.String
    ).alias("bp_status")


def _rank_expr(
    value: pl.Expr, bounds: Sequence[tuple[int, int | None, bool]]
) -> pl.Expr:
    """Return the rank of the highest band whose lower bound ``value`` reaches.

    ``bounds`` lists ``(rank, bound, strict)`` from the lowest band up. A value
    below every bound gets rank 1, the first band.
    """
    rank: pl.Expr = pl.lit(1, dtype=pl.Int64)
    # Wrap from the lowest band up, so the outermost test is the highest band.
    for band_rank, bound, strict in bounds:
        if bound is None:
            continue
        reached = value > bound if strict else value >= bound
        rank = pl.when(reached).then(pl.lit(band_rank, dtype=pl.Int64)).otherwise(rank)
    return rank


def _band_rank(
    bands: Sequence[BpBand],
    *,
    systolic: pl.Expr,
    diastolic: pl.Expr,
    low_below: str | None = None,
) -> pl.Expr:
    """Rank an adult reading, 0 in the low range and ``i + 1`` for ``bands[i]``.

    The rank is the higher of the SBP and the DBP rank, as both guidelines
    require, and 0 when one value is low (SBP < 90 or DBP < 60) and that rank
    is below the band labelled ``low_below``. Without ``low_below`` a low
    value always gives 0. These are the ranks of :data:`BP_LABEL_RANK`.
    """
    ranked = list(enumerate(bands, start=1))
    systolic_rank = _rank_expr(
        systolic, [(rank, band.systolic_min, band.strict) for rank, band in ranked]
    )
    diastolic_rank = _rank_expr(
        diastolic, [(rank, band.diastolic_min, band.strict) for rank, band in ranked]
    )

    rank = pl.max_horizontal(systolic_rank, diastolic_rank)
    is_low = (systolic < HYPOTENSION_SYSTOLIC_BELOW) | (
        diastolic < HYPOTENSION_DIASTOLIC_BELOW
    )
    if low_below is not None:
        # A hypertension range wins over a low value, so 150/55 is Stage 2 (ESC/ESH
        # 2018 grades such a reading as isolated systolic hypertension).
        first_kept = 1 + [band.label for band in bands].index(low_below)
        is_low = is_low & (rank < first_kept)
    return pl.when(is_low).then(pl.lit(0, dtype=pl.Int64)).otherwise(rank)


def _esc_esh_2018_code(*, systolic: pl.Expr, diastolic: pl.Expr) -> pl.Expr:
    """Code an adult reading by ESC/ESH 2018, with isolated systolic grades."""
    rank = _band_rank(
        ESC_ESH_2018_BANDS,
        systolic=systolic,
        diastolic=diastolic,
        low_below=BP_GRADE_1,
    )
    # With DBP < 90 the grade comes from SBP alone, so only the label changes. A
    # reading in the low range keeps rank 0, which the renaming leaves as it is.
    isolated_codes = {
        _ESC_ESH_2018_LABELS.index(grade): _ESC_ESH_2018_LABELS.index(isolated)
        for grade, isolated in ESC_ESH_2018_ISOLATED_SYSTOLIC_LABELS.items()
    }
    is_isolated_systolic = (systolic >= ESC_ESH_2018_ISOLATED_SYSTOLIC_MIN) & (
        diastolic < ESC_ESH_2018_ISOLATED_DIASTOLIC_BELOW
    )
    return (
        pl.when(is_isolated_systolic).then(rank.replace(isolated_codes)).otherwise(rank)
    )


def _screening_value(
    age: pl.Expr, sex: pl.Expr, *, boys: Mapping[int, int], girls: Mapping[int, int]
) -> pl.Expr:
    """Look up one AAP Table 6 value by age and sex, null outside ages 1 to 12."""
    # Unknown sex takes the lower of the two values, so no child who would be
    # flagged as a boy or as a girl goes unflagged.
    lower = {age_years: min(boys[age_years], girls[age_years]) for age_years in boys}
    return (
        pl.when(sex == "M")
        .then(age.replace_strict(boys, default=None, return_dtype=pl.Int64))
        .when(sex == "F")
        .then(age.replace_strict(girls, default=None, return_dtype=pl.Int64))
        .otherwise(age.replace_strict(lower, default=None, return_dtype=pl.Int64))
    )


def _paediatric_code(
    *,
    systolic: pl.Expr,
    diastolic: pl.Expr,
    age: pl.Expr,
    sex: pl.Expr,
    labels: Sequence[str],
) -> pl.Expr:
    """Code a reading of a child aged 1 to 12 by AAP Table 6 and the PALS rule."""
    rows = AAP_2017_SCREENING_VALUES.items()
    systolic_threshold = _screening_value(
        age,
        sex,
        boys={age_years: row.boys_systolic for age_years, row in rows},
        girls={age_years: row.girls_systolic for age_years, row in rows},
    )
    diastolic_threshold = _screening_value(
        age,
        sex,
        boys={age_years: row.boys_diastolic for age_years, row in rows},
        girls={age_years: row.girls_diastolic for age_years, row in rows},
    )
    # Without height the AAP percentiles cannot be used, so the table only splits
    # readings at the screening value. The max of two below/above ranks is "above"
    # when either value is at or above its threshold.
    is_above = (systolic >= systolic_threshold) | (diastolic >= diastolic_threshold)
    pals_floor = PALS_SYSTOLIC_BASE + PALS_SYSTOLIC_PER_YEAR * pl.min_horizontal(
        age, pl.lit(PALS_MAX_AGE)
    )
    return (
        pl.when(systolic < pals_floor)
        .then(pl.lit(labels.index(BP_HYPOTENSION), dtype=pl.Int64))
        .when(is_above)
        .then(pl.lit(labels.index(BP_PAEDIATRIC_ABOVE), dtype=pl.Int64))
        .otherwise(pl.lit(labels.index(BP_PAEDIATRIC_BELOW), dtype=pl.Int64))
    )


def _legacy_code(*, systolic: pl.Expr, diastolic: pl.Expr, age: pl.Expr) -> pl.Expr:
    """Code a reading by the legacy Low/Normal/High bands for its age.

    Low wins over High (150/55 is Low), as in the system this rule set
    reproduces, which tests for Low first.
    """
    code: pl.Expr = pl.lit(None, dtype=pl.Int64)
    # Wrap from the oldest band down, so the outermost test is the youngest band.
    for band in reversed(LEGACY_AGE_BANDS):
        bands = (
            BpBand(BP_LEGACY_NORMAL, None, None),
            BpBand(BP_LEGACY_HIGH, band.systolic_high, band.diastolic_high),
        )
        band_code = _band_rank(bands, systolic=systolic, diastolic=diastolic)
        if band.age_below is None:
            code = band_code
        else:
            code = pl.when(age < band.age_below).then(band_code).otherwise(code)
    return code


def news2_parameter_scores(
    *,
    respiratory_rate: pl.Expr,
    spo2: pl.Expr,
    on_oxygen: pl.Expr,
    systolic: pl.Expr,
    heart_rate: pl.Expr,
    consciousness: pl.Expr,
    temperature: pl.Expr,
    age: pl.Expr,
    spo2_scale: pl.Expr | None = None,
) -> dict[str, pl.Expr]:
    """Build the NEWS2 score of each of the seven parameters (RCP 2017, Chart 1).

    Parameters
    ----------
    respiratory_rate, heart_rate
        Float64 rates per minute.
    spo2
        Float64 oxygen saturation in percent.
    on_oxygen
        Boolean, true when the patient breathes supplemental oxygen.
    systolic
        Systolic blood pressure in mmHg.
    consciousness
        String ACVPU letter: ``"A"``, ``"C"``, ``"V"``, ``"P"`` or ``"U"``.
    temperature
        Float64 temperature in degrees Celsius.
    age
        Int64 age in whole years.
    spo2_scale
        Int64 SpO2 scale. Only 2 selects Scale 2, so any other value, null or a
        missing expression selects Scale 1.

    Returns
    -------
    dict[str, pl.Expr]
        Int64 expressions keyed ``respiratory_rate``, ``spo2``, ``air_or_oxygen``,
        ``systolic``, ``heart_rate``, ``consciousness`` and ``temperature``, each
        named ``news2_<key>_score``. A score is null when its input is null or not
        a valid value, and every score is null under age 16. A null age is scored
        as an adult.
    """
    scores = _parameter_scores(
        respiratory_rate=respiratory_rate,
        spo2=spo2,
        on_oxygen=on_oxygen,
        systolic=systolic,
        heart_rate=heart_rate,
        consciousness=consciousness,
        temperature=temperature,
        spo2_scale=spo2_scale,
    )
    return {
        name: pl.when(age < NEWS2_MIN_AGE)
        .then(pl.lit(None, dtype=pl.Int64))
        .otherwise(score)
        .alias(f"news2_{name}_score")
        for name, score in scores.items()
    }


def news2(
    *,
    respiratory_rate: pl.Expr,
    spo2: pl.Expr,
    on_oxygen: pl.Expr,
    systolic: pl.Expr,
    heart_rate: pl.Expr,
    consciousness: pl.Expr,
    temperature: pl.Expr,
    age: pl.Expr,
    spo2_scale: pl.Expr | None = None,
) -> tuple[pl.Expr, pl.Expr]:
    """Build the NEWS2 total score and its clinical risk (RCP 2017, Charts 1 and 3).

    The inputs are those of :func:`news2_parameter_scores`.

    Returns
    -------
    tuple[pl.Expr, pl.Expr]
        ``news2_score``, the Int64 total from 0 to 20, and ``news2_risk``, a
        String label. Under age 16 the score is null and the risk is
        :data:`NEWS2_RISK_NOT_APPLICABLE`. Otherwise, when any parameter score is
        null, the score is null and the risk is :data:`NEWS2_RISK_INCOMPLETE`:
        a missing consciousness or oxygen value is never taken as Alert or air.
        A null age is scored as an adult.

    Examples
    --------
    >>> df = pl.DataFrame({"rr": [22.0], "spo2": [95.0], "o2": [False], "sbp": [105],
    ...                    "hr": [95.0], "avpu": ["A"], "temp": [39.1], "age": [70]})
    >>> score, risk = news2(
    ...     respiratory_rate=pl.col("rr"), spo2=pl.col("spo2"), on_oxygen=pl.col("o2"),
    ...     systolic=pl.col("sbp"), heart_rate=pl.col("hr"),
    ...     consciousness=pl.col("avpu"), temperature=pl.col("temp"), age=pl.col("age"),
    ... )
    >>> df.select(score, risk).row(0)
    (7, 'High')
    """
    code = news2_code(
        respiratory_rate=respiratory_rate,
        spo2=spo2,
        on_oxygen=on_oxygen,
        systolic=systolic,
        heart_rate=heart_rate,
        consciousness=consciousness,
        temperature=temperature,
        spo2_scale=spo2_scale,
    )
    return news2_from_code(code, age=age)


def news2_code(
    *,
    respiratory_rate: pl.Expr,
    spo2: pl.Expr,
    on_oxygen: pl.Expr,
    systolic: pl.Expr,
    heart_rate: pl.Expr,
    consciousness: pl.Expr,
    temperature: pl.Expr,
    spo2_scale: pl.Expr | None = None,
) -> pl.Expr:
    """Build the one Int64 sum that :func:`news2_from_code` reads both outputs from.

    The inputs are those of :func:`news2_parameter_scores`, without the age.
    Eager Polars evaluates an expression once per output that uses it, so a
    frame that needs both the score and the risk can store this sum as a
    column first and pass that column to :func:`news2_from_code` and
    :func:`news2_alert_from_code`.
    """
    codes = _parameter_scores(
        respiratory_rate=respiratory_rate,
        spo2=spo2,
        on_oxygen=on_oxygen,
        systolic=systolic,
        heart_rate=heart_rate,
        consciousness=consciousness,
        temperature=temperature,
        spo2_scale=spo2_scale,
        red_weight=_RED_SCORE_WEIGHT,
    ).values()
    return reduce(operator.add, (part.fill_null(_MISSING_WEIGHT) for part in codes))


def news2_from_code(code: pl.Expr, *, age: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """Return ``news2_score`` and ``news2_risk`` from the sum of :func:`news2_code`.

    Both outputs read the one sum, so a separate test for a red score does
    not score every parameter again.
    """
    total = pl.when(code < _MISSING_WEIGHT).then(code % _RED_SCORE_WEIGHT)
    # A sum with a missing parameter is no key, so its risk is Incomplete.
    risk = code.replace_strict(
        _NEWS2_RISK_BY_CODE, default=NEWS2_RISK_INCOMPLETE, return_dtype=pl.String
    )

    is_child = age < NEWS2_MIN_AGE
    score = pl.when(is_child).then(pl.lit(None, dtype=pl.Int64)).otherwise(total)
    risk = pl.when(is_child).then(pl.lit(NEWS2_RISK_NOT_APPLICABLE)).otherwise(risk)
    return score.alias("news2_score"), risk.alias("news2_risk")


def news2_alert_from_code(code: pl.Expr, *, age: pl.Expr) -> pl.Expr:
    """Build whether a reading needs an urgent response: NEWS2 of 5 or more from age 16.

    That is a risk of Medium or High. When parameters are missing, the scores
    of the recorded ones count, because a missing parameter can only add to
    the total. Recorded scores of 5 or more mean a full NEWS2 of at least 5.
    The result is a Boolean named ``news2_alert``, false under age 16 and
    scored as an adult when the age is null, as :func:`news2_from_code` does.
    """
    recorded_total = code % _MISSING_WEIGHT % _RED_SCORE_WEIGHT
    return (
        pl.when(age < NEWS2_MIN_AGE)
        .then(pl.lit(value=False))
        .otherwise(recorded_total >= NEWS2_MEDIUM_MIN)
        .alias("news2_alert")
    )


def _parameter_scores(
    *,
    respiratory_rate: pl.Expr,
    spo2: pl.Expr,
    on_oxygen: pl.Expr,
    systolic: pl.Expr,
    heart_rate: pl.Expr,
    consciousness: pl.Expr,
    temperature: pl.Expr,
    spo2_scale: pl.Expr | None,
    red_weight: int = 0,
) -> dict[str, pl.Expr]:
    """Score the seven NEWS2 parameters, without the age limit.

    A score of 3 comes out as ``3 + red_weight``, the code that news2_code() sums.
    """
    # Rates, SpO2 and SBP are banded as whole numbers and temperature to 0.1 C,
    # so that 20.5 or 35.05 cannot fall between two bands. Halves round away
    # from zero (20.5 becomes 21), while Polars rounds half to even by default.
    spo2_rounded = _round(spo2, decimals=0)
    is_scale_2 = pl.lit(value=False) if spo2_scale is None else (spo2_scale == 2)
    spo2_score = (
        pl.when(is_scale_2.fill_null(value=False))
        .then(_spo2_scale_2_score(spo2_rounded, on_oxygen, red_weight=red_weight))
        .otherwise(_score_expr(spo2_rounded, NEWS2_SPO2_SCALE_1, red_weight=red_weight))
    )
    air_or_oxygen_score = (
        pl.when(on_oxygen)
        .then(_points(NEWS2_OXYGEN_SCORE, red_weight=red_weight))
        .when(on_oxygen.not_())
        .then(_points(NEWS2_AIR_SCORE, red_weight=red_weight))
        .otherwise(pl.lit(None, dtype=pl.Int64))
    )
    consciousness_codes = {
        letter: score + (red_weight if score == NEWS2_RED_SCORE else 0)
        for letter, score in NEWS2_CONSCIOUSNESS.items()
    }
    return {
        "respiratory_rate": _score_expr(
            _round(respiratory_rate, decimals=0),
            NEWS2_RESPIRATORY_RATE,
            red_weight=red_weight,
        ),
        "spo2": spo2_score,
        "air_or_oxygen": air_or_oxygen_score,
        "systolic": _score_expr(
            _round(systolic, decimals=0), NEWS2_SYSTOLIC, red_weight=red_weight
        ),
        "heart_rate": _score_expr(
            _round(heart_rate, decimals=0), NEWS2_HEART_RATE, red_weight=red_weight
        ),
        "consciousness": consciousness.replace_strict(
            consciousness_codes, default=None, return_dtype=pl.Int64
        ),
        "temperature": _score_expr(
            _round(temperature, decimals=1), NEWS2_TEMPERATURE, red_weight=red_weight
        ),
    }


def _round(value: pl.Expr, *, decimals: int) -> pl.Expr:
    return value.cast(pl.Float64).round(decimals, mode="half_away_from_zero")


def _points(score: int, *, red_weight: int) -> pl.Expr:
    """Return the score literal of a band, with ``red_weight`` added to a 3."""
    code = score + red_weight if score == NEWS2_RED_SCORE else score
    return pl.lit(code, dtype=pl.Int64)


def _score_expr(
    value: pl.Expr, bands: Sequence[ScoreBand], *, red_weight: int
) -> pl.Expr:
    """Score ``value`` by the first band whose upper bound it does not exceed."""
    *bounded, last = bands
    score = _points(last.score, red_weight=red_weight)
    # Wrap from the highest band down, so the outermost test is the lowest band.
    for band in reversed(bounded):
        score = (
            pl.when(value <= band.upper)
            .then(_points(band.score, red_weight=red_weight))
            .otherwise(score)
        )
    return pl.when(value.is_null()).then(pl.lit(None, dtype=pl.Int64)).otherwise(score)


def _spo2_scale_2_score(
    spo2: pl.Expr, on_oxygen: pl.Expr, *, red_weight: int
) -> pl.Expr:
    """Score SpO2 on Scale 2, which depends on air or oxygen from 93% up."""
    on_air_score = _score_expr(spo2, NEWS2_SPO2_SCALE_2_ON_AIR, red_weight=red_weight)
    on_oxygen_score = _score_expr(
        spo2, NEWS2_SPO2_SCALE_2_ON_OXYGEN, red_weight=red_weight
    )
    # With on_oxygen null the score is known only below 93%, where both agree.
    return (
        pl.when(on_oxygen)
        .then(on_oxygen_score)
        .when(on_oxygen.not_() | (spo2 < NEWS2_SPO2_SCALE_2_OXYGEN_MIN))
        .then(on_air_score)
    )
