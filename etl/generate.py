"""Generate synthetic vital-sign readings and produce them to Kafka.

Each reading is one compact UTF-8 JSON object in the input message format, keyed by
``patient_id``. The readings come from a seeded cohort (see ``etl.cohort``). A share
of the messages can be replaced by malformed input from ``MALFORMED_KINDS`` to
exercise the rejection path of the ETL.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

# The documented import path of NewTopic, which the confluent-kafka 2.16 stubs do not
# re-export.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.progress import Progress

from etl.cohort import Patient, build_cohort, draw_reading
from etl.config import ENV_PREFIX, kafka_client
from etl.malformed import MALFORMED_KINDS
from etl.terminal import counted

if TYPE_CHECKING:
    from etl.config import Settings

__all__ = [
    "MALFORMED_KINDS",
    "PRODUCER_TUNING",
    "WINDOW_S",
    "ProduceFailed",
    "ProduceStopped",
    "ensure_topic",
    "iter_readings",
    "produce_messages",
    "produce_readings",
]

logger = logging.getLogger(__name__)

WINDOW_S: Final = 300.0
"""Length of the time window, in seconds before ``now``, that the readings cover."""


def iter_readings(
    *,
    count: int,
    seed: int | None = None,
    cohort_size: int = 200,
    malformed_rate: float = 0.0,
    now: float | None = None,
) -> Iterator[tuple[bytes, bytes | None]]:
    """Yield ``count`` Kafka messages as ``(key, value)`` pairs.

    The key is the patient id in UTF-8. The value is a compact JSON reading, or, with
    probability ``malformed_rate``, a malformed message from ``MALFORMED_KINDS``,
    where ``None`` is a tombstone. Timestamps fall in the ``WINDOW_S`` seconds before
    ``now`` (default: the current time) and increase from one message to the next,
    so they also increase per patient. The same ``seed`` yields the same messages.

    Raises
    ------
    ValueError
        When ``count`` is negative, ``cohort_size`` is outside 1 to
        ``MAX_COHORT_SIZE`` or ``malformed_rate`` is outside 0.0 to 1.0. The
        arguments are checked here, before the first message is drawn.

    Examples
    --------
    >>> key, value = next(iter_readings(count=1, seed=7, now=1_700_000_000.0))
    >>> key.startswith(b"PT-")
    True
    """
    _check_count_and_rate(count, malformed_rate)
    rng = random.Random(seed)
    cohort = build_cohort(cohort_size, rng)
    end = time.time() if now is None else now
    return _generate(cohort, rng, count=count, malformed_rate=malformed_rate, end=end)


def _check_count_and_rate(count: int, malformed_rate: float) -> None:
    if count < 0:
        msg = f"count must be >= 0, got {count!r}"
        raise ValueError(msg)
    if not 0.0 <= malformed_rate <= 1.0:
        msg = f"malformed_rate must be between 0.0 and 1.0, got {malformed_rate!r}"
        raise ValueError(msg)


def _generate(
    cohort: tuple[Patient, ...],
    rng: random.Random,
    *,
    count: int,
    malformed_rate: float,
    end: float,
) -> Iterator[tuple[bytes, bytes | None]]:
    # Each patient appears in the pool once per unit of reading weight, so unwell
    # patients send more readings. Indexing is faster than rng.choices per message.
    pool = [
        patient for patient in cohort for _ in range(patient.condition.reading_weight)
    ]
    pool_size = len(pool)
    kind_count = len(MALFORMED_KINDS)
    start = end - WINDOW_S
    step = WINDOW_S / count if count else 0.0

    for index in range(count):
        patient = pool[int(rng.random() * pool_size)]
        # One random point in each of ``count`` equal slots keeps the order strict.
        reading = draw_reading(patient, start + (index + rng.random()) * step, rng)
        if malformed_rate and rng.random() < malformed_rate:
            _, make_malformed = MALFORMED_KINDS[int(rng.random() * kind_count)]
            yield patient.key, make_malformed(reading, rng)
        else:
            yield patient.key, orjson.dumps(reading)


# Producer properties for throughput and safe retries. Settings from the environment
# (``VITALS_KAFKA_EXTRA`` included) override them.
PRODUCER_TUNING: Final[dict[str, Any]] = {
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "compression.type": "lz4",
    "message.timeout.ms": 30_000,
}
# A little longer than message.timeout.ms, after which every queued message has
# either been delivered or reported as failed.
_FLUSH_TIMEOUT_S: Final = 35.0
#: Maximum wait between two checks of a stop request.
_STOP_CHECK_S: Final = 0.2
#: confluent-kafka rounds poll()'s timeout down to whole milliseconds, so
#: poll(0.0009) returns at once (measured with confluent-kafka 2.16.1).
_POLL_RESOLUTION_S: Final = 0.001
#: How long a stopped producer waits for the messages it was handed.
_STOP_FLUSH_S: Final = 5.0
_POLL_EVERY: Final = 1_000
_PROGRESS_MIN_COUNT: Final = 10_000


def ensure_topic(settings: Settings, *, partitions: int = 3) -> None:
    """Create ``settings.kafka_topic`` with ``partitions`` partitions unless it exists.

    An existing topic is kept as it is, even with another number of partitions.

    Raises
    ------
    ValueError
        When ``partitions`` is below 1.
    RuntimeError
        When the broker is unreachable or rejects the topic creation. The message
        names the bootstrap servers.
    """
    if partitions < 1:
        msg = f"partitions must be >= 1, got {partitions!r}"
        raise ValueError(msg)
    topic = settings.kafka_topic
    servers = settings.kafka_bootstrap_servers
    timeout_s = settings.kafka_timeout_s
    admin = kafka_client(AdminClient, settings.kafka_config())

    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise RuntimeError(_unreachable_message(servers, exc)) from exc
    existing = metadata.topics.get(topic)
    if existing is not None and existing.error is None:
        if len(existing.partitions) != partitions:
            logger.warning(
                "Keeping topic %s with its %s instead of the %d requested",
                topic,
                counted(len(existing.partitions), "partition"),
                partitions,
            )
        return

    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions)], request_timeout=timeout_s
    )
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        # Another producer may have created the topic since the metadata request.
        if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return
        msg = f"creating topic {topic!r} on Kafka at {servers} failed: {exc.args[0]}"
        raise RuntimeError(msg) from exc
    except TimeoutError as exc:
        msg = f"creating topic {topic!r} on Kafka at {servers} timed out after {timeout_s} s"
        raise RuntimeError(msg) from exc
    logger.info("Created topic %s with %s", topic, counted(partitions, "partition"))


def _unreachable_message(servers: str, error: object) -> str:
    return (
        f"Kafka broker at {servers} is unreachable or did not answer ({error}). "
        f"Start the broker, or set {ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS to its "
        "address. When a process listens there, it is either not a Kafka broker "
        "(check the port) or a broker that hangs: resume one stopped by SIGSTOP "
        "with 'kill -CONT PID', and restart any other"
    )


class _DeliveryReports:
    """Counts of delivery reports, with the first error kept for the message."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0
        self.timed_out = 0
        self.first_error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if error.code() == KafkaError._MSG_TIMED_OUT:
            self.timed_out += 1
        if self.first_error is None:
            self.first_error = error

    def raise_if_failed(self, servers: str, topic: str) -> None:
        if self.failed:
            msg = (
                f"delivery to topic {topic!r} on Kafka at {servers} failed for "
                f"{self.failed} message(s), first error: {self.first_error}. Check that "
                "the broker is running and accepts writes to the topic"
            )
            if self.timed_out:
                # librdkafka reports a message sent but not acknowledged within
                # message.timeout.ms as timed out, whether the broker wrote it or not.
                msg += (
                    f". {self.timed_out} of them timed out, and a broker may have "
                    "written those all the same: count the topic's records before "
                    "sending them again, or their readings may be stored twice"
                )
            raise RuntimeError(msg)


