"""Hostile and malformed messages: each has a reason code or a documented acceptance rule.

The corpus lives in ``tests/data/hostile/*.jsonl``; its README describes the
line format and the acceptance rules.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etl.config import load_settings
from etl.parse import RAW_SCHEMA
from etl.pipeline import REJECT_PAYLOAD_BYTES, BatchReport, process_chunk
from etl.reasons import Reason
from etl.sink import WriteResult, counters

CORPUS_DIR: Final = Path(__file__).resolve().parents[1] / "data" / "hostile"
NOW: Final = 1_718_000_600.0
SETTINGS: Final = load_settings()

#: The reading that corpus lines modify; every value is invented.
BASE_READING: Final[dict[str, Any]] = {
    "patient_id": "PT-H0001",
    "name": "Zanele Hostilova",
    "age": 58,
    "blood_pressure": "142/91",
    "heart_rate": 88,
    "temperature": 37.1,
    "timestamp": 1718000000.0,
}

#: Rules that accept an odd value; the corpus README explains each one.
ACCEPTANCE_RULES: Final = frozenset(
    {
        "numeric_strings",
        "numeric_patient_id",
        "integral_decimals",
        "blood_pressure_spaces",
        "boolean_text",
        "unknown_fields_dropped",
        "duplicate_keys_first_wins",
        "insignificant_whitespace",
        "iso8601_with_offset",
        "epoch_milliseconds",
        "optional_null",
        "one_word_name",
        "whitespace_collapsed",
        "unicode_text_kept",
    }
)


@dataclass(frozen=True)
class HostileCase:
    """One corpus line with its Kafka value built."""

    kind: str
    category: str
    value: bytes | None
    expected_reason: str | None
    expected_field: str | None
    accepted_by: str | None
    expected_row: dict[str, Any] = field(default_factory=dict)


def _render_text(entry: dict[str, Any]) -> str:
    document = {**BASE_READING, **entry.get("fields", {})}
    for name in entry.get("drop", []):
        document.pop(name)
    reading_text = json.dumps(document, ensure_ascii=False)
    text: str = entry.get("value_text", "{{reading}}").replace(
        "{{reading}}", reading_text
    )
    for placeholder, parts in entry.get("repeat", {}).items():
        filled = "".join(
            unit.replace("{i}", str(index))
            for unit, times in parts
            for index in range(times)
        )
        text = text.replace(json.dumps(placeholder), filled)
        text = text.replace(placeholder, filled)
    return text


def build_value(entry: dict[str, Any]) -> bytes | None:
    """Return the Kafka value bytes of a corpus line (None for a tombstone)."""
    if entry.get("tombstone"):
        return None
    if "value" in entry:
        return json.dumps(entry["value"]).encode()
    data = _render_text(entry).encode(entry.get("encoding", "utf-8"))
    if "insert_hex" in entry:
        data = data.replace(b"{{bytes}}", bytes.fromhex(entry["insert_hex"]))
    return bytes.fromhex(entry.get("prefix_hex", "")) + data


@cache
def load_corpus() -> tuple[HostileCase, ...]:
    """Every corpus line of every file, in file and line order."""
    cases = []
    for path in sorted(CORPUS_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            cases.append(
                HostileCase(
                    kind=entry["kind"],
                    category=path.stem,
                    value=build_value(entry),
                    expected_reason=entry.get("expected_reason"),
                    expected_field=entry.get("expected_field"),
                    accepted_by=entry.get("accepted_by"),
                    expected_row=entry.get("expected_row", {}),
                )
            )
    return tuple(cases)


def good_value(index: int) -> bytes:
    return json.dumps(
        {**BASE_READING, "patient_id": f"PT-G{index:04d}", "name": "Ilse Goodman"}
    ).encode()


def raw_frame(
    values: list[bytes | None], *, partitions: list[int] | None = None
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "partition": partitions or [0] * len(values),
            "offset": list(range(len(values))),
            "key": [b"k"] * len(values),
            "value": values,
        },
        schema=RAW_SCHEMA,
    )


def decoded(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in frame["payload"].to_list()]


def test_corpus_has_many_distinct_kinds() -> None:
    cases = load_corpus()
    kinds = [case.kind for case in cases]
    assert len(kinds) >= 40
    assert len(set(kinds)) == len(kinds), Counter(kinds).most_common(3)
    assert len({case.category for case in cases}) >= 8


@pytest.mark.parametrize("case", load_corpus(), ids=lambda case: case.kind)
def test_corpus_line_has_one_known_outcome(case: HostileCase) -> None:
    assert (case.expected_reason is None) != (case.accepted_by is None)
    if case.expected_reason is not None:
        assert case.expected_reason in {reason.value for reason in Reason}
    else:
        assert case.accepted_by in ACCEPTANCE_RULES


def test_corpus_rules_documented() -> None:
    readme = (CORPUS_DIR / "README.md").read_text()
    for rule in ACCEPTANCE_RULES:
        assert f"| `{rule}` |" in readme, rule


@pytest.mark.parametrize("case", load_corpus(), ids=lambda case: case.kind)
def test_process_chunk_hostile_value_between_good_ones(case: HostileCase) -> None:
    """The hostile value gets its outcome, and the good values around it are rows."""
    chunk, duplicates = process_chunk(
        raw_frame([good_value(0), case.value, good_value(2)]),
        SETTINGS,
        topic="vitals",
        now=NOW,
        expected={0: None},
    )
    rows = decoded(chunk.rows)
    rejects = decoded(chunk.rejects)

    assert duplicates == 0
    assert chunk.next_offsets == {0: 3}
    row_offsets = [row["source"]["offset"] for row in rows]
    reject_offsets = [reject["source"]["offset"] for reject in rejects]
    assert 0 in row_offsets
    assert 2 in row_offsets
    if case.expected_reason is not None:
        assert row_offsets == [0, 2]
        (reject,) = rejects
        assert reject["reason"] == case.expected_reason
        if case.expected_field is not None:
            assert reject["field"] == case.expected_field
    else:
        assert reject_offsets == []
        (row,) = [row for row in rows if row["source"]["offset"] == 1]
        for name, expected in case.expected_row.items():
            assert row[name] == expected, name


def test_process_chunk_whole_corpus_counts_by_reason() -> None:
    """All kinds in one chunk: the report counts rejects by reason code."""
    cases = load_corpus()
    values = [value for case in cases for value in (case.value, good_value(0))]
    chunk, _ = process_chunk(
        raw_frame(values), SETTINGS, topic="vitals", now=NOW, expected={0: None}
    )
    report = BatchReport(topic="vitals", started_at="")
    written = WriteResult(
        written=chunk.rows.height,
        rejected=chunk.rejects.height,
        alerts=0,
        skipped=0,
        concurrent=False,
        counts=counters(chunk.rows, chunk.rejects),
    )
    report.add(chunk, written)

    expected = Counter(c.expected_reason for c in cases if c.expected_reason)
    assert report.rejected_by_reason == dict(expected)
    accepted = sum(1 for case in cases if case.accepted_by)
    assert chunk.rows.height == len(cases) + accepted
    offsets = chunk.rows["offset"].to_list() + chunk.rejects["offset"].to_list()
    assert sorted(offsets) == list(range(len(values)))


# Hypothesis: mixed batches of good and bad messages, some delivered twice.

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["١٤٢/٩١", "142/91", " 142 / 91 ", "1e30", "58", "NaN", "-0"]),
)
hostile_fields = st.one_of(
    hostile_scalars,
    st.lists(hostile_scalars, max_size=2),
    st.dictionaries(st.text(max_size=4), hostile_scalars, max_size=2),
)
mutated_readings = st.dictionaries(
    st.sampled_from([*BASE_READING, "spo2", "spo2_scale", "sex", "on_oxygen"]),
    hostile_fields,
    max_size=3,
).map(lambda changes: json.dumps({**BASE_READING, **changes}).encode())
corpus_values = st.sampled_from([case.value for case in load_corpus()])
message_values = st.one_of(
    st.integers(0, 999).map(good_value),
    corpus_values,
    mutated_readings,
    st.binary(max_size=40),
)


@st.composite
def deliveries(draw: st.DrawFn) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, value) records; some are delivered a second time."""
    values = draw(st.lists(message_values, max_size=30))
    next_offset = {0: 0, 1: 0, 2: 0}
    records = []
    for value in values:
        partition = draw(st.integers(0, 2))
        records.append((partition, next_offset[partition], value))
        next_offset[partition] += 1
    repeats = draw(st.lists(st.sampled_from(records), max_size=5)) if records else []
    return records + repeats


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
@example([])
@example([(0, 0, None), (0, 0, None)])
def test_process_chunk_mixed_batch_accounts_every_offset(
    records: list[tuple[int, int, bytes | None]],
) -> None:
    """Every (partition, offset) ends as exactly one row or one reject."""
    frame = pl.DataFrame(
        {
            "partition": [partition for partition, _, _ in records],
            "offset": [offset for _, offset, _ in records],
            "key": [b"k"] * len(records),
            "value": [value for _, _, value in records],
        },
        schema=RAW_SCHEMA,
    )
    chunk, duplicates = process_chunk(
        frame, SETTINGS, topic="vitals", now=NOW, expected={}
    )

    delivered = {(partition, offset) for partition, offset, _ in records}
    found = list(chunk.rows.select("partition", "offset").iter_rows())
    found += list(chunk.rejects.select("partition", "offset").iter_rows())
    assert sorted(found) == sorted(delivered)
    assert duplicates == len(records) - len(delivered)
    ends: dict[int, int] = {}
    for partition, offset in delivered:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert chunk.next_offsets == ends


