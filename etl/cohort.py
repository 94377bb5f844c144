"""Synthetic patient cohort and its well-formed vital-sign readings.

Each patient has a stable id and name, an age-appropriate set of baseline vital signs,
sometimes an acute condition that shifts them, and a monitor model that decides which
optional fields the readings carry. ``draw_reading`` adds Gaussian noise around the
baselines. ``etl.generate`` turns the readings into Kafka messages.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from faker import Faker

MAX_COHORT_SIZE: Final = 1_000_000
"""Maximum cohort size, because patient ids have six digits (``PT-000000``)."""

REQUIRED_FIELDS: Final = (
    "patient_id",
    "name",
    "age",
    "blood_pressure",
    "heart_rate",
    "temperature",
    "timestamp",
)
OPTIONAL_FIELDS: Final = (
    "spo2",
    "respiratory_rate",
    "consciousness",
    "on_oxygen",
    "sex",
    "device_id",
)

# Approximate resting values of children by age band: (maximum age in years, heart
# rate /min, respiratory rate /min, systolic mmHg, diastolic mmHg). They are estimates
# for synthetic data, not clinical limits.
_CHILD_BASELINES: Final = (
    (0, 140.0, 40.0, 75.0, 45.0),
    (2, 120.0, 30.0, 92.0, 55.0),
    (5, 105.0, 24.0, 98.0, 60.0),
    (11, 90.0, 20.0, 104.0, 64.0),
    (15, 80.0, 17.0, 112.0, 68.0),
)


@dataclass(frozen=True, slots=True)
class Condition:
    """An acute state that shifts a patient's baselines, with its share of the cohort."""

    name: str
    adult_share: float
    child_share: float
    systolic: float = 0.0
    diastolic: float = 0.0
    heart_rate: float = 0.0
    respiratory_rate: float = 0.0
    temperature: float = 0.0
    spo2: float = 0.0
    on_oxygen: bool = False
    # ACVPU levels drawn uniformly per reading, so repeats set the weights.
    consciousness: str = "A" * 199 + "V"
    # Relative number of readings: unwell patients are observed more often.
    reading_weight: int = 3


WELL: Final = Condition("well", 1.0, 1.0, reading_weight=1)

# The shares sum to 0.23 for adults and 0.15 for children, and the rest are well.
CONDITIONS: Final = (
    Condition("hypertensive", 0.08, 0.01, systolic=42.0, diastolic=22.0),
    Condition("tachycardic", 0.04, 0.02, heart_rate=45.0),
    Condition(
        "febrile", 0.05, 0.09, heart_rate=18.0, respiratory_rate=5.0, temperature=1.9
    ),
    Condition(
        "hypoxic_on_oxygen",
        0.04,
        0.02,
        heart_rate=15.0,
        respiratory_rate=9.0,
        spo2=-8.5,
        on_oxygen=True,
    ),
    Condition(
        "septic",
        0.02,
        0.01,
        systolic=-35.0,
        diastolic=-20.0,
        heart_rate=40.0,
        respiratory_rate=10.0,
        temperature=1.5,
        consciousness="AAAAAACCVVPU",
    ),
)

# Monitor models: (device id prefix, share of the cohort, optional fields sent).
# Spot-check devices and legacy monitors leave out fields, so NEWS2 is incomplete.
_MONITORS: Final = (
    ("MON", 0.70, frozenset(OPTIONAL_FIELDS)),
    ("SPOT", 0.20, frozenset({"spo2", "sex", "device_id"})),
    ("LEGACY", 0.10, frozenset[str]()),
)


@dataclass(frozen=True, slots=True)
class Patient:
    """A member of the synthetic cohort: identity, monitor and baseline vital signs."""

    patient_id: str
    key: bytes
    name: str
    age: int
    sex: str
    device_id: str
    optional_fields: frozenset[str]
    condition: Condition
    systolic: float
    diastolic: float
    heart_rate: float
    respiratory_rate: float
    temperature: float
    spo2: float


def build_cohort(size: int, rng: random.Random) -> tuple[Patient, ...]:
    """Build ``size`` patients with stable ids, names and baselines drawn from ``rng``.

    The same generator state always gives the same cohort.
    """
    if not 1 <= size <= MAX_COHORT_SIZE:
        msg = f"cohort_size must be between 1 and {MAX_COHORT_SIZE}, got {size!r}"
        raise ValueError(msg)

    # Faker draws names from its own generators, so seed them from ``rng``.
    for locale, _ in _NAME_LOCALES:
        _faker(locale).seed_instance(rng.getrandbits(64))

    numbers = rng.sample(range(MAX_COHORT_SIZE), size)
    return tuple(_build_patient(f"PT-{number:06d}", rng) for number in numbers)


