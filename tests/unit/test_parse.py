"""Parsing and input contract: tolerances, reason codes, and the accounting invariant."""

from __future__ import annotations

import base64
import json
import unicodedata
from datetime import datetime
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl.cohort import REQUIRED_FIELDS
from etl.config import load_settings
from etl.generate import iter_readings
from etl.parse import (
    RAW_SCHEMA,
    _typed_where_possible,
    _utc_text,
    decode,
    parse,
    to_typed,
)
from etl.pipeline import process_chunk
from etl.reasons import Reason
from tests.conftest import case_value, encode, load_cases, reading

NOW = 1_718_000_600.0
SETTINGS = load_settings()


def raw_frame(values: list[bytes | None], *, partition: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "partition": [partition] * len(values),
            "offset": list(range(len(values))),
            "key": [b"k"] * len(values),
            "value": values,
        },
        schema=RAW_SCHEMA,
    )


def run_chunk(values: list[bytes | None]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Process values as one chunk; return (rows, rejects) with decoded payloads."""
    chunk, _ = process_chunk(
        raw_frame(values), SETTINGS, topic="vitals", now=NOW, expected={0: None}
    )
    return chunk.rows, chunk.rejects


def rows_of(values: list[bytes | None]) -> list[dict[str, Any]]:
    rows, _ = run_chunk(values)
    return [json.loads(payload) for payload in rows["payload"].to_list()]


def rejects_of(values: list[bytes | None]) -> list[dict[str, Any]]:
    _, rejects = run_chunk(values)
    return [json.loads(payload) for payload in rejects["payload"].to_list()]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # Numeric strings are read as numbers.
        pytest.param(
            {"age": "42", "heart_rate": "72"},
            {"age": 42, "heart_rate": 72.0},
            id="numeric-strings",
        ),
        # Integral decimals in the pressure and for whole-number fields.
        pytest.param(
            {"blood_pressure": "130.0/85.0", "heart_rate": 72.0},
            {"blood_pressure": "130/85", "heart_rate": 72.0},
            id="integral-decimals",
        ),
        pytest.param(
            {"blood_pressure": " 130 / 85 "},
            {"blood_pressure": "130/85"},
            id="spaces-around-slash",
        ),
        pytest.param({"age": 42.0}, {"age": 42}, id="integral-age"),
        pytest.param(
            {"temperature": 37}, {"temperature": 37.0}, id="integer-temperature"
        ),
        pytest.param(
            {"timestamp": 1718000000123},
            {"timestamp": "2024-06-10T06:13:20.123+00:00"},
            id="epoch-ms",
        ),
        pytest.param(
            {"timestamp": "2024-06-10T08:13:20+02:00"},
            {"timestamp": "2024-06-10T06:13:20.000+00:00"},
            id="iso-offset",
        ),
        pytest.param(
            {"timestamp": "2024-06-10T06:13:20.5Z"},
            {"timestamp": "2024-06-10T06:13:20.500+00:00"},
            id="iso-z",
        ),
        pytest.param(
            {"timestamp": "2024-06-10 08:13:20.25+02:00"},
            {"timestamp": "2024-06-10T06:13:20.250+00:00"},
            id="iso-space-separator",
        ),
        pytest.param(
            {"timestamp": "2024-06-10t06:13:20z"},
            {"timestamp": "2024-06-10T06:13:20.000+00:00"},
            id="iso-lower-case",
        ),
        pytest.param(
            {"timestamp": "1718000000"},
            {"timestamp": "2024-06-10T06:13:20.000+00:00"},
            id="epoch-string",
        ),
        pytest.param(
            {"patient_id": 1234}, {"patient_id": "1234"}, id="numeric-patient-id"
        ),
        pytest.param(
            {"name": "  Jean-Pierre   Morel "},
            {"first_name": "Jean-Pierre", "last_name": "Morel"},
            id="whitespace-collapsed",
        ),
        pytest.param({"consciousness": "a", "sex": "f"}, {}, id="lower-case-codes"),
        pytest.param(
            {"unknown_field": {"nested": [1, 2]}},
            {"patient_id": "PT-0001"},
            id="unknown-field-dropped",
        ),
    ],
)
def test_parse_tolerances(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    (row,) = rows_of([encode(reading(**fields))])
    for key, value in expected.items():
        assert row[key] == value


def escaped_key(fields: dict[str, Any], key: str, written: str) -> bytes:
    """Encode ``fields`` with ``key`` written as ``written``, a JSON escape of it."""
    return encode(fields).replace(f'"{key}"'.encode(), f'"{written}"'.encode(), 1)


@pytest.mark.parametrize(
    ("value", "reason", "field"),
    [
        pytest.param(None, Reason.TOMBSTONE, None, id="tombstone"),
        pytest.param(b"", Reason.INVALID_JSON, None, id="empty"),
        pytest.param(b"   ", Reason.INVALID_JSON, None, id="blank"),
        pytest.param(b'{"patient_id": "PT', Reason.INVALID_JSON, None, id="truncated"),
        pytest.param(b"\xff\xfe{}", Reason.NOT_UTF8, None, id="not-utf8"),
        pytest.param(b"[1, 2]", Reason.NOT_AN_OBJECT, None, id="array"),
        pytest.param(b'"text"', Reason.NOT_AN_OBJECT, None, id="string"),
        pytest.param(b"null", Reason.NOT_AN_OBJECT, None, id="json-null"),
        pytest.param(b'{"a": NaN}', Reason.INVALID_JSON, None, id="nan-literal"),
        pytest.param(
            b'{"heart_rate": 1e400}', Reason.INVALID_JSON, None, id="huge-number"
        ),
        pytest.param(
            b"{" * 2000 + b"}" * 2000, Reason.INVALID_JSON, None, id="deep-nesting"
        ),
        # Python's json module does not convert integers of more than 4300 digits.
        pytest.param(
            encode(reading()).replace(b"}", b', "extra": ' + b"9" * 5_000 + b"}"),
            Reason.INVALID_JSON,
            None,
            id="integer-of-5000-digits",
        ),
        pytest.param(
            b'{"name": "a\nb"}', Reason.INVALID_JSON, None, id="raw-newline-in-string"
        ),
        pytest.param(b"x" * 70_000, Reason.TOO_LARGE, None, id="too-large"),
        pytest.param(
            encode(reading(age="forty")), Reason.WRONG_TYPE, "age", id="age-word"
        ),
        pytest.param(
            encode(reading(age=42.5)), Reason.WRONG_TYPE, "age", id="age-fraction"
        ),
        pytest.param(
            encode(reading(blood_pressure={"systolic": 131, "diastolic": 85})),
            Reason.WRONG_TYPE,
            "blood_pressure",
            id="bp-object",
        ),
        pytest.param(
            encode(reading(blood_pressure="130.5/85")),
            Reason.WRONG_TYPE,
            "blood_pressure",
            id="bp-fraction",
        ),
        pytest.param(
            encode(reading(blood_pressure=130)),
            Reason.WRONG_TYPE,
            "blood_pressure",
            id="bp-number",
        ),
        pytest.param(
            encode(reading(heart_rate="fast")),
            Reason.WRONG_TYPE,
            "heart_rate",
            id="hr-word",
        ),
        pytest.param(
            encode(reading(heart_rate="NaN")),
            Reason.WRONG_TYPE,
            "heart_rate",
            id="hr-nan-string",
        ),
        pytest.param(
            encode(reading(temperature=[37])),
            Reason.WRONG_TYPE,
            "temperature",
            id="temp-array",
        ),
        pytest.param(
            encode(reading(name=["Jean", "Dupont"])),
            Reason.WRONG_TYPE,
            "name",
            id="name-array",
        ),
        pytest.param(
            encode(reading(name=True)), Reason.WRONG_TYPE, "name", id="name-boolean"
        ),
        pytest.param(
            escaped_key(reading(name=["x", {"y": 1}]), "name", "n\\u0061me"),
            Reason.WRONG_TYPE,
            "name",
            id="name-array-escaped-key",
        ),
        pytest.param(
            escaped_key(
                reading(patient_id={"mrn": "123"}), "patient_id", "\\u0070atient_id"
            ),
            Reason.WRONG_TYPE,
            "patient_id",
            id="patient-id-object-escaped-key",
        ),
        pytest.param(
            escaped_key(reading(device_id=True), "device_id", "device\\u005Fid"),
            Reason.WRONG_TYPE,
            "device_id",
            id="device-id-boolean-escaped-key",
        ),
        pytest.param(
            encode(reading(on_oxygen="maybe")),
            Reason.WRONG_TYPE,
            "on_oxygen",
            id="oxygen-word",
        ),
        pytest.param(
            encode(reading(timestamp="yesterday")),
            Reason.TIMESTAMP_INVALID,
            "timestamp",
            id="ts-word",
        ),
        pytest.param(
            encode(reading(timestamp="2024-06-10T06:13:20")),
            Reason.TIMESTAMP_INVALID,
            "timestamp",
            id="ts-no-offset",
        ),
        *(
            pytest.param(
                encode(reading(timestamp=text)),
                Reason.TIMESTAMP_INVALID,
                "timestamp",
                id=f"ts-{name}",
            )
            for name, text in (
                ("two-spaces", "2024-06-10  06:13:20Z"),
                ("tab", "2024-06-10\t06:13:20Z"),
                ("no-separator", "2024-06-1006:13:20Z"),
                ("space-before-zone", "2024-06-10T06:13:20 Z"),
                ("space-after-t", "2024-06-10T 06:13:20Z"),
            )
        ),
        pytest.param(
            encode(reading(timestamp=NOW + 86_400)),
            Reason.TIMESTAMP_INVALID,
            "timestamp",
            id="ts-future",
        ),
        pytest.param(
            encode(reading(timestamp=12)),
            Reason.TIMESTAMP_INVALID,
            "timestamp",
            id="ts-far-past",
        ),
        pytest.param(
            encode(reading(temperature=None)),
            Reason.MISSING_FIELD,
            "temperature",
            id="temp-null",
        ),
        pytest.param(
            encode({k: v for k, v in reading().items() if k != "heart_rate"}),
            Reason.MISSING_FIELD,
            "heart_rate",
            id="hr-absent",
        ),
        pytest.param(
            encode(reading(name="   ")), Reason.MISSING_FIELD, "name", id="name-blank"
        ),
        pytest.param(
            encode({k: v for k, v in reading().items() if k != "timestamp"}),
            Reason.MISSING_FIELD,
            "timestamp",
            id="ts-absent",
        ),
        pytest.param(
            encode(reading(blood_pressure=None)),
            Reason.MISSING_FIELD,
            "blood_pressure",
            id="bp-null",
        ),
        pytest.param(
            encode(reading(name="?!-")),
            Reason.INVALID_NAME,
            "name",
            id="name-punctuation",
        ),
        pytest.param(
            encode(reading(patient_id="")),
            Reason.MISSING_FIELD,
            "patient_id",
            id="id-empty",
        ),
        pytest.param(
            encode(reading(patient_id="x" * 65)),
            Reason.OUT_OF_RANGE,
            "patient_id",
            id="id-too-long",
        ),
        pytest.param(
            encode(reading(age=131)), Reason.OUT_OF_RANGE, "age", id="age-131"
        ),
        pytest.param(
            encode(reading(age=-1)), Reason.OUT_OF_RANGE, "age", id="age-negative"
        ),
        pytest.param(
            encode(reading(heart_rate=351)),
            Reason.OUT_OF_RANGE,
            "heart_rate",
            id="hr-351",
        ),
        pytest.param(
            encode(reading(temperature=98.6)),
            Reason.OUT_OF_RANGE,
            "temperature",
            id="temp-fahrenheit",
        ),
        pytest.param(
            encode(reading(spo2=101)), Reason.OUT_OF_RANGE, "spo2", id="spo2-101"
        ),
        pytest.param(
            encode(reading(consciousness="X")),
            Reason.OUT_OF_RANGE,
            "consciousness",
            id="acvpu-unknown",
        ),
        # A code sent as a number or a boolean has the wrong JSON type, and
        # so does a boolean timestamp.
        pytest.param(
            encode(reading(consciousness=1)),
            Reason.WRONG_TYPE,
            "consciousness",
            id="acvpu-number",
        ),
        pytest.param(
            encode(reading(consciousness=True)),
            Reason.WRONG_TYPE,
            "consciousness",
            id="acvpu-boolean",
        ),
        pytest.param(encode(reading(sex=1)), Reason.WRONG_TYPE, "sex", id="sex-number"),
        pytest.param(
            encode(reading(sex=False)), Reason.WRONG_TYPE, "sex", id="sex-boolean"
        ),
        pytest.param(
            encode(reading(timestamp=True)),
            Reason.WRONG_TYPE,
            "timestamp",
            id="ts-boolean",
        ),
        # The same text in a JSON string is read as text.
        pytest.param(
            encode(reading(consciousness="1")),
            Reason.OUT_OF_RANGE,
            "consciousness",
            id="acvpu-numeric-string",
        ),
        pytest.param(
            encode(reading(sex="true")), Reason.OUT_OF_RANGE, "sex", id="sex-text-true"
        ),
        pytest.param(
            encode(reading(timestamp="true")),
            Reason.TIMESTAMP_INVALID,
            "timestamp",
            id="ts-text-true",
        ),
        pytest.param(
            encode(reading(blood_pressure="80/120")),
            Reason.DIASTOLIC_NOT_BELOW_SYSTOLIC,
            "diastolic",
            id="dbp-above-sbp",
        ),
        pytest.param(
            encode(reading(blood_pressure="120/120")),
            Reason.DIASTOLIC_NOT_BELOW_SYSTOLIC,
            "diastolic",
            id="dbp-equal-sbp",
        ),
        pytest.param(
            encode(reading(blood_pressure="400/90")),
            Reason.OUT_OF_RANGE,
            "systolic",
            id="sbp-400",
        ),
    ],
)
def test_parse_rejects_with_reason(
    value: bytes | None, reason: Reason, field: str | None
) -> None:
    good = encode(reading(patient_id="PT-GOOD"))
    rows, rejects = run_chunk([good, value, good])
    (reject,) = [json.loads(p) for p in rejects["payload"].to_list()]
    assert reject["reason"] == reason.value
    assert reject["field"] == field
    assert reject["source"] == {"topic": "vitals", "partition": 0, "offset": 1}
    assert rows.height == 2


def test_parse_first_duplicate_key_wins() -> None:
    (row,) = rows_of(
        [
            b'{"patient_id": "PT-1", "name": "Ana Lima", "age": 30, "age": 31, "blood_pressure": "120/80", "heart_rate": 70, "temperature": 36.8, "timestamp": 1718000000}'
        ]
    )
    assert row["age"] == 30


def test_parse_multiline_json_accepted() -> None:
    value = json.dumps(reading(), indent=2).encode()
    assert b"\n" in value
    (row,) = rows_of([value])
    assert row["patient_id"] == "PT-0001"


def test_parse_multiline_json_keeps_chunk_order() -> None:
    """A pretty-printed reading between two others stays between them."""
    values = [
        encode(reading(patient_id="PT-1")),
        json.dumps(reading(patient_id="PT-2"), indent=2).encode(),
        b'{"patient_id": "PT-X",\n "name": "A\nB"}',
        encode(reading(patient_id="PT-3")),
    ]
    rows, rejects = run_chunk(values)

    assert [json.loads(p)["source"]["offset"] for p in rows["payload"]] == [0, 1, 3]
    assert [json.loads(p)["reason"] for p in rejects["payload"]] == ["invalid_json"]


def test_chunk_rejects_in_offset_order() -> None:
    """A contract reject before a read reject stays before it in the rejects list."""
    values = [
        encode(reading(age=131)),
        b"not json",
        encode(reading()),
        encode(reading(sex="X")),
        b"{",
    ]
    _, rejects = run_chunk(values)

    offsets = [json.loads(p)["source"]["offset"] for p in rejects["payload"]]
    assert offsets == [0, 1, 3, 4]


def test_parse_multiline_utf16_rejected_unchanged() -> None:
    """UTF-16 JSON with line breaks is not folded: the reject keeps its bytes."""
    value = json.dumps(reading(), indent=2).encode("utf-16")
    (reject,) = rejects_of([value])
    assert reject["reason"] == "not_utf8"
    assert base64.b64decode(reject["payload_base64"]) == value


def test_multiline_contract_reject_keeps_line_breaks() -> None:
    """A pretty-printed reading that breaks the contract is rejected as it was sent."""
    value = json.dumps(reading(age=131), indent=2).encode()
    (reject,) = rejects_of([value])
    assert reject["reason"] == "out_of_range"
    assert reject["payload"] == value.decode()


def test_parse_bom_rejected_with_plain_detail() -> None:
    (reject,) = rejects_of([b"\xef\xbb\xbf" + encode(reading())])
    assert reject["reason"] == "invalid_json"
    assert reject["detail"] == "starts with a byte order mark (U+FEFF)"


def test_parse_reject_keeps_non_utf8_as_base64() -> None:
    (reject,) = rejects_of([b'{"name": "H\xe9l\xe8ne"}'])
    assert "payload" not in reject
    assert reject["payload_base64"] == "eyJuYW1lIjogIkjpbOhuZSJ9"


@pytest.mark.parametrize(
    ("key", "kept"),
    [
        (b"PT-0001", {"key": "PT-0001", "key_truncated": False}),
        (b"\xff\xfe", {"key_base64": "//4=", "key_truncated": False}),
        (None, {}),
        (b"k" * 4097, {"key": "k" * 4096, "key_truncated": True}),
    ],
)
def test_reject_keeps_kafka_key(key: bytes | None, kept: dict[str, str]) -> None:
    raw = raw_frame([b"not json"]).with_columns(pl.lit(key, pl.Binary).alias("key"))
    chunk, _ = process_chunk(raw, SETTINGS, topic="vitals", now=NOW, expected={0: None})

    (reject,) = [json.loads(p) for p in chunk.rejects["payload"].to_list()]
    assert {k: v for k, v in reject.items() if k.startswith("key")} == kept


def test_parse_reject_payload_is_bounded() -> None:
    (reject,) = rejects_of([b"y" * 70_000])
    assert reject["payload_truncated"] is True
    assert len(reject["payload"]) == 4096


def test_parse_null_run_then_value_keeps_value() -> None:
    # Schema inference would type a column from its first values; the explicit
    # schema keeps the value that follows a long run of nulls.
    values = [encode(reading(spo2=None))] * 1000 + [encode(reading(spo2=97))]
    rows = rows_of(values)
    assert rows[-1]["spo2"] == 97.0
    assert rows[0]["spo2"] is None


def test_parse_result_does_not_depend_on_order() -> None:
    number = encode(reading(patient_id="A", age=42))
    text = encode(reading(patient_id="B", age="42"))
    forward = {r["patient_id"]: r["age"] for r in rows_of([number, text])}
    backward = {r["patient_id"]: r["age"] for r in rows_of([text, number])}
    assert forward == backward == {"A": 42, "B": 42}


def test_decode_counts_every_value() -> None:
    values: list[bytes | None] = [encode(reading()), None, b"", b"{", b"[]", b"\xff"]
    text, rejects = decode(raw_frame(values), max_bytes=65_536)
    assert text.height + rejects.height == len(values)
    assert sorted(rejects["offset"].to_list()) == [1, 2, 3, 4, 5]


ACVPU_TYPE_DETAIL = "expected a string, one of A, C, V, P, U"
SEX_TYPE_DETAIL = "expected a string, one of F, M"
TIMESTAMP_TYPE_DETAIL = (
    "expected a number or a string: epoch seconds, epoch milliseconds or "
    "ISO-8601 with an offset"
)


@pytest.mark.parametrize(
    ("fields", "field", "detail"),
    [
        pytest.param(
            {"consciousness": 1}, "consciousness", ACVPU_TYPE_DETAIL, id="acvpu-integer"
        ),
        pytest.param(
            {"consciousness": -0.5},
            "consciousness",
            ACVPU_TYPE_DETAIL,
            id="acvpu-float",
        ),
        pytest.param(
            {"consciousness": True}, "consciousness", ACVPU_TYPE_DETAIL, id="acvpu-true"
        ),
        pytest.param(
            {"consciousness": ["A"]},
            "consciousness",
            ACVPU_TYPE_DETAIL,
            id="acvpu-array",
        ),
        pytest.param({"sex": 0}, "sex", SEX_TYPE_DETAIL, id="sex-integer"),
        pytest.param({"sex": 1e3}, "sex", SEX_TYPE_DETAIL, id="sex-exponent"),
        pytest.param({"sex": False}, "sex", SEX_TYPE_DETAIL, id="sex-false"),
        pytest.param({"sex": {"code": "F"}}, "sex", SEX_TYPE_DETAIL, id="sex-object"),
        pytest.param(
            {"timestamp": True}, "timestamp", TIMESTAMP_TYPE_DETAIL, id="ts-true"
        ),
        pytest.param(
            {"timestamp": False}, "timestamp", TIMESTAMP_TYPE_DETAIL, id="ts-false"
        ),
        pytest.param(
            {"timestamp": [1718000000]},
            "timestamp",
            TIMESTAMP_TYPE_DETAIL,
            id="ts-array",
        ),
    ],
)
def test_wrong_json_type_detail_on_both_paths(
    fields: dict[str, Any], field: str, detail: str
) -> None:
    """parse (typed read where it can) and the text read give the same wrong_type reject."""
    values: list[bytes | None] = [
        encode(reading(patient_id="PT-GOOD")),
        encode(reading(**fields)),
    ]
    with mock.patch(
        "etl.parse._typed_where_possible", wraps=_typed_where_possible
    ) as retype:
        _, fast_rejects = parse(raw_frame(values), max_bytes=65_536, now=NOW)
    text, decode_rejects = decode(raw_frame(values), max_bytes=65_536)
    _, text_rejects = to_typed(text, now=NOW)

    # consciousness and sex are String columns in both schemas, so the chunk
    # keeps the typed read. A timestamp that is no number or string sends it
    # to the text read.
    assert retype.called is (field == "timestamp")
    assert decode_rejects.is_empty()
    for rejects in (fast_rejects, text_rejects):
        assert rejects["offset"].to_list() == [1]
        assert rejects["reason"].to_list() == [Reason.WRONG_TYPE.value]
        assert rejects["field"].to_list() == [field]
        assert rejects["detail"].to_list() == [detail]


def test_to_typed_reports_first_failing_field() -> None:
    values = [encode(reading(age="x", heart_rate="y"))]
    text, _ = decode(raw_frame(values), max_bytes=65_536)
    typed, rejects = to_typed(text, now=NOW)
    assert typed.is_empty()
    assert rejects["field"].to_list() == ["age"]


CASE_EXPECTATIONS = {
    # case: (rows, rejects, reasons)
    "C06": (0, 1, {Reason.TOMBSTONE}),
    "C07": (0, 1, {Reason.NOT_UTF8}),
    "C08": (0, 2, {Reason.INVALID_JSON}),
    "C11": (2, 1, {Reason.WRONG_TYPE}),
    "C12": (2, 0, set()),
    "C15": (0, 1, {Reason.MISSING_FIELD}),
    "C16": (0, 2, {Reason.WRONG_TYPE, Reason.MISSING_FIELD}),
    "C17": (1, 1, {Reason.MISSING_FIELD}),
    "C18": (1, 0, set()),
    "C21": (2, 0, set()),
    "C22": (1, 0, set()),
}


@pytest.mark.parametrize("case", sorted(CASE_EXPECTATIONS))
def test_parse_public_cases(case: str) -> None:
    values = [case_value(e) for e in load_cases() if e["case"] == case]
    rows, rejects = run_chunk(values)
    expected_rows, expected_rejects, reasons = CASE_EXPECTATIONS[case]
    assert rows.height == expected_rows
    assert rejects.height == expected_rejects
    assert set(rejects["reason"].to_list()) == {r.value for r in reasons}


def test_parse_case_names_split() -> None:
    by_id = {
        row["patient_id"]: (row["first_name"], row["last_name"])
        for row in rows_of(
            [case_value(e) for e in load_cases() if e["case"] in {"C17", "C18", "C21"}]
        )
    }
    assert by_id["PT-0123"] == ("Teodora", None)
    assert by_id["PT-0125"] == ("Pieter", "van den Broek")
    assert by_id["PT-0129"] == ("Jean-Pierre", "Morel")
    assert by_id["PT-0130"] == ("Anne-Sophie", "Duval-Roche")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("DUBOIS Élodie", ("Élodie", "DUBOIS"), id="leading-upper-case"),
        pytest.param("Seán Ó BRIAIN", ("Seán", "Ó BRIAIN"), id="irish-prefix"),
        pytest.param("Zoë LEFÈVRE", ("Zoë", "LEFÈVRE"), id="trailing-upper-case"),
        pytest.param("김민준 박", ("김민준", "박"), id="hangul"),
    ],
)
def test_decomposed_name_split_as_composed(
    name: str, expected: tuple[str, str]
) -> None:
    """A name with decomposed accents or jamo (NFD) gives the NFC parts of its composed form."""
    decomposed = unicodedata.normalize("NFD", name)
    assert decomposed != name
    (row,) = rows_of([encode(reading(name=decomposed))])
    assert (row["first_name"], row["last_name"]) == expected


def test_name_length_checked_as_sent() -> None:
    """The 200-character limit applies to the name as sent, not to its NFC form."""
    # U+0958 is a composition exclusion: NFC writes it as two characters.
    name = "Anna " + "\u0958" * 100 + "\u093f" + "x" * 94
    assert len(name) == 200
    assert len(unicodedata.normalize("NFC", name)) > 200

    (row,) = rows_of([encode(reading(name=name))])

    assert row["first_name"] == "Anna"


def test_parse_case_c22_values() -> None:
    (value,) = [case_value(e) for e in load_cases() if e["case"] == "C22"]
    (row,) = rows_of([value])
    assert (row["systolic"], row["diastolic"], row["heart_rate"]) == (130, 85, 72.0)
    assert row["blood_pressure"] == "130/85"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=30))
@example([])
@example([None])
@example([b"\n"])
@example([b"{}\n{}"])
def test_parse_arbitrary_bytes_accounted(values: list[bytes | None]) -> None:
    """Arbitrary values never raise, and each offset ends as exactly one row or reject."""
    rows, rejects = run_chunk(values)
    offsets = rows["offset"].to_list() + rejects["offset"].to_list()
    assert sorted(offsets) == list(range(len(values)))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                key: st.one_of(json_scalars, st.lists(json_scalars, max_size=2))
                for key in (
                    "patient_id",
                    "name",
                    "age",
                    "blood_pressure",
                    "heart_rate",
                    "temperature",
                    "timestamp",
                    "spo2",
                    "on_oxygen",
                )
            },
        ).map(lambda extra: encode(reading(**extra))),
        max_size=20,
    )
)
def test_parse_mutated_readings_accounted(values: list[bytes]) -> None:
    rows, rejects = run_chunk(list(values))
    offsets = rows["offset"].to_list() + rejects["offset"].to_list()
    assert sorted(offsets) == list(range(len(values)))


def test_chunk_same_offset_twice_gives_one_row() -> None:
    """A record delivered twice (same partition and offset) is written once (C05)."""
    (value,) = {case_value(e) for e in load_cases() if e["case"] == "C05"}
    raw = pl.concat([raw_frame([value]), raw_frame([value])])
    chunk, duplicates = process_chunk(
        raw, SETTINGS, topic="vitals", now=NOW, expected={0: None}
    )
    assert duplicates == 1
    assert chunk.rows.height == 1
    assert chunk.next_offsets == {0: 1}


#: Stands for a lone surrogate escape until the JSON text is built.
SURROGATE_MARK = "\N{REPLACEMENT CHARACTER}"


def with_escape(fields: dict[str, Any], escape: str) -> bytes:
    """Encode a reading (non-ASCII escaped), then put ``escape`` where the mark is."""
    text = json.dumps(reading(**fields))
    return text.replace(json.dumps(SURROGATE_MARK)[1:-1], escape).encode()


@pytest.mark.parametrize("escape", ["\\ud800", "\\udbff", "\\udc00", "\\uDFFF"])
@pytest.mark.parametrize(
    "field", ["patient_id", "name", "device_id", "consciousness", "note"]
)
def test_parse_lone_surrogate_rejected(field: str, escape: str) -> None:
    value = with_escape({field: f"A{SURROGATE_MARK}B"}, escape)

    (reject,) = rejects_of([value, encode(reading())])

    assert reject["reason"] == Reason.INVALID_JSON
    assert reject["field"] == field
    assert "surrogate" in reject["detail"]
    assert reject["source"]["offset"] == 0


@settings(max_examples=80, deadline=None)
@given(
    st.text(max_size=12),
    st.text(max_size=12),
    st.sampled_from(["\\ud800", "\\udb7f", "\\udc00", "\\udfff", "\\uDABC"]),
)
def test_parse_lone_surrogate_anywhere_in_name(
    before: str, after: str, escape: str
) -> None:
    """Any text around a lone escape, astral characters (sent as pairs) included."""
    value = with_escape({"name": f"{before}{SURROGATE_MARK}{after}"}, escape)

    (reject,) = rejects_of([value])

    assert (reject["reason"], reject["field"]) == (Reason.INVALID_JSON, "name")


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=20))
def test_parse_escaped_text_has_no_lone_surrogate(text: str) -> None:
    """Astral characters arrive as surrogate pairs (json.dumps escapes them), never lone."""
    value = json.dumps(reading(name=f"Ann {text} Lee", device_id=text)).encode()

    rejects = rejects_of([value])

    assert not [r for r in rejects if "surrogate" in r["detail"]]


def test_parse_escaped_backslash_is_no_surrogate() -> None:
    rows = rows_of([json.dumps(reading(name="Ann \\ud800 Lee")).encode()])

    assert rows[0]["last_name"] == "\\ud800 Lee"


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("Anna \u200bBerg", "Anna", "Berg"),
        ("Anna\u200bBerg", "Anna", "Berg"),
        ("\u200bAnna\u200b \u200bBerg\u200b", "Anna", "Berg"),
    ],
)
def test_zero_width_space_in_name_is_space(name: str, first: str, last: str) -> None:
    (row,) = rows_of([encode(reading(name=name))])

    assert row["first_name"] == first
    assert row["last_name"] == last


def test_zero_width_space_only_name_is_missing() -> None:
    (reject,) = rejects_of([encode(reading(name="\u200b \u200b"))])

    assert reject["reason"] == Reason.MISSING_FIELD.value
    assert reject["field"] == "name"


@pytest.mark.parametrize(("levels", "accepted"), [(1024, True), (1025, False)])
def test_nesting_limit_in_unknown_field(levels: int, accepted: bool) -> None:
    """The README's limit: 1,024 levels, the message's own object included."""
    nested = "[" * (levels - 1) + "]" * (levels - 1)
    value = f'{{"x": {nested}, '.encode() + encode(reading())[1:]

    rows, rejects = run_chunk([value])

    assert rows.height == int(accepted)
    assert rejects["reason"].to_list() == ([] if accepted else ["invalid_json"])


def test_parse_deep_nesting_with_escape_accounted() -> None:
    """A lone surrogate after an unknown field nested 900 deep: no crash, a reject."""
    nested = "[" * 900 + "]" * 900
    document = json.dumps(reading(name=f"Ann {SURROGATE_MARK} Lee"))
    text = f'{{"x": {nested}, ' + document[1:]
    value = text.replace(json.dumps(SURROGATE_MARK)[1:-1], r"\ud800").encode()

    rows, rejects = run_chunk([value, encode(reading())])

    assert rows["offset"].to_list() == [1]
    assert rejects["offset"].to_list() == [0]


@pytest.mark.parametrize(
    "first, second",
    [
        pytest.param(SURROGATE_MARK, "PT-2", id="lone-first"),
        pytest.param("PT-1", SURROGATE_MARK, id="lone-second"),
    ],
)
def test_parse_duplicate_key_with_lone_surrogate(first: str, second: str) -> None:
    """Polars keeps the first of two equal keys and Python the last: both are checked."""
    text = (
        json.dumps(reading(patient_id=first))[:-1]
        + f', "patient_id": {json.dumps(second)}}}'
    )
    value = text.replace(json.dumps(SURROGATE_MARK)[1:-1], "\\ud800").encode()

    (reject,) = rejects_of([value])

    assert (reject["reason"], reject["field"]) == (Reason.INVALID_JSON, "patient_id")


@pytest.mark.parametrize(
    "patient_id",
    [
        pytest.param("PT-1\u0000", id="nul"),
        pytest.param("PT-\t1", id="tab"),
        pytest.param("PT-\n1", id="line-feed"),
        pytest.param("PT-\u200b1", id="zero-width-space"),
        pytest.param("PT-\u20281", id="line-separator"),
        pytest.param("\ufeffPT-1", id="byte-order-mark"),
    ],
)
def test_parse_patient_id_invisible_character_rejected(patient_id: str) -> None:
    (reject,) = rejects_of([encode(reading(patient_id=patient_id))])

    assert (reject["reason"], reject["field"]) == (Reason.OUT_OF_RANGE, "patient_id")
    assert reject["detail"] == "contains a control or invisible formatting character"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("\u202eAnna Smith", id="right-to-left-override"),
        pytest.param("Anna \u2066Smith", id="left-to-right-isolate"),
        pytest.param("Anna \ufeffSmith", id="byte-order-mark"),
        pytest.param("Anna\x85Smith", id="c1-next-line"),
    ],
)
def test_parse_name_control_character_rejected(name: str) -> None:
    (reject,) = rejects_of([encode(reading(name=name))])

    assert (reject["reason"], reject["field"]) == (Reason.INVALID_NAME, "name")
    assert (
        reject["detail"]
        == "contains a control or explicit bidirectional formatting character"
    )


@pytest.mark.parametrize("space", ["\t", "\n", "\v", "\f", "\r", "\u2028", "\u2029"])
def test_parse_name_whitespace_control_splits(space: str) -> None:
    """Whitespace controls and Unicode line separators in a name count as spaces."""
    (row,) = rows_of([encode(reading(name=f"Jean{space}Dupont"))])

    assert (row["first_name"], row["last_name"]) == ("Jean", "Dupont")


@pytest.mark.parametrize(
    "patient_id",
    ["PT-1\n", "PT-1\r\n", "\tPT-1", "PT-1\u2028", " PT-1 ", "PT-1\u3000"],
)
def test_parse_patient_id_surrounding_whitespace_stripped(patient_id: str) -> None:
    (row,) = rows_of([encode(reading(patient_id=patient_id))])

    assert row["patient_id"] == "PT-1"


def test_parse_name_zero_width_joiners_kept() -> None:
    """Persian and Indic names need the zero-width non-joiner and joiner."""
    (row,) = rows_of([encode(reading(name="Ali Mohammad\u200cpour Sh\u200dah"))])

    assert row["first_name"] == "Ali"


def test_parse_surrogate_pairs_skip_python_check() -> None:
    """Values whose surrogate escapes all pair up are not decoded a second time."""
    values = [
        json.dumps(reading(name=f"Ann \N{GRINNING FACE}{n} Lee")).encode()
        for n in range(50)
    ]
    with mock.patch("etl.parse._lone_surrogate") as check:
        rows = rows_of(values)

    assert len(rows) == 50
    check.assert_not_called()


@pytest.mark.parametrize("depth", [995, 1010, 1040])
def test_parse_lone_surrogate_too_deep_for_python(depth: int) -> None:
    """Polars reads a little deeper than Python's parser: such a value is still rejected."""
    nested = "[" * depth + "]" * depth
    document = json.dumps(reading(device_id=SURROGATE_MARK))
    text = f'{{"x": {nested}, ' + document[1:]
    value = text.replace(json.dumps(SURROGATE_MARK)[1:-1], r"\ud800").encode()

    (reject,) = rejects_of([value])

    assert reject["reason"] == Reason.INVALID_JSON


def test_parse_deep_multiline_value_rejected() -> None:
    """A raw line break beside nesting too deep for Python's parser: a reject, no crash."""
    nested = "[" * 1000 + "]" * 1000
    value = (json.dumps(reading())[:-1] + f',\n"x": {nested}}}').encode()

    rows, rejects = run_chunk([encode(reading()), value, encode(reading())])

    assert rows["offset"].to_list() == [0, 2]
    assert rejects["reason"].to_list() == [Reason.INVALID_JSON]


COMPLETE_NEWS2 = {
    "spo2": 97,
    "respiratory_rate": 16,
    "consciousness": "A",
    "on_oxygen": False,
    "spo2_scale": 1,
    "sex": "F",
}


@pytest.mark.parametrize(
    ("field", "risk"),
    [
        ("spo2", "Incomplete"),
        ("respiratory_rate", "Incomplete"),
        ("on_oxygen", "Incomplete"),
        ("consciousness", "Incomplete"),
        ("spo2_scale", "Low"),
        ("sex", "Low"),
    ],
)
@pytest.mark.parametrize("blank", ["", "  "])
def test_parse_blank_optional_field_is_absent(
    field: str, risk: str, blank: str
) -> None:
    (row,) = rows_of([encode(reading(**{**COMPLETE_NEWS2, field: blank}))])

    assert row["news2_risk"] == risk


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
@pytest.mark.parametrize("blank", ["", "  ", "\u00a0"])
def test_parse_blank_required_field_is_missing(field: str, blank: str) -> None:
    """A blank value counts as absent in every field, as the contract's detail states."""
    (reject,) = rejects_of([encode(reading(**{field: blank}))])

    assert reject["reason"] == Reason.MISSING_FIELD.value
    assert reject["field"] == field
    assert reject["detail"] == "required field is null, blank or absent"


@pytest.mark.parametrize("malformed_rate", [0.1, 0.6])
def test_parse_mixed_chunk_as_each_message_alone(malformed_rate: float) -> None:
    """A chunk with odd messages of every kind gives each message its result alone."""
    values = [
        value
        for _, value in iter_readings(
            count=80, seed=11, malformed_rate=malformed_rate, now=NOW
        )
    ]
    rows, rejects = run_chunk(values)

    alone = [run_chunk([value]) for value in values]
    expected_rows = [row for one_rows, _ in alone for row in one_rows["payload"]]
    expected_rejects = [
        json.loads(reject)["reason"] for _, one in alone for reject in one["payload"]
    ]
    assert rows.height + rejects.height == len(values)
    assert [json.loads(p)["patient_id"] for p in rows["payload"]] == [
        json.loads(p)["patient_id"] for p in expected_rows
    ]
    assert sorted(json.loads(p)["reason"] for p in rejects["payload"]) == sorted(
        expected_rejects
    )


def test_parse_object_polars_cannot_read_still_accounted() -> None:
    """Should orjson read a value that Polars cannot, each value is read on its own."""
    good = encode(reading(patient_id="PT-GOOD"))
    values = [good, b"not json", good]
    with mock.patch("etl.parse._split_json_objects", return_value=([0, 1, 2], [])):
        rows, rejects = run_chunk(values)

    assert rows.height == 2
    assert [json.loads(p)["reason"] for p in rejects["payload"]] == ["invalid_json"]


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (b"[1, 2]", "JSON array, expected an object"),
        (b'"text"', "JSON string, expected an object"),
        (b"12", "JSON number, expected an object"),
        (b"1.5", "JSON number, expected an object"),
        (b"true", "JSON boolean, expected an object"),
        (b"null", "JSON null, expected an object"),
        (b'{"a": "b', "Unterminated string starting at: line 1 column 7"),
        (b"-Infinity", "NaN or Infinity, which JSON does not allow"),
        (b"NaN", "NaN or Infinity, which JSON does not allow"),
        (b"1e400", "JSON number, expected an object"),
        (
            b'{"age": ' + b"1" * 5_000 + b"}",
            "JSON the strict reader rejects (NaN, Infinity, huge number or deep nesting)",
        ),
    ],
)
def test_unreadable_value_detail_uses_json_terms(value: bytes, detail: str) -> None:
    _, rejects = run_chunk([value])

    (reject,) = [json.loads(p) for p in rejects["payload"].to_list()]
    assert reject["detail"] == detail