def test_process_chunk_filtered_frame_does_not_panic() -> None:
    """Values that once made Polars 2.1 panic in transform after filtering (found by Hypothesis)."""
    good = (
        b'{"patient_id": "PT-0001", "name": "Amara Okafor", "age": 58, "blood_pressure":'
        b' "142/91", "heart_rate": 88, "temperature": 37.1, "timestamp": 1718000000.0}'
    )
    values: list[bytes | None] = [
        good,
        b'{"patient_id": true, "name": -1000000, "age": [], "blood_pressure": '
        b'"f\\u0017\\u00ad\\ud994\\ude55", "heart_rate": 986880, "temperature": [], '
        b'"timestamp": [], "on_oxygen": 946684800.0, "spo2": null}',
        good,
        good,
        b'{"patient_id": "PT-0001", "name": "Amara Okafor", "age": 1000000, '
        b'"blood_pressure": -Infinity, "heart_rate": "1\\udb4c\\udce5r\\u00ac\\u001e'
        b'(I\\u00a2\\u00bf", "temperature": 37.1, "timestamp": 374, "spo2": null}',
    ]
    chunk, _ = process_chunk(
        raw_frame(values), SETTINGS, topic="vitals", now=NOW, expected={0: None}
    )
    assert chunk.rows["offset"].to_list() == [0, 2, 3]
    assert sorted(chunk.rejects["offset"].to_list()) == [1, 4]


