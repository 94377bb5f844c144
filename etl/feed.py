"""Validate or publish a producer's feed file (NDJSON, one Kafka message value per line).

To validate, each line goes through the batch's own parsing and contracts
(:func:`etl.pipeline.process_chunk`), so a line fails here exactly when the
batch would reject the same message, with the same reason code. To publish,
each line is produced to the topic unchanged.
"""

from __future__ import annotations

import codecs
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
import polars as pl

from etl.parse import RAW_SCHEMA

if TYPE_CHECKING:
    from etl.config import Settings
    from etl.generate import StopRequest


@dataclass(frozen=True)
class LineFailure:
    """A line of the feed that the batch would reject; ``line`` counts from 1."""

    line: int
    reason: str
    field: str | None
    detail: str | None


@dataclass
class FeedResult:
    """Outcome of a feed validation: lines read, blank lines skipped, failures."""

    lines: int = 0
    blank: int = 0
    failures: list[LineFailure] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return self.lines - self.blank

    @property
    def by_reason(self) -> dict[str, int]:
        """Return failure counts per reason code, most frequent first."""
        counts = Counter(failure.reason for failure in self.failures)
        return dict(counts.most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "blank": self.blank,
            "checked": self.checked,
            "valid": self.checked - len(self.failures),
            "invalid": len(self.failures),
            "by_reason": self.by_reason,
            "failures": [asdict(failure) for failure in self.failures],
        }


def iter_lines(stream: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, value)`` with the line ending (LF or CRLF) removed.

    A UTF-8 byte order mark at the very start of the file is dropped. Windows
    editors such as Notepad can write it to mark the file's encoding, so it is
    not part of the first message, and RFC 8259 section 8.1 lets a JSON parser
    ignore it. A mark anywhere else stays in its line, which the batch then
    rejects as ``invalid_json``, as it would the same Kafka message.
    """
    for number, line in enumerate(stream, start=1):
        if number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        yield number, line.removesuffix(b"\n").removesuffix(b"\r")


def validate_feed(
    stream: Iterable[bytes],
    settings: Settings,
    *,
    now: float | None = None,
    chunk_size: int | None = None,
) -> FeedResult:
    """Run every line of ``stream`` through the batch's parsing and contracts.

    Blank lines (empty or only whitespace) are skipped and counted, because
    text editors leave them and producers never send them as messages.
    ``now`` is the time the timestamp window is checked against (default:
    the current time). Lines are processed ``chunk_size`` at a time (default:
    ``settings.chunk_size``), so memory stays bounded on large files.
    """
    now = time.time() if now is None else now
    size = chunk_size or settings.chunk_size
    result = FeedResult()
    batch: list[tuple[int, bytes]] = []
    for number, value in iter_lines(stream):
        result.lines = number
        if not value.strip():
            result.blank += 1
            continue
        batch.append((number, value))
        if len(batch) >= size:
            result.failures.extend(_check_lines(batch, settings, now=now))
            batch = []
    if batch:
        result.failures.extend(_check_lines(batch, settings, now=now))
    return result


def _check_lines(
    batch: list[tuple[int, bytes]], settings: Settings, *, now: float
) -> list[LineFailure]:
    from etl.pipeline import process_chunk

    # The line number replaces the Kafka offset, so each reject maps back to its line.
    raw = pl.DataFrame(
        {
            "partition": [0] * len(batch),
            "offset": [number for number, _ in batch],
            "key": [None] * len(batch),
            "value": [value for _, value in batch],
        },
        schema=RAW_SCHEMA,
    )
    chunk, _ = process_chunk(raw, settings, topic="feed", now=now, expected={0: None})
    failures = []
    for payload in chunk.rejects["payload"].to_list():
        document = json.loads(payload)
        failures.append(
            LineFailure(
                line=document["source"]["offset"],
                reason=document["reason"],
                field=document.get("field"),
                detail=document.get("detail"),
            )
        )
    return sorted(failures, key=lambda failure: failure.line)


@dataclass
class PublishResult:
    """Outcome of publishing a feed: lines read, blank lines skipped, messages sent.

    With a key field, ``without_field`` counts the messages sent without a key
    because they are not a JSON object with that field, and ``unusable_key``
    those whose field is blank or neither a string nor a whole number.
    """

    lines: int = 0
    blank: int = 0
    published: int = 0
    without_field: int = 0
    unusable_key: int = 0


#: A float represents every whole number below 2**53 exactly, so its digits
#: are certain. Above it, Polars and Python may print different digits.
_EXACT_FLOAT_LIMIT: Final = 2**53


def find_message_key(value: bytes, key_field: str | None) -> tuple[bytes | None, bool]:
    """Return the Kafka key for ``value`` and whether ``key_field`` is in ``value``.

    The key is the stripped ``key_field`` string in UTF-8, or the decimal
    digits of a whole number, which is the id the batch stores: ``7`` up to 64
    bits, ``7.0`` or ``7e0`` below 2**53. A value that is not a JSON object,
    or whose ``key_field`` is missing, blank or of another type, gets no key,
    and librdkafka's default partitioner then spreads such messages over the
    partitions at random. The field counts as found when ``value`` is a JSON
    object with a member of that name at the top level, whatever its value.
    """
    if not key_field:
        return None, False
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(document, dict) or key_field not in document:
        return None, False
    key = document.get(key_field)
    if value.count(json.dumps(key_field).encode()) > 1 or b"\\u" in value:
        # orjson keeps the last of two members with the same name, and the
        # batch's reader the first, which the key must match. A name may also
        # be written with \u escapes ("p\u0061tient_id").
        try:
            key = json.loads(value, object_pairs_hook=_first_member(key_field))
        except (ValueError, RecursionError):
            return None, True
    if isinstance(key, int) and not isinstance(key, bool):
        # The batch stores a JSON integer as its decimal digits.
        return str(key).encode(), True
    if isinstance(key, float) and key.is_integer() and abs(key) < _EXACT_FLOAT_LIMIT:
        # Polars prints a whole number written as 7.0 or 1e3 as its digits,
        # and -0.0 as "-0".
        digits = "-0" if key == 0 and math.copysign(1.0, key) < 0 else str(int(key))
        return digits.encode(), True
    if not isinstance(key, str):
        return None, True
    # The batch strips the value, so the key is the patient_id of the row.
    return key.strip().encode("utf-8", "backslashreplace") or None, True


def _first_member(name: str) -> Callable[[list[tuple[str, Any]]], Any]:
    """Return an ``object_pairs_hook`` that gives the top level's first ``name`` member."""

    def first(pairs: list[tuple[str, Any]]) -> Any:
        return next((item for key, item in pairs if key == name), None)

    return first


