"""The fast paths of parsing, validation and the drain give what the slow paths give."""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pandera.polars as pa
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.models import InputReading, OutputRow
from etl import parse as parse_module
from etl.parse import (
    TEXT_SCHEMA,
    _try_read,
    _typed_where_possible,
    decode,
    parse,
    to_typed,
)
from etl.reasons import Reason
from etl.source import Prefetcher, SourceError, _rare_gc
from etl.transform import transform
from etl.validate import (
    _check_details,
    _check_sentence,
    _split_with_pandera,
    split_valid,
)
from tests.conftest import encode, reading
from tests.unit.test_parse import NOW, json_scalars, raw_frame

CARRY = ("partition", "offset", "value")


def slow_parse(values: list[bytes | None]) -> tuple[pl.DataFrame, pl.DataFrame]:
    text, decode_rejects = decode(raw_frame(values), max_bytes=65_536)
    typed, type_rejects = to_typed(text, now=NOW)
    return typed, pl.concat([decode_rejects, type_rejects])


def sorted_rejects(rejects: pl.DataFrame) -> list[tuple[Any, ...]]:
    return sorted(rejects.select("offset", "reason", "field").rows())


@pytest.mark.parametrize(
    "values",
    [
        # Every message in JSON types: the whole chunk takes the typed read.
        pytest.param(
            [encode(reading(patient_id=f"P{i}")) for i in range(40)], id="all-typed"
        ),
        # Tolerances in the middle: those segments take the text path.
        pytest.param(
            [encode(reading(patient_id=f"P{i}")) for i in range(300)]
            + [encode(reading(age="42", timestamp="2024-06-10T08:13:20+02:00"))]
            + [encode(reading(patient_id=f"Q{i}", on_oxygen="1")) for i in range(300)],
            id="mixed",
        ),
        pytest.param(
            [encode(reading()), b"\xff{}", None, b"{", encode(reading(age=1e19))],
            id="with-rejects",
        ),
        # Strings in number fields: the columns that all convert become typed.
        pytest.param(
            [encode(reading(patient_id=f"P{i}", spo2=97)) for i in range(20)]
            + [
                encode(reading(age=" 42 ", spo2="", on_oxygen="true")),
                encode(reading(heart_rate="NaN", spo2=" ")),
                encode(reading(temperature="37.2", on_oxygen=True)),
                encode(reading(timestamp="1718000000", respiratory_rate="18")),
                encode(reading(age="", spo2_scale="2")),
            ],
            id="strings-in-number-fields",
        ),
    ],
)
def test_parse_matches_text_path(values: list[bytes | None]) -> None:
    typed, rejects = parse(raw_frame(values), max_bytes=65_536, now=NOW)
    expected_typed, expected_rejects = slow_parse(values)
    assert typed.equals(expected_typed)
    assert sorted_rejects(rejects) == sorted_rejects(expected_rejects)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                key: json_scalars
                for key in (
                    "age",
                    "heart_rate",
                    "timestamp",
                    "spo2",
                    "on_oxygen",
                    "name",
                )
            },
        ).map(lambda extra: encode(reading(**extra))),
        max_size=12,
    )
)
def test_parse_matches_text_path_on_mutations(values: list[bytes]) -> None:
    typed, rejects = parse(raw_frame(list(values)), max_bytes=65_536, now=NOW)
    expected_typed, expected_rejects = slow_parse(list(values))
    assert typed.equals(expected_typed)
    assert sorted_rejects(rejects) == sorted_rejects(expected_rejects)


#: Patient ids and names that each read check of to_typed reacts to, sent
#: several times in one chunk as a monitor sends them.
ODD_IDS = st.sampled_from(
    ["PT-1", " PT-2 ", "PT\u200b3", "[1]", "", 42, [1], True, None]
)
ODD_NAMES = st.sampled_from(
    [
        *("Jean Martin", "Jean  Martin", " Anne\tMorel ", "Jean\u202eMartin"),
        *("Ana\x07", "", " ", "true", "17", 42, True, ["a"], None),
    ]
)


@settings(max_examples=60)
@given(
    pool=st.lists(st.tuples(ODD_IDS, ODD_NAMES), min_size=1, max_size=3),
    picks=st.lists(st.integers(0, 2), min_size=2, max_size=20),
)
def test_parse_repeated_values_match_rows_alone(
    pool: list[tuple[Any, Any]], picks: list[int]
) -> None:
    """A chunk whose ids and names repeat gives each row what parsing it alone gives."""
    values: list[bytes | None] = []
    for pick in picks:
        patient_id, name = pool[pick % len(pool)]
        values.append(encode(reading(patient_id=patient_id, name=name)))
    raw = raw_frame(values)

    typed, rejects = parse(raw, max_bytes=65_536, now=NOW)
    alone = [
        parse(raw.slice(row, 1), max_bytes=65_536, now=NOW)
        for row in range(len(values))
    ]

    assert typed.equals(pl.concat([rows for rows, _ in alone]))
    expected_rejects = pl.concat([found for _, found in alone])
    columns = ("offset", "reason", "field", "detail")
    assert sorted(rejects.select(columns).rows()) == sorted(
        expected_rejects.select(columns).rows()
    )


