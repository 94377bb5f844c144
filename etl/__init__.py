"""Micro-batch ETL of patient vital signs: Kafka to Polars to Redis."""

import os

__version__ = "0.1.0"

#: Options for Polars' allocator (jemalloc). Polars reads ``_RJEM_MALLOC_CONF``
#: once, when it is first imported, and appends it to its own options
#: (``dirty_decay_ms:500,muzzy_decay_ms:1000`` in Polars 2.1), so these win.
#: A batch frees and allocates chunk-sized buffers several times a second,
#: and each page handed back to the kernel costs a page fault when it is used
#: again. In A/B runs of the batch on 1M readings (line (c) of
#: ``benchmarks/run.py``, three to seven runs each, 2 vCPUs), keeping freed
#: pages 1 s lowered the batch's CPU time from about 6.0 s to 5.7 s. Keeping
#: them 5 s lowered it to 5.4 s, but the peak RSS at a backlog of 2M rose by
#: about 40 MB. A value already in the environment is kept, and none applies
#: when Polars was imported before this package.
JEMALLOC_OPTIONS = "dirty_decay_ms:1000,muzzy_decay_ms:1000"

os.environ.setdefault("_RJEM_MALLOC_CONF", JEMALLOC_OPTIONS)