def publish_feed(
    stream: Iterable[bytes],
    settings: Settings,
    *,
    key_field: str | None = "patient_id",
    partitions: int = 3,
    rate: float | None = None,
    from_line: int = 1,
    stop: StopRequest | None = None,
) -> PublishResult:
    """Produce every line of ``stream`` from line ``from_line`` on to ``settings.kafka_topic``.

    Lines are sent as they are, without their line ending, so the batch checks
    them as it checks any producer's messages. Blank lines are skipped and
    counted, as :func:`validate_feed` does. With ``key_field``, a JSON object's
    string in that field is the message key, which keeps one patient's
    readings in one partition and so in order.

    Raises
    ------
    PublishError
        When the broker is unreachable or a message cannot be sent. When one
        line could not be produced, for example for its size, every line
        before it was delivered and the error names that line.
    ProduceStopped
        Once ``stop`` is set. Its ``line`` is the first line that was not sent.
    """
    from etl.generate import ProduceFailed, ProduceStopped, produce_messages

    result = PublishResult()
    # The line of the last message handed out, and how many were, so that a
    # stop can name the first line that was not sent.
    last_line, handed_out = from_line - 1, 0

    def messages() -> Iterator[tuple[bytes | None, bytes]]:
        nonlocal last_line, handed_out
        for number, value in iter_lines(stream):
            result.lines = number
            if number < from_line:
                continue
            if not value.strip():
                result.blank += 1
                continue
            last_line, handed_out = number, handed_out + 1
            key, field_found = find_message_key(value, key_field)
            if key_field and not field_found:
                result.without_field += 1
            elif key_field and key is None:
                result.unusable_key += 1
            yield key, value

    try:
        result.published = produce_messages(
            settings, messages(), rate=rate, partitions=partitions, stop=stop
        )
    except ProduceStopped as exc:
        exc.line = last_line + 1 if exc.sent == handed_out else last_line
        raise
    except ProduceFailed as exc:
        raise PublishError(str(exc), failed_line=result.lines) from exc
    except RuntimeError as exc:
        raise PublishError(str(exc)) from exc
    return result


class PublishError(RuntimeError):
    """A feed could not be published in full.

    ``failed_line`` is the line that could not be produced when every line
    before it was delivered, else None.
    """

    def __init__(self, message: str, *, failed_line: int | None = None) -> None:
        super().__init__(message)
        self.failed_line = failed_line
