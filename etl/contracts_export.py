"""Export the data contracts as files, and detect when a committed export drifts.

Three artefacts live next to the models in ``contracts/``:

- ``vitals_input.schema.json``: JSON Schema (draft 2020-12) of one Kafka
  message, for producers. The field list, types and tolerances follow the
  parser (:mod:`etl.parse`); ranges, lengths and allowed values come from
  ``InputReading``.
- ``input_reading.yaml`` and ``output_row.yaml``: Pandera's own YAML form of
  ``InputReading`` and ``OutputRow``, plus a ``custom_checks`` section.
  Pandera skips checks that are not registered with its extension API, so
  that section lists them by column and name with a SHA-256 of their source.

The Python models are the source of truth. ``check_artefacts`` compares the
committed files with a fresh export; it does not load the YAML back, because
``DataFrameSchema.from_yaml`` in Pandera 0.35 needs pandas.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import yaml

from contracts import models
from etl.config import Settings
from etl.parse import BLOOD_PRESSURE_PATTERN, EPOCH_MS_THRESHOLD, TEXT_SCHEMA

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandera.polars as pa

CONTRACTS_DIR: Final = Path(models.__file__).parent
JSON_SCHEMA_FILE: Final = "vitals_input.schema.json"
INPUT_YAML_FILE: Final = "input_reading.yaml"
OUTPUT_YAML_FILE: Final = "output_row.yaml"

#: The characters that Polars' ``strip_chars()`` removes (Unicode White_Space),
#: listed because ``\s`` and ``\d`` differ between regex dialects (Python's
#: ``re`` adds U+001C to U+001F and non-ASCII digits, ECMA-262 adds U+FEFF).
_SPACE: Final = (
    r"[\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
#: Text that the parser reads as absent: blank.
BLANK_TEXT: Final = rf"^{_SPACE}*$"
#: A decimal number as text, as the parser reads it (surrounding spaces allowed).
NUMBER_TEXT: Final = rf"^{_SPACE}*-?[0-9]+(\.[0-9]+)?{_SPACE}*$"
#: A whole number as text; "42.0" counts as whole, like the JSON number 42.0.
INTEGER_TEXT: Final = rf"^{_SPACE}*[0-9]+(\.0+)?{_SPACE}*$"
#: ISO-8601 date and time with seconds and a UTC offset or Z. A space may
#: replace the T, as RFC 3339 allows.
ISO_8601_TEXT: Final = (
    rf"^{_SPACE}*[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}[T ][0-9]{{2}}:[0-9]{{2}}:[0-9]{{2}}"
    rf"(\.[0-9]+)?(Z|[+-][0-9]{{2}}(:?[0-9]{{2}})?){_SPACE}*$"
)
#: Columns that the Kafka source adds; they are not part of a message.
KAFKA_COLUMNS: Final = ("partition", "offset")

_UNREGISTERED_WARNING: Final = "Only registered checks may be serialized"

Kind = Literal[
    "string", "integer", "number", "boolean", "choice", "blood_pressure", "timestamp"
]


class ContractExportError(RuntimeError):
    """The models and the export code no longer fit together; the message names what to extend."""


@dataclass(frozen=True)
class MessageField:
    """A field of the Kafka message and the ``InputReading`` columns parsed from it."""

    name: str
    columns: tuple[str, ...]
    kind: Kind
    description: str


MESSAGE_FIELDS: Final = (
    MessageField("patient_id", ("patient_id",), "string", "Patient identifier."),
    MessageField("name", ("name",), "string", "Full name as typed at admission."),
    MessageField("age", ("age",), "integer", "Age in whole years."),
    MessageField(
        "blood_pressure",
        ("systolic", "diastolic"),
        "blood_pressure",
        'Systolic over diastolic pressure in whole mmHg, such as "120/80".',
    ),
    MessageField("heart_rate", ("heart_rate",), "number", "Heart rate, beats/min."),
    MessageField("temperature", ("temperature",), "number", "Body temperature, °C."),
    MessageField(
        "timestamp", ("measured_at",), "timestamp", "Time of the measurement."
    ),
    MessageField("spo2", ("spo2",), "number", "Oxygen saturation, %."),
    MessageField(
        "respiratory_rate",
        ("respiratory_rate",),
        "number",
        "Respiratory rate, breaths/min.",
    ),
    MessageField(
        "consciousness",
        ("consciousness",),
        "choice",
        "ACVPU level: Alert, new Confusion, Voice, Pain, Unresponsive.",
    ),
    MessageField(
        "on_oxygen", ("on_oxygen",), "boolean", "Whether supplemental oxygen is given."
    ),
    MessageField("sex", ("sex",), "choice", "Sex, for the paediatric tables."),
    MessageField("device_id", ("device_id",), "string", "Monitor or wearable id."),
    MessageField(
        "spo2_scale",
        ("spo2_scale",),
        "integer",
        "NEWS2 SpO2 scale: 1, or 2 for a prescribed 88-92 % target.",
    ),
)

#: Pandera built-in check -> JSON Schema keyword, for checks with one value.
_BOUND_KEYWORDS: Final = {
    "greater_than_or_equal_to": ("minimum", "min_value", ">="),
    "greater_than": ("exclusiveMinimum", "min_value", ">"),
    "less_than_or_equal_to": ("maximum", "max_value", "<="),
    "less_than": ("exclusiveMaximum", "max_value", "<"),
}


@dataclass(frozen=True)
class Drift:
    """A committed artefact that differs from a fresh export, with a unified diff."""

    name: str
    diff: str


# Custom checks


def custom_checks(model: type[pa.DataFrameModel]) -> dict[str, Any]:
    """List the checks of ``model`` that Pandera's serialiser skips.

    Returns ``{"columns": {column: [check, ...]}, "dataframe": [check, ...]}``
    where each check is ``{"name": ..., "source_sha256": ...}``. The hash
    covers the check function's source, so editing its logic changes the
    export as well as renaming it.
    """
    schema = model.to_schema()
    columns: dict[str, list[dict[str, str]]] = {}
    for column_name, column in schema.columns.items():
        found = [
            _describe_check(check, model)
            for check in column.checks
            if check.registry_name is None
        ]
        if found:
            columns[column_name] = found
    dataframe = [
        _describe_check(check, model)
        for check in schema.checks
        if check.registry_name is None
    ]
    return {"columns": columns, "dataframe": dataframe}


def _describe_check(check: pa.Check, model: type[Any]) -> dict[str, str]:
    function = _check_function(check)
    if function is None:
        msg = (
            f"cannot find the function of custom check {check.name!r} on "
            f"{model.__name__}; update etl.contracts_export._check_function for "
            "this Pandera version"
        )
        raise ContractExportError(msg)
    source = textwrap.dedent(inspect.getsource(function)).strip()
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    return {"name": str(check.name), "source_sha256": digest}


def _check_function(check: pa.Check) -> Callable[..., Any] | None:
    """Return the function decorated with ``@pa.check`` or ``@pa.dataframe_check``.

    NOTE: Pandera 0.35 wraps it in an adapter closure over the decorator's
    settings object, and that object's ``check_fn`` is the function. A later
    version may change this, and the export then fails with a message.
    """
    adapter = getattr(check, "_check_fn", None)
    for cell in getattr(adapter, "__closure__", None) or ():
        function = getattr(cell.cell_contents, "check_fn", None)
        if inspect.isfunction(function):
            return function
    return None


# Pandera YAML


def model_yaml(model: type[pa.DataFrameModel]) -> str:
    """Return Pandera's YAML form of ``model`` with a ``custom_checks`` section."""
    with warnings.catch_warnings():
        # The skipped checks are listed in custom_checks below.
        warnings.filterwarnings(
            "ignore", message=_UNREGISTERED_WARNING, category=UserWarning
        )
        body = model.to_schema().to_yaml()
    if body is None:
        msg = f"Pandera returned no YAML for {model.__name__}"
        raise ContractExportError(msg)
    extra = yaml.safe_dump(
        {"custom_checks": custom_checks(model)}, sort_keys=False, allow_unicode=True
    )
    header = (
        f"# Generated by 'etl contracts export' from {model.__module__}.{model.__name__}; "
        "do not edit.\n"
        "# Pandera's YAML form of the model, then custom_checks: the checks that\n"
        "# Pandera does not serialise, by column and name, with a SHA-256 of their source.\n"
    )
    return header + body.rstrip("\n") + "\n" + extra


