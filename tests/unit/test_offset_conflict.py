"""The advice given when stored offsets move back during a batch."""

from __future__ import annotations

import pytest

from etl.config import load_settings
from etl.sink import OffsetConflict, RedisSink


@pytest.mark.parametrize(
    ("relied_on", "stored", "again"),
    [
        pytest.param(
            {1: 34}, {1: 33}, "writes the reading at offset 33 again", id="one"
        ),
        pytest.param(
            {1: 100}, {1: 0}, "writes the readings from 0 to 99 again", id="range"
        ),
        pytest.param(
            {0: 7, 1: 34},
            {0: 5, 1: 33},
            "writes the readings from 5 to 6 of partition 0 and the reading at "
            "offset 33 of partition 1 again",
            id="two-partitions",
        ),
    ],
)
def test_moved_back_names_readings_again(
    relied_on: dict[int, int], stored: dict[int, int], again: str
) -> None:
    # The check reads no Redis: redis-py connects at the first command.
    sink = RedisSink(load_settings(redis_url="redis://127.0.0.1:6380/0"))

    with pytest.raises(OffsetConflict) as raised:
        sink._check_still_stored("vitals", relied_on, stored)

    assert again in " ".join(str(raised.value).split())
