"""Contract artefacts: the committed exports match the models, and drift is caught."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pandera.polars as pa
import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from pandera.api.polars.types import PolarsData

from contracts import models
from contracts.models import InputReading, OutputRow
from etl.cli import main
from etl.config import load_settings
from etl.contracts_export import (
    BLANK_TEXT,
    CONTRACTS_DIR,
    INPUT_YAML_FILE,
    JSON_SCHEMA_FILE,
    MESSAGE_FIELDS,
    OUTPUT_YAML_FILE,
    ContractExportError,
    check_artefacts,
    custom_checks,
    message_json_schema,
    model_yaml,
    render_artefacts,
)
from etl.parse import RAW_SCHEMA
from etl.pipeline import MESSAGE_FIELD_OF, process_chunk
from tests.conftest import case_value, load_cases, reading

NOW = 1_718_000_600.0
SETTINGS = load_settings()


class NarrowerAge(InputReading):
    """InputReading with a lower maximum age."""

    age: pl.Int64 = pa.Field(ge=0, le=120)


class WiderOutput(OutputRow):
    """OutputRow with one more column."""

    ward: pl.String = pa.Field(nullable=True)


class ExtraCheck(OutputRow):
    """OutputRow with one more custom check."""

    @pa.dataframe_check(name="pulse_pressure_positive")
    def _pulse_pressure(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("systolic") - pl.col("diastolic") > 0)


class StricterCheck(InputReading):
    """InputReading whose diastolic_below_systolic check has a changed body."""

    @pa.dataframe_check(name="diastolic_below_systolic")
    def _diastolic_below_systolic(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("diastolic") + 10 < pl.col("systolic"))


class UnmappedColumn(InputReading):
    """InputReading with a column that no message field fills."""

    ward: pl.String = pa.Field(nullable=True)


def drifted_names(**models_: Any) -> list[str]:
    return [drift.name for drift in check_artefacts(fresh=render_artefacts(**models_))]


# Committed files


def test_contracts_committed_files_match_models() -> None:
    drifts = check_artefacts()

    assert [drift.name for drift in drifts] == [], "".join(d.diff for d in drifts)


def test_contracts_cli_check_passes_on_committed_files() -> None:
    result = CliRunner().invoke(main, ["contracts", "check"])

    assert result.exit_code == 0, result.output
    assert "every artefact matches" in result.output


def test_contracts_export_writes_what_check_accepts(tmp_path: Path) -> None:
    runner = CliRunner()

    exported = runner.invoke(main, ["contracts", "export", "--dir", str(tmp_path)])
    checked = runner.invoke(main, ["contracts", "check", "--dir", str(tmp_path)])

    assert exported.exit_code == 0, exported.output
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [INPUT_YAML_FILE, JSON_SCHEMA_FILE, OUTPUT_YAML_FILE]
    )
    assert checked.exit_code == 0, checked.output


# Drift


def test_contracts_check_catches_changed_bound() -> None:
    drifts = check_artefacts(fresh=render_artefacts(input_model=NarrowerAge))

    assert sorted(drift.name for drift in drifts) == [INPUT_YAML_FILE, JSON_SCHEMA_FILE]
    diff = "".join(drift.diff for drift in drifts)
    assert "-    less_than_or_equal_to: 130" in diff
    assert "+    less_than_or_equal_to: 120" in diff
    assert '+          "maximum": 120' in diff


def test_contracts_check_catches_added_column() -> None:
    assert drifted_names(output_model=WiderOutput) == [OUTPUT_YAML_FILE]


def test_contracts_check_catches_added_custom_check() -> None:
    drifts = check_artefacts(fresh=render_artefacts(output_model=ExtraCheck))

    assert [drift.name for drift in drifts] == [OUTPUT_YAML_FILE]
    assert "+  - name: pulse_pressure_positive" in drifts[0].diff


def test_contracts_check_catches_changed_check_body() -> None:
    original = custom_checks(InputReading)["dataframe"]
    changed = custom_checks(StricterCheck)["dataframe"]

    assert [check["name"] for check in changed] == ["diastolic_below_systolic"]
    assert changed[0]["source_sha256"] != original[0]["source_sha256"]
    assert INPUT_YAML_FILE in drifted_names(input_model=StricterCheck)


def test_contracts_cli_check_fails_on_changed_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "InputReading", NarrowerAge)

    result = CliRunner().invoke(main, ["contracts", "check"])

    assert result.exit_code == 1
    assert "+    less_than_or_equal_to: 120" in result.output
    assert "etl contracts export" in result.stderr


def test_contracts_cli_check_fails_on_unmapped_column(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "InputReading", UnmappedColumn)

    result = CliRunner().invoke(main, ["contracts", "check"])

    assert result.exit_code == 1
    assert "columns ['ward'] of UnmappedColumn have no message field" in result.stderr


def test_contracts_check_reports_missing_file(tmp_path: Path) -> None:
    drifts = check_artefacts(tmp_path)

    assert len(drifts) == 3
    assert all("is missing" in drift.diff for drift in drifts)


def test_contracts_export_rejects_unmapped_column() -> None:
    with pytest.raises(ContractExportError, match=r"\['ward'\].*MESSAGE_FIELDS"):
        message_json_schema(UnmappedColumn)


# Pandera YAML


def test_model_yaml_emits_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = model_yaml(InputReading)

    assert text.startswith("# Generated by 'etl contracts export'")


def test_model_yaml_lists_custom_checks() -> None:
    document = yaml.safe_load(model_yaml(InputReading))

    assert document["schema_type"] == "polars_dataframe"
    assert list(document["columns"]) == list(InputReading.to_schema().columns)
    custom = document["custom_checks"]
    assert [c["name"] for c in custom["columns"]["name"]] == ["contains_letter"]
    assert [c["name"] for c in custom["columns"]["spo2"]] == ["percentage_not_fraction"]
    spo2 = message_json_schema()["properties"]["spo2"]
    assert "x-pandera-checks" not in spo2
    assert [c["name"] for c in custom["dataframe"]] == ["diastolic_below_systolic"]
    assert all(len(c["source_sha256"]) == 64 for c in custom["dataframe"])


# JSON Schema of the message


def load_json_schema() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (CONTRACTS_DIR / JSON_SCHEMA_FILE).read_text(encoding="utf-8")
    )
    return document


def schema_accepts(document: Any) -> bool:
    return jsonschema.Draft202012Validator(load_json_schema()).is_valid(document)


def batch_reason(value: bytes) -> str | None:
    """Return the reason code when the batch rejects ``value`` sent alone, else None."""
    raw = pl.DataFrame(
        {"partition": [0], "offset": [0], "key": [None], "value": [value]},
        schema=RAW_SCHEMA,
    )
    chunk, _ = process_chunk(raw, SETTINGS, topic="t", now=NOW, expected={0: None})
    if chunk.rejects.is_empty():
        return None
    reason: str = chunk.rejects["reason"][0]
    return reason


def batch_accepts(value: bytes) -> bool:
    return batch_reason(value) is None


def test_json_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(load_json_schema())


def test_json_schema_takes_bounds_from_model() -> None:
    properties = message_json_schema(NarrowerAge)["properties"]

    assert properties["age"]["oneOf"][0] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 120,
    }
    assert properties["patient_id"]["maxLength"] == 64
    assert properties["consciousness"]["oneOf"][0]["enum"] == ["A", "C", "V", "P", "U"]


def test_json_schema_requires_non_nullable_fields() -> None:
    required = load_json_schema()["required"]

    assert required == [
        "patient_id",
        "name",
        "age",
        "blood_pressure",
        "heart_rate",
        "temperature",
        "timestamp",
    ]


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        pytest.param({}, True, id="plain"),
        # The documented tolerances.
        pytest.param({"age": "42", "heart_rate": " 72 "}, True, id="numeric-strings"),
        pytest.param({"blood_pressure": "130.0/85.0"}, True, id="integral-decimals"),
        pytest.param({"blood_pressure": "130 / 85"}, True, id="spaces-around-slash"),
        pytest.param({"age": 42.0}, True, id="integral-age"),
        pytest.param({"timestamp": 1718000000123}, True, id="epoch-ms"),
        pytest.param({"timestamp": "2024-06-10T06:13:20Z"}, True, id="iso-z"),
        pytest.param({"timestamp": "2024-06-10T08:13:20+02:00"}, True, id="iso-offset"),
        pytest.param(
            {"timestamp": "2024-06-10  06:13:20Z"}, False, id="iso-two-spaces"
        ),
        pytest.param({"spo2": 0.97}, False, id="spo2-as-fraction"),
        pytest.param({"spo2": 1}, False, id="spo2-one"),
        pytest.param({"spo2": 0}, True, id="spo2-zero"),
        pytest.param({"spo2": 1.5}, True, id="spo2-above-one"),
        pytest.param(
            {"timestamp": "2024-06-10T06:13:20 Z"}, False, id="iso-space-zone"
        ),
        pytest.param(
            {"timestamp": "2024-06-10 06:13:20.5+00:00"}, True, id="iso-space"
        ),
        pytest.param(
            {"spo2": 97, "respiratory_rate": "16", "consciousness": "A"},
            True,
            id="optional-fields",
        ),
        pytest.param({"spo2": None, "sex": None}, True, id="optional-null"),
        pytest.param({"ward": "B2"}, True, id="unknown-field"),
        # Rejected by both.
        pytest.param({"age": 131}, False, id="age-out-of-range"),
        pytest.param({"age": 42.5}, False, id="fractional-age"),
        pytest.param({"age": "forty"}, False, id="age-not-a-number"),
        pytest.param({"heart_rate": True}, False, id="boolean-heart-rate"),
        pytest.param({"temperature": 60}, False, id="temperature-out-of-range"),
        pytest.param({"spo2": 101}, False, id="spo2-out-of-range"),
        pytest.param({"blood_pressure": "120-80"}, False, id="pressure-without-slash"),
        pytest.param({"blood_pressure": [120, 80]}, False, id="pressure-as-array"),
        pytest.param({"timestamp": "2024-06-10T06:13:20"}, False, id="iso-no-offset"),
        pytest.param({"timestamp": 86400}, False, id="timestamp-before-2000"),
        pytest.param({"on_oxygen": "1.0"}, False, id="boolean-as-decimal-string"),
        pytest.param({"name": "   "}, False, id="blank-name"),
        pytest.param({"name": 42}, False, id="number-as-name"),
        pytest.param({"consciousness": "X"}, False, id="unknown-consciousness"),
        pytest.param({"sex": "X"}, False, id="unknown-sex"),
        pytest.param({"consciousness": 1}, False, id="consciousness-as-number"),
        pytest.param({"sex": True}, False, id="sex-as-boolean"),
        pytest.param({"timestamp": True}, False, id="timestamp-as-boolean"),
        pytest.param({"patient_id": "P" * 65}, False, id="patient-id-too-long"),
        pytest.param({"temperature": None}, False, id="required-null"),
    ],
)
def test_json_schema_agrees_with_batch(fields: dict[str, Any], accepted: bool) -> None:
    message = reading(**fields)

    assert schema_accepts(message) is accepted
    assert batch_accepts(json.dumps(message).encode()) is accepted


@pytest.mark.parametrize(
    "fields",
    [
        # Cross-field and letter checks are named in x-pandera-checks only.
        pytest.param({"blood_pressure": "80/120"}, id="diastolic-above-systolic"),
        pytest.param({"name": "12345"}, id="name-without-letter"),
        # So are the invisible characters of ids and names.
        pytest.param({"patient_id": "PT-\u200b1"}, id="zero-width-space-in-id"),
        pytest.param({"name": "\u202eAnna Smith"}, id="bidi-override-in-name"),
        # A range applies to the value of a numeric string only in the batch.
        pytest.param({"age": "131"}, id="numeric-string-out-of-range"),
        # The time window depends on the batch start.
        pytest.param({"timestamp": NOW + 7200}, id="timestamp-in-future"),
        # The pattern does not know the calendar.
        pytest.param({"timestamp": "2024-13-10T06:13:20Z"}, id="month-13"),
        pytest.param({"timestamp": "2023-02-29T06:13:20Z"}, id="february-29-2023"),
        pytest.param({"timestamp": "2024-06-10T24:00:00Z"}, id="hour-24"),
        pytest.param({"timestamp": "2024-06-10T06:13:60Z"}, id="second-60"),
        # Nor the earliest accepted time, for epoch milliseconds or a date.
        pytest.param({"timestamp": 100_000_000_001}, id="epoch-ms-before-2000"),
        pytest.param({"timestamp": "1999-12-31T23:00:00Z"}, id="iso-before-2000"),
        pytest.param(
            {"timestamp": "2000-01-01T00:00:00+00:01"}, id="iso-offset-before-2000"
        ),
        # Nor the size limit of VITALS_MAX_MESSAGE_BYTES.
        pytest.param({"note": "x" * 70_000}, id="larger-than-64-kib"),
        # Nor a zero width space, which the batch reads as a space.
        pytest.param({"name": "\u200b \u200b"}, id="zero-width-spaces-as-name"),
        # A lone surrogate escape is valid JSON text but no Unicode character.
        pytest.param({"name": "Anna \ud800"}, id="lone-surrogate-in-name"),
        pytest.param({"ward": {"bed": "\udc00"}}, id="lone-surrogate-nested"),
        pytest.param({"\ud83d": "B2"}, id="lone-surrogate-in-key"),
    ],
)
def test_json_schema_leaves_checks_to_batch(fields: dict[str, Any]) -> None:
    message = reading(**fields)

    assert schema_accepts(message)
    assert not batch_accepts(json.dumps(message).encode())


def test_number_beyond_float_left_to_batch() -> None:
    """The schema accepts 1e400 in an unknown field, but Polars' reader rejects it."""
    value = b'{"note": 1e400, ' + json.dumps(reading()).encode()[1:]

    assert schema_accepts(json.loads(value))
    assert batch_reason(value) == "invalid_json"