# JSON Schema of the message


def message_json_schema(
    model: type[pa.DataFrameModel] | None = None,
) -> dict[str, Any]:
    """Build the JSON Schema (draft 2020-12) of one Kafka message from the input model.

    Raises
    ------
    ContractExportError
        When a model column or a parser field has no entry in
        :data:`MESSAGE_FIELDS`, or a column has a check with no JSON Schema
        equivalent here.
    """
    model = model or models.InputReading
    schema = model.to_schema()
    _check_coverage(schema.columns, model.__name__)

    unregistered = custom_checks(model)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for message_field in MESSAGE_FIELDS:
        columns = [schema.columns[name] for name in message_field.columns]
        nullable = all(column.nullable for column in columns)
        if not nullable:
            required.append(message_field.name)
        properties[message_field.name] = _property(message_field, columns, nullable)
        names = [
            check["name"]
            for name in message_field.columns
            for check in unregistered["columns"].get(name, [])
            if check["name"] not in CUSTOM_CHECK_KEYWORDS
        ]
        if names:
            properties[message_field.name]["x-pandera-checks"] = names

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Generated by 'etl contracts export' from {model.__module__}."
            f"{model.__name__} and etl.parse; do not edit."
        ),
        "title": "Vital-sign reading (Kafka message value)",
        "description": (
            "One UTF-8 JSON object per Kafka message. Numbers may also be sent as "
            "numeric strings; a range applies to the value of a JSON number, and "
            "the batch checks it again after reading a numeric string. Unknown "
            "fields are ignored. x-pandera-checks names the contract checks that "
            "JSON Schema cannot express; they run in the batch."
        ),
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": True,
        "x-pandera-checks": [check["name"] for check in unregistered["dataframe"]],
    }