class StopRequest(Protocol):
    """A flag that reports whether a stop was requested, such as ``threading.Event``."""

    def is_set(self) -> bool: ...


class _NoStopRequest:
    """The stop request of a caller that never stops the loop."""

    def is_set(self) -> bool:
        return False


_NO_STOP_REQUEST: Final = _NoStopRequest()


def _delivered_text(sent: int, delivered: int) -> str:
    verb = "was" if delivered == 1 else "were"
    return f"Of the {counted(sent, 'message')} sent, {delivered} {verb} delivered"


class ProduceStopped(Exception):
    """A stop request ended the produce loop; the message gives the delivered count.

    ``sent`` counts the messages handed to the producer and ``delivered`` those
    the broker acknowledged. ``line`` is for callers that read messages from a
    file: the line that was not sent.
    """

    def __init__(self, message: str, *, sent: int = 0, delivered: int = 0) -> None:
        super().__init__(message)
        self.sent = sent
        self.delivered = delivered
        self.line: int | None = None


class ProduceFailed(RuntimeError):
    """librdkafka failed to queue one message, and every message before it was delivered."""


def produce_readings(
    settings: Settings,
    *,
    count: int,
    rate: float | None = None,
    seed: int | None = None,
    cohort_size: int = 200,
    malformed_rate: float = 0.0,
    partitions: int = 3,
    progress: bool = False,
    stop: StopRequest | None = None,
) -> int:
    """Produce ``count`` readings from ``iter_readings`` to ``settings.kafka_topic``.

    The topic is created first if needed (see ``ensure_topic``). ``rate`` caps the
    throughput in messages per second, and ``None`` sends as fast as the producer
    accepts. With ``progress=True`` a progress bar is drawn on stderr when ``count`` is
    at least 10,000 and stderr is a terminal. Returns the number of messages
    delivered, which is ``count`` on success.

    Raises
    ------
    ValueError
        When an argument is invalid. The message names it.
    RuntimeError
        When the broker is unreachable, a delivery fails or the final flush times out.
        The message names the bootstrap servers.
    """
    readings = iter_readings(
        count=count, seed=seed, cohort_size=cohort_size, malformed_rate=malformed_rate
    )
    return produce_messages(
        settings,
        readings,
        count=count,
        rate=rate,
        partitions=partitions,
        progress=progress,
        stop=stop,
    )


