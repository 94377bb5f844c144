"""Measure ``process_chunk`` on chunks with odd messages mixed in.

Run as ``python -m benchmarks.odd``. No broker or Redis is needed: the
readings come from ``etl.generate.iter_readings`` with a ``malformed_rate``
(every kind of ``etl.malformed``), and each feed is cut into chunks the way
the drain hands them over. Each line gives the CPU time and the wall time of
``process_chunk`` over the whole feed, scaled to 1M readings, best of
``--repeat`` passes, and the CPU time against that of the feed without odd
messages, which always comes first. The last line is a feed of valid readings whose timestamps are
ISO-8601 text, a documented tolerance that the typed read does not take.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import polars as pl

from etl.config import load_settings
from etl.generate import iter_readings
from etl.parse import RAW_SCHEMA
from etl.pipeline import process_chunk

#: The clock of the generated readings and of the batch, so that every run
#: draws the same messages and accepts the same timestamps.
NOW = 1_790_000_000.0


def positive(text: str) -> int:
    """Parse a whole number of at least 1 (an argparse type)."""
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def shares(text: str) -> list[float]:
    """Parse comma-separated shares of odd messages, each from 0 to 1."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        msg = f"expected numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    outside = [value for value in values if not 0.0 <= value <= 1.0]
    if outside:
        msg = f"shares must be from 0 to 1, got {outside}"
        raise argparse.ArgumentTypeError(msg)
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.odd",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--count",
        type=positive,
        default=500_000,
        help="readings per feed (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=positive,
        default=None,
        help="records per chunk (default: the product's VITALS_CHUNK_SIZE default)",
    )
    parser.add_argument(
        "--rates",
        type=shares,
        default="0,0.0001,0.001,0.02",
        help="shares of odd messages, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=positive,
        default=3,
        help="passes over each feed; the fastest is kept (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the generated readings"
    )
    return parser.parse_args(argv)


def feed(count: int, seed: int, rate: float) -> Iterator[tuple[bytes, bytes | None]]:
    """Yield generated readings with a share ``rate`` of odd messages."""
    yield from iter_readings(count=count, seed=seed, malformed_rate=rate, now=NOW)


def iso_feed(count: int, seed: int) -> Iterator[tuple[bytes, bytes | None]]:
    """Yield valid readings with the timestamp as ISO-8601 text with an offset."""
    for key, value in feed(count, seed, 0.0):
        assert value is not None
        document = orjson.loads(value)
        moment = datetime.fromtimestamp(document["timestamp"], UTC)
        document["timestamp"] = moment.isoformat()
        yield key, orjson.dumps(document)


def chunks(
    messages: Iterator[tuple[bytes, bytes | None]], size: int
) -> list[pl.DataFrame]:
    """Cut ``messages`` into raw frames of ``size`` records on partition 0, as the drain does."""
    pairs = list(messages)
    frames = []
    for start in range(0, len(pairs), size):
        part = pairs[start : start + size]
        columns = {
            "partition": [0] * len(part),
            "offset": range(start, start + len(part)),
            "key": [key for key, _ in part],
            "value": [value for _, value in part],
        }
        frames.append(pl.DataFrame(columns, schema=RAW_SCHEMA))
    return frames


def measure(
    frames: list[pl.DataFrame], repeat: int, chunk_size: int
) -> tuple[float, float, int, int]:
    """Return the best CPU and wall seconds of ``process_chunk`` over ``frames``, rows, rejects."""
    settings = load_settings(chunk_size=chunk_size)
    best_cpu = best_wall = float("inf")
    rows = rejects = 0
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        rows = rejects = 0
        for raw in frames:
            chunk, _ = process_chunk(
                raw, settings, topic="vitals", now=NOW, expected={}
            )
            rows += chunk.rows.height
            rejects += chunk.rejects.height
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, rows, rejects


def main(argv: list[str] | None = None) -> None:
    """Measure each feed and print the table."""
    args = parse_args(argv)
    chunk_size = args.chunk_size or load_settings().chunk_size

    # The feed without odd messages comes first: the last column divides by it.
    rates = sorted({0.0, *args.rates})
    feeds = [
        (f"odd messages {rate:.2%}", feed(args.count, args.seed, rate))
        for rate in rates
    ]
    feeds.append(("ISO-8601 timestamps", iso_feed(args.count, args.seed)))

    # One small chunk of each kind first, so that no line pays for the first
    # calls (regex compilation, the contract checks built once per model).
    warm_up = [feed(2_000, args.seed, rate) for rate in (0.0, 0.02)]
    warm_up.append(iso_feed(2_000, args.seed))
    for messages in warm_up:
        measure(chunks(messages, chunk_size), 1, chunk_size)

    scale = 1_000_000 / args.count
    print(f"process_chunk, {args.count:,} readings in chunks of {chunk_size:,}")
    print("| feed | CPU-s per 1M | s per 1M | rows | rejects | CPU / no odd |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    baseline = 0.0
    for name, messages in feeds:
        cpu, wall, rows, rejects = measure(
            chunks(messages, chunk_size), args.repeat, chunk_size
        )
        baseline = baseline or cpu
        print(
            f"| {name} | {cpu * scale:.2f} | {wall * scale:.2f} | {rows:,} "
            f"| {rejects:,} | {cpu / baseline:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
