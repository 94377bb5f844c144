"""The allocator options the package sets before Polars loads."""

from __future__ import annotations

import os
import subprocess
import sys

import etl

_VARIABLE = "_RJEM_MALLOC_CONF"


def _environment_after(code: str, **preset: str) -> str:
    """Run ``code`` in a fresh interpreter; return its ``_RJEM_MALLOC_CONF``."""
    env = {k: v for k, v in os.environ.items() if k != _VARIABLE} | preset
    completed = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport os; print(os.environ['{_VARIABLE}'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout.strip()


def test_options_follow_polars_own() -> None:
    conf = _environment_after("import etl.parse")

    # Polars keeps its own options and appends ours, so ours are read last.
    assert conf.endswith("," + etl.JEMALLOC_OPTIONS)


def test_user_options_are_kept() -> None:
    conf = _environment_after("import etl.parse", **{_VARIABLE: "dirty_decay_ms:0"})

    assert conf.endswith(",dirty_decay_ms:0")
    assert etl.JEMALLOC_OPTIONS not in conf
