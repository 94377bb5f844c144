"""Unit tests of the synthetic readings generator: cohort, readings and bad input."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import orjson
import polars as pl
import pytest
from confluent_kafka import KafkaError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl.cohort import (
    MAX_COHORT_SIZE,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    build_cohort,
    draw_reading,
    make_name,
)
from etl.config import load_settings
from etl.generate import (
    WINDOW_S,
    _delivered_text,
    _DeliveryReports,
    _wait_until,
    ensure_topic,
    iter_readings,
    produce_readings,
)
from etl.malformed import MALFORMED_KINDS
from etl.parse import RAW_SCHEMA
from etl.pipeline import process_chunk

NOW = 1_800_000_000.0
PATIENT_ID = re.compile(r"PT-\d{6}")
# Default of Settings.max_message_bytes.
MAX_MESSAGE_BYTES = 65_536
# 2000-01-01T00:00:00Z, the default of Settings.min_timestamp.
MIN_TIMESTAMP = 946_684_800.0
# Default of Settings.max_future_skew_s.
MAX_FUTURE_SKEW_S = 3600.0
BLOOD_PRESSURE = re.compile(r"\s*(\d+)(?:\.0+)?\s*/\s*(\d+)(?:\.0+)?\s*")
NEWS2_FIELDS = ("spo2", "respiratory_rate", "consciousness", "on_oxygen")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _number(value: Any) -> float | None:
    """Return ``value`` as a finite float, accepting numeric strings, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _timestamp(value: Any) -> float | None:
    """Return epoch seconds from seconds, milliseconds or ISO-8601 with an offset."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return _number(value)
        return parsed.timestamp() if parsed.tzinfo is not None else None
    seconds = _number(value)
    if seconds is not None and seconds > 1e11:
        return seconds / 1000
    return seconds


def _in_range(value: Any, low: float, high: float) -> bool:
    number = _number(value)
    return number is not None and low <= number <= high


def _check_optional_fields(data: dict[str, Any]) -> str | None:
    if "spo2" in data and not _in_range(data["spo2"], 0, 100):
        return "spo2"
    if "respiratory_rate" in data and not _in_range(data["respiratory_rate"], 0, 100):
        return "respiratory_rate"
    if "consciousness" in data and data["consciousness"] not in set("ACVPU"):
        return "consciousness"
    if "on_oxygen" in data and not isinstance(data["on_oxygen"], bool):
        return "on_oxygen"
    if "sex" in data and data["sex"] not in ("F", "M"):
        return "sex"
    if "device_id" in data and not isinstance(data["device_id"], str):
        return "device_id"
    return None


def reading_problem(value: bytes | None, *, now: float = NOW) -> str | None:
    """Return why ``value`` is not an acceptable reading, or None when it is one.

    This is the input contract with its documented tolerances (numeric strings,
    spaces around the slash, integral decimals, epoch milliseconds, ISO-8601 with an
    offset) and the plausibility bounds at which a reading is rejected as bad data.
    """
    if value is None:
        return "tombstone"
    if len(value) > MAX_MESSAGE_BYTES:
        return "message_too_large"
    try:
        data = json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return "not_utf8"
    except ValueError:
        return "invalid_json"
    if not isinstance(data, dict):
        return "not_an_object"

    for field in REQUIRED_FIELDS:
        if data.get(field) is None:
            return f"missing_{field}"
    patient_id, name = data["patient_id"], data["name"]
    if not isinstance(patient_id, str) or not 1 <= len(patient_id) <= 64:
        return "patient_id"
    if not isinstance(name, str) or not name.strip():
        return "name"
    age = _number(data["age"])
    if age is None or age != int(age) or not 0 <= age <= 130:
        return "age"

    blood_pressure = data["blood_pressure"]
    match = (
        BLOOD_PRESSURE.fullmatch(blood_pressure)
        if isinstance(blood_pressure, str)
        else None
    )
    if match is None:
        return "blood_pressure"
    systolic, diastolic = int(match[1]), int(match[2])
    if not 20 < systolic <= 300 or not 0 < diastolic <= 250:
        return "blood_pressure_range"
    if diastolic >= systolic:
        return "diastolic_not_below_systolic"

    if not _in_range(data["heart_rate"], 0, 350):
        return "heart_rate"
    if not _in_range(data["temperature"], 14.2, 47.0):
        return "temperature"
    timestamp = _timestamp(data["timestamp"])
    if timestamp is None or not MIN_TIMESTAMP <= timestamp <= now + MAX_FUTURE_SKEW_S:
        return "timestamp"
    return _check_optional_fields(data)


def _messages(**options: Any) -> list[tuple[bytes, bytes | None]]:
    return list(iter_readings(now=NOW, **options))


def _readings(**options: Any) -> list[dict[str, Any]]:
    readings = []
    for _, value in _messages(**options):
        assert value is not None
        readings.append(orjson.loads(value))
    return readings


def _split_name(name: str) -> tuple[str, str]:
    first, _, last = name.partition(" ")
    return first, last


# --------------------------------------------------------------------------------------
# Determinism and shape
# --------------------------------------------------------------------------------------


def test_iter_readings_same_seed_same_messages() -> None:
    first = _messages(count=2_000, seed=42, malformed_rate=0.2)
    second = _messages(count=2_000, seed=42, malformed_rate=0.2)
    assert first == second


def test_iter_readings_other_seed_differs() -> None:
    first = _messages(count=200, seed=1)
    second = _messages(count=200, seed=2)
    assert first != second


def test_iter_readings_yields_count_messages() -> None:
    assert len(_messages(count=1_234, seed=5)) == 1_234
    assert _messages(count=0, seed=5) == []


def test_iter_readings_key_is_patient_id() -> None:
    for key, value in _messages(count=1_000, seed=3):
        assert value is not None
        assert key == orjson.loads(value)["patient_id"].encode()
        assert PATIENT_ID.fullmatch(key.decode())


def test_well_formed_readings_are_accepted() -> None:
    for _, value in _messages(count=20_000, seed=11, cohort_size=1_000):
        assert reading_problem(value) is None, value


def test_well_formed_reading_types() -> None:
    allowed = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    for reading in _readings(count=5_000, seed=8, cohort_size=500):
        assert set(REQUIRED_FIELDS) <= reading.keys()
        assert reading.keys() <= allowed
        assert type(reading["patient_id"]) is str
        assert type(reading["name"]) is str
        assert type(reading["age"]) is int
        assert re.fullmatch(r"\d{2,3}/\d{2,3}", reading["blood_pressure"])
        assert type(reading["heart_rate"]) is int
        assert type(reading["temperature"]) is float
        assert round(reading["temperature"], 1) == reading["temperature"]
        assert type(reading["timestamp"]) is float
        assert type(reading.get("spo2", 0)) is int
        assert type(reading.get("respiratory_rate", 0)) is int
        assert reading.get("consciousness", "A") in ("A", "C", "V", "P", "U")
        assert type(reading.get("on_oxygen", False)) is bool
        assert reading.get("sex", "F") in ("F", "M")
        assert type(reading.get("device_id", "")) is str


def test_well_formed_values_plausible() -> None:
    for reading in _readings(count=20_000, seed=9, cohort_size=2_000):
        systolic, diastolic = map(int, reading["blood_pressure"].split("/"))
        assert 55 <= systolic <= 250
        assert 30 <= diastolic <= systolic - 15
        assert 30 <= reading["heart_rate"] <= 220
        assert 34.0 <= reading["temperature"] <= 42.0
        assert 70 <= reading.get("spo2", 100) <= 100
        assert 6 <= reading.get("respiratory_rate", 6) <= 60
        assert 0 <= reading["age"] <= 100


def test_timestamps_in_window_and_increasing() -> None:
    readings = _readings(count=5_000, seed=4, cohort_size=50)
    timestamps = [reading["timestamp"] for reading in readings]
    assert min(timestamps) >= NOW - WINDOW_S
    assert max(timestamps) < NOW
    assert timestamps == sorted(timestamps)

    last_by_patient: dict[str, float] = {}
    for reading in readings:
        previous = last_by_patient.get(reading["patient_id"], -math.inf)
        assert reading["timestamp"] > previous
        last_by_patient[reading["patient_id"]] = reading["timestamp"]


def test_timestamps_default_to_current_time() -> None:
    _, value = next(iter_readings(count=1, seed=1))
    assert value is not None
    timestamp = orjson.loads(value)["timestamp"]
    assert datetime.now().timestamp() - WINDOW_S - 5 <= timestamp
    assert timestamp <= datetime.now().timestamp()


def test_patient_identity_stable() -> None:
    identity: dict[str, tuple[Any, ...]] = {}
    for reading in _readings(count=5_000, seed=6, cohort_size=100):
        fields = (reading["name"], reading["age"], reading.get("sex"))
        assert identity.setdefault(reading["patient_id"], fields) == fields


def test_cohort_size_bounds_patients() -> None:
    keys = {key for key, _ in _messages(count=3_000, seed=2, cohort_size=40)}
    assert len(keys) <= 40
    assert len(keys) >= 35


# --------------------------------------------------------------------------------------
# Clinical realism
# --------------------------------------------------------------------------------------


def test_optional_fields_sometimes_absent() -> None:
    readings = _readings(count=10_000, seed=12, cohort_size=1_000)
    complete = [r for r in readings if all(field in r for field in NEWS2_FIELDS)]
    share = len(complete) / len(readings)
    assert 0.5 <= share <= 0.85
    assert any("spo2" not in r for r in readings)
    assert any("device_id" in r for r in readings)


def test_abnormal_readings_appear() -> None:
    readings = _readings(count=30_000, seed=13, cohort_size=1_000)
    systolics = [int(r["blood_pressure"].split("/")[0]) for r in readings]
    assert any(systolic >= 160 for systolic in systolics)
    assert any(systolic < 90 for systolic in systolics)
    assert any(r["heart_rate"] > 130 for r in readings)
    assert any(r["temperature"] >= 38.5 for r in readings)
    assert any(r.get("spo2", 100) <= 91 and r.get("on_oxygen") for r in readings)
    assert any(r.get("consciousness", "A") != "A" for r in readings)


def test_most_readings_normal() -> None:
    readings = _readings(count=30_000, seed=13, cohort_size=1_000)
    alert = [r for r in readings if "consciousness" in r]
    share_alert = sum(r["consciousness"] == "A" for r in alert) / len(alert)
    share_afebrile = sum(r["temperature"] < 38.0 for r in readings) / len(readings)
    assert share_alert > 0.9
    assert share_afebrile > 0.75


def test_baselines_follow_age() -> None:
    readings = _readings(count=40_000, seed=14, cohort_size=3_000)
    by_band: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for reading in readings:
        age = reading["age"]
        band = (
            "child"
            if age < 16
            else "young"
            if age < 40
            else "old"
            if age >= 70
            else "mid"
        )
        by_band[band].append(reading)

    def mean_of(band: str, field: str) -> float:
        if field == "systolic":
            return statistics.fmean(
                int(r["blood_pressure"].split("/")[0]) for r in by_band[band]
            )
        return statistics.fmean(r[field] for r in by_band[band] if field in r)

    assert mean_of("child", "heart_rate") > mean_of("young", "heart_rate") + 10
    assert (
        mean_of("child", "respiratory_rate") > mean_of("young", "respiratory_rate") + 3
    )
    assert mean_of("child", "systolic") < mean_of("young", "systolic") - 8
    assert mean_of("old", "systolic") > mean_of("young", "systolic") + 10


def test_cohort_age_distribution() -> None:
    ages = [patient.age for patient in build_cohort(5_000, random.Random(21))]
    share_children = sum(age < 16 for age in ages) / len(ages)
    share_infants = sum(age < 1 for age in ages) / len(ages)
    assert 0.09 <= share_children <= 0.16
    assert 0.01 <= share_infants <= 0.04
    assert min(ages) == 0
    assert max(ages) <= 100
    assert sum(age >= 80 for age in ages) > 0


def test_cohort_has_unwell_share() -> None:
    cohort = build_cohort(5_000, random.Random(22))
    share_unwell = sum(p.condition.name != "well" for p in cohort) / len(cohort)
    names = {p.condition.name for p in cohort}
    assert 0.15 <= share_unwell <= 0.3
    assert {"hypertensive", "tachycardic", "febrile", "hypoxic_on_oxygen"} <= names


def test_cohort_ids_unique() -> None:
    cohort = build_cohort(2_000, random.Random(23))
    assert len({patient.patient_id for patient in cohort}) == 2_000


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def test_names_include_varied_forms() -> None:
    names = [patient.name for patient in build_cohort(4_000, random.Random(31))]
    two_part = [_split_name(name) for name in names if " " in name]
    assert any(re.fullmatch(r"(Jean|Marie|Anne|Pierre)-\w+", f) for f, _ in two_part)
    assert any(re.search(r"\w-\w", last) for _, last in two_part)
    assert any(re.match(r"(de|de la|du|des) [A-Z]", last) for _, last in two_part)
    assert any(last.startswith("d'") for _, last in two_part)
    assert any(re.match(r"(van|van den|van der|de) ", last) for _, last in two_part)
    assert any(" " not in name for name in names)
    assert any(not name.isascii() for name in names)


def test_names_mostly_distinct() -> None:
    names = [patient.name for patient in build_cohort(2_000, random.Random(32))]
    assert len(set(names)) / len(names) > 0.95


def test_names_well_formed() -> None:
    rng = random.Random(33)
    for _ in range(3_000):
        name = make_name(rng.choice("FM"), rng)
        assert name == name.strip()
        assert "  " not in name
        assert name
        assert not re.search(r"\b(Dr|Mr|Mrs|Ms|Prof|MBA|B\.Sc)\b", name)


# --------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------


def test_malformed_kind_names_unique() -> None:
    kinds = [kind for kind, _ in MALFORMED_KINDS]
    assert len(kinds) == len(set(kinds))
    assert len(kinds) >= 20


@pytest.mark.parametrize(
    "make_malformed",
    [pytest.param(make, id=kind) for kind, make in MALFORMED_KINDS],
)
def test_malformed_kind_rejected(make_malformed: Any) -> None:
    rng = random.Random(41)
    cohort = build_cohort(100, rng)
    values = []
    for index in range(300):
        reading = draw_reading(cohort[index % len(cohort)], NOW - index, rng)
        assert reading_problem(orjson.dumps(reading)) is None
        value = make_malformed(reading, rng)
        assert value is None or isinstance(value, bytes)
        assert reading_problem(value) is not None, value
        values.append(value)
    raw = pl.DataFrame(
        {
            "partition": [0] * len(values),
            "offset": range(len(values)),
            "key": [None] * len(values),
            "value": values,
        },
        schema=RAW_SCHEMA,
    )

    chunk, _ = process_chunk(
        raw, load_settings(), topic="t", now=NOW, expected={0: None}
    )

    assert chunk.rows.height == 0, chunk.rows["payload"].to_list()[:3]


@pytest.mark.parametrize(
    ("rate", "low", "high"),
    [
        pytest.param(0.0, 0.0, 0.0, id="none"),
        pytest.param(0.05, 0.04, 0.06, id="five-percent"),
        pytest.param(0.3, 0.28, 0.32, id="thirty-percent"),
        pytest.param(1.0, 1.0, 1.0, id="all"),
    ],
)
def test_malformed_rate_honoured(rate: float, low: float, high: float) -> None:
    messages = _messages(count=20_000, seed=51, malformed_rate=rate)
    share = sum(reading_problem(value) is not None for _, value in messages) / 20_000
    assert low <= share <= high


def test_malformed_messages_keep_patient_key() -> None:
    for key, _ in _messages(count=2_000, seed=52, malformed_rate=1.0):
        assert PATIENT_ID.fullmatch(key.decode())


def test_malformed_messages_include_tombstones() -> None:
    values = [value for _, value in _messages(count=5_000, seed=53, malformed_rate=1.0)]
    assert None in values
    assert b"" in values


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"count": -1}, r"count must be >= 0, got -1", id="negative-count"),
        pytest.param(
            {"count": 1, "malformed_rate": 1.5},
            r"malformed_rate must be between 0.0 and 1.0, got 1.5",
            id="rate-above-one",
        ),
        pytest.param(
            {"count": 1, "malformed_rate": -0.1},
            r"malformed_rate .* got -0.1",
            id="negative-rate",
        ),
        pytest.param(
            {"count": 1, "malformed_rate": math.nan},
            r"malformed_rate .* got nan",
            id="nan-rate",
        ),
        pytest.param(
            {"count": 1, "cohort_size": 0},
            r"cohort_size must be between 1 and 1000000, got 0",
            id="empty-cohort",
        ),
        pytest.param(
            {"count": 1, "cohort_size": MAX_COHORT_SIZE + 1},
            r"cohort_size .* got 1000001",
            id="cohort-too-large",
        ),
    ],
)
def test_iter_readings_invalid_arguments(options: dict[str, Any], match: str) -> None:
    # Raised by the call itself, before any message is requested.
    with pytest.raises(ValueError, match=match):
        iter_readings(**options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"count": 1, "rate": 0.0}, r"rate must be .* got 0.0", id="zero"),
        pytest.param({"count": 1, "rate": -5.0}, r"rate .* got -5.0", id="negative"),
        pytest.param({"count": 1, "rate": math.inf}, r"rate .* got inf", id="inf"),
        pytest.param({"count": 1, "rate": math.nan}, r"rate .* got nan", id="nan"),
        pytest.param({"count": -3}, r"count must be >= 0, got -3", id="count"),
        pytest.param({"count": 1, "partitions": 0}, r"partitions .* got 0", id="parts"),
    ],
)
def test_produce_readings_invalid_arguments(
    options: dict[str, Any], match: str
) -> None:
    # Validation fails before any connection, so nothing needs to listen on port 9.
    settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", kafka_timeout_s=0.5)
    with pytest.raises(ValueError, match=match):
        produce_readings(settings, **options)


def test_ensure_topic_invalid_partitions() -> None:
    settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", kafka_timeout_s=0.5)
    with pytest.raises(ValueError, match=r"partitions must be >= 1, got -1"):
        ensure_topic(settings, partitions=-1)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=80),
    seed=st.integers(min_value=0, max_value=2**32) | st.none(),
    cohort_size=st.integers(min_value=1, max_value=30),
    malformed_rate=st.floats(min_value=0.0, max_value=1.0),
)
@example(count=0, seed=0, cohort_size=1, malformed_rate=0.0)
@example(count=1, seed=0, cohort_size=1, malformed_rate=1.0)
@example(count=50, seed=None, cohort_size=1, malformed_rate=0.0)
def test_iter_readings_any_valid_arguments(
    count: int, seed: int | None, cohort_size: int, malformed_rate: float
) -> None:
    messages = list(
        iter_readings(
            count=count,
            seed=seed,
            cohort_size=cohort_size,
            malformed_rate=malformed_rate,
            now=NOW,
        )
    )
    assert len(messages) == count
    assert len({key for key, _ in messages}) <= cohort_size
    for key, value in messages:
        assert PATIENT_ID.fullmatch(key.decode())
        assert value is None or isinstance(value, bytes)
        if malformed_rate == 0.0:
            assert reading_problem(value) is None
        if malformed_rate == 1.0:
            assert reading_problem(value) is not None


@settings(max_examples=40, deadline=None)
@given(
    malformed_rate=st.floats(allow_nan=True).filter(lambda rate: not 0.0 <= rate <= 1.0)
)
def test_malformed_rate_outside_unit_interval(
    malformed_rate: float,
) -> None:
    with pytest.raises(
        ValueError, match=r"malformed_rate must be between 0\.0 and 1\.0"
    ):
        iter_readings(count=1, malformed_rate=malformed_rate)


@pytest.mark.parametrize(
    ("sent", "delivered", "text"),
    [
        (1, 1, "Of the 1 message sent, 1 was delivered"),
        (1, 0, "Of the 1 message sent, 0 were delivered"),
        (10, 2, "Of the 10 messages sent, 2 were delivered"),
    ],
)
def test_delivered_text_singular_and_plural(
    sent: int, delivered: int, text: str
) -> None:
    assert _delivered_text(sent, delivered) == text


class _NonBlockingProducer:
    """A producer whose poll() returns at once, as confluent-kafka's does under 1 ms."""

    def __init__(self) -> None:
        self.polls = 0

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0


def test_rate_wait_does_not_spin() -> None:
    """Waits shorter than poll()'s resolution sleep instead of polling in a loop."""
    producer = _NonBlockingProducer()

    for _ in range(20):
        _wait_until(producer, time.monotonic() + 0.0008, threading.Event())  # type: ignore[arg-type]

    assert producer.polls < 100


def test_timed_out_delivery_warns_of_duplicates() -> None:
    """A timed-out message may be in the topic, so sending it again may store it twice."""
    reports = _DeliveryReports()
    reports(None, None)  # type: ignore[arg-type]
    reports(KafkaError(KafkaError._MSG_TIMED_OUT), None)  # type: ignore[arg-type]
    reports(KafkaError(KafkaError._MSG_TIMED_OUT), None)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError) as failure:
        reports.raise_if_failed("127.0.0.1:9", "vitals")

    assert "failed for 2 message(s)" in str(failure.value)
    assert "2 of them timed out" in str(failure.value)
    assert "count the topic's records before sending them again" in str(failure.value)


def test_other_delivery_error_has_no_warning() -> None:
    reports = _DeliveryReports()
    reports(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError) as failure:
        reports.raise_if_failed("127.0.0.1:9", "vitals")

    assert "timed out" not in str(failure.value)
