"""No patient data and no secret in any log record, even at DEBUG with librdkafka's debug logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from pydantic import SecretStr

from etl.pipeline import (
    drain_to_staging,
    load_staging,
    report_staging,
    run_batch,
    transform_staging,
)
from etl.services import Service, free_port, start_redis
from etl.sink import SinkError
from tests.conftest import Broker, create_topic, make_settings
from tests.integration.accounting import produce_tracked
from tests.unit.test_hostile_corpus import load_corpus

pytestmark = pytest.mark.integration

REDIS_PASSWORD: Final = "redis-Secret-8f3a"
SASL_PASSWORD: Final = "sasl-Secret-71c2"

#: Invented patients whose names and ids must never reach a log.
PATIENTS: Final = [
    ("PT-PRIV-0193", "Quillon Varga-Mbeki"),
    ("PT-PRIV-0194", "Ysolde Thackeray"),
    ("PT-PRIV-0195", "Ottoline Brzęczyszczykiewicz"),
]


def patient_values() -> list[bytes | None]:
    """Good readings, and each patient also in rejects of several kinds."""
    values: list[bytes | None] = []
    for patient_id, name in PATIENTS:
        base = (
            f'"patient_id": "{patient_id}", "name": "{name}", "age": 47, '
            '"blood_pressure": "151/97", "heart_rate": 93, "temperature": 38.4, '
            '"timestamp": 1718000000.0'
        )
        values += [
            ("{" + base + "}").encode(),
            ("{" + base + ', "spo2": 88, "respiratory_rate": 26}').encode(),
            ("{" + base.replace('"age": 47', '"age": "old"') + "}").encode(),
            ("{" + base.replace('"151/97"', '"97/151"') + "}").encode(),
            ("{" + base + ', "heart_rate": NaN}').encode(),
            ("{" + base).encode(),
            ("{" + base + "}").encode("latin-1", errors="replace"),
        ]
    return values


def patient_keys() -> list[bytes]:
    """The Kafka key of each value of :func:`patient_values`: its patient id."""
    per_patient = len(patient_values()) // len(PATIENTS)
    return [pid.encode() for pid, _ in PATIENTS for _ in range(per_patient)]


#: Text that must not appear: names, ids, value fragments and secrets.
FORBIDDEN: Final = [
    *(patient_id for patient_id, _ in PATIENTS),
    *(part for _, name in PATIENTS for part in name.split()),
    "151/97",
    "97/151",
    '"temperature": 38.4',
    "Zanele",
    "Hostilova",
    "PT-H0001",
    REDIS_PASSWORD,
    SASL_PASSWORD,
]


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[Service]:
    service = start_redis(
        port=free_port(), state_dir=tmp_path / "redis", password=REDIS_PASSWORD
    )
    try:
        yield service
    finally:
        service.stop()


def assert_no_private_text(records: list[logging.LogRecord]) -> None:
    formatter = logging.Formatter("%(name)s %(message)s")
    leaks = []
    for record in records:
        text = formatter.format(record)
        leaks += [(record.name, word) for word in FORBIDDEN if word in text]
    assert not leaks, leaks[:10]


def test_batch_logs_hold_no_patient_data_or_secret(
    broker: Broker,
    password_redis: Service,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{password_redis.port}/0"
    librdkafka = logging.getLogger("librdkafka")
    settings = make_settings(
        broker.bootstrap,
        url,
        chunk_size=25,
        kafka_sasl_password=SASL_PASSWORD,
        kafka_extra={"debug": "all", "logger": librdkafka},
    )
    create_topic(settings)
    corpus = [case.value for case in load_corpus()]
    # Producers often key readings by patient id; keys must not leak either.
    keys = patient_keys() + [b"corpus"] * len(corpus)
    produce_tracked(settings, patient_values() + corpus, keys=keys)
    caplog.set_level(logging.DEBUG)

    report = run_batch(settings)
    produce_tracked(settings, patient_values(), keys=patient_keys())
    drain_to_staging(settings, tmp_path)
    transform_staging(settings, tmp_path)
    load_staging(settings, tmp_path)
    report_staging(settings, tmp_path)
    wrong = settings.model_copy(
        update={
            "redis_url": SecretStr(
                f"redis://:{REDIS_PASSWORD}x@127.0.0.1:{password_redis.port}/0"
            )
        }
    )
    with pytest.raises(SinkError, match="rejected the user or password"):
        run_batch(wrong)

    assert report.rejected >= 5 * len(PATIENTS)
    assert len(report.rejected_by_reason) >= 8
    assert any(record.name == "librdkafka" for record in caplog.records)
    assert any(record.name.startswith("etl.") for record in caplog.records)
    assert_no_private_text(caplog.records)
