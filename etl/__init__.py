"""Micro-batch ETL of patient vital signs: Kafka to Polars to Redis."""

import os

__version__ = "0.1.0"

#: Options for Polars' allocator (jemalloc). Polars reads ``_RJEM_MALLOC_CONF``
#: once, when it is first imported, and appends it to its own options
#: (``dirty_decay_ms:500,muzzy_decay_ms:1000`` in Polars 2.1), so these win.
#: A batch frees and allocates chunk-sized buffers several times a second;
#: with freed pages handed back to the kernel after 0.5 s, each chunk paid
#: the page faults again. Keeping them 5 s cut the batch's CPU time by about
#: a tenth in ``benchmarks/run.py``. A value already in the environment is
#: kept, and none applies when Polars was imported before this package.
JEMALLOC_OPTIONS = "dirty_decay_ms:5000,muzzy_decay_ms:5000"

os.environ.setdefault("_RJEM_MALLOC_CONF", JEMALLOC_OPTIONS)
