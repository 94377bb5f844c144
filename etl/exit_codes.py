"""Exit codes of the ``etl`` command, shared by every subcommand."""

from typing import Final

EXIT_FAILED: Final = 1
"""A check failed: a contract drifted or a feed has invalid lines."""
EXIT_CONFIG: Final = 2
"""Invalid settings."""
EXIT_INFRASTRUCTURE: Final = 3
"""Kafka or Redis is unreachable or failed."""