def _build_patient(patient_id: str, rng: random.Random) -> Patient:
    age = _draw_age(rng)
    sex = "F" if rng.random() < 0.5 else "M"
    condition = _draw_condition(age, rng)
    heart_rate, respiratory_rate, systolic, diastolic = _age_baselines(age)
    prefix, optional_fields = _draw_monitor(rng)
    spo2 = 97.8 - (1.0 if age >= 70 else 0.0)

    return Patient(
        patient_id=patient_id,
        key=patient_id.encode(),
        name=make_name(sex, rng),
        age=age,
        sex=sex,
        device_id=f"{prefix}-{rng.randrange(10_000):04d}",
        optional_fields=optional_fields,
        condition=condition,
        systolic=rng.gauss(systolic, 8.0) + condition.systolic,
        diastolic=rng.gauss(diastolic, 6.0) + condition.diastolic,
        heart_rate=rng.gauss(heart_rate, 8.0) + condition.heart_rate,
        respiratory_rate=rng.gauss(respiratory_rate, 1.5) + condition.respiratory_rate,
        temperature=rng.gauss(36.8, 0.25) + condition.temperature,
        spo2=rng.gauss(spo2, 0.8) + condition.spo2,
    )


def _draw_age(rng: random.Random) -> int:
    """Draw an age in years: about 2% under 1, 12% under 16, adults skewed old."""
    roll = rng.random()
    if roll < 0.02:
        return 0
    if roll < 0.12:
        return rng.randint(1, 15)
    return min(100, int(rng.triangular(16.0, 101.0, 72.0)))


def _draw_condition(age: int, rng: random.Random) -> Condition:
    roll = rng.random()
    for condition in CONDITIONS:
        share = condition.child_share if age < 16 else condition.adult_share
        if roll < share:
            return condition
        roll -= share
    return WELL


def _age_baselines(age: int) -> tuple[float, float, float, float]:
    """Return the heart rate, respiratory rate, systolic and diastolic for ``age``."""
    for max_age, heart_rate, respiratory_rate, systolic, diastolic in _CHILD_BASELINES:
        if age <= max_age:
            return heart_rate, respiratory_rate, systolic, diastolic

    # Systolic pressure rises with age. Diastolic rises until about 60, then falls.
    systolic = 112.0 + 0.45 * (age - 16)
    diastolic = 72.0 + 0.25 * min(age - 16, 44) - 0.2 * max(age - 60, 0)
    return 72.0, 15.0, systolic, diastolic


def _draw_monitor(rng: random.Random) -> tuple[str, frozenset[str]]:
    roll = rng.random()
    for prefix, share, optional_fields in _MONITORS:
        if roll < share:
            return prefix, optional_fields
        roll -= share
    return _MONITORS[0][0], _MONITORS[0][2]


# Locales of patient names with their relative weights: mostly French, as in a French
# hospital, then neighbouring and international names.
_NAME_LOCALES: Final = (
    ("fr_FR", 50),
    ("en_GB", 8),
    ("de_DE", 6),
    ("nl_NL", 6),
    ("nl_BE", 3),
    ("es_ES", 6),
    ("it_IT", 6),
    ("pt_BR", 5),
    ("pt_PT", 4),
    ("pl_PL", 3),
    ("tr_TR", 3),
)
_LOCALE_NAMES: Final = tuple(locale for locale, _ in _NAME_LOCALES)
_LOCALE_WEIGHTS: Final = tuple(weight for _, weight in _NAME_LOCALES)

# First parts of French compound first names such as "Jean-Pierre" or "Anne-Sophie".
_COMPOUND_FIRST_PARTS: Final = {
    "F": ("Marie", "Anne", "Jeanne", "Marie", "Anne"),
    "M": ("Jean", "Pierre", "Jean", "Louis", "Paul"),
}
_FRENCH_PARTICLES: Final = ("de ", "de la ", "du ", "de ", "des ")


@functools.cache
def _faker(locale: str) -> Faker:
    # Imported on first use, so that importing the ETL (for example while Airflow
    # parses a DAG) does not load Faker and its locale data.
    from faker import Faker

    return Faker(locale)


