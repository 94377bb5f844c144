"""Deterministic, realistic readings for the benchmark (about 200 bytes each).

Used when ``etl.generate`` is not available. Invented patients: a cohort of
people with compound first names and multi-word family names, each sending
readings a few seconds apart over the last day.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Final

FIRST_NAMES: Final = (
    "Sophie", "Jean-Pierre", "Amara", "Marie Claire", "Lucas", "Inès", "Mohamed",
    "Chloé", "Anne-Laure", "Pieter", "Fatou", "Hugo", "Léa", "Yusuf", "Camille",
)  # fmt: skip
LAST_NAMES: Final = (
    "Bernard", "de la Tour", "Okafor", "van den Broek", "Martin", "Diallo",
    "Nguyen", "Le Goff", "DUBOIS", "Moreau", "Benali", "da Silva", "Petit",
)  # fmt: skip


def _cohort(rng: random.Random, size: int) -> list[tuple[str, str, int]]:
    people = []
    for _ in range(size):
        patient_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        people.append((patient_id, name, rng.randint(18, 95)))
    return people


def iter_readings(
    *, count: int, seed: int = 0, cohort_size: int = 200, now: float | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``count`` (key, value) pairs: the key is the patient id, the value compact JSON."""
    rng = random.Random(seed)
    people = _cohort(rng, cohort_size)
    keys = [person[0].encode() for person in people]
    start = (time.time() if now is None else now) - 86_400.0
    step = 86_000.0 / max(count, 1)
    uniform = rng.random
    for index in range(count):
        which = int(uniform() * cohort_size)
        patient_id, name, age = people[which]
        systolic = 85 + int(uniform() * 106)
        diastolic = 50 + int(uniform() * (min(systolic - 10, 120) - 49))
        tenths = 355 + int(uniform() * 46)
        value = (
            f'{{"patient_id":"{patient_id}","name":"{name}","age":{age},'
            f'"blood_pressure":"{systolic}/{diastolic}",'
            f'"heart_rate":{45 + int(uniform() * 96)},'
            f'"temperature":{tenths // 10}.{tenths % 10},'
            f'"spo2":{85 + int(uniform() * 16)},'
            f'"respiratory_rate":{10 + int(uniform() * 21)},'
            f'"timestamp":{start + index * step:.3f}}}'
        )
        yield keys[which], value.encode()
