"""Parse Kafka message values into a typed Polars frame, routing bad ones to rejects.

Two steps, both vectorised:

1. ``decode``: bytes to a frame of text fields with one explicit schema
   (``pl.read_ndjson`` on the joined values; no type inference).
2. ``to_typed``: text fields to typed columns, with the documented tolerances
   (numeric strings, ``"130.0/85.0"``, epoch milliseconds, ISO-8601 with an
   offset). A value that cannot be read becomes a reject with a reason code.

``parse`` runs both steps with a fast path: JSON objects whose numbers and
booleans have their JSON types are read straight into typed columns
(:data:`TYPED_SCHEMA`), which is cheaper than reading every number as text
and parsing it again. Values that are not JSON objects are set apart first;
one object with a number or boolean in another type sends all the chunk's
objects to the text path. Both paths give the same rows.

Range, nullability and cross-field rules live in the Pandera input contract
(``contracts.models.InputReading``), applied after this module.
"""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import polars as pl

from contracts.models import CONSCIOUSNESS_LEVELS, SEXES
from etl.reasons import Reason
from etl.transform import collapse_whitespace

logger = logging.getLogger(__name__)

#: Every field of the message format, read as text. A JSON number or boolean
#: for a String field arrives as its text ("72" for 72.0, "true"); an object or
#: array arrives as its JSON text. Unknown fields are dropped.
TEXT_SCHEMA: Final = {
    "patient_id": pl.String,
    "name": pl.String,
    "age": pl.String,
    "blood_pressure": pl.String,
    "heart_rate": pl.String,
    "temperature": pl.String,
    "timestamp": pl.String,
    "spo2": pl.String,
    "respiratory_rate": pl.String,
    "consciousness": pl.String,
    "on_oxygen": pl.String,
    "sex": pl.String,
    "device_id": pl.String,
    "spo2_scale": pl.String,
}

#: The fields of :data:`TEXT_SCHEMA` in their JSON types. Polars' reader raises
#: when a number or boolean field contains another JSON type (a numeric
#: string, an ISO timestamp, a 20-digit integer), so a frame read with this
#: schema needs none of the text tolerances. String fields still take any JSON
#: value as its text, as in the text schema.
TYPED_SCHEMA: Final = {
    **TEXT_SCHEMA,
    **dict.fromkeys(
        (
            "age",
            "heart_rate",
            "temperature",
            "timestamp",
            "spo2",
            "respiratory_rate",
            "spo2_scale",
        ),
        pl.Float64,
    ),
    "on_oxygen": pl.Boolean,
}

#: Column that keeps the chunk order of records while the two paths of
#: :func:`parse` run apart.
ROW_INDEX: Final = "_row"

#: The frame that the Kafka source hands over: one row per record.
RAW_SCHEMA: Final = {
    "partition": pl.Int32,
    "offset": pl.Int64,
    "key": pl.Binary,
    "value": pl.Binary,
}

REJECT_SCHEMA: Final = {
    "partition": pl.Int32,
    "offset": pl.Int64,
    "reason": pl.String,
    "field": pl.String,
    "detail": pl.String,
    "value": pl.Binary,
}

#: Epoch values above this are milliseconds: 1e11 s is the year 5138, while
#: 1e11 ms is 1973-03-03, so the two ranges cannot be confused for readings.
EPOCH_MS_THRESHOLD: Final = 1e11

ISO_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.f%#z"
#: The ISO-8601 text that :data:`ISO_FORMAT` reads. RFC 3339 (section 5.6)
#: lets a space separate the date and the time, as Python's ``str(datetime)``
#: writes it, and allows a lower-case t and z.
ISO_8601_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)$"
)
#: ISO-8601 date and time with no offset, which :data:`ISO_FORMAT` rejects
#: because the instant it names depends on a time zone that it does not give.
ISO_8601_LOCAL_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?$"
)
#: ISO-8601 date and time to the minute, with or without an offset. ISO 8601
#: allows leaving out the seconds, but :data:`ISO_FORMAT` requires them.
ISO_8601_MINUTES_PATTERN: Final = (
    r"^(?<minutes>[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2})"
    r"(?<offset>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?$"
)
#: ASCII digits only: ``\d`` also matches other scripts' digits ("١٢٠"), which
#: the integer cast cannot read.
BLOOD_PRESSURE_PATTERN: Final = (
    r"^(?<systolic>[0-9]{1,3})(?:\.0+)?\s*/\s*(?<diastolic>[0-9]{1,3})(?:\.0+)?$"
)
#: Whole numbers are clipped to +-2**53 before the Int64 cast. A value like 1e30
#: would otherwise make the cast, and with it the batch, fail. The contract's
#: bounds are far inside the clip, so it still rejects the value as out of range.
_WHOLE_NUMBER_LIMIT: Final = 2**53
#: C0 and C1 control characters other than the whitespace that names may hold,
#: the byte order mark, and the explicit directional formatting characters of
#: Unicode Standard Annex #9 (U+202A to U+202E, U+2066 to U+2069). These last
#: make text display in another order than it is stored.
NAME_CONTROL_CHARACTER: Final = (
    r"[\x00-\x08\x0E-\x1F\x7F-\x9F\x{202A}-\x{202E}\x{2066}-\x{2069}\x{FEFF}]"
)
#: Control, format and line or paragraph separator characters, whitespace
#: controls included, which a patient id must not contain once stripped. An id
#: with one displays like the id without it, so two patients could look like one.
INVISIBLE_IN_ID: Final = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]"
#: Any surrogate escape, and a high surrogate escape directly followed by a low one.
_SURROGATE_ESCAPE: Final = r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
_SURROGATE_PAIR: Final = r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"