@pytest.mark.parametrize(
    "text",
    [
        "2024-06-10T06:13:20",
        "2024-06-10 06:13:20",
        "2024-06-10T06:13:20.250",
        # A leap second once the offset is Z.
        "2016-12-31T23:59:60",
    ],
)
def test_local_time_detail_asks_for_offset(text: str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=text))])

    assert reject["reason"] == "timestamp_invalid"
    assert reject["detail"].startswith("ISO-8601 without an offset: add Z")


@pytest.mark.parametrize(
    "text",
    [
        "2023-02-29T06:13:20Z",
        "2024-13-10T06:13:20Z",
        "2024-06-10T24:00:00Z",
        "2024-06-10T06:60:00+02:00",
        "2024-06-10 06:13:20+25:00",
        "2024-06-10T06:13:60Z",
        "2024-06-30T23:58:60.5Z",
        "2024-06-30T23:59:60+02:00",
    ],
)
def test_impossible_iso_detail_names_it(text: str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=text))])

    assert reject["reason"] == "timestamp_invalid"
    assert reject["detail"].startswith("ISO-8601 naming a date, time or offset that")


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00.000+00:00"),
        ("2017-01-01T00:59:60+01:00", "2017-01-01T00:00:00.000+00:00"),
        ("2015-06-30t23:59:60.250z", "2015-07-01T00:00:00.250+00:00"),
    ],
)
def test_leap_second_read_as_next_second(text: str, stored: str) -> None:
    """RFC 3339 allows second 60 at the end of a UTC month, for a leap second."""
    (row,) = rows_of([encode(reading(timestamp=text))])

    assert row["timestamp"] == stored


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2024-06-10",
        "2024-06-10T25",
        # Invalid with an offset or seconds too: adding them would not help.
        "2026-13-45T99:99:99",
        "2026-02-30T10:00:00",
        "2026-02-30T10:00Z",
        "2024-06-10T24:13",
        "2024-06-10T06:13:60",
    ],
)
def test_other_timestamp_text_keeps_generic_detail(text: str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=text))])

    assert reject["reason"] == "timestamp_invalid"
    assert reject["detail"].startswith("expected epoch seconds")


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("2024-06-10T06:13Z", "ISO-8601 without seconds: write the time as HH:MM:SS"),
        ("2024-06-10 06:13+02:00", "ISO-8601 without seconds: write the time"),
        (" 2024-06-10t06:13z ", "ISO-8601 without seconds: write the time"),
        ("2024-06-10T06:13", "ISO-8601 without seconds or an offset: write"),
    ],
)
def test_time_to_minute_detail_asks_for_seconds(text: str, detail: str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=text))])

    assert reject["reason"] == "timestamp_invalid"
    assert reject["detail"].startswith(detail)


