"""Apply the Pandera contracts and turn their failure cases into rejects.

Pandera runs each check as its own query, so a call costs tens of
milliseconds whatever the frame size (about 70 ms for the input contract on
2 vCPUs, measured with Pandera 0.35). :func:`split_valid` evaluates every
check of the model in one Polars query instead, with Pandera's own check
functions and null rules. A failing row is named after its first failing
check, in the order Pandera lists them. Columns come in model order, with
the null rule before the checks of a column and the checks in their
order, then the checks of the whole frame. Pandera itself validates the frame when a check
cannot be read as an expression, and it is the reference that the tests
compare against.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import polars as pl
from pandera.api.polars.types import PolarsData
from pandera.backends.polars.checks import PolarsCheckBackend
from pandera.errors import SchemaErrors

from etl.parse import REJECT_SCHEMA, empty_rejects
from etl.reasons import Reason

if TYPE_CHECKING:
    import pandera.polars as pa
    from pandera.api.checks import Check

logger = logging.getLogger(__name__)

#: Pandera check name -> reason code; any other failed check is a range or set
#: violation.
CHECK_REASONS: Final = {
    "not_nullable": Reason.MISSING_FIELD,
    "diastolic_below_systolic": Reason.DIASTOLIC_NOT_BELOW_SYSTOLIC,
    "contains_letter": Reason.INVALID_NAME,
}


def split_valid(
    frame: pl.DataFrame,
    model: type[pa.DataFrameModel],
    *,
    carry: Sequence[str] = (),
    default_reason: Reason = Reason.OUT_OF_RANGE,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate ``frame`` against ``model``; return ``(valid_df, rejects_df)``.

    Columns named in ``carry`` are not part of the model: they are left out of
    the validation and kept in ``valid_df``. ``frame`` must contain partition,
    offset and value, which the rejects keep. Every failing row becomes one
    reject, named after its first failing column in model order. A failure
    that names no row (a wrong column set or dtype) is a bug and is raised.
    """
    columns = model.to_schema().columns
    checked = frame.drop([name for name in carry if name not in columns])
    conditions = _conditions_for(checked, model)
    if conditions is None:
        return _split_with_pandera(frame, checked, model, default_reason)
    # Lazy: the optimiser shares the subexpressions of the checks.
    passed = (
        checked.lazy()
        .select(pl.all_horizontal(condition.expr for condition in conditions))
        .collect()
        .to_series()
    )
    if passed.all():
        return frame, empty_rejects()
    failing = checked.filter(~passed)
    # The index of each failing row's first failing condition.
    first = failing.lazy().select(
        pl.coalesce(
            pl.when(~condition.expr).then(pl.lit(number, pl.UInt32))
            for number, condition in enumerate(conditions)
        ).alias("_condition")
    )
    labels = pl.LazyFrame(
        {
            "_condition": pl.Series(range(len(conditions)), dtype=pl.UInt32),
            "column": [condition.column for condition in conditions],
            "check": [condition.check for condition in conditions],
        }
    )
    cases = (
        first.with_row_index("index")
        .join(labels, on="_condition", how="left", maintain_order="left")
        .select("index", "column", "check")
        .collect()
    )
    rejects = _rejects(frame.filter(~passed), cases, model, default_reason)
    return frame.filter(passed), rejects


@dataclass(frozen=True)
class _Condition:
    """One check or null rule of a model, as Pandera names it in its failure cases."""

    column: str
    check: str
    expr: pl.Expr


def _conditions_for(
    frame: pl.DataFrame, model: type[pa.DataFrameModel]
) -> tuple[_Condition, ...] | None:
    """Return the conditions of ``model`` if they apply to ``frame`` row by row.

    Returns None when the frame's columns or dtypes differ from the schema, or
    when a check is not a row-wise expression; Pandera then validates the
    whole frame.
    """
    schema = model.to_schema()
    if list(frame.columns) != list(schema.columns):
        return None
    if any(
        frame.schema[name] != column.dtype.type
        for name, column in schema.columns.items()
    ):
        return None
    return _model_conditions(model)