def first_values(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Keep the first value of each key, as the example of docs/contracts.md does."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        found.setdefault(key, value)
    return found


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load_strict(value: bytes) -> Any:
    return json.loads(
        value, object_pairs_hook=first_values, parse_constant=reject_constant
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constant_left_to_batch(constant: str) -> None:
    """json.loads reads NaN and Infinity, which the batch rejects as invalid JSON."""
    value = f'{{"note": {constant}, '.encode() + json.dumps(reading()).encode()[1:]

    assert schema_accepts(json.loads(value))
    assert batch_reason(value) == "invalid_json"
    with pytest.raises(ValueError, match="is not JSON"):
        load_strict(value)


def test_nan_passes_schema_bounds() -> None:
    value = json.dumps(reading())[:-1].encode() + b', "heart_rate": NaN}'

    assert schema_accepts(json.loads(value))
    assert batch_reason(value) == "invalid_json"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        pytest.param(
            b'{"age": "x", ' + json.dumps(reading()).encode()[1:],
            False,
            id="bad-value-first",
        ),
        pytest.param(
            json.dumps(reading()).encode()[:-1] + b', "age": "x"}',
            True,
            id="bad-value-last",
        ),
    ],
)
def test_repeated_key_keeps_first_value(value: bytes, accepted: bool) -> None:
    """The batch reads the first value of a repeated key, json.loads the last."""
    assert batch_accepts(value) is accepted
    assert schema_accepts(json.loads(value)) is not accepted
    assert schema_accepts(load_strict(value)) is accepted


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"name": "Anna \ud800"}, "name", id="in-name"),
        pytest.param({"ward": {"bed": "\udc00"}}, "ward", id="nested"),
    ],
)
def test_lone_surrogate_rejected_as_invalid_json(
    fields: dict[str, Any], field: str
) -> None:
    value = json.dumps(reading(**fields)).encode()
    raw = pl.DataFrame(
        {"partition": [0], "offset": [0], "key": [None], "value": [value]},
        schema=RAW_SCHEMA,
    )

    chunk, _ = process_chunk(raw, SETTINGS, topic="t", now=NOW, expected={0: None})
    rejects = [json.loads(payload) for payload in chunk.rejects["payload"]]

    assert b"\\ud" in value
    assert [reject["reason"] for reject in rejects] == ["invalid_json"]
    assert [reject["field"] for reject in rejects] == [field]


