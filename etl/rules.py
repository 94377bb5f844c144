"""TEMPORARY local stub; replaced by the rules branch."""

from __future__ import annotations

import polars as pl

RULE_SETS = ("acc_aha_2017", "esc_esh_2018", "legacy_age_bands")


def bp_status(
    rule_set: str, *, systolic: pl.Expr, diastolic: pl.Expr, age: pl.Expr, sex: pl.Expr
) -> pl.Expr:
    return (
        pl.when((systolic >= 130) | (diastolic >= 80))
        .then(pl.lit("High"))
        .otherwise(pl.lit("Normal"))
    )


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
    return pl.lit(None, pl.Int64), pl.lit("Incomplete")
