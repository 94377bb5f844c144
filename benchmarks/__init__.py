"""Throughput benchmark of the batch against a local broker and redis-server."""

# Imported first, so that the stages measured in this process get the
# allocator options the batch sets before Polars loads.
import etl  # noqa: F401