def _check_coverage(columns: dict[str, Any], model_name: str) -> None:
    covered = {name for field in MESSAGE_FIELDS for name in field.columns}
    unmapped = [c for c in columns if c not in covered and c not in KAFKA_COLUMNS]
    if unmapped:
        msg = (
            f"columns {unmapped} of {model_name} have no message field; "
            "add them to etl.contracts_export.MESSAGE_FIELDS"
        )
        raise ContractExportError(msg)
    fields = [field.name for field in MESSAGE_FIELDS]
    if sorted(fields) != sorted(TEXT_SCHEMA):
        msg = (
            f"the parser reads fields {sorted(TEXT_SCHEMA)} but MESSAGE_FIELDS has "
            f"{sorted(fields)}; keep etl.contracts_export.MESSAGE_FIELDS in step"
        )
        raise ContractExportError(msg)


def _property(
    field: MessageField, columns: list[Any], nullable: bool
) -> dict[str, Any]:
    """Build the JSON Schema of one message field."""
    column = columns[0]
    description = field.description
    if field.kind == "blood_pressure":
        bounds = "; ".join(_bounds_text(c) for c in columns)
        pattern = re.sub(r"\(\?<\w+>", "(", BLOOD_PRESSURE_PATTERN)
        pattern = r"^\s*" + pattern.removeprefix("^").removesuffix("$") + r"\s*$"
        return {
            "description": f"{description} The contract requires {bounds}.",
            "type": "string",
            "pattern": pattern,
        }
    if field.kind == "timestamp":
        return _timestamp_property(description)

    options: list[dict[str, Any]]
    if field.kind in ("integer", "number"):
        number = {"type": field.kind, **_keywords(column)}
        text_pattern = INTEGER_TEXT if field.kind == "integer" else NUMBER_TEXT
        options = [number, {"type": "string", "pattern": text_pattern}]
    elif field.kind == "string":
        text = {"type": "string", **_keywords(column)}
        if text.get("minLength", 0) >= 1:
            # The parser strips spaces, so a blank value counts as missing.
            text["pattern"] = r"\S"
        options = [text]
    elif field.kind == "choice":
        options = [{"type": "string", **_keywords(column)}]
    else:
        options = [{"type": "boolean"}]

    if nullable:
        if field.kind != "string":
            # The parser reads a blank string in an optional field as absent.
            options.append({"type": "string", "pattern": BLANK_TEXT})
        options.append({"type": "null"})
    if len(options) == 1:
        return {"description": description, **options[0]}
    return {"description": description, "oneOf": options}