# Reject rows keep the raw value safely: text when it is UTF-8, else base64, bounded.


def reject_of(value: bytes) -> dict[str, Any]:
    chunk, _ = process_chunk(
        raw_frame([value]), SETTINGS, topic="vitals", now=NOW, expected={0: None}
    )
    (reject,) = decoded(chunk.rejects)
    return reject


def test_reject_payload_cut_keeps_utf8_text() -> None:
    """A long UTF-8 value cut inside a 3-byte character is still stored as text."""
    value = json.dumps({**BASE_READING, "name": "€" * 3000}, ensure_ascii=False)
    reject = reject_of(value.encode())
    assert reject["reason"] == Reason.OUT_OF_RANGE
    assert "payload_base64" not in reject
    assert reject["payload_truncated"] is True
    kept = reject["payload"].encode()
    assert len(kept) <= REJECT_PAYLOAD_BYTES
    assert value.encode().startswith(kept)


def test_reject_payload_non_utf8_is_base64_and_bounded() -> None:
    value = b"\xe9" * 10_000
    reject = reject_of(value)
    assert reject["reason"] == Reason.NOT_UTF8
    assert "payload" not in reject
    assert base64.b64decode(reject["payload_base64"]) == value[:REJECT_PAYLOAD_BYTES]
    assert reject["payload_truncated"] is True


def test_reject_payload_invalid_last_byte_is_base64() -> None:
    """An incomplete character at the very end of an uncut value is kept as bytes."""
    value = json.dumps(BASE_READING).encode() + b"\xc3"
    reject = reject_of(value)
    assert reject["reason"] == Reason.NOT_UTF8
    assert base64.b64decode(reject["payload_base64"]) == value
    assert reject["payload_truncated"] is False
