"""The sink's own Redis protocol encoding gives the bytes redis-py would send."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import Connection

from etl.sink import VALUES_PER_COMMAND, rpush_commands


def redis_py_bytes(key: str, values: list[bytes]) -> bytes:
    """Encode the same RPUSH commands with redis-py, VALUES_PER_COMMAND values each."""
    connection = Connection()
    packed = b""
    for start in range(0, len(values), VALUES_PER_COMMAND):
        parts = connection.pack_command(
            "RPUSH", key, *values[start : start + VALUES_PER_COMMAND]
        )
        packed += b"".join(bytes(part) for part in parts)
    return packed


def own_bytes(key: str, values: list[bytes]) -> bytes:
    frame = pl.DataFrame({"payload": values}, schema={"payload": pl.Binary})
    return b"".join(part for command in rpush_commands(key, frame) for part in command)


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(min_size=1, max_size=20),
    values=st.lists(st.text(max_size=60), max_size=30),
)
def test_rpush_commands_match_redis_py(key: str, values: list[str]) -> None:
    """Any UTF-8 payload, including empty ones, line breaks and non-ASCII text."""
    encoded = [value.encode() for value in values]
    assert own_bytes(key, encoded) == redis_py_bytes(key, encoded)


def test_rpush_commands_split_long_frames() -> None:
    values = [f'{{"n":{n}}}'.encode() for n in range(VALUES_PER_COMMAND * 2 + 7)]
    commands = rpush_commands("liste-patients", pl.DataFrame({"payload": values}))

    assert len(commands) == 3
    assert commands[0][0].startswith(b"*%d\r\n" % (VALUES_PER_COMMAND + 2))
    assert commands[2][0].startswith(b"*9\r\n")
    assert own_bytes("liste-patients", values) == redis_py_bytes(
        "liste-patients", values
    )


def test_rpush_commands_empty_frame_sends_nothing() -> None:
    empty = pl.DataFrame(schema={"payload": pl.Binary})
    assert rpush_commands("liste-patients", empty) == []


def test_rpush_commands_non_utf8_payload_encoded_as_bytes() -> None:
    values = [b"\xff\xfe not text", b'{"ok":1}']
    assert own_bytes("liste-patients", values) == redis_py_bytes(
        "liste-patients", values
    )


def test_rpush_commands_null_payload_raises() -> None:
    frame = pl.DataFrame({"payload": [b"{}", None]}, schema={"payload": pl.Binary})
    with pytest.raises(ValueError, match="payload for 'liste-patients' is null"):
        rpush_commands("liste-patients", frame)