def _timestamp_property(description: str) -> dict[str, Any]:
    defaults = Settings.model_fields
    earliest = defaults["min_timestamp"].default
    skew = defaults["max_future_skew_s"].default
    return {
        "description": (
            f"{description} Unix epoch seconds, epoch milliseconds (values above "
            f"{EPOCH_MS_THRESHOLD:.0e} are read as milliseconds), or ISO-8601 with "
            "seconds and a UTC offset or Z (a space may replace the T). Rejected when "
            f"earlier than VITALS_MIN_TIMESTAMP (default {earliest:.0f}) or more than "
            f"VITALS_MAX_FUTURE_SKEW_S (default {skew:.0f} s) after the batch start."
        ),
        "oneOf": [
            {"type": "number", "minimum": earliest},
            {"type": "string", "pattern": NUMBER_TEXT},
            {"type": "string", "pattern": ISO_8601_TEXT},
        ],
    }


#: JSON Schema keywords of the custom checks that JSON Schema can express.
#: The others are listed in x-pandera-checks.
CUSTOM_CHECK_KEYWORDS: Final[dict[str, dict[str, Any]]] = {
    "percentage_not_fraction": {
        "not": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    },
}


def _keywords(column: Any) -> dict[str, Any]:
    """Translate the built-in checks of a Pandera column into JSON Schema keywords."""
    keywords: dict[str, Any] = {}
    for check in column.checks:
        if check.registry_name is None:
            # Custom: expressed here when it can be, else in x-pandera-checks.
            keywords.update(CUSTOM_CHECK_KEYWORDS.get(check.name, {}))
            continue
        statistics = check.statistics or {}
        if check.name in _BOUND_KEYWORDS:
            keyword, statistic, _ = _BOUND_KEYWORDS[check.name]
            keywords[keyword] = statistics[statistic]
        elif check.name == "isin":
            keywords["enum"] = list(statistics["allowed_values"])
        elif check.name == "str_length":
            if statistics.get("min_value") is not None:
                keywords["minLength"] = statistics["min_value"]
            if statistics.get("max_value") is not None:
                keywords["maxLength"] = statistics["max_value"]
        else:
            msg = (
                f"check {check.name!r} of column {column.name!r} has no JSON Schema "
                "keyword in etl.contracts_export._keywords; add one"
            )
            raise ContractExportError(msg)
    return keywords


def _bounds_text(column: Any) -> str:
    """Describe the bounds of a column, such as ``systolic > 20 and <= 300``."""
    parts = []
    for check in column.checks:
        if check.name in _BOUND_KEYWORDS:
            _, statistic, symbol = _BOUND_KEYWORDS[check.name]
            parts.append(f"{symbol} {check.statistics[statistic]}")
    return f"{column.name} " + " and ".join(parts)


# Files


def render_artefacts(
    *,
    input_model: type[pa.DataFrameModel] | None = None,
    output_model: type[pa.DataFrameModel] | None = None,
) -> dict[str, str]:
    """Return the text of every artefact by file name, freshly exported from the models.

    The models default to ``contracts.models.InputReading`` and ``OutputRow``,
    looked up at call time.
    """
    input_model = input_model or models.InputReading
    output_model = output_model or models.OutputRow
    json_schema = message_json_schema(input_model)
    return {
        JSON_SCHEMA_FILE: json.dumps(json_schema, indent=2, ensure_ascii=False) + "\n",
        INPUT_YAML_FILE: model_yaml(input_model),
        OUTPUT_YAML_FILE: model_yaml(output_model),
    }


def write_artefacts(directory: Path = CONTRACTS_DIR) -> list[Path]:
    """Write every artefact into ``directory``; return the paths written."""
    written = []
    for name, text in render_artefacts().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_artefacts(
    directory: Path = CONTRACTS_DIR, *, fresh: dict[str, str] | None = None
) -> list[Drift]:
    """Compare the artefacts in ``directory`` with a fresh export; return the differences.

    An empty list means every committed file equals its fresh export.
    """
    fresh = render_artefacts() if fresh is None else fresh
    drifts = []
    for name, expected in fresh.items():
        path = directory / name
        if not path.exists():
            drifts.append(Drift(name, f"{path} is missing"))
            continue
        committed = path.read_text(encoding="utf-8")
        if committed == expected:
            continue
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{name} (committed)",
            tofile=f"{name} (fresh export)",
        )
        drifts.append(Drift(name, "".join(diff)))
    return drifts
