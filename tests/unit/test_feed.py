"""Feed validator: each NDJSON line is judged as the batch would judge the message."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from etl.cli import main
from etl.config import load_settings
from etl.feed import LineFailure, find_message_key, iter_lines, validate_feed
from etl.parse import RAW_SCHEMA
from etl.pipeline import process_chunk
from tests.conftest import case_value, encode, load_cases, reading

NOW = 1_718_000_600.0
SETTINGS = load_settings()

#: Failures expected in the cases file, by patient id (or by case for values
#: that are not readable JSON): (reason, field).
EXPECTED_CASE_FAILURES = {
    "PT-0108": ("not_utf8", None),
    "PT-0109": ("invalid_json", None),
    "PT-0111": ("missing_field", "temperature"),
    "PT-0115": ("wrong_type", "blood_pressure"),
    "PT-0120": ("missing_field", "temperature"),
    "PT-0121": ("wrong_type", "age"),
    "PT-0122": ("missing_field", "heart_rate"),
    "PT-0124": ("missing_field", "name"),
}


def case_lines() -> list[bytes]:
    """The case values; a tombstone (null value) has no line form and is left out."""
    values = [case_value(envelope) for envelope in load_cases()]
    return [value for value in values if value is not None]


def cases_feed() -> bytes:
    return b"\n".join(case_lines()) + b"\n"


def line_of(feed: bytes, patient_id: str) -> int:
    for number, line in enumerate(feed.split(b"\n"), start=1):
        if f'"{patient_id}"'.encode() in line:
            return number
    raise AssertionError(f"{patient_id} is not in the feed")


def batch_verdict(value: bytes) -> tuple[str, str | None] | None:
    """Return (reason, field) when the batch rejects ``value`` sent alone, else None."""
    raw = pl.DataFrame(
        {"partition": [0], "offset": [0], "key": [None], "value": [value]},
        schema=RAW_SCHEMA,
    )
    chunk, _ = process_chunk(raw, SETTINGS, topic="t", now=NOW, expected={0: None})
    if chunk.rejects.is_empty():
        return None
    document = json.loads(chunk.rejects["payload"][0])
    return document["reason"], document["field"]


def test_feed_cases_fail_on_expected_lines() -> None:
    feed = cases_feed()

    result = validate_feed(io.BytesIO(feed), SETTINGS, now=NOW)

    found = {
        failure.line: (failure.reason, failure.field) for failure in result.failures
    }
    for patient, outcome in EXPECTED_CASE_FAILURES.items():
        assert found.get(line_of(feed, patient)) == outcome, patient
    # Cases added to the file later get the verdict of the batch on that message.
    for number, value in enumerate(case_lines(), start=1):
        if value.strip():
            assert found.get(number) == batch_verdict(value), f"line {number}"


def test_feed_cases_counts() -> None:
    lines = case_lines()

    result = validate_feed(io.BytesIO(cases_feed()), SETTINGS, now=NOW)

    # The empty value of case C08 is a blank line.
    blank = sum(1 for value in lines if not value.strip())
    assert (result.lines, result.blank) == (len(lines), blank)
    assert result.checked == len(lines) - blank
    assert len(result.failures) == sum(result.by_reason.values())


def test_feed_small_chunks_give_same_failures() -> None:
    whole = validate_feed(io.BytesIO(cases_feed()), SETTINGS, now=NOW)
    chunked = validate_feed(io.BytesIO(cases_feed()), SETTINGS, now=NOW, chunk_size=3)

    assert chunked.failures == whole.failures


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"a\nb\n", [(1, b"a"), (2, b"b")], id="lf"),
        pytest.param(b"a\r\nb\r\n", [(1, b"a"), (2, b"b")], id="crlf"),
        pytest.param(b"a\nb", [(1, b"a"), (2, b"b")], id="no-final-newline"),
        pytest.param(b"a\n\nb\n", [(1, b"a"), (2, b""), (3, b"b")], id="blank-line"),
        pytest.param(b"", [], id="empty-file"),
        pytest.param(b"\xef\xbb\xbfa\r\nb\r\n", [(1, b"a"), (2, b"b")], id="bom"),
        pytest.param(b"\xef\xbb\xbf", [(1, b"")], id="bom-only"),
        pytest.param(
            b"a\n\xef\xbb\xbfb\n", [(1, b"a"), (2, b"\xef\xbb\xbfb")], id="bom-later"
        ),
        pytest.param(
            b"\xef\xbb\xbf\xef\xbb\xbfa\n",
            [(1, b"\xef\xbb\xbfa")],
            id="second-bom-kept",
        ),
    ],
)
def test_feed_iter_lines_strips_line_endings(
    data: bytes, expected: list[tuple[int, bytes]]
) -> None:
    assert list(iter_lines(io.BytesIO(data))) == expected


def test_feed_skips_blank_lines() -> None:
    feed = b"\n" + encode(reading()) + b"\n   \n" + encode(reading(age=200)) + b"\n"

    result = validate_feed(io.BytesIO(feed), SETTINGS, now=NOW)

    assert result.blank == 2
    assert result.failures == [
        LineFailure(4, "out_of_range", "age", "must be at most 130")
    ]


def test_feed_ignores_bom_at_start() -> None:
    """A file saved as UTF-8 with BOM by Windows Notepad: line 1 still passes."""
    feed = b"\xef\xbb\xbf" + encode(reading()) + b"\r\n" + encode(reading()) + b"\r\n"

    result = validate_feed(io.BytesIO(feed), SETTINGS, now=NOW)

    assert result.checked == 2
    assert result.failures == []


def test_feed_rejects_bom_after_start() -> None:
    """Only the file's first bytes may be a BOM, as the batch rejects one in a message."""
    feed = encode(reading()) + b"\n\xef\xbb\xbf" + encode(reading()) + b"\n"

    result = validate_feed(io.BytesIO(feed), SETTINGS, now=NOW)

    assert [(failure.line, failure.reason) for failure in result.failures] == [
        (2, "invalid_json")
    ]


