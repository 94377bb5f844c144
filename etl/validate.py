"""Apply the Pandera contracts and turn their failure cases into rejects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import polars as pl
from pandera.errors import SchemaErrors

from etl.parse import REJECT_SCHEMA, empty_rejects
from etl.reasons import Reason

if TYPE_CHECKING:
    import pandera.polars as pa

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
    checked = frame.drop(
        [name for name in carry if name not in model.to_schema().columns]
    )
    try:
        model.validate(checked, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return frame, empty_rejects()

    if cases["index"].null_count():
        # Never log failure_case itself: it holds patient values.
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
        .sort("index", "_rank")
        .unique("index", keep="first", maintain_order=True)
    )
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
        pl.col("check")
        .replace({"not_nullable": "required field is null or absent"})
        .alias("detail"),
    )
    indexed = frame.select("partition", "offset", "value").with_row_index("index")
    rejects = indexed.join(reasons, on="index", how="inner").select(
        REJECT_SCHEMA.keys()
    )
    valid = (
        frame.with_row_index("_index")
        .join(reasons, left_on="_index", right_on="index", how="anti")
        .drop("_index")
    )
    return valid, rejects