def make_name(sex: str, rng: random.Random) -> str:
    """Make a full name as typed at admission, in a locale drawn from ``rng``.

    About 15% of French first names are compound ("Jean-Pierre"), 10% of French
    surnames have a particle ("de la Tour", "d'Arc"), 6% of surnames are hyphenated,
    and 1% of names are a single word. Dutch, Belgian and Brazilian surnames bring
    their own particles ("van den Broek", "da Cunha").
    """
    locale = rng.choices(_LOCALE_NAMES, _LOCALE_WEIGHTS)[0]
    fake = _faker(locale)
    first = _first_name(fake, sex)
    last = fake.last_name()

    if locale == "fr_FR" and rng.random() < 0.15:
        first = f"{rng.choice(_COMPOUND_FIRST_PARTS[sex])}-{first}"
    if locale == "es_ES" and rng.random() < 0.6:
        last = f"{last} {fake.last_name()}"

    roll = rng.random()
    if locale == "fr_FR" and roll < 0.10:
        last = _with_particle(fake, last, rng)
    elif roll > 0.94:
        last = f"{last}-{fake.last_name()}"

    if rng.random() < 0.01:
        return first if rng.random() < 0.5 else last
    return f"{first} {last}"


def _first_name(fake: Faker, sex: str) -> str:
    name: str = fake.first_name_female() if sex == "F" else fake.first_name_male()
    return name


def _with_particle(fake: Faker, last: str, rng: random.Random) -> str:
    """Add a French particle: "d'" before a vowel, else "de", "de la", "du" or "des"."""
    for _ in range(5):
        if last[0] in "AEIOUÉ":
            return f"d'{last}"
        if rng.random() < 0.7:
            break
        last = fake.last_name()
    return f"{rng.choice(_FRENCH_PARTICLES)}{last}"


# Standard normal quantiles at 4096 evenly spaced probabilities. Indexing the table
# with 12 random bits draws per-reading noise several times faster than random.gauss.
# The tails stop at about 3.5 standard deviations.
_NORMAL_BITS: Final = 12
_STANDARD_NORMAL: Final = tuple(
    NormalDist().inv_cdf((index + 0.5) / 2**_NORMAL_BITS)
    for index in range(2**_NORMAL_BITS)
)


def _clamp(value: float, low: float, high: float) -> float:
    # Plain comparisons, because min(max(...)) is several times slower per call.
    if value < low:
        return low
    if value > high:
        return high
    return value


def draw_reading(
    patient: Patient, timestamp: float, rng: random.Random
) -> dict[str, Any]:
    """Draw one well-formed reading of ``patient``: its baselines plus Gaussian noise.

    Values are clamped to ranges that a bedside monitor displays, so every reading
    stays physiologically plausible. An optional field is present only when the
    patient's monitor sends it, and SpO2 is missing from about 3% of those readings
    (probe off).
    """
    normal = _STANDARD_NORMAL
    bits = rng.getrandbits
    width = _NORMAL_BITS
    systolic = round(_clamp(patient.systolic + 6.0 * normal[bits(width)], 55.0, 250.0))
    diastolic = patient.diastolic + 4.0 * normal[bits(width)]
    heart_rate = patient.heart_rate + 4.0 * normal[bits(width)]
    temperature = patient.temperature + 0.12 * normal[bits(width)]
    reading: dict[str, Any] = {
        "patient_id": patient.patient_id,
        "name": patient.name,
        "age": patient.age,
        "blood_pressure": f"{systolic}/{round(_clamp(diastolic, 30.0, systolic - 15.0))}",
        "heart_rate": round(_clamp(heart_rate, 30.0, 220.0)),
        "temperature": round(_clamp(temperature, 34.0, 42.0), 1),
        "timestamp": timestamp,
    }

    optional_fields = patient.optional_fields
    if "spo2" in optional_fields and rng.random() >= 0.03:
        spo2 = patient.spo2 + 0.8 * normal[bits(width)]
        reading["spo2"] = round(_clamp(spo2, 70.0, 100.0))
    if "respiratory_rate" in optional_fields:
        respiratory_rate = patient.respiratory_rate + 1.2 * normal[bits(width)]
        reading["respiratory_rate"] = round(_clamp(respiratory_rate, 6.0, 60.0))
    if "consciousness" in optional_fields:
        levels = patient.condition.consciousness
        reading["consciousness"] = levels[int(rng.random() * len(levels))]
    if "on_oxygen" in optional_fields:
        reading["on_oxygen"] = patient.condition.on_oxygen
    if "sex" in optional_fields:
        reading["sex"] = patient.sex
    if "device_id" in optional_fields:
        reading["device_id"] = patient.device_id
    return reading