# Minimum segment size below which a failing read_ndjson call is retried value
# by value; bisection above it keeps the cost near n * log2(bad values).
_BISECT_LEAF: Final = 16


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECT_SCHEMA)


def make_rejects(
    frame: pl.DataFrame, reason: Reason, *, field: str | None = None, detail: str = ""
) -> pl.DataFrame:
    """Build reject rows for every row of ``frame`` (which has partition, offset, value)."""
    return frame.select(
        "partition",
        "offset",
        pl.lit(reason.value, pl.String).alias("reason"),
        pl.lit(field, pl.String).alias("field"),
        pl.lit(detail, pl.String).alias("detail"),
        "value",
    )


def decode(raw: pl.DataFrame, *, max_bytes: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Decode message values into text fields.

    Returns ``(text_df, rejects_df)``: ``text_df`` has partition, offset,
    value and the :data:`TEXT_SCHEMA` columns, one row per JSON object;
    ``rejects_df`` has every other message with its reason.
    """
    candidates, rejects = _precheck(raw, max_bytes=max_bytes)
    text, parse_rejects = _read_objects(candidates)
    return text, pl.concat([rejects, parse_rejects])


def parse(
    raw: pl.DataFrame,
    *,
    max_bytes: int,
    now: float,
    max_future_skew_s: float = 3600.0,
    min_timestamp: float = 946_684_800.0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Decode and type a chunk: the result of :func:`decode` then :func:`to_typed`.

    JSON objects that Polars reads with :data:`TYPED_SCHEMA` skip the text
    step (see :func:`_read_chunk`). The typed rows keep the order of ``raw``.
    """
    candidates, prechecked = _precheck(raw, max_bytes=max_bytes)
    candidates = candidates.with_row_index(ROW_INDEX)
    limits = {
        "now": now,
        "max_future_skew_s": max_future_skew_s,
        "min_timestamp": min_timestamp,
    }
    typed_parts: list[pl.DataFrame] = []
    rejects = [prechecked]

    for frame, read_rejects in _read_chunk(candidates):
        typed, type_rejects = to_typed(frame, **limits)
        typed_parts.append(typed)
        rejects.extend([read_rejects, type_rejects])

    if not typed_parts:
        typed, _ = to_typed(_empty_text(candidates), **limits)
        typed_parts.append(typed)
    typed = pl.concat(typed_parts)
    if len(typed_parts) > 1:
        typed = typed.sort(ROW_INDEX)
    return typed.drop(ROW_INDEX), pl.concat(rejects)


def _empty_text(candidates: pl.DataFrame) -> pl.DataFrame:
    return pl.concat(
        [candidates.clear(), pl.DataFrame(schema=TEXT_SCHEMA)], how="horizontal"
    )


def _precheck(
    raw: pl.DataFrame, *, max_bytes: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Reject tombstones, oversized and empty values; fold line breaks in the rest."""
    size = pl.col("value").bin.size()
    checks = raw.with_columns(
        pl.when(pl.col("value").is_null())
        .then(pl.lit(Reason.TOMBSTONE.value))
        .when(size > max_bytes)
        .then(pl.lit(Reason.TOO_LARGE.value))
        .when(size == 0)
        .then(pl.lit(Reason.INVALID_JSON.value))
        .alias("_reason")
    )
    rejects = [empty_rejects()]
    if checks["_reason"].null_count() < checks.height:
        rejects = [
            make_rejects(
                checks.filter(pl.col("_reason") == reason.value),
                reason,
                detail=detail,
            )
            for reason, detail in (
                (Reason.TOMBSTONE, "null value"),
                (Reason.TOO_LARGE, f"value larger than {max_bytes} bytes"),
                (Reason.INVALID_JSON, "empty value"),
            )
        ]
    candidates = checks.filter(pl.col("_reason").is_null()).drop("_reason")
    candidates, surrogate_rejects = _reject_lone_surrogates(candidates)
    candidates, newline_rejects = _fold_line_breaks(candidates)
    rejects.extend([surrogate_rejects, newline_rejects])
    return candidates, pl.concat(rejects)


def _reject_lone_surrogates(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Reject values with a string that has a lone UTF-16 surrogate escape (``"\\ud800"``).

    Such an escape stands for no Unicode character (RFC 8259, section 8.2).
    Polars reads a lone high surrogate as NUL, which would pass into a
    patient id unseen, and rejects a lone low one as unreadable. A value
    whose surrogate escapes all come in high-low pairs is let through at
    once. The others are decoded again by Python's parser, which joins valid
    pairs and leaves lone surrogates in the text.
    """
    has_escape = frame.select(
        pl.col("value").bin.contains(b"\\ud") | pl.col("value").bin.contains(b"\\uD")
    ).to_series()
    if not has_escape.any():
        return frame, empty_rejects()
    rows = has_escape.arg_true()
    try:
        text = frame["value"].gather(rows).cast(pl.String)
    except pl.exceptions.ComputeError:
        pass  # A value that is not UTF-8: Python checks every row with an escape.
    else:
        escapes = text.str.count_matches(_SURROGATE_ESCAPE)
        rows = rows.filter(escapes != 2 * text.str.count_matches(_SURROGATE_PAIR))
    findings: list[tuple[str | None, str] | None] = [None] * frame.height
    values = frame["value"].gather(rows).to_list()
    for row, value in zip(rows.to_list(), values, strict=True):
        findings[row] = _lone_surrogate(value)
    lone = pl.Series([finding is not None for finding in findings])
    if not lone.any():
        return frame, empty_rejects()
    found = [finding for finding in findings if finding is not None]
    rejects = frame.filter(lone).select(
        "partition",
        "offset",
        pl.lit(Reason.INVALID_JSON.value).alias("reason"),
        pl.Series("field", [field for field, _ in found], pl.String),
        pl.Series("detail", [detail for _, detail in found], pl.String),
        "value",
    )
    return frame.filter(~lone), rejects


class _Members(list[tuple[str, Any]]):
    """A JSON object as the list of its members, duplicate keys included."""


_LONE_SURROGATE: Final = (
    "lone UTF-16 surrogate escape (\\uD800 to \\uDFFF without its pair), "
    "which stands for no Unicode character"
)
_TOO_DEEP_TO_CHECK: Final = (
    "surrogate escape (\\uD800 to \\uDFFF) that may lack its pair, in JSON "
    "nested too deep to check"
)


def _lone_surrogate(value: bytes) -> tuple[str | None, str] | None:
    """Return (top-level field, detail) when a key or value has a lone surrogate, else None.

    Every member counts, a repeated key too: Python's parser would keep the
    last of two members with the same key and Polars' reader the first. A
    value that Python cannot parse is left to the reader, which gives it its
    reason code. A value nested too deep for Python is rejected without a
    field, because Polars reads a little deeper and would turn a lone high
    surrogate into NUL.
    """
    try:
        document = json.loads(value, object_pairs_hook=_Members)
    except RecursionError:
        return None, _TOO_DEEP_TO_CHECK
    except ValueError:
        return None
    if not isinstance(document, _Members):
        return None
    for key, item in document:
        if _has_lone_surrogate(key) or _has_lone_surrogate(item):
            return key.encode("utf-8", "backslashreplace").decode(), _LONE_SURROGATE
    return None


def _has_lone_surrogate(root: Any) -> bool:
    """Return whether a string at any depth of ``root`` has a lone surrogate.

    A loop, not recursion, because nesting may be deep.
    """
    pending = [root]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


def _fold_line_breaks(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Replace CR and LF by spaces in valid multi-line JSON, so values join as NDJSON.

    A raw line break can only be insignificant whitespace in valid JSON (inside
    a string it must be escaped), so the replacement keeps the meaning. Values
    with a raw break inside a string are invalid and rejected here.
    """
    has_break = frame.select(
        pl.col("value").bin.contains(b"\n") | pl.col("value").bin.contains(b"\r")
    ).to_series()
    if not has_break.any():
        return frame, empty_rejects()

    rows = has_break.arg_true()
    folded: list[bytes | None] = []
    for value in frame["value"].gather(rows).to_list():
        try:
            json.loads(value.decode("utf-8"))
        except (ValueError, RecursionError):
            # Not UTF-8 (json.loads would take UTF-16 bytes, which a byte
            # replacement corrupts), unreadable, or nested too deep for
            # Python to tell whether a break sits inside a string: rejected
            # with its reason below.
            folded.append(None)
        else:
            folded.append(value.replace(b"\r", b" ").replace(b"\n", b" "))
    # The folded values go back in their places: rows keep the chunk's order.
    values = frame["value"].clone().scatter(rows, pl.Series(folded, dtype=pl.Binary))
    broken = has_break & values.is_null()
    readable = frame.with_columns(values.alias("value")).filter(~broken)
    return readable, _classify_unreadable(frame.filter(broken))


def _read_objects(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read each value as one JSON object; bisect to isolate values Polars cannot read."""
    values: list[bytes] = frame["value"].to_list()
    good: list[int] = []
    bad: list[int] = []
    parts: list[pl.DataFrame] = []
    _bisect(values, 0, len(values), good, bad, parts)

    text = (
        pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema=TEXT_SCHEMA)
    )
    ordered = frame[good] if bad else frame
    text_df = pl.concat([ordered, text], how="horizontal")
    return text_df, _classify_unreadable(frame[bad])


def _bisect(
    values: list[bytes],
    start: int,
    stop: int,
    good: list[int],
    bad: list[int],
    parts: list[pl.DataFrame],
) -> None:
    if start >= stop:
        return
    frame = _try_read(values[start:stop])
    if frame is not None:
        good.extend(range(start, stop))
        parts.append(frame)
        return
    if stop - start <= _BISECT_LEAF:
        for index in range(start, stop):
            single = _try_read(values[index : index + 1])
            if single is None:
                bad.append(index)
            else:
                good.append(index)
                parts.append(single)
        return
    middle = (start + stop) // 2
    _bisect(values, start, middle, good, bad, parts)
    _bisect(values, middle, stop, good, bad, parts)


def _read_whole(candidates: pl.DataFrame) -> pl.DataFrame | None:
    """Read every value in one go, typed or else as text, or return None.

    Polars joins the values, with no Python object per value, and reads them
    in :data:`TYPED_SCHEMA`. When a field holds another JSON type (a numeric
    string, an ISO-8601 timestamp), it reads them as text and converts what
    it can (:func:`_typed_where_possible`). A value that is not UTF-8 or not
    a JSON object sends the chunk to the other reads of :func:`_read_chunk`.
    """
    if candidates.is_empty():
        return None
    joined = pl.col("value").cast(pl.String).str.join("\n").cast(pl.Binary)
    try:
        data = candidates.select(joined).item()
        frame = pl.read_ndjson(io.BytesIO(data), schema=TYPED_SCHEMA)
    except pl.exceptions.PolarsError as error:
        # Polars 2.1 reports a field of another JSON type as "cannot parse
        # '...' (string) as Float64", and invalid JSON or a value that is not
        # an object as "error parsing line". Only the first can pass the text
        # read, so the second skips it and saves a whole read. Other wording
        # in another Polars release costs time, never a wrong result.
        if "cannot parse" not in str(error):
            return None
        text = _try_read_bytes(data, candidates.height, TEXT_SCHEMA)
        return None if text is None else _typed_where_possible(text)
    return frame if frame.height == candidates.height else None


def _read_chunk(
    candidates: pl.DataFrame,
) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """Read the values of ``candidates`` into field columns, as (frame, rejects) groups.

    Polars first reads the whole chunk at once (:func:`_read_whole`). When
    that fails, orjson decodes each value once to set apart the values that
    are not JSON objects. The objects are then read in one go, typed or as
    text, and only the others take the smaller reads of :func:`_read_objects`.
    Many odd messages so cost one decode per value instead of many small reads.
    """
    if candidates.is_empty():
        return []
    whole = _read_whole(candidates)
    if whole is not None:
        return [(pl.concat([candidates, whole], how="horizontal"), empty_rejects())]
    values: list[bytes] = candidates["value"].to_list()
    objects, others = _split_json_objects(values)
    groups = []
    if objects:
        frame = candidates if not others else candidates[objects]
        groups.append(_read_objects_at_once(frame, [values[i] for i in objects]))
    if others:
        groups.append(_read_objects(candidates[others]))
    return groups


def _split_json_objects(values: list[bytes]) -> tuple[list[int], list[int]]:
    """Split the indexes of ``values`` into orjson-readable JSON objects and the rest."""
    objects: list[int] = []
    others: list[int] = []
    for index, value in enumerate(values):
        try:
            is_object = isinstance(orjson.loads(value), dict)
        except orjson.JSONDecodeError:
            is_object = False
        (objects if is_object else others).append(index)
    return objects, others


def _read_objects_at_once(
    frame: pl.DataFrame, values: list[bytes]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read ``values`` typed, else as text, in one read each; else take :func:`_read_objects`."""
    for schema in (TYPED_SCHEMA, TEXT_SCHEMA):
        read = _try_read(values, schema)
        if read is not None:
            if schema is TEXT_SCHEMA:
                read = _typed_where_possible(read)
            return pl.concat([frame, read], how="horizontal"), empty_rejects()
    # NOTE: reached only if orjson reads as an object a value that Polars cannot
    # read. No such value is known: both fail at 1024 levels and on 1e400.
    return _read_objects(frame)


def _typed_where_possible(text: pl.DataFrame) -> pl.DataFrame:
    """Give each number or boolean column of ``text`` its type when every value converts.

    A chunk read as text because a few values are strings ("76", an ISO-8601
    timestamp) so keeps the text steps of :func:`to_typed` for those fields
    only. A number column converts when each value reads as a number once
    stripped, as :func:`to_typed` reads it, and ``on_oxygen`` when each value
    is ``true`` or ``false``. Blank text is left to the text steps, which
    tell absent optional values from unreadable required ones.
    """
    converted = text.select(
        *(
            _text(field).cast(pl.Float64, strict=False)
            for field, dtype in TYPED_SCHEMA.items()
            if dtype == pl.Float64
        ),
        pl.col("on_oxygen").replace_strict(
            {"true": True, "false": False}, default=None, return_dtype=pl.Boolean
        ),
    )
    return text.with_columns(
        column
        for column in converted
        if column.null_count() == text[column.name].null_count()
    )


def _try_read(
    values: list[bytes], schema: dict[str, Any] = TEXT_SCHEMA
) -> pl.DataFrame | None:
    """Read values as NDJSON, or return None when any of them is unreadable."""
    return _try_read_bytes(b"\n".join(values), len(values), schema)


def _try_read_bytes(
    data: bytes, count: int, schema: dict[str, Any]
) -> pl.DataFrame | None:
    """Read ``count`` joined values as NDJSON, or return None when any is unreadable."""
    try:
        frame = pl.read_ndjson(io.BytesIO(data), schema=schema)
    except pl.exceptions.PolarsError:
        return None
    # Blank lines are skipped by the reader; a short frame means one was there.
    if frame.height != count:
        return None
    return frame


def _classify_unreadable(frame: pl.DataFrame) -> pl.DataFrame:
    """Give each value that Polars could not read its reason code."""
    if frame.is_empty():
        return empty_rejects()
    reasons: list[str] = []
    details: list[str] = []
    for value in frame["value"].to_list():
        reason, detail = _diagnose(value)
        reasons.append(reason.value)
        details.append(detail)
    return frame.select(
        "partition",
        "offset",
        pl.Series("reason", reasons, pl.String),
        pl.lit(None, pl.String).alias("field"),
        pl.Series("detail", details, pl.String),
        "value",
    )


#: JSON's names (RFC 8259) for the Python types that ``json.loads`` returns.
_JSON_TYPE_NAMES: Final = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


_STRICT_READER_DETAIL: Final = (
    "JSON the strict reader rejects (NaN, Infinity, huge number or deep nesting)"
)


def _diagnose(value: bytes) -> tuple[Reason, str]:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reason.NOT_UTF8, f"invalid UTF-8 byte at position {exc.start}"
    if not text.strip():
        return Reason.INVALID_JSON, "blank value"
    if text.startswith("\ufeff"):
        # RFC 8259, section 8.1: no byte order mark before networked JSON text.
        return Reason.INVALID_JSON, "starts with a byte order mark (U+FEFF)"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return (
            Reason.INVALID_JSON,
            f"{exc.msg}: line {exc.lineno} column {exc.colno}",
        )
    except RecursionError:
        return Reason.INVALID_JSON, "nesting too deep"
    except ValueError:
        # Python does not convert integers longer than sys.get_int_max_str_digits()
        # digits (4300 by default), which also exceed what Polars' reader accepts.
        return Reason.INVALID_JSON, _STRICT_READER_DETAIL
    # Python reads NaN and Infinity, which RFC 8259 does not allow. A huge
    # number such as 1e400 is valid JSON, which Python reads as infinity.
    if isinstance(document, float) and text.strip().lstrip("-")[:1] in ("N", "I"):
        return Reason.INVALID_JSON, "NaN or Infinity, which JSON does not allow"
    if not isinstance(document, dict):
        return (
            Reason.NOT_AN_OBJECT,
            f"JSON {_JSON_TYPE_NAMES[type(document)]}, expected an object",
        )
    # Python's parser is more lenient than Polars' (NaN, 1e400, deep nesting).
    return Reason.INVALID_JSON, _STRICT_READER_DETAIL


def _utc_text(seconds: float) -> str:
    """Return epoch ``seconds`` as ISO-8601 UTC, with microseconds when not whole."""
    timespec = "seconds" if float(seconds).is_integer() else "microseconds"
    moment = datetime.fromtimestamp(seconds, UTC).isoformat(timespec=timespec)
    return moment.replace("+00:00", "Z")


def _text(field: str) -> pl.Expr:
    return pl.col(field).str.strip_chars()


def _number(field: str, typed: frozenset[str]) -> pl.Expr:
    """Return ``field`` as Float64; ``typed`` names the fields read as JSON numbers."""
    if field in typed:
        return pl.col(field).cast(pl.Float64)
    return _text(field).cast(pl.Float64, strict=False)


def _present(field: str, typed: frozenset[str]) -> pl.Expr:
    """Return whether ``field`` carries a value.

    A blank string does not, in any field: the contract then rejects a
    required field as missing, and an optional one counts as absent.
    """
    if field in typed:
        return pl.col(field).is_not_null()
    return _text(field).str.len_bytes() > 0


def _unreadable_number(field: str, typed: frozenset[str]) -> pl.Expr:
    number = _number(field, typed)
    return _present(field, typed) & (number.is_null() | ~number.is_finite())


def _not_integral(field: str, typed: frozenset[str]) -> pl.Expr:
    number = _number(field, typed)
    return number.is_not_null() & (number != number.floor())


def _whole_number(field: str, typed: frozenset[str]) -> pl.Expr:
    """Return an integral ``field`` as Int64.

    Values beyond 2**53 are clipped there before the cast, which would fail on
    1e19; the contract then rejects them as out of range.
    """
    limit = float(_WHOLE_NUMBER_LIMIT)
    return _number(field, typed).clip(-limit, limit).cast(pl.Int64)


def _json_token_for(field: str, *, numbers_allowed: bool) -> pl.Expr:
    """True where ``field`` was sent as an object, array, boolean (or number) and not a string.

    Polars returns non-string JSON as its text, so the text alone cannot tell
    ``"[1]"`` from ``[1]``; the raw message decides. Both must agree, so a
    nested key of the same name cannot cause a false match on its own.
    """
    tokens = r"[\[{]|true\b|false\b" + ("" if numbers_allowed else r"|-?\d")
    # One regex per field: with a second str.contains for numbers, the check
    # cost about 1.5 times as much on fields of one to twenty characters.
    number = "" if numbers_allowed else r"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?$"
    looks_like = pl.col(field).str.contains(rf"^(?:[\[{{]|true$|false${number})")
    # The message is searched only where the text looks like a JSON token:
    # other rows are null here, and the regex skips nulls.
    suspect = pl.when(pl.col(field).is_not_null() & looks_like).then(pl.col("value"))
    key = _json_key_pattern(field)
    in_message = suspect.cast(pl.String).str.contains(rf"{key}\s*:\s*(?:{tokens})")
    return in_message.fill_null(False)


def _json_key_pattern(field: str) -> str:
    """Return a regex for ``field`` as a JSON object key, each character plain or escaped.

    JSON lets any character of a key be written as a ``\\uXXXX`` escape
    (RFC 8259, section 7), which Polars decodes, so ``"p\\u0061tient_id"`` is
    the key ``patient_id`` too.
    """
    parts = []
    for character in field:
        code = f"{ord(character):04x}"
        hex_digits = "".join(
            f"[{digit}{digit.upper()}]" if digit.isalpha() else digit for digit in code
        )
        parts.append(f"(?:{re.escape(character)}|\\\\u{hex_digits})")
    return '"' + "".join(parts) + '"'


def _blood_pressure() -> pl.Expr:
    """Return the systolic and diastolic text of ``blood_pressure`` as a struct.

    One capture-group regex (:data:`BLOOD_PRESSURE_PATTERN`) for every form.
    With Polars 2.1 it cost a third of splitting the plain ``"SYS/DIA"``
    form apart and merging the two results.
    """
    return _text("blood_pressure").str.extract_groups(BLOOD_PRESSURE_PATTERN)


def _epoch_seconds(typed: frozenset[str]) -> pl.Expr:
    """Read the timestamp as epoch seconds, epoch milliseconds or ISO-8601 with an offset."""
    number = _number("timestamp", typed)
    from_number = (
        pl.when(~number.is_finite())
        .then(None)
        .when(number.abs() > EPOCH_MS_THRESHOLD)
        .then(number / 1000)
        .otherwise(number)
    )
    if "timestamp" in typed:
        return from_number
    text = _text("timestamp")
    # chrono skips whitespace where the format has none ("06:13:20 Z"), so the
    # text must match the pattern first.
    iso = pl.when(text.str.contains(ISO_8601_PATTERN)).then(text)
    moment = _iso_datetime(iso)
    from_iso = (
        pl.when(_misplaced_leap_second(iso, moment))
        .then(None)
        .otherwise(moment.dt.epoch("us") / 1e6)
    )
    return pl.coalesce(from_number, from_iso)


def _misplaced_leap_second(iso: pl.Expr, moment: pl.Expr) -> pl.Expr:
    """Tell whether the ISO-8601 text ``iso`` has second 60 other than at a month's end.

    RFC 3339 (section 5.7) allows second 60 only for a leap second, which
    ends a UTC month (23:59:60Z, so 00:59:60+01:00 too). chrono reads it as
    second 0 of the next minute, so ``moment``, in UTC, is then the first
    second of a month.
    """
    month_start = (
        (moment.dt.day() == 1)
        & (moment.dt.hour() == 0)
        & (moment.dt.minute() == 0)
        & (moment.dt.second() == 0)
    )
    return (iso.str.slice(17, 2) == "60") & ~month_start


def _iso_datetime(date_time: pl.Expr, *suffix: pl.Expr) -> pl.Expr:
    """Parse ``date_time`` followed by ``suffix`` with :data:`ISO_FORMAT`, null where invalid.

    The date-time separator (a space or a lower-case t, as RFC 3339 allows)
    becomes the T that the format requires.
    """
    return pl.concat_str(
        date_time.str.slice(0, 10), pl.lit("T"), date_time.str.slice(11), *suffix
    ).str.to_datetime(ISO_FORMAT, time_zone="UTC", strict=False)


def _local_time(field: str, typed: frozenset[str]) -> pl.Expr:
    """Tell whether ``field`` is a date and time in ISO-8601 that only lacks its offset."""
    if field in typed:
        return pl.lit(False)
    text = _text(field)
    in_utc = _iso_datetime(text, pl.lit("Z"))
    local = (
        text.str.contains(ISO_8601_LOCAL_PATTERN)
        & in_utc.is_not_null()
        & ~_misplaced_leap_second(text, in_utc)
    )
    return local.fill_null(False)


def _iso_form(field: str, typed: frozenset[str]) -> pl.Expr:
    """Tell whether ``field`` has the form of :data:`ISO_8601_PATTERN`, valid or not."""
    if field in typed:
        return pl.lit(False)
    return _text(field).str.contains(ISO_8601_PATTERN).fill_null(False)


def _without_seconds(field: str, typed: frozenset[str], *, offset: bool) -> pl.Expr:
    """Tell whether ``field`` is a valid ISO-8601 date and time to the minute.

    With ``offset``, the text must end with ``Z`` or an offset. Without it,
    the text must end with the minutes, so it lacks its offset too.
    """
    if field in typed:
        return pl.lit(False)
    parts = _text(field).str.extract_groups(ISO_8601_MINUTES_PATTERN)
    sent_offset = parts.struct.field("offset")
    with_seconds = _iso_datetime(
        parts.struct.field("minutes"), pl.lit(":00"), sent_offset.fill_null("Z")
    )
    has_offset = sent_offset.is_not_null()
    return with_seconds.is_not_null() & (has_offset if offset else ~has_offset)


def _epoch_in_unit(
    per_second: float,
    typed: frozenset[str],
    *,
    now: float,
    max_future_skew_s: float,
    min_timestamp: float,
) -> pl.Expr:
    """Tell whether the timestamp is a number that, divided by ``per_second``, is a valid time.

    An epoch in microseconds or nanoseconds is above the milliseconds
    threshold, so it is read as milliseconds and lands far in the future.
    """
    number = _number("timestamp", typed)
    seconds = number / per_second
    return (
        number.is_finite()
        & (seconds >= min_timestamp)
        & (seconds <= now + max_future_skew_s)
    )


def _boolean(field: str, typed: frozenset[str]) -> pl.Expr:
    if field in typed:
        return pl.col(field)
    text = _text(field).str.to_lowercase()
    return (
        pl.when(text.is_in(["true", "1"]))
        .then(True)
        .when(_present(field, typed))
        .then(False)
    )


def _unreadable_boolean(field: str, typed: frozenset[str]) -> pl.Expr:
    if field in typed:
        return pl.lit(False)
    text = _text(field).str.to_lowercase()
    return _present(field, typed) & ~text.is_in(["true", "false", "1", "0"])


#: Checks that make a message unreadable as a reading, in the order they are
#: reported: (field, reason, detail, condition). The first true condition wins.
def _read_checks(
    typed: frozenset[str], *, now: float, max_future_skew_s: float, min_timestamp: float
) -> list[tuple[str, Reason, str, pl.Expr]]:
    seconds = pl.col("_seconds")
    bp = pl.col("_bp")
    limits = {
        "now": now,
        "max_future_skew_s": max_future_skew_s,
        "min_timestamp": min_timestamp,
    }
    # In a frame read with TYPED_SCHEMA the timestamp is a Float64 column, so
    # only a frame read as text can contain a JSON boolean, array or object there.
    timestamp_token = (
        pl.lit(False)
        if "timestamp" in typed
        else _json_token_for("timestamp", numbers_allowed=True)
    )
    return [
        (
            "patient_id",
            Reason.WRONG_TYPE,
            "expected a string",
            _json_token_for("patient_id", numbers_allowed=True),
        ),
        (
            "patient_id",
            Reason.OUT_OF_RANGE,
            "contains a control or invisible formatting character",
            _text("patient_id").str.contains(INVISIBLE_IN_ID),
        ),
        (
            "name",
            Reason.WRONG_TYPE,
            "expected a string",
            _json_token_for("name", numbers_allowed=False),
        ),
        (
            "name",
            Reason.INVALID_NAME,
            "contains a control or explicit bidirectional formatting character",
            pl.col("name").str.contains(NAME_CONTROL_CHARACTER),
        ),
        (
            "age",
            Reason.WRONG_TYPE,
            "expected a whole number of years",
            _unreadable_number("age", typed) | _not_integral("age", typed),
        ),
        (
            "blood_pressure",
            Reason.WRONG_TYPE,
            "expected a string 'SYS/DIA' of two whole numbers of 1 to 3 digits in mmHg, "
            "such as '120/80'",
            _present("blood_pressure", typed) & bp.struct.field("systolic").is_null(),
        ),
        (
            "heart_rate",
            Reason.WRONG_TYPE,
            "expected a number",
            _unreadable_number("heart_rate", typed),
        ),
        (
            "temperature",
            Reason.WRONG_TYPE,
            "expected a number",
            _unreadable_number("temperature", typed),
        ),
        (
            "timestamp",
            Reason.WRONG_TYPE,
            "expected a number or a string: epoch seconds, epoch milliseconds or "
            "ISO-8601 with an offset",
            timestamp_token,
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "ISO-8601 without an offset: add Z for UTC, or the offset such as +02:00",
            _local_time("timestamp", typed) & seconds.is_null(),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "ISO-8601 without seconds: write the time as HH:MM:SS",
            _without_seconds("timestamp", typed, offset=True) & seconds.is_null(),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "ISO-8601 without seconds or an offset: write the time as HH:MM:SS, "
            "then Z for UTC or the offset such as +02:00",
            _without_seconds("timestamp", typed, offset=False) & seconds.is_null(),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "ISO-8601 naming a date, time or offset that does not exist, such as "
            "2023-02-29, 24:00:00 or +25:00",
            _iso_form("timestamp", typed) & seconds.is_null(),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "expected epoch seconds, epoch milliseconds or ISO-8601 with an offset",
            _present("timestamp", typed) & seconds.is_null(),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            f"before the earliest accepted time, {_utc_text(min_timestamp)}",
            seconds < min_timestamp,
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "epoch microseconds: send epoch seconds or milliseconds",
            (seconds > now + max_future_skew_s) & _epoch_in_unit(1e6, typed, **limits),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            "epoch nanoseconds: send epoch seconds or milliseconds",
            (seconds > now + max_future_skew_s) & _epoch_in_unit(1e9, typed, **limits),
        ),
        (
            "timestamp",
            Reason.TIMESTAMP_INVALID,
            f"more than {max_future_skew_s:.0f} s in the future",
            seconds > now + max_future_skew_s,
        ),
        (
            "spo2",
            Reason.WRONG_TYPE,
            "expected a number",
            _unreadable_number("spo2", typed),
        ),
        (
            "respiratory_rate",
            Reason.WRONG_TYPE,
            "expected a number",
            _unreadable_number("respiratory_rate", typed),
        ),
        (
            "consciousness",
            Reason.WRONG_TYPE,
            f"expected a string, one of {', '.join(CONSCIOUSNESS_LEVELS)}",
            _json_token_for("consciousness", numbers_allowed=False),
        ),
        (
            "on_oxygen",
            Reason.WRONG_TYPE,
            "expected true or false",
            _unreadable_boolean("on_oxygen", typed),
        ),
        (
            "sex",
            Reason.WRONG_TYPE,
            f"expected a string, one of {', '.join(SEXES)}",
            _json_token_for("sex", numbers_allowed=False),
        ),
        (
            "spo2_scale",
            Reason.WRONG_TYPE,
            "expected 1 or 2",
            _unreadable_number("spo2_scale", typed)
            | _not_integral("spo2_scale", typed),
        ),
        (
            "device_id",
            Reason.WRONG_TYPE,
            "expected a string",
            _json_token_for("device_id", numbers_allowed=True),
        ),
    ]


def to_typed(
    text: pl.DataFrame,
    *,
    now: float,
    max_future_skew_s: float = 3600.0,
    min_timestamp: float = 946_684_800.0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Convert text fields to typed columns; unreadable values become rejects.

    ``now`` is the batch start as epoch seconds: timestamps later than
    ``now + max_future_skew_s`` or earlier than ``min_timestamp`` are rejected.
    Number and boolean fields of a frame read with :data:`TYPED_SCHEMA` are
    taken as they are.
    """
    typed_fields = frozenset(
        name
        for name, dtype in text.schema.items()
        if name in TEXT_SCHEMA and dtype != pl.String
    )
    with_parts = text.lazy().with_columns(
        _epoch_seconds(typed_fields).alias("_seconds"),
        _blood_pressure().alias("_bp"),
    )
    checks = _read_checks(
        typed_fields,
        now=now,
        max_future_skew_s=max_future_skew_s,
        min_timestamp=min_timestamp,
    )
    first_failure = pl.lit(None, pl.Int32)
    for index, (_, _, _, condition) in reversed(list(enumerate(checks))):
        first_failure = (
            pl.when(condition.fill_null(False))
            .then(pl.lit(index, pl.Int32))
            .otherwise(first_failure)
        )
    # One lazy query, so the checks share their subexpressions.
    staged = with_parts.with_columns(first_failure.alias("_failure")).collect()

    failures = staged["_failure"].null_count() < staged.height
    failed = staged.filter(pl.col("_failure").is_not_null()) if failures else None
    rejects = empty_rejects()
    if failed is not None:
        table = pl.DataFrame(
            {
                "_failure": pl.Series(range(len(checks)), dtype=pl.Int32),
                "reason": [reason.value for _, reason, _, _ in checks],
                "field": [field for field, _, _, _ in checks],
                "detail": [detail for _, _, detail, _ in checks],
            }
        )
        rejects = failed.join(table, on="_failure", how="left").select(
            REJECT_SCHEMA.keys()
        )

    accepted = staged.filter(pl.col("_failure").is_null()) if failures else staged
    typed = accepted.select(
        "partition",
        "offset",
        "value",
        _text("patient_id").alias("patient_id"),
        collapse_whitespace(_text("name")).alias("name"),
        _whole_number("age", typed_fields).alias("age"),
        pl.col("_bp").struct.field("systolic").cast(pl.Int64).alias("systolic"),
        pl.col("_bp").struct.field("diastolic").cast(pl.Int64).alias("diastolic"),
        _number("heart_rate", typed_fields).alias("heart_rate"),
        _number("temperature", typed_fields).alias("temperature"),
        (pl.col("_seconds") * 1e6)
        .round()
        .cast(pl.Int64)
        .cast(pl.Datetime("us", "UTC"))
        .alias("measured_at"),
        _number("spo2", typed_fields).alias("spo2"),
        _number("respiratory_rate", typed_fields).alias("respiratory_rate"),
        _text("consciousness").str.to_uppercase().alias("consciousness"),
        _boolean("on_oxygen", typed_fields).alias("on_oxygen"),
        _text("sex").str.to_uppercase().alias("sex"),
        _text("device_id").alias("device_id"),
        _whole_number("spo2_scale", typed_fields).alias("spo2_scale"),
        pl.col(f"^{ROW_INDEX}$"),
    )
    typed = typed.with_columns(
        pl.col(name).replace("", None)
        for name in ("patient_id", "name", "consciousness", "sex", "device_id")
    )
    return typed, rejects