@pytest.mark.parametrize(
    "fields",
    [
        # Forms the batch reads but the message format does not promise.
        pytest.param({"patient_id": 123}, id="number-as-patient-id"),
        pytest.param({"consciousness": "a", "sex": "f"}, id="lower-case-codes"),
        pytest.param({"consciousness": " A "}, id="padded-consciousness"),
        pytest.param({"sex": " F "}, id="padded-sex"),
        pytest.param({"on_oxygen": "true"}, id="boolean-as-string"),
        pytest.param({"on_oxygen": "TRUE"}, id="boolean-upper-case"),
        pytest.param({"on_oxygen": 1.0}, id="boolean-as-float-one"),
        pytest.param({"on_oxygen": 0.0}, id="boolean-as-float-zero"),
        pytest.param({"heart_rate": "7.2e1"}, id="exponent-string"),
        # Numeric strings outside the schema's pattern that Polars' float cast reads.
        pytest.param({"heart_rate": "+90"}, id="leading-plus"),
        pytest.param({"heart_rate": "90."}, id="trailing-point"),
        pytest.param({"heart_rate": ".5"}, id="leading-point"),
        pytest.param({"age": "+42"}, id="age-leading-plus"),
        pytest.param({"age": "42."}, id="age-trailing-point"),
        pytest.param({"timestamp": "1718000000."}, id="epoch-trailing-point"),
        pytest.param({"timestamp": "2024-06-10t06:13:20z"}, id="lower-case-t-z"),
        pytest.param(
            {"name": "A" * 150 + " " * 60 + "B" * 10}, id="name-long-before-collapse"
        ),
        pytest.param({"patient_id": "P" * 64 + " "}, id="patient-id-long-before-strip"),
        pytest.param({"device_id": "X" * 128 + " "}, id="device-id-long-before-strip"),
        pytest.param({"device_id": " " * 129}, id="device-id-long-blank"),
    ],
)
def test_json_schema_stricter_than_batch(fields: dict[str, Any]) -> None:
    message = reading(**fields)

    assert not schema_accepts(message)
    assert batch_accepts(json.dumps(message).encode())