def produce_messages(
    settings: Settings,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    *,
    count: int | None = None,
    rate: float | None = None,
    partitions: int = 3,
    progress: bool = False,
    stop: StopRequest | None = None,
) -> int:
    """Produce ``(key, value)`` pairs to ``settings.kafka_topic`` and wait for every delivery.

    The topic is created first if needed (see ``ensure_topic``). ``rate`` caps
    the throughput in messages per second. ``count``, when known, sizes the
    progress bar that ``progress=True`` draws. Returns the number of messages
    delivered. The errors are those of :func:`produce_readings`, and
    :class:`ProduceStopped` once ``stop`` is set (by a signal handler, say).
    """
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        msg = (
            "rate must be a finite number of messages/s above 0, or None for no cap, "
            f"got {rate!r}"
        )
        raise ValueError(msg)
    if stop is None:
        stop = _NO_STOP_REQUEST
    try:
        ensure_topic(settings, partitions=partitions)
    except RuntimeError:
        if not stop.is_set():
            raise
    # The metadata request ignores a stop request, so it is checked after it.
    if stop.is_set():
        raise ProduceStopped(_delivered_text(0, 0))

    topic = settings.kafka_topic
    servers = settings.kafka_bootstrap_servers
    reports = _DeliveryReports()
    producer = kafka_client(Producer, PRODUCER_TUNING | settings.kafka_config())
    logger.info("Producing to topic %s", topic)
    started = time.monotonic()
    sent = 0
    try:
        with _progress_bar(count or 0, enabled=progress) as show_progress:
            for index, (key, value) in enumerate(messages):
                if rate is not None:
                    _wait_until(producer, started + index / rate, stop)
                if stop.is_set():
                    raise ProduceStopped("stop requested")
                try:
                    _produce(
                        producer, topic, key, value, reports, servers=servers, stop=stop
                    )
                except RuntimeError as exc:
                    # The messages queued before this one still go out, so that
                    # the caller can go on from the failed one.
                    left = producer.flush(_FLUSH_TIMEOUT_S)
                    reports.raise_if_failed(servers, topic)
                    if left:
                        raise
                    raise ProduceFailed(str(exc)) from exc
                sent += 1
                if index % _POLL_EVERY == 0:
                    producer.poll(0)
                    show_progress(reports.delivered)
                    reports.raise_if_failed(servers, topic)

            # Wait for every delivery report before counting.
            remaining = _flush(producer, time.monotonic() + _FLUSH_TIMEOUT_S, stop)
            if remaining and stop.is_set():
                raise ProduceStopped("stop requested")
            show_progress(reports.delivered)
        reports.raise_if_failed(servers, topic)
        if remaining:
            msg = (
                f"{remaining} message(s) still undelivered to Kafka at {servers} after "
                f"{_FLUSH_TIMEOUT_S} s. Check the broker's health"
            )
            raise RuntimeError(msg)
    except ProduceFailed:
        raise
    except ProduceStopped:
        # The messages already handed to the producer still go out, for a short while.
        producer.flush(_STOP_FLUSH_S)
        delivered = reports.delivered
        msg = _delivered_text(sent, delivered)
        raise ProduceStopped(msg, sent=sent, delivered=delivered) from None
    except RuntimeError as exc:
        # Drop what is still queued and let what is in flight settle, so that
        # the count of delivered messages is final.
        producer.purge(in_queue=True, in_flight=False)
        producer.flush(_FLUSH_TIMEOUT_S)
        msg = f"{exc}. {_delivered_text(sent, reports.delivered)}"
        raise RuntimeError(msg) from exc
    finally:
        _close_producer(producer)

    elapsed = time.monotonic() - started
    logger.info(
        "Delivered %d messages to topic %s in %.2f s", reports.delivered, topic, elapsed
    )
    return reports.delivered


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    reports: _DeliveryReports,
    *,
    servers: str,
    stop: StopRequest,
) -> None:
    """Queue one message, serving delivery reports while the local queue is full."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=reports)
        except BufferError:
            if stop.is_set():
                raise ProduceStopped("stop requested") from None
            producer.poll(0.05)
        except KafkaException as exc:
            # For example MSG_SIZE_TOO_LARGE when message.max.bytes is set low.
            msg = f"producing to topic {topic!r} on Kafka at {servers} failed: {exc.args[0]}"
            raise RuntimeError(msg) from exc
        else:
            return


def _close_producer(producer: Producer) -> None:
    """Close the producer without masking an error raised while producing."""
    try:
        # Drop what is still queued after a failure, so close() does not wait for it.
        producer.purge()
        producer.close()
    except (KafkaException, RuntimeError):
        logger.warning("Closing the Kafka producer failed", exc_info=True)


def _wait_until(producer: Producer, deadline: float, stop: StopRequest) -> None:
    """Serve delivery reports until the monotonic clock reaches ``deadline`` or ``stop`` is set."""
    delay = deadline - time.monotonic()
    while delay > 0 and not stop.is_set():
        step = min(delay, _STOP_CHECK_S)
        if step < _POLL_RESOLUTION_S:
            # poll() would not wait at all, so the loop would spin until the deadline.
            time.sleep(step)
        else:
            # poll() may return early once it has served an event, hence the loop.
            producer.poll(step)
        delay = deadline - time.monotonic()


def _flush(producer: Producer, deadline: float, stop: StopRequest) -> int:
    """Flush in short steps until ``deadline`` or ``stop``; return the messages left."""
    while True:
        left = producer.flush(max(0.0, min(deadline - time.monotonic(), _STOP_CHECK_S)))
        if not left or time.monotonic() >= deadline or stop.is_set():
            return int(left)


@contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield a function that shows the number of delivered messages out of ``total``."""
    console = Console(stderr=True)
    # Off a terminal, Rich would still print the bar's last frame into the log.
    if not enabled or total < _PROGRESS_MIN_COUNT or not console.is_terminal:
        yield lambda _delivered: None
        return

    with Progress(console=console) as progress:
        task = progress.add_task("Producing readings", total=total)
        yield lambda delivered: progress.update(task, completed=delivered)