@functools.cache
def _model_conditions(model: type[pa.DataFrameModel]) -> tuple[_Condition, ...] | None:
    """Build, once per model, one condition per check and nullability rule, in order."""
    schema = model.to_schema()
    if schema.unique:
        return None
    # Pandera registers its check functions on the first validation.
    schema.register_default_backends(pl.LazyFrame)
    conditions: list[_Condition] = []
    for name, column in schema.columns.items():
        if column.unique:
            return None
        if not column.nullable:
            # Pandera counts NaN as missing in float columns.
            present = pl.col(name).is_not_null()
            if column.dtype.type.is_float():
                present = present & pl.col(name).is_not_nan()
            conditions.append(_Condition(name, "not_nullable", present))
        for check in column.checks:
            expr = _check_condition(check, name)
            if expr is None:
                return None
            conditions.append(_Condition(name, check.error or check.name, expr))
    # Pandera names the checks of the whole frame after the schema.
    frame_name = schema.name or model.__name__
    for check in schema.checks:
        expr = _check_condition(check, "*")
        if expr is None:
            return None
        conditions.append(_Condition(frame_name, check.error or check.name, expr))
    return tuple(conditions)


class _RecordedSelect:
    """A stand-in for the LazyFrame that a check function selects from.

    Pandera's Polars checks return ``data.lazyframe.select(<expression>)``.
    Given this object instead, they return their expressions, which
    :func:`split_valid` evaluates for every check in one query. Any other use
    of the frame raises AttributeError, and Pandera then validates the frame.
    """

    def select(self, *exprs: object) -> tuple[object, ...]:
        return exprs


def _check_condition(check: Check, key: str) -> pl.Expr | None:
    """Return ``check`` as a boolean expression with Pandera's rule for null outputs."""
    if check.element_wise or check.groupby is not None:
        return None
    # Built-in checks made before Pandera registered its Polars functions hold
    # a stale dispatcher; Check.__call__ reloads it the same way.
    builtin = getattr(check._check_fn, "__name__", None)
    if builtin is not None and check.is_builtin_check(builtin):
        check._check_fn = check.get_builtin_check_fn(builtin)
    if check.get_backend(pl.LazyFrame()) is not PolarsCheckBackend:
        # The Narwhals backend (PANDERA_USE_NARWHALS_BACKEND) takes other inputs.
        return None
    try:
        selected = PolarsCheckBackend(check).check_fn(
            PolarsData(_RecordedSelect(), key)  # type: ignore[arg-type]
        )
    except AttributeError:
        return None
    if not isinstance(selected, tuple) or not selected:
        return None
    exprs = [expr for expr in selected if isinstance(expr, pl.Expr)]
    if len(exprs) != len(selected):
        return None
    # A check that selects several columns passes where all of them are true,
    # as Pandera folds them.
    result = exprs[0] if len(exprs) == 1 else pl.all_horizontal(exprs)
    if check.ignore_na:
        return result | result.is_null()
    return result.fill_null(False)


@functools.cache
def _check_details(model: type[pa.DataFrameModel]) -> dict[str, str]:
    """Map the name Pandera gives each failed check of ``model`` to a sentence.

    Pandera names a failed built-in check by its call, such as
    ``less_than_or_equal_to(130)``. A check without a sentence keeps that name.
    """
    schema = model.to_schema()
    checks = [
        *(check for column in schema.columns.values() for check in column.checks),
        *schema.checks,
    ]
    sentences: dict[str, set[str | None]] = {}
    for check in checks:
        name = check.error or check.name
        sentences.setdefault(name, set()).add(
            _check_sentence(check.name, check.statistics)
        )
    # Pandera gives checks that differ only in options, such as in_range with
    # and without include_max, one name. Such a name keeps its Pandera form.
    details = {
        name: sentence
        for name, (sentence, *others) in sentences.items()
        if sentence is not None and not others
    }
    details["not_nullable"] = "required field is null, blank or absent"
    details["diastolic_below_systolic"] = "diastolic must be below systolic"
    return details