def test_typed_where_possible_converts_the_other_columns() -> None:
    """One numeric string leaves only its own field to the text steps."""
    values = [encode(reading(patient_id=f"P{i}")) for i in range(10)]
    values.append(encode(reading(age="42", on_oxygen=False)))
    text = _try_read(values, TEXT_SCHEMA)
    assert text is not None

    typed = _typed_where_possible(text)

    assert typed.schema["age"] == pl.Float64
    assert typed.schema["heart_rate"] == pl.Float64
    assert typed.schema["on_oxygen"] == pl.Boolean
    assert typed["age"][10] == 42.0


def test_parse_reads_objects_with_iso_timestamps_whole() -> None:
    """Valid objects with ISO-8601 timestamps are read whole, with no decode per value."""
    values: list[bytes | None] = [
        encode(reading(patient_id=f"P{i}", timestamp="2024-06-10T08:13:20+02:00"))
        for i in range(30)
    ]
    with mock.patch("etl.parse._split_json_objects", side_effect=AssertionError):
        typed, rejects = parse(raw_frame(values), max_bytes=65_536, now=NOW)

    assert typed.height == 30
    assert rejects.is_empty()
    assert typed["measured_at"].dt.epoch("s").unique().to_list() == [1_718_000_000]


def test_read_whole_skips_text_read_on_invalid_json() -> None:
    """Invalid JSON fails the text read too, so the chunk goes to orjson at once."""
    values: list[bytes | None] = [
        encode(reading(patient_id=f"P{i}")) for i in range(10)
    ]
    values.append(b'{"patient_id": "P10", "na')
    with mock.patch(
        "etl.parse._try_read_bytes", wraps=parse_module._try_read_bytes
    ) as reads:
        typed, rejects = parse(raw_frame(values), max_bytes=65_536, now=NOW)

    assert typed.height == 10
    assert rejects["reason"].to_list() == [Reason.INVALID_JSON.value]
    whole_reads = [call for call in reads.call_args_list if call.args[1] == 11]
    assert whole_reads == []


def test_typed_where_possible_leaves_blank_and_odd_columns() -> None:
    values = [
        encode(reading(spo2="", on_oxygen="1")),
        encode(reading(spo2=97, timestamp="2024-06-10T08:13:20+02:00")),
    ]
    text = _try_read(values, TEXT_SCHEMA)
    assert text is not None

    typed = _typed_where_possible(text)

    assert typed.schema["spo2"] == pl.String
    assert typed.schema["on_oxygen"] == pl.String
    assert typed.schema["timestamp"] == pl.String
    assert typed.schema["age"] == pl.Float64


def typed_readings() -> pl.DataFrame:
    values = [encode(reading(patient_id=f"P{i}", spo2=97)) for i in range(8)]
    typed, _ = parse(raw_frame(values), max_bytes=65_536, now=NOW)
    return typed


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        pytest.param("age", 140, Reason.OUT_OF_RANGE, id="age-out-of-range"),
        pytest.param("systolic", None, Reason.MISSING_FIELD, id="required-null"),
        pytest.param(
            "temperature", math.nan, Reason.MISSING_FIELD, id="nan-is-missing"
        ),
        pytest.param(
            "diastolic", 200, Reason.DIASTOLIC_NOT_BELOW_SYSTOLIC, id="diastolic"
        ),
        pytest.param("name", "1234", Reason.INVALID_NAME, id="no-letter"),
        pytest.param("spo2", 101.0, Reason.OUT_OF_RANGE, id="nullable-out-of-range"),
        pytest.param("sex", "X", Reason.OUT_OF_RANGE, id="not-in-set"),
    ],
)
def test_split_valid_matches_pandera(column: str, value: Any, reason: Reason) -> None:
    frame = typed_readings()
    # Rows 1 and 4 get the bad value; the others stay valid.
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()).is_in([1, 4]))
        .then(pl.lit(value, frame.schema[column]))
        .otherwise(pl.col(column))
        .alias(column)
    )
    checked = frame.drop("value")

    valid, rejects = split_valid(frame, InputReading, carry=CARRY)
    expected_valid, expected_rejects = _split_with_pandera(
        frame, checked, InputReading, Reason.OUT_OF_RANGE
    )

    assert valid.equals(expected_valid)
    assert rejects.sort("offset").equals(expected_rejects.sort("offset"))
    assert set(rejects["reason"].to_list()) == {reason.value}
    assert rejects["offset"].to_list() == [1, 4]