#: Reasons of the checks that only the batch applies (cross-field, letter,
#: time window, range of a numeric string); see test_json_schema_leaves_checks_to_batch.
BATCH_ONLY_REASONS = {
    "diastolic_not_below_systolic",
    "invalid_name",
    "timestamp_invalid",
    "out_of_range",
}


def test_json_schema_agrees_with_batch_on_cases() -> None:
    for envelope in load_cases():
        document = envelope.get("value")
        if not isinstance(document, dict):
            continue  # not a JSON object: no schema verdict to compare
        value = case_value(envelope)
        assert value is not None
        reason = batch_reason(value)
        if schema_accepts(document):
            assert reason in {None, *BATCH_ONLY_REASONS}, envelope["case"]
        else:
            assert reason is not None, envelope["case"]


def test_blank_text_pattern_matches_parser_strip() -> None:
    """The schema's blank pattern accepts exactly the text that the parser strips away."""
    characters = [chr(code) for code in range(0x3001) if not 0xD800 <= code <= 0xDFFF]
    stripped = pl.Series(characters).str.strip_chars().str.len_bytes() == 0

    for character, blank in zip(characters, stripped.to_list(), strict=True):
        assert bool(re.fullmatch(BLANK_TEXT, character)) == blank, hex(ord(character))


def test_reject_field_names_match_message_fields() -> None:
    derived = {
        column: field.name
        for field in MESSAGE_FIELDS
        for column in field.columns
        if column != field.name
    }

    assert derived == MESSAGE_FIELD_OF