def _check_sentence(name: str | None, statistics: dict[str, Any]) -> str | None:
    """Describe a Pandera check as the rule a valid value follows, or return None."""
    low = _plain_number(statistics.get("min_value"))
    high = _plain_number(statistics.get("max_value"))

    if name == "greater_than_or_equal_to":
        return f"must be at least {low}"
    if name == "greater_than":
        return f"must be above {low}"
    if name == "less_than_or_equal_to":
        return f"must be at most {high}"
    if name == "less_than":
        return f"must be below {high}"
    if name == "in_range":
        # An open end has no sentence, and the check keeps its Pandera name.
        closed = statistics.get("include_min", True) and statistics.get(
            "include_max", True
        )
        return f"must be from {low} to {high}" if closed else None

    if name == "isin":
        values = statistics["allowed_values"]
        if isinstance(values, set | frozenset):
            values = sorted(values, key=str)
        texts = [str(_plain_number(value)) for value in values]
        # Quoted when a value is blank or contains the separator, so each reads apart.
        if any(not text.strip() or "," in text for text in texts):
            texts = [json.dumps(text, ensure_ascii=False) for text in texts]
        return f"must be one of {', '.join(texts)}"

    if name == "str_length":
        if low is not None and high is not None:
            return f"must be {low} to {high} characters long"
        if high is not None:
            return f"must be at most {high} characters long"
        if low is not None:
            plural = "" if low == 1 else "s"
            return f"must be at least {low} character{plural} long"

    if name == "str_matches":
        return f"must match the pattern {statistics['pattern']}"
    if name == "contains_letter":
        return "must contain a letter"
    if name == "percentage_not_fraction":
        return "must be 0 or a percentage above 1 (97, not 0.97)"
    return None


def _plain_number(value: Any) -> Any:
    """Return a whole float as an int, so that a bound of 47.0 reads as 47."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _split_with_pandera(
    frame: pl.DataFrame,
    checked: pl.DataFrame,
    model: type[pa.DataFrameModel],
    default_reason: Reason,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    try:
        model.validate(checked, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return frame, empty_rejects()

    if cases["index"].null_count():
        # Never log failure_case itself, because it contains patient values.
        schema_level = cases.filter(pl.col("index").is_null()).select("column", "check")
        msg = f"frame does not match {model.__name__}: {schema_level.rows()}"
        raise ValueError(msg)

    columns = list(model.to_schema().columns)
    rank = {name: position for position, name in enumerate(columns)}
    first = (
        cases.with_columns(
            pl.col("column")
            .replace_strict(rank, default=len(columns), return_dtype=pl.Int32)
            .alias("_rank")
        )
        .sort("index", "_rank", "check_number", nulls_last=False, maintain_order=True)
        .unique("index", keep="first", maintain_order=True)
    )
    failed = first.select(pl.col("index").cast(pl.UInt32))
    valid = (
        frame.with_row_index("_index")
        .join(failed, left_on="_index", right_on="index", how="anti")
        .drop("_index")
    )
    return valid, _rejects(frame, first, model, default_reason)


def _rejects(
    frame: pl.DataFrame,
    first: pl.DataFrame,
    model: type[pa.DataFrameModel],
    default_reason: Reason,
) -> pl.DataFrame:
    """Turn each row's first failure case (index, column, check) into a reject."""
    reasons = first.select(
        pl.col("index").cast(pl.UInt32),
        pl.col("check")
        .replace_strict(
            {k: v.value for k, v in CHECK_REASONS.items()}, default=default_reason.value
        )
        .alias("reason"),
        pl.when(pl.col("check") == "diastolic_below_systolic")
        .then(pl.lit("diastolic"))
        .otherwise(pl.col("column"))
        .alias("field"),
        pl.col("check").replace(_check_details(model)).alias("detail"),
    )
    indexed = frame.select("partition", "offset", "value").with_row_index("index")
    return indexed.join(reasons, on="index", how="inner").select(REJECT_SCHEMA.keys())