def test_feed_cli_bom_file_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "notepad.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + encode(reading()) + b"\r\n")

    result = CliRunner().invoke(main, ["validate-feed", str(path)])

    assert result.exit_code == 0, result.output
    assert "1 message checked: 1 valid, 0 invalid" in result.output


def test_feed_checks_timestamp_against_now() -> None:
    feed = encode(reading(timestamp=NOW + 7200)) + b"\n"

    result = validate_feed(io.BytesIO(feed), SETTINGS, now=NOW)

    assert [(f.reason, f.field) for f in result.failures] == [
        ("timestamp_invalid", "timestamp")
    ]


# Command line


def test_feed_cli_prints_failures_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "feed.ndjson"
    path.write_bytes(cases_feed())
    expected = validate_feed(io.BytesIO(cases_feed()), SETTINGS)
    invalid = len(expected.failures)

    result = CliRunner().invoke(main, ["validate-feed", str(path)])

    assert result.exit_code == 1
    assert "not_utf8" in result.output
    assert "missing_field" in result.output
    summary = (
        f"{expected.checked} messages checked: {expected.checked - invalid} valid, "
        f"{invalid} invalid; 1 blank line skipped"
    )
    assert expected.blank == 1
    assert summary in result.output


def test_feed_cli_json_lists_every_failure() -> None:
    feed = cases_feed()
    expected = validate_feed(io.BytesIO(feed), SETTINGS)

    result = CliRunner().invoke(main, ["validate-feed", "--json", "-"], input=feed)

    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["invalid"] == len(expected.failures)
    assert document["valid"] == expected.checked - len(expected.failures)
    failures = {(f["line"], f["reason"], f["field"]) for f in document["failures"]}
    assert (line_of(feed, "PT-0121"), "wrong_type", "age") in failures


