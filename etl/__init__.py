"""Micro-batch ETL of patient vital signs: Kafka to Polars to Redis."""

__version__ = "0.1.0"
