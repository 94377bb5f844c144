"""The threads of a batch: chunks processed two at a time, written one at a time, in order."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

import polars as pl
import pytest

from etl.pipeline import (
    MANIFEST,
    BatchReport,
    _counted,
    _process_ahead,
    _WriteBehind,
    _written_by_earlier_attempt,
    load_chunk_file,
    transform_staging,
)
from etl.sink import Chunk, SinkError, WriteCancelled, WriteResult
from tests.conftest import encode, reading
from tests.unit.test_parse import NOW, SETTINGS, raw_frame


def chunk(partition_offset: int) -> Chunk:
    empty = pl.DataFrame(
        schema={
            "partition": pl.Int32,
            "offset": pl.Int64,
            "payload": pl.Binary,
            "reason": pl.String,
            "blood_pressure_status": pl.String,
            "news2_risk": pl.String,
        }
    )
    return Chunk(
        rows=empty.drop("reason"),
        rejects=empty.select("partition", "offset", "payload", "reason"),
        alerts=empty.drop("reason"),
        expected={0: partition_offset},
        next_offsets={0: partition_offset + 1},
    )


class FakeSink:
    def __init__(
        self,
        *,
        fail_at: int | None = None,
        concurrent_at: int | None = None,
        error: BaseException | None = None,
    ):
        self.written: list[int] = []
        self.fail_at = fail_at
        self.error = error or SinkError("injected: Redis went away")
        self.concurrent_at = concurrent_at
        self.release = threading.Event()
        self.release.set()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def write_chunk(self, topic: str, chunk: Chunk) -> WriteResult:
        self.release.wait(5)
        offset = chunk.next_offsets[0] - 1
        if offset == self.fail_at:
            raise self.error
        self.written.append(offset)
        return WriteResult(1, 0, 0, 0, concurrent=offset == self.concurrent_at)


class FakeSource:
    topic = "vitals"

    def __init__(self) -> None:
        self.committed: list[int] = []

    def commit(self, offsets: dict[int, int]) -> None:
        self.committed.append(offsets[0])


def writer_for(sink: FakeSink) -> tuple[_WriteBehind, FakeSource, BatchReport]:
    source = FakeSource()
    report = BatchReport(topic="vitals", started_at="now")
    return _WriteBehind(sink, source, report), source, report  # type: ignore[arg-type]


def test_write_behind_writes_and_commits_in_order() -> None:
    sink = FakeSink()
    writer, source, report = writer_for(sink)
    for offset in range(6):
        assert writer.submit(chunk(offset), read=1, duplicates=0)
    writer.finish()

    assert sink.written == list(range(6))
    assert source.committed == list(range(1, 7))
    assert (report.read, report.chunks) == (6, 6)


def test_write_behind_takes_one_chunk_at_a_time() -> None:
    """The caller waits while a chunk is being written, so at most one more is held."""
    sink = FakeSink()
    sink.release.clear()
    writer, _, _ = writer_for(sink)
    assert writer.submit(chunk(0), read=1, duplicates=0)
    blocked = threading.Thread(
        target=writer.submit, args=(chunk(1),), kwargs={"read": 1, "duplicates": 0}
    )
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()
    sink.release.set()
    blocked.join(5)
    writer.finish()
    assert sink.written == [0, 1]


def test_write_behind_raises_write_error_in_caller() -> None:
    sink = FakeSink(fail_at=1)
    writer, source, _ = writer_for(sink)
    with pytest.raises(SinkError, match="injected"):
        for offset in range(5):
            writer.submit(chunk(offset), read=1, duplicates=0)
        writer.finish()
    writer.close()

    assert sink.written == [0]
    assert source.committed == [1]


def test_write_behind_stops_after_concurrent_batch() -> None:
    sink = FakeSink(concurrent_at=2)
    writer, source, report = writer_for(sink)
    submitted = 0
    for offset in range(6):
        if not writer.submit(chunk(offset), read=1, duplicates=0):
            break
        submitted += 1
    writer.finish()

    assert sink.written == [0, 1, 2]
    # The chunk that met another batch's write may be partly unwritten.
    assert source.committed == [1, 2]
    assert report.status == "concurrent_batch"
    assert report.read == 3
    assert submitted == 3


def test_write_behind_close_drops_unwritten_chunks() -> None:
    sink = FakeSink()
    sink.release.clear()
    writer, _, _ = writer_for(sink)
    writer.submit(chunk(0), read=1, duplicates=0)
    sink.release.set()
    writer.close()

    assert sink.written in ([], [0])


def raw_chunks(sizes: list[int]) -> list[pl.DataFrame]:
    """Consecutive raw chunks of partition 0, with a reject in each."""
    chunks, offset = [], 0
    for size in sizes:
        values = [encode(reading(patient_id=f"PT-{offset + n}")) for n in range(size)]
        values[-1] = b"not json"
        frame = raw_frame(values).with_columns(pl.col("offset") + offset)
        chunks.append(frame)
        offset += size
    return chunks


def test_process_ahead_yields_chunks_in_drain_order() -> None:
    sizes = [30, 5, 40, 1, 12]
    expected: dict[int, int | None] = {0: None}
    processed = list(
        _process_ahead(
            raw_chunks(sizes), SETTINGS, topic="vitals", now=NOW, expected=expected
        )
    )

    assert [read for _, read, _ in processed] == sizes
    ends = [sum(sizes[: n + 1]) for n in range(len(sizes))]
    assert [chunk.next_offsets for chunk, _, _ in processed] == [{0: e} for e in ends]
    # Each chunk continues from where the one before it ends.
    assert [chunk.expected for chunk, _, _ in processed] == [{0: None}] + [
        {0: e} for e in ends[:-1]
    ]
    assert [chunk.rejects["offset"].to_list() for chunk, _, _ in processed] == [
        [e - 1] for e in ends
    ]
    assert expected == {0: ends[-1]}


def test_process_ahead_close_stops_early() -> None:
    processed = _process_ahead(
        iter(raw_chunks([10] * 6)), SETTINGS, topic="vitals", now=NOW, expected={}
    )
    first, read, duplicates = next(processed)
    processed.close()

    assert (first.next_offsets, read, duplicates) == ({0: 10}, 10, 0)


@pytest.mark.parametrize(
    ("error", "logged", "level"),
    [
        pytest.param(
            SinkError("injected: Redis went away"),
            "Writing to Redis failed while the batch stopped: injected",
            "ERROR",
            id="sink",
        ),
        pytest.param(
            ValueError(),
            "Writing to Redis failed while the batch stopped: ValueError",
            "ERROR",
            id="bare",
        ),
        pytest.param(
            WriteCancelled("writing to Redis at redis://h:1/0 was cancelled"),
            "Writing to Redis stopped with the batch: writing to Redis",
            "WARNING",
            id="cancelled",
        ),
        # On Ctrl-C, Polars raises a KeyboardInterrupt without a message in the thread.
        pytest.param(
            KeyboardInterrupt(),
            "Writing to Redis stopped on the interrupt",
            "WARNING",
            id="interrupt",
        ),
    ],
)
def test_write_behind_close_logs_unraised_error(
    caplog: pytest.LogCaptureFixture, error: BaseException, logged: str, level: str
) -> None:
    """The caller failed first: the write error still reaches the log, and retries stop."""
    sink = FakeSink(fail_at=0, error=error)
    sink.release.clear()
    writer, _, _ = writer_for(sink)
    writer.submit(chunk(0), read=1, duplicates=0)
    sink.release.set()
    writer._thread.join(5)
    writer.close()

    [record] = [r for r in caplog.records if r.name == "etl.pipeline"]
    assert logged in record.getMessage()
    assert record.levelname == level


def test_write_behind_close_cancels_pending_retries() -> None:
    sink = FakeSink()
    sink.release.clear()
    writer, _, _ = writer_for(sink)
    writer.submit(chunk(0), read=1, duplicates=0)
    threading.Timer(0.2, sink.release.set).start()
    writer.close()

    assert sink.cancelled


def test_write_behind_commits_chunk_offsets() -> None:
    """Each write commits the offsets its chunk reached, which its records confirm."""
    writer, source, _ = writer_for(FakeSink())
    writer.submit(chunk(0), read=1, duplicates=0)
    writer.finish()

    assert source.committed == [1]


def test_staged_transform_matches_chunk_order(tmp_path: Path) -> None:
    sizes = [30, 5, 40, 1, 12]
    names = []
    for index, raw in enumerate(raw_chunks(sizes)):
        names.append(f"raw-{index:05d}.arrow")
        raw.write_ipc(tmp_path / names[-1])
    manifest = {
        "topic": "vitals",
        "now": NOW,
        "stored_offsets": {"0": None},
        "raw_files": names,
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))

    totals = transform_staging(SETTINGS, tmp_path)

    ends = [sum(sizes[: n + 1]) for n in range(len(sizes))]
    starts: list[int | None] = [None, *ends[:-1]]
    stems = [name.removeprefix("raw-").removesuffix(".arrow") for name in names]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["processed"] == stems
    assert manifest["transform_s"] >= 0
    assert totals == {
        "chunks": 5,
        "rows": sum(sizes) - 5,
        "rejects": 5,
        "duplicates": 0,
    }
    for stem, size, start, end in zip(stems, sizes, starts, ends, strict=True):
        meta = json.loads((tmp_path / f"chunk-{stem}.json").read_text())
        chunk = load_chunk_file(tmp_path, stem)
        assert meta["read"] == size
        assert chunk.expected == {0: start}
        assert chunk.next_offsets == {0: end}
        assert chunk.rows["offset"].to_list() == list(range(end - size, end - 1))
        assert chunk.rejects["offset"].to_list() == [end - 1]


#: Marker contents that are read as no earlier write, with a warning.
DAMAGED_MARKERS = (
    "{garbage",
    "{}",
    '{"applied": {"rows": 1}}',
    '{"applied": 3}',
    b'\xff\xfe{"write_id"',
    "",
    "[1]",
)
EARLIER = WriteResult(90, 10, 3, 0, False, {"bp_status:Normal": 90})
SKIPPED = WriteResult(0, 0, 0, 100, True)


def marker_state(
    write_id: str,
    *,
    pending: WriteResult | None = None,
    applied: WriteResult | None = None,
) -> str:
    return json.dumps(
        {
            "write_id": write_id,
            "pending": None if pending is None else asdict(pending),
            "applied": None if applied is None else asdict(applied),
        }
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, None, id="no-marker"),
        # Markers of older releases: "done", or the id of the write sent.
        pytest.param("done", True, id="older-done"),
        pytest.param("last-id", True, id="older-applied-id"),
        pytest.param("0123456789abcdef0123456789abcdef", None, id="older-unapplied-id"),
        pytest.param(marker_state("other-id", applied=EARLIER), EARLIER, id="applied"),
        # The write was applied, but the load failed before recording it.
        pytest.param(
            marker_state("last-id", pending=EARLIER), EARLIER, id="pending-applied"
        ),
        pytest.param(marker_state("last-id"), True, id="applied-before-pending"),
        pytest.param(
            marker_state("other-id", pending=EARLIER), None, id="pending-unapplied"
        ),
        # Damaged markers are ignored, with a warning.
        pytest.param("{garbage", None, id="invalid-json"),
        pytest.param("{}", None, id="no-write-id"),
        pytest.param('{"applied": {"rows": 1}}', None, id="unknown-fields"),
        pytest.param('{"applied": 3}', None, id="applied-not-object"),
        pytest.param(b'\xff\xfe{"write_id"', None, id="not-utf8"),
        pytest.param("", None, id="empty"),
        pytest.param("[1]", None, id="list"),
    ],
)
def test_earlier_attempt_read_from_marker(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: str | bytes | None,
    expected: WriteResult | bool | None,
) -> None:
    marker = tmp_path / "chunk-00000.attempted"
    if isinstance(content, bytes):
        marker.write_bytes(content)
    elif content is not None:
        marker.write_text(content)

    assert _written_by_earlier_attempt(marker, "last-id") == expected
    assert ("unreadable marker" in caplog.text) is (content in DAMAGED_MARKERS)


def test_counted_prefers_earlier_write() -> None:
    """A chunk that an earlier attempt wrote counts as written, not as skipped."""
    assert _counted(EARLIER, SKIPPED) == EARLIER
    assert _counted(True, SKIPPED) == SKIPPED
    assert _counted(None, EARLIER) == EARLIER


def test_counted_takes_rewrite_after_lost_data() -> None:
    """When Redis lost the earlier write, what it contains is the new write's."""
    rewritten = WriteResult(100, 0, 0, 0, False)

    assert _counted(EARLIER, rewritten) == rewritten
