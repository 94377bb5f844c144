"""A model of the original implementation, for the benchmark's baseline.

It consumes with kafka-python's ``KafkaConsumer`` (``assign()`` and
``seek_to_beginning()``, one message per iteration), decodes each value with
``json.loads``, derives the row in Python, encodes it with ``json.dumps`` and
sends one ``RPUSH`` per row with no pipeline. It stops after ``count``
messages. The blood-pressure classes are the age bands of the original
behaviour (the ``legacy_age_bands`` rule set): Low under 90/60, High from
130/80 under 40, 140/90 from 40 to 59 and 150/90 from 60.

Run as ``python -m benchmarks.original_model ARGS_JSON``; it prints one JSON
object with the count, the duration and the peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from datetime import UTC, datetime
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition

from benchmarks.procinfo import peak_rss_bytes

HIGH_FROM = ((40, 130, 80), (60, 140, 90), (200, 150, 90))


def classify_blood_pressure(systolic: int, diastolic: int, age: int) -> str:
    if systolic < 90 or diastolic < 60:
        return "Low"
    for below_age, high_systolic, high_diastolic in HIGH_FROM:
        if age < below_age:
            if systolic >= high_systolic or diastolic >= high_diastolic:
                return "High"
            return "Normal"
    return "Normal"


def transform_row(reading: dict[str, Any]) -> dict[str, Any]:
    first_name, _, last_name = reading["name"].partition(" ")
    systolic_text, _, diastolic_text = reading["blood_pressure"].partition("/")
    systolic, diastolic = int(systolic_text), int(diastolic_text)
    measured_at = datetime.fromtimestamp(reading["timestamp"], UTC)
    return {
        "patient_id": reading["patient_id"],
        "first_name": first_name,
        "last_name": last_name or None,
        "age": reading["age"],
        "blood_pressure": f"{systolic}/{diastolic}",
        "blood_pressure_status": classify_blood_pressure(
            systolic, diastolic, reading["age"]
        ),
        "heart_rate": reading["heart_rate"],
        "temperature": reading["temperature"],
        "timestamp": measured_at.isoformat(timespec="milliseconds"),
    }


def run(
    *, bootstrap: str, topic: str, partitions: int, redis_url: str, key: str, count: int
) -> dict[str, Any]:
    started = time.perf_counter()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
    )
    client = redis.Redis.from_url(redis_url)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    done = 0
    for message in consumer:
        row = transform_row(json.loads(message.value))
        client.rpush(key, json.dumps(row))
        done += 1
        if done >= count:
            break
    duration = time.perf_counter() - started
    consumer.close()
    client.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "count": done,
        "duration_s": duration,
        "peak_rss_bytes": peak_rss_bytes(),
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    arguments = json.loads(sys.argv[1])
    print(json.dumps(run(**arguments)))


if __name__ == "__main__":
    main()
