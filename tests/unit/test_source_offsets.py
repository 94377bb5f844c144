"""Offsets as the Kafka source shows them in messages and logs."""

from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID, OFFSET_STORED

from etl.source import describe_offsets


def test_describe_offsets_names_logical_offsets() -> None:
    offsets = {
        3: OFFSET_INVALID,
        0: OFFSET_BEGINNING,
        1: OFFSET_END,
        2: OFFSET_STORED,
        4: 5000,
    }

    shown = describe_offsets(offsets)

    assert shown == "{0: earliest, 1: latest, 2: committed, 3: unknown, 4: 5000}"


def test_describe_offsets_keeps_real_offsets() -> None:
    assert describe_offsets({0: 0, 1: 187}) == "{0: 0, 1: 187}"


def test_describe_offsets_empty() -> None:
    assert describe_offsets({}) == "{}"
