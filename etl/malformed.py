"""Kinds of malformed input that the generator can inject into the readings topic.

``MALFORMED_KINDS`` lists them as ``(kind, make)`` pairs. Each ``make`` turns a
well-formed reading from ``etl.cohort.draw_reading`` into one bad message: invalid
JSON or UTF-8, a wrong type, an out-of-range value, a missing field or a tombstone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import orjson

from etl.cohort import REQUIRED_FIELDS

MalformedMaker = Callable[[dict[str, Any], random.Random], bytes | None]


def _with(reading: dict[str, Any], **changes: Any) -> bytes:
    return orjson.dumps(reading | changes)


def _truncated_json(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Every proper prefix of a JSON object is invalid, because only the last
    # character closes it.
    data = orjson.dumps(reading)
    return data[: rng.randrange(1, len(data))]


def _trailing_garbage(reading: dict[str, Any], rng: random.Random) -> bytes:
    return orjson.dumps(reading) + rng.choice((b"}", b",", b" x", b"{}"))


def _latin1_encoding(reading: dict[str, Any], rng: random.Random) -> bytes:
    # A legacy producer that encodes in Latin-1: "é" becomes the lone byte 0xE9,
    # which is invalid UTF-8.
    name = rng.choice(("Hélène Dupré", "José Muñoz", "Zoé Lefèvre", "André Gaël"))
    return orjson.dumps(reading | {"name": name}).decode().encode("latin-1")


def _binary_garbage(reading: dict[str, Any], rng: random.Random) -> bytes:
    # 0xC3 0x28 is an invalid two-byte UTF-8 sequence. Unlike 0xFF 0xFE, it is not a
    # byte order mark that a decoder could switch to UTF-16 on.
    return b"\xc3\x28" + rng.randbytes(rng.randrange(0, 64))


def _empty_value(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Empty or whitespace only.
    return rng.choice((b"", b" ", b"\n"))


def _tombstone(reading: dict[str, Any], rng: random.Random) -> None:
    return None


def _not_an_object(reading: dict[str, Any], rng: random.Random) -> bytes:
    choices: tuple[Any, ...] = (
        list(reading.values()),
        reading["name"],
        reading["heart_rate"],
        None,
        [],
    )
    return orjson.dumps(rng.choice(choices))


def _nan_literal(reading: dict[str, Any], rng: random.Random) -> bytes:
    # JSON has no NaN, but Python's json module writes and reads it by default.
    field = rng.choice(("heart_rate", "temperature"))
    return _with(reading, **{field: "<nan>"}).replace(b'"<nan>"', b"NaN")


def _missing_required_field(reading: dict[str, Any], rng: random.Random) -> bytes:
    missing = rng.choice(REQUIRED_FIELDS)
    return orjson.dumps({k: v for k, v in reading.items() if k != missing})


def _null_required_field(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, **{rng.choice(REQUIRED_FIELDS): None})


def _invalid_patient_id(reading: dict[str, Any], rng: random.Random) -> bytes:
    # The batch accepts a JSON number as an id, so none is drawn here.
    return _with(reading, patient_id=rng.choice(("", "PT-" + "9" * 70, ["PT-1"])))


def _age_as_words(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, age=rng.choice(("forty", "quarante", "unknown", "40 ans")))


def _age_out_of_range(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, age=rng.choice((-1, 131, 250, 1985)))


def _blood_pressure_object(reading: dict[str, Any], rng: random.Random) -> bytes:
    systolic, diastolic = (int(part) for part in reading["blood_pressure"].split("/"))
    return _with(reading, blood_pressure={"systolic": systolic, "diastolic": diastolic})


def _blood_pressure_garbage(reading: dict[str, Any], rng: random.Random) -> bytes:
    garbage = ("120-80", "high", "120/", "/80", "120/80/60", "", "abc/def", 120)
    return _with(reading, blood_pressure=rng.choice(garbage))


def _diastolic_not_below_systolic(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Swapped values, as when a nurse types them in the wrong order, or equal values.
    systolic, diastolic = reading["blood_pressure"].split("/")
    swapped = (
        f"{diastolic}/{systolic}" if rng.random() < 0.7 else f"{systolic}/{systolic}"
    )
    return _with(reading, blood_pressure=swapped)


def _heart_rate_as_text(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, heart_rate=rng.choice(("fast", "n/a", True, [72])))


def _heart_rate_out_of_range(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, heart_rate=rng.choice((-15, 420, 999, 7200)))


def _temperature_in_fahrenheit(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Sent in °F by mistake: 36.8 °C becomes 98.2, far above any survivable °C value.
    return _with(reading, temperature=round(reading["temperature"] * 9 / 5 + 32, 1))


def _spo2_out_of_range(reading: dict[str, Any], rng: random.Random) -> bytes:
    return _with(reading, spo2=rng.choice((-1, 101, 127, 255)))


def _invalid_consciousness(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Not drawn: a blank value counts as absent, and "a" is read as "A".
    return _with(reading, consciousness=rng.choice(("alert", "X", "Z", 1)))


def _timestamp_garbage(reading: dict[str, Any], rng: random.Random) -> bytes:
    garbage = ("yesterday", "not-a-date", "2024-13-45T99:00:00", "", "12:30", True)
    return _with(reading, timestamp=rng.choice(garbage))


def _timestamp_in_future(reading: dict[str, Any], rng: random.Random) -> bytes:
    # Ten days ahead, as from a monitor with a wrong clock.
    return _with(reading, timestamp=reading["timestamp"] + 10 * 86_400)


def _huge_name(reading: dict[str, Any], rng: random.Random) -> bytes:
    # 100,000 characters, so the message is over the default 64 KiB message limit.
    return _with(reading, name="A" * 100_000)


MALFORMED_KINDS: Final[tuple[tuple[str, MalformedMaker], ...]] = (
    ("truncated_json", _truncated_json),
    ("trailing_garbage", _trailing_garbage),
    ("latin1_encoding", _latin1_encoding),
    ("binary_garbage", _binary_garbage),
    ("empty_value", _empty_value),
    ("tombstone", _tombstone),
    ("not_an_object", _not_an_object),
    ("nan_literal", _nan_literal),
    ("missing_required_field", _missing_required_field),
    ("null_required_field", _null_required_field),
    ("invalid_patient_id", _invalid_patient_id),
    ("age_as_words", _age_as_words),
    ("age_out_of_range", _age_out_of_range),
    ("blood_pressure_object", _blood_pressure_object),
    ("blood_pressure_garbage", _blood_pressure_garbage),
    ("diastolic_not_below_systolic", _diastolic_not_below_systolic),
    ("heart_rate_as_text", _heart_rate_as_text),
    ("heart_rate_out_of_range", _heart_rate_out_of_range),
    ("temperature_in_fahrenheit", _temperature_in_fahrenheit),
    ("spo2_out_of_range", _spo2_out_of_range),
    ("invalid_consciousness", _invalid_consciousness),
    ("timestamp_garbage", _timestamp_garbage),
    ("timestamp_in_future", _timestamp_in_future),
    ("huge_name", _huge_name),
)
"""Kinds of malformed input as ``(kind, make)`` pairs.

``make(reading, rng)`` turns a well-formed reading into the bytes of one bad message,
or into ``None`` for a tombstone.
"""