def test_feed_cli_valid_feed_exits_0() -> None:
    feed = b"\n".join(encode(reading(patient_id=f"PT-{i}")) for i in range(3))

    result = CliRunner().invoke(main, ["validate-feed", "-"], input=feed)

    assert result.exit_code == 0, result.output
    assert "3 messages checked: 3 valid, 0 invalid" in result.output


def test_feed_cli_piped_table_keeps_details() -> None:
    """Off a terminal the failure table is as wide as its longest detail."""
    feed = encode(reading(name="Jean\u202eMartin"))

    result = CliRunner().invoke(
        main, ["validate-feed", "-"], input=feed, env={"COLUMNS": "60"}
    )

    assert result.exit_code == 1
    detail = "contains a control or explicit bidirectional formatting character"
    [row] = [line for line in result.output.splitlines() if "contains a" in line]
    assert detail in row


def test_feed_cli_limit_shortens_table() -> None:
    feed = b"\n".join(encode(reading(age=200)) for _ in range(5))

    result = CliRunner().invoke(
        main, ["validate-feed", "--limit", "2", "-"], input=feed
    )

    assert result.exit_code == 1
    assert "... and 3 more" in result.output


@pytest.mark.parametrize(
    ("value", "key_field", "expected"),
    [
        pytest.param(
            b'{"patient_id": "PT-7"}', "patient_id", (b"PT-7", True), id="key"
        ),
        pytest.param(b'{"patient_id": 7}', "patient_id", (b"7", True), id="integer"),
        pytest.param(b'{"patient_id": 7.5}', "patient_id", (None, True), id="fraction"),
        pytest.param(
            b'{"patient_id": 7.0}', "patient_id", (b"7", True), id="whole-float"
        ),
        pytest.param(
            b'{"patient_id": 1e3}', "patient_id", (b"1000", True), id="exponent"
        ),
        pytest.param(
            b'{"patient_id": -0.0}', "patient_id", (b"-0", True), id="minus-zero"
        ),
        pytest.param(
            b'{"patient_id": 1e16}', "patient_id", (None, True), id="past-exact-floats"
        ),
        pytest.param(b'{"patient_id": true}', "patient_id", (None, True), id="boolean"),
        pytest.param(b'{"patient_id": null}', "patient_id", (None, True), id="null"),
        pytest.param(b'{"patient_id": " "}', "patient_id", (None, True), id="blank"),
        pytest.param(b'{"device_id": "D-1"}', "patient_id", (None, False), id="absent"),
        pytest.param(
            b'{"x": {"patient_id": "C"}}', "patient_id", (None, False), id="nested-only"
        ),
        pytest.param(b"[1, 2]", "patient_id", (None, False), id="array"),
        pytest.param(b"{", "patient_id", (None, False), id="unreadable"),
        pytest.param(b'{"patient_id": "PT-7"}', "", (None, False), id="no-key-field"),
        pytest.param(
            b'{"p\\u0061tient_id": "A", "patient_id": "B"}',
            "patient_id",
            (b"A", True),
            id="escaped-name",
        ),
    ],
)
def test_find_message_key_reports_field(
    value: bytes, key_field: str, expected: tuple[bytes | None, bool]
) -> None:
    assert find_message_key(value, key_field) == expected


@given(
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.integers(min_value=1 - 2**53, max_value=2**53 - 1).map(float),
    )
)
def test_whole_number_key_matches_stored_id(number: int | float) -> None:
    """A whole-number patient_id keys its message by the id the batch stores."""
    value = encode(reading(patient_id=number))
    raw = pl.DataFrame(
        {"partition": [0], "offset": [0], "key": [None], "value": [value]},
        schema=RAW_SCHEMA,
    )

    chunk, _ = process_chunk(raw, SETTINGS, topic="t", now=NOW, expected={0: None})

    stored = json.loads(chunk.rows["payload"][0])["patient_id"]
    assert find_message_key(value, "patient_id") == (stored.encode(), True)
