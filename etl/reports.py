"""Read batch reports back from the capped Redis stream that ``run_batch`` appends to.

Each stream entry has flat fields (status, read, written, rejected, tombstones,
duplicates, skipped, alerts, duration_s, rate_per_s) and a ``report`` field with the
whole report as JSON (counts by reason, by blood-pressure status and by NEWS2
risk, offsets per partition).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

COUNT_FIELDS: Final = (
    "read",
    "written",
    "rejected",
    "tombstones",
    "duplicates",
    "skipped",
    "alerts",
)
RATE_FIELDS: Final = ("duration_s", "rate_per_s")


@dataclass(frozen=True)
class ReportEntry:
    """One batch report as stored in the stream; ``time`` is when it was appended."""

    id: str
    time: datetime
    status: str
    read: int = 0
    written: int = 0
    rejected: int = 0
    tombstones: int = 0
    duplicates: int = 0
    #: Records that another batch had written first (entries written before
    #: this field existed read 0).
    skipped: int = 0
    alerts: int = 0
    duration_s: float = 0.0
    rate_per_s: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str | None:
        """Kafka topic of the batch, read from the ``report`` field, or None without one.

        Batches of every topic append to the same stream.
        """
        topic = self.report.get("topic")
        return topic if isinstance(topic, str) else None

    @property
    def error(self) -> str | None:
        """Error that ended the batch, read from the ``report`` field, or None."""
        error = self.report.get("error")
        return error if isinstance(error, str) else None

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        counts = self.report.get("rejected_by_reason") or {}
        return {str(reason): int(amount) for reason, amount in counts.items()}

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as JSON-ready values (``time`` as ISO-8601 UTC).

        The report document is not copied: ``dataclasses.asdict`` would copy
        it with one recursive call per level of nesting.
        """
        data = {
            item.name: getattr(self, item.name) for item in dataclasses.fields(self)
        }
        data["time"] = self.time.isoformat(timespec="milliseconds")
        return data


def entry_time(entry_id: str) -> datetime:
    """Return the time encoded in a stream entry id (``<milliseconds>-<sequence>``)."""
    milliseconds = int(entry_id.split("-", 1)[0])
    try:
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        # An id set by hand (XADD with an explicit id) may lie past year 9999.
        return datetime.max.replace(tzinfo=UTC)


def parse_entry(
    entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]
) -> ReportEntry:
    """Build a :class:`ReportEntry` from one raw XRANGE item.

    A field that is missing or not a number reads as 0, and a ``report``
    field that is not a JSON object reads as an empty report, so one damaged
    entry does not hide the others.
    """
    text = {_text(name): _text(value) for name, value in fields.items()}
    ident = _text(entry_id)
    numbers: dict[str, Any] = {}
    for name in COUNT_FIELDS:
        numbers[name] = int(_number(text.get(name)))
    for name in RATE_FIELDS:
        numbers[name] = _number(text.get(name))
    return ReportEntry(
        id=ident,
        time=entry_time(ident),
        status=text.get("status", "unknown"),
        report=_report_document(text.get("report"), ident),
        **numbers,
    )


def read_reports(
    client: redis.Redis, key: str, *, last: int | None = None
) -> list[ReportEntry]:
    """Return the last ``last`` reports of the stream ``key``, oldest first.

    ``last=None`` returns every entry the stream still contains (it is capped at
    ``VITALS_REDIS_REPORTS_MAXLEN`` entries, approximately).
    """
    if last is not None and last < 1:
        msg = f"last must be at least 1, got {last}"
        raise ValueError(msg)
    # redis-py types the reply loosely (sync or async client); it is a list here.
    reply: Any = (
        client.xrange(key) if last is None else client.xrevrange(key, count=last)
    )
    items = list(reply or [])
    if last is not None:
        items.reverse()
    return [parse_entry(entry_id, fields) for entry_id, fields in items]


def _text(value: bytes | str) -> str:
    return (
        value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    )


def _number(value: str | None) -> float:
    """Return ``value`` as a finite number, or 0.0 when it is missing, not a number, inf or nan."""
    if value is None:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _reject_constant(name: str) -> NoReturn:
    """Raise ValueError for NaN and Infinity, which Python's parser accepts and JSON does not.

    ``etl reports --json`` prints the document again, and must print JSON.
    """
    msg = f"{name} is not a JSON value"
    raise ValueError(msg)


def _finite_float(text: str) -> float:
    """Return the number of ``text``, or raise ValueError for one too large for a float (1e999)."""
    number = float(text)
    if not math.isfinite(number):
        msg = f"{text} is out of the range of a float"
        raise ValueError(msg)
    return number


def _report_document(value: str | None, entry_id: str) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        document = json.loads(
            value, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (ValueError, RecursionError):
        logger.warning("Report %s has a report field that is not JSON", entry_id)
        return {}
    if not isinstance(document, dict):
        logger.warning("Report %s has a report field that is not an object", entry_id)
        return {}
    return document
