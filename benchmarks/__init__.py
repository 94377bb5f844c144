"""Throughput benchmark of the batch against a local broker and redis-server."""