#: Values that break the input contract, by column: out of range, null, NaN,
#: infinite, too long, not in the set, and a diastolic not below the systolic.
BAD_INPUT_VALUES: dict[str, list[Any]] = {
    "patient_id": ["", "P" * 65, None],
    "name": ["1234", "x" * 201, None],
    "age": [-1, 131, None],
    "systolic": [10, 400, None],
    "diastolic": [0, 260, 200, None],
    "heart_rate": [-1.0, 400.0, math.nan, None],
    "temperature": [10.0, 50.0, math.nan, math.inf],
    "spo2": [0.97, 101.0, -1.0, math.nan],
    "respiratory_rate": [-1.0, 101.0, -math.inf],
    "consciousness": ["X", ""],
    "sex": ["Q"],
    "device_id": ["d" * 129],
    "spo2_scale": [3],
}

#: The same for the output row.
BAD_OUTPUT_VALUES: dict[str, list[Any]] = {
    "patient_id": ["", None],
    "first_name": ["", None],
    "last_name": [""],
    "age": [131, None],
    "blood_pressure": ["1/2", "120-80"],
    "blood_pressure_status": ["Bad"],
    "heart_rate": [400.0, math.nan],
    "timestamp": ["2024-06-10", None],
    "systolic": [10],
    "diastolic": [0, 260],
    "spo2": [101.0, math.nan],
    "news2_score": [21, -1],
    "news2_risk": ["Unknown", None],
    "rule_set": ["other"],
}


def changed_rows(
    frame: pl.DataFrame, bad_values: dict[str, list[Any]], changes: list[dict[str, int]]
) -> pl.DataFrame:
    """Return ``frame`` with the bad value that ``changes`` picks for each row and column."""
    rows = frame.to_dicts()
    for row, row_changes in zip(rows, changes, strict=True):
        for column, choice in row_changes.items():
            values = bad_values[column]
            row[column] = values[choice % len(values)]
    return pl.DataFrame(rows, schema=frame.schema)


def changes_of(
    bad_values: dict[str, list[Any]],
) -> st.SearchStrategy[list[dict[str, int]]]:
    return st.lists(
        st.dictionaries(
            st.sampled_from(sorted(bad_values)),
            st.integers(min_value=0, max_value=3),
            max_size=4,
        ),
        min_size=8,
        max_size=8,
    )


def assert_split_as_pandera(
    frame: pl.DataFrame, model: Any, default_reason: Reason
) -> None:
    valid, rejects = split_valid(
        frame, model, carry=CARRY, default_reason=default_reason
    )
    checked = frame.drop(
        [name for name in CARRY if name not in model.to_schema().columns]
    )
    expected_valid, expected_rejects = _split_with_pandera(
        frame, checked, model, default_reason
    )

    assert valid.equals(expected_valid)
    assert rejects.sort("offset").equals(expected_rejects.sort("offset"))


@settings(max_examples=60, deadline=None)
@given(changes_of(BAD_INPUT_VALUES))
def test_split_valid_names_input_failures_as_pandera(
    changes: list[dict[str, int]],
) -> None:
    """Rows with several bad columns get the reject that Pandera's first failure gives."""
    frame = changed_rows(typed_readings(), BAD_INPUT_VALUES, changes)
    assert_split_as_pandera(frame, InputReading, Reason.OUT_OF_RANGE)


@settings(max_examples=40, deadline=None)
@given(changes_of(BAD_OUTPUT_VALUES))
def test_split_valid_names_output_failures_as_pandera(
    changes: list[dict[str, int]],
) -> None:
    frame = changed_rows(output_rows(), BAD_OUTPUT_VALUES, changes)
    assert_split_as_pandera(frame, OutputRow, Reason.OUTPUT_CONTRACT)


def output_rows() -> pl.DataFrame:
    readings = typed_readings()
    derived = transform(
        readings.drop("value"), topic="vitals", rule_set="acc_aha_2017", time_zone="UTC"
    )
    return pl.concat([derived, readings.select(CARRY)], how="horizontal")


def test_split_valid_all_valid_returns_frame() -> None:
    frame = typed_readings()
    valid, rejects = split_valid(frame, InputReading, carry=CARRY)
    assert valid.equals(frame)
    assert rejects.is_empty()


class FakeSource:
    """A source whose drain yields the given frames, then raises or never ends."""

    def __init__(self, frames: list[pl.DataFrame], error: Exception | None) -> None:
        self.frames = frames
        self.error = error
        self.stop: threading.Event | None = None

    def chunks(self, **options: Any) -> Iterator[pl.DataFrame]:
        self.stop = options["stop"]
        yield from self.frames
        if self.error is not None:
            raise self.error
        while not self.stop.is_set():
            yield self.frames[-1]


