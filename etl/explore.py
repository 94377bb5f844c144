"""Load ``liste-patients``, its rejects and the batch reports from Redis into Polars.

The exploration notebooks use these helpers with the same settings as the CLI
(``VITALS_*`` environment variables), so they read whatever the batch wrote.
Nothing here imports Airflow or a plotting library.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import redis

from contracts.models import OutputRow
from etl.parse import RAW_SCHEMA
from etl.reports import COUNT_FIELDS, RATE_FIELDS, read_reports

if TYPE_CHECKING:
    from etl.config import Settings

#: Elements per LRANGE call, so a long list never comes back as one huge reply.
PAGE_SIZE: Final = 10_000

OUTPUT_SCHEMA: Final[dict[str, pl.DataType]] = {
    name: column.dtype.type for name, column in OutputRow.to_schema().columns.items()
}
"""Polars dtypes of a row of ``liste-patients``, in key order (from ``OutputRow``)."""

REJECT_FRAME_SCHEMA: Final[dict[str, pl.DataType]] = {
    "reason": pl.String(),
    "field": pl.String(),
    "detail": pl.String(),
    "topic": pl.String(),
    "partition": pl.Int32(),
    "offset": pl.Int64(),
    "payload": pl.String(),
    "payload_base64": pl.String(),
    "payload_truncated": pl.Boolean(),
    "value": pl.Binary(),
}
"""Columns of :func:`load_rejects`; ``value`` is the stored payload as bytes."""

REPORT_FRAME_SCHEMA: Final[dict[str, pl.DataType]] = {
    "id": pl.String(),
    "time": pl.Datetime("ms", "UTC"),
    "status": pl.String(),
    **{name: pl.Int64() for name in COUNT_FIELDS},
    **{name: pl.Float64() for name in RATE_FIELDS},
    "report": pl.String(),
}
"""Columns of :func:`load_reports`; ``report`` is the whole report as JSON text."""


class ExploreError(RuntimeError):
    """Redis is unreachable, or a key contains data in a form the batch does not write."""


@contextmanager
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """Open a client on the configured Redis and close it afterwards.

    Raises
    ------
    ExploreError
        When Redis is unreachable; the message names the URL (password masked).
    """
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        msg = (
            f"Redis at {settings.redis_url_redacted} is unreachable ({exc}); start "
            "the local stack with scripts/run-local.sh or set VITALS_REDIS_URL"
        )
        raise ExploreError(msg) from exc
    try:
        yield client
    finally:
        client.close()


def read_list(
    client: redis.Redis, key: str, *, limit: int | None = None
) -> list[bytes]:
    """Return the elements of the list ``key``: all, or the last ``limit`` (newest)."""
    if limit is not None and limit < 0:
        msg = f"limit must be 0 or more, got {limit}"
        raise ValueError(msg)
    length = int(client.llen(key))
    start = 0 if limit is None else max(0, length - limit)
    values: list[bytes] = []
    for first in range(start, length, PAGE_SIZE):
        last = min(first + PAGE_SIZE, length) - 1
        values.extend(client.lrange(key, first, last))  # type: ignore[arg-type]
    return values


def load_rows(settings: Settings, *, limit: int | None = None) -> pl.DataFrame:
    """Load ``liste-patients`` into a frame with the output contract's columns and dtypes.

    ``limit`` keeps the last ``limit`` rows, which are the most recently
    written. An empty or missing list gives an empty frame with the same
    columns.

    Examples
    --------
    >>> from etl.config import load_settings
    >>> rows = load_rows(load_settings(), limit=1000)  # doctest: +SKIP
    >>> rows.group_by("news2_risk").len()  # doctest: +SKIP
    """
    with redis_client(settings) as client:
        values = read_list(client, settings.redis_list_key, limit=limit)
    return rows_frame(values, key=settings.redis_list_key)


def rows_frame(values: list[bytes], *, key: str = "liste-patients") -> pl.DataFrame:
    """Parse JSON row payloads into a frame with :data:`OUTPUT_SCHEMA`."""
    if not values:
        return pl.DataFrame(schema=OUTPUT_SCHEMA)
    try:
        return pl.read_ndjson(io.BytesIO(b"\n".join(values)), schema=OUTPUT_SCHEMA)
    except pl.exceptions.PolarsError as exc:
        msg = f"{key} holds an element that is not a JSON row: {exc}"
        raise ExploreError(msg) from exc


def load_rejects(settings: Settings, *, limit: int | None = None) -> pl.DataFrame:
    """Load the rejects list into a frame with :data:`REJECT_FRAME_SCHEMA`.

    ``value`` is the stored payload as bytes (decoded from base64 where the
    value was not UTF-8), or null for a tombstone. ``limit`` keeps the newest.
    """
    with redis_client(settings) as client:
        values = read_list(client, settings.redis_rejects_key, limit=limit)
    return rejects_frame(values)


def rejects_frame(values: list[bytes]) -> pl.DataFrame:
    """Parse JSON reject payloads into a frame with :data:`REJECT_FRAME_SCHEMA`."""
    records = [_reject_record(json.loads(value)) for value in values]
    return pl.DataFrame(records, schema=REJECT_FRAME_SCHEMA, orient="row")


def _reject_record(document: dict[str, Any]) -> tuple[Any, ...]:
    source = document.get("source") or {}
    payload = document.get("payload")
    encoded = document.get("payload_base64")
    value: bytes | None = None
    if payload is not None:
        value = payload.encode("utf-8")
    elif encoded is not None:
        value = base64.b64decode(encoded)
    return (
        document.get("reason"),
        document.get("field"),
        document.get("detail"),
        source.get("topic"),
        source.get("partition"),
        source.get("offset"),
        payload,
        encoded,
        document.get("payload_truncated"),
        value,
    )


def load_reports(settings: Settings, *, last: int | None = None) -> pl.DataFrame:
    """Load the batch reports stream into a frame, oldest first (:data:`REPORT_FRAME_SCHEMA`)."""
    with redis_client(settings) as client:
        entries = read_reports(client, settings.redis_reports_key, last=last)
    records = [
        {**entry.to_dict(), "time": entry.time, "report": json.dumps(entry.report)}
        for entry in entries
    ]
    return pl.DataFrame(records, schema=REPORT_FRAME_SCHEMA)


def reject_reasons_by_run(reports: pl.DataFrame) -> pl.DataFrame:
    """Return one row per (report, reason) with the count, from :func:`load_reports`.

    Runs without rejects have no row; pivot on ``reason`` to chart them side by side.
    """
    schema: dict[str, pl.DataType] = {
        "id": pl.String(),
        "time": pl.Datetime("ms", "UTC"),
        "reason": pl.String(),
        "count": pl.Int64(),
    }
    records = []
    for ident, moment, text in reports.select("id", "time", "report").iter_rows():
        counts = json.loads(text).get("rejected_by_reason") or {}
        for reason, amount in sorted(counts.items()):
            records.append(
                {"id": ident, "time": moment, "reason": reason, "count": amount}
            )
    return pl.DataFrame(records, schema=schema)


def replay_rejects(
    rejects: pl.DataFrame, settings: Settings, *, now: float | None = None
) -> pl.DataFrame:
    """Run the stored payloads through the batch's parsing and contracts again.

    Returns ``rejects`` with three more columns: ``replayed`` ("rejected",
    "accepted" or "not replayed"), ``replayed_reason`` and ``same_reason``.
    A payload that was cut to fit the rejects list (``payload_truncated``)
    cannot be replayed. Checks that depend on the clock (the timestamp window)
    use ``now``, by default the current time, so an old reading may replay
    differently.
    """
    from etl.pipeline import process_chunk

    now = time.time() if now is None else now
    indexed = rejects.with_row_index("_index")
    truncated = pl.col("payload_truncated").fill_null(False)
    # Fresh offsets: the same (partition, offset) may appear under two topics,
    # and process_chunk keeps only the first record of a repeated offset.
    raw = indexed.filter(~truncated).select(
        pl.lit(0, pl.Int32).alias("partition"),
        pl.col("_index").cast(pl.Int64).alias("offset"),
        pl.lit(None, pl.Binary).alias("key"),
        pl.col("value"),
    )
    chunk, _ = process_chunk(
        raw.select(RAW_SCHEMA.keys()),
        settings,
        topic="replay",
        now=now,
        expected={0: None},
    )
    replayed = rejects_frame(chunk.rejects["payload"].to_list()).select(
        pl.col("offset").cast(pl.UInt32).alias("_index"),
        pl.col("reason").alias("replayed_reason"),
    )
    outcome = (
        pl.when(truncated)
        .then(pl.lit("not replayed"))
        .when(pl.col("replayed_reason").is_null())
        .then(pl.lit("accepted"))
        .otherwise(pl.lit("rejected"))
    )
    return (
        indexed.join(replayed, on="_index", how="left")
        .with_columns(
            outcome.alias("replayed"),
            pl.when(truncated)
            .then(None)
            .otherwise((pl.col("replayed_reason") == pl.col("reason")).fill_null(False))
            .alias("same_reason"),
        )
        .sort("_index")
        .drop("_index")
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Return ``VITALS_*`` variables that rebuild ``settings`` in another process.

    Secrets are included in clear text: pass the result to a child process
    (a notebook kernel, a subprocess), never print or log it.
    """
    from etl.config import ENV_PREFIX

    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = text
    return env
