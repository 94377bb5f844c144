"""Pandera models of a parsed reading (input) and of a row of ``liste-patients`` (output).

Bounds are plausibility limits, not clinical categories: a value outside them
is bad data (a unit mix-up, a sensor fault, a typing error). They follow the
MIMIC-III benchmark cleaning table (YerevaNN/mimic3-benchmarks,
``variable_ranges.csv``) and documented human extremes; the README's
"Clinical rules" section lists them with their sources.
"""

from __future__ import annotations

from typing import Final

import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData

from etl.rules import BP_LABEL_RANK, RULE_SETS

CONSCIOUSNESS_LEVELS: Final = ["A", "C", "V", "P", "U"]
"""ACVPU, Royal College of Physicians NEWS2 (2017): Alert, new Confusion, Voice, Pain, Unresponsive."""

SEXES: Final = ["F", "M"]

BP_LABELS: Final = sorted(
    {label for labels in BP_LABEL_RANK.values() for label in labels}
)
NEWS2_RISKS: Final = [
    "Low",
    "Low-medium",
    "Medium",
    "High",
    "Incomplete",
    "Not applicable",
]


class InputReading(pa.DataFrameModel):
    """One vital-sign reading after parsing: types are settled, values not yet trusted."""

    partition: pl.Int32 = pa.Field(ge=0)
    offset: pl.Int64 = pa.Field(ge=0)
    patient_id: pl.String = pa.Field(str_length={"min_value": 1, "max_value": 64})
    name: pl.String = pa.Field(str_length={"min_value": 1, "max_value": 200})
    age: pl.Int64 = pa.Field(ge=0, le=130)
    systolic: pl.Int64 = pa.Field(gt=20, le=300)
    diastolic: pl.Int64 = pa.Field(gt=0, le=250)
    heart_rate: pl.Float64 = pa.Field(ge=0, le=350)
    temperature: pl.Float64 = pa.Field(ge=14.2, le=47.0)
    measured_at: pl.Datetime(time_unit="us", time_zone="UTC")  # type: ignore[valid-type]
    spo2: pl.Float64 = pa.Field(nullable=True, ge=0, le=100)
    respiratory_rate: pl.Float64 = pa.Field(nullable=True, ge=0, le=100)
    consciousness: pl.String = pa.Field(nullable=True, isin=CONSCIOUSNESS_LEVELS)
    on_oxygen: pl.Boolean = pa.Field(nullable=True)
    sex: pl.String = pa.Field(nullable=True, isin=SEXES)
    device_id: pl.String = pa.Field(nullable=True, str_length={"max_value": 128})
    spo2_scale: pl.Int64 = pa.Field(nullable=True, isin=[1, 2])

    @pa.check("name", name="contains_letter")
    def _name_has_letter(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).str.contains(r"\p{L}"))

    @pa.check("spo2", name="percentage_not_fraction")
    def _spo2_not_fraction(cls, data: PolarsData) -> pl.LazyFrame:
        # 0.97 is 97 % sent as a fraction, which NEWS2 would score as severe hypoxaemia.
        spo2 = pl.col(data.key)
        return data.lazyframe.select(~spo2.is_between(0, 1, closed="right"))

    @pa.dataframe_check(name="diastolic_below_systolic")
    def _diastolic_below_systolic(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("diastolic") < pl.col("systolic"))

    class Config:
        strict = True
        ordered = True


class OutputRow(pa.DataFrameModel):
    """One element of the Redis list ``liste-patients``, before JSON encoding.

    The column order is the key order of the JSON object.
    """

    patient_id: pl.String = pa.Field(str_length={"min_value": 1, "max_value": 64})
    first_name: pl.String = pa.Field(str_length={"min_value": 1})
    last_name: pl.String = pa.Field(nullable=True, str_length={"min_value": 1})
    age: pl.Int64 = pa.Field(ge=0, le=130)
    blood_pressure: pl.String = pa.Field(str_matches=r"^\d{2,3}/\d{1,3}$")
    blood_pressure_status: pl.String = pa.Field(nullable=True, isin=BP_LABELS)
    heart_rate: pl.Float64 = pa.Field(ge=0, le=350)
    temperature: pl.Float64 = pa.Field(ge=14.2, le=47.0)
    timestamp: pl.String = pa.Field(
        str_matches=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$"
    )
    systolic: pl.Int64 = pa.Field(gt=20, le=300)
    diastolic: pl.Int64 = pa.Field(gt=0, le=250)
    spo2: pl.Float64 = pa.Field(nullable=True, ge=0, le=100)
    respiratory_rate: pl.Float64 = pa.Field(nullable=True, ge=0, le=100)
    news2_score: pl.Int64 = pa.Field(nullable=True, ge=0, le=20)
    news2_risk: pl.String = pa.Field(isin=NEWS2_RISKS)
    rule_set: pl.String = pa.Field(isin=list(RULE_SETS))
    source: pl.Struct(  # type: ignore[valid-type]
        {"topic": pl.String, "partition": pl.Int32, "offset": pl.Int64}
    )

    @pa.dataframe_check(name="diastolic_below_systolic")
    def _diastolic_below_systolic(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("diastolic") < pl.col("systolic"))

    class Config:
        strict = True
        ordered = True


OUTPUT_KEYS: Final = list(OutputRow.to_schema().columns)