def test_prefetcher_keeps_order_and_raises_drain_error() -> None:
    frames = [pl.DataFrame({"n": [i]}) for i in range(5)]
    prefetcher = Prefetcher(
        FakeSource(frames, SourceError("broker lost")),  # type: ignore[arg-type]
        chunk_size=1,
        max_records=10,
        deadline=0.0,
    )
    seen = []
    with pytest.raises(SourceError, match="broker lost"):
        for frame in prefetcher:
            seen.append(frame["n"].item())
    prefetcher.close()
    assert seen == [0, 1, 2, 3, 4]


def test_prefetcher_close_stops_endless_drain() -> None:
    source = FakeSource([pl.DataFrame({"n": [1]})], None)
    prefetcher = Prefetcher(
        source,  # type: ignore[arg-type]
        chunk_size=1,
        max_records=10,
        deadline=0.0,
    )
    first = next(iter(prefetcher))
    prefetcher.close()
    assert first["n"].item() == 1
    assert source.stop is not None
    assert source.stop.is_set()


def test_rare_gc_restores_thresholds() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError, match="inside"), _rare_gc():
        assert gc.get_threshold()[0] >= 100_000
        raise RuntimeError("inside")
    assert gc.get_threshold() == before


def test_split_valid_diastolic_detail_is_sentence() -> None:
    frame = typed_readings().with_columns(pl.lit(200, pl.Int64).alias("diastolic"))

    _, rejects = split_valid(frame, InputReading, carry=CARRY)

    assert set(rejects["field"].to_list()) == {"diastolic"}
    assert set(rejects["detail"].to_list()) == {"diastolic must be below systolic"}


@pytest.mark.parametrize(
    ("column", "value", "detail"),
    [
        ("age", 200, "must be at most 130"),
        ("heart_rate", -1.0, "must be at least 0"),
        ("temperature", 50.0, "must be at most 47"),
        ("temperature", 10.0, "must be at least 14.2"),
        ("systolic", 20, "must be above 20"),
        ("consciousness", "Z", "must be one of A, C, V, P, U"),
        ("patient_id", "P" * 80, "must be 1 to 64 characters long"),
        ("device_id", "d" * 200, "must be at most 128 characters long"),
        ("name", "1234", "must contain a letter"),
    ],
)
def test_split_valid_range_detail_is_sentence(
    column: str, value: Any, detail: str
) -> None:
    frame = typed_readings()
    frame = frame.with_columns(pl.lit(value, frame.schema[column]).alias(column))

    _, rejects = split_valid(frame, InputReading, carry=CARRY)

    assert set(rejects["field"].to_list()) == {column}
    assert set(rejects["detail"].to_list()) == {detail}


@pytest.mark.parametrize("model", [InputReading, OutputRow])
def test_every_contract_check_has_sentence(model: Any) -> None:
    schema = model.to_schema()
    checks = [
        *(check for column in schema.columns.values() for check in column.checks),
        *schema.checks,
    ]

    details = _check_details(model)

    for check in checks:
        assert details[check.error or check.name] != (check.error or check.name)


@pytest.mark.parametrize(
    ("check", "sentence"),
    [
        (pa.Check.in_range(1, 5), "must be from 1 to 5"),
        (pa.Check.in_range(1, 5, include_max=False), None),
        (pa.Check.less_than(3), "must be below 3"),
        (pa.Check.str_length(min_value=1), "must be at least 1 character long"),
        (pa.Check.str_length(min_value=2), "must be at least 2 characters long"),
        (pa.Check.str_length(exact_value=4), None),
        (pa.Check.str_matches("^a$"), "must match the pattern ^a$"),
        (pa.Check.isin([1.0, 2.5]), "must be one of 1, 2.5"),
        (pa.Check.isin(["a, b", ""]), 'must be one of "a, b", ""'),
        (pa.Check.isin({"M", "F"}), "must be one of F, M"),
    ],
)
def test_check_sentence_for_builtin_checks(check: Any, sentence: str | None) -> None:
    assert _check_sentence(check.name, check.statistics) == sentence


def test_shared_check_name_keeps_pandera_form() -> None:
    class Scores(pa.DataFrameModel):
        closed: float = pa.Field(in_range={"min_value": 1, "max_value": 5})
        half_open: float = pa.Field(
            in_range={"min_value": 1, "max_value": 5, "include_max": False}
        )

    details = _check_details(Scores)

    assert "in_range(1, 5)" not in details
    assert details["not_nullable"] == "required field is null, blank or absent"