@given(
    moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2026, 1, 1)),
    offset=st.sampled_from(["Z", "+02:00", "-0530", "+01"]),
    separator=st.sampled_from(["T", " "]),
)
@settings(max_examples=50, deadline=None)
def test_any_time_to_minute_asks_for_seconds(
    moment: datetime, offset: str, separator: str
) -> None:
    text = moment.strftime(f"%Y-%m-%d{separator}%H:%M") + offset
    (reject,) = rejects_of([encode(reading(timestamp=text))])

    assert reject["detail"] == "ISO-8601 without seconds: write the time as HH:MM:SS"


@pytest.mark.parametrize("value", [1_718_000_000_000_000, "1718000000000000"])
def test_epoch_microseconds_detail_names_unit(value: int | str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=value))])

    assert reject["reason"] == "timestamp_invalid"
    assert reject["detail"] == "epoch microseconds: send epoch seconds or milliseconds"


@pytest.mark.parametrize("value", [1_718_000_000_000_000_000, "1718000000000000000"])
def test_epoch_nanoseconds_detail_names_unit(value: int | str) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=value))])

    assert reject["detail"] == "epoch nanoseconds: send epoch seconds or milliseconds"


@pytest.mark.parametrize("value", [1e17, 1e21, 9e99])
def test_far_future_number_detail_keeps_skew(value: float) -> None:
    (reject,) = rejects_of([encode(reading(timestamp=value))])

    assert reject["detail"] == "more than 3600 s in the future"


def test_early_timestamp_detail_names_earliest_time() -> None:
    _, rejects = run_chunk([encode(reading(timestamp=12))])

    (reject,) = [json.loads(p) for p in rejects["payload"].to_list()]
    assert reject["detail"] == (
        "before the earliest accepted time, 2000-01-01T00:00:00Z"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (946_684_800, "2000-01-01T00:00:00Z"),
        (1_500_000_000.9, "2017-07-14T02:40:00.900000Z"),
        (253_402_300_799, "9999-12-31T23:59:59Z"),
    ],
)
def test_utc_text_keeps_fraction(seconds: float, text: str) -> None:
    assert _utc_text(seconds) == text


@pytest.mark.parametrize(
    "text", ["130.5/85", "/80", "130/", "130-85", "130 / 85 mmHg", "1200/80", "-120/80"]
)
def test_blood_pressure_text_detail_shows_form(text: str) -> None:
    (reject,) = rejects_of([encode(reading(blood_pressure=text))])

    assert reject["reason"] == "wrong_type"
    assert reject["field"] == "blood_pressure"
    assert "two whole numbers of 1 to 3 digits in mmHg" in reject["detail"]
