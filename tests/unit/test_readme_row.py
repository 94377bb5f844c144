"""The example row of README.md is the row that the batch writes for its reading."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from etl.config import load_settings
from etl.parse import RAW_SCHEMA
from etl.pipeline import process_chunk

README = Path(__file__).resolve().parents[2] / "README.md"
#: The batch's clock: ten minutes after the example's timestamp.
NOW = 1_718_000_600.0


def readme_row() -> bytes:
    """Return the example row of the README as the compact JSON that Redis holds."""
    text = README.read_text(encoding="utf-8")
    after = text.split("LRANGE liste-patients 0 0` shows it:", 1)[1]
    block = after.split("```json\n", 1)[1].split("```", 1)[0]
    return "".join(line.strip() for line in block.splitlines()).encode()


def reading_of(row: dict[str, Any]) -> bytes:
    """Return the message whose row is ``row``: alert, on air, in the row's fields."""
    message = {
        "patient_id": row["patient_id"],
        "name": f"{row['first_name']} {row['last_name']}",
        "age": row["age"],
        "blood_pressure": row["blood_pressure"],
        "heart_rate": row["heart_rate"],
        "temperature": row["temperature"],
        "timestamp": datetime.fromisoformat(row["timestamp"]).timestamp(),
        "spo2": row["spo2"],
        "respiratory_rate": row["respiratory_rate"],
        "consciousness": "A",
        "on_oxygen": False,
    }
    return json.dumps(message).encode()


def test_readme_row_is_batch_output() -> None:
    """Its blood-pressure class, NEWS2 score and name split follow from its values."""
    row = json.loads(readme_row())
    source = row["source"]
    raw = pl.DataFrame(
        {
            "partition": [source["partition"]],
            "offset": [source["offset"]],
            "key": [row["patient_id"].encode()],
            "value": [reading_of(row)],
        },
        schema=RAW_SCHEMA,
    )

    chunk, _ = process_chunk(
        raw,
        load_settings(),
        topic=source["topic"],
        now=NOW,
        expected={source["partition"]: None},
    )

    assert chunk.rejects.is_empty()
    assert chunk.rows["payload"].to_list() == [readme_row()]
