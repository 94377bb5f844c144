"""Fixtures for the Airflow tests: a throwaway AIRFLOW_HOME with a SQLite database.

Airflow reads its configuration when it is first imported, so this module
points ``AIRFLOW_HOME`` and the database at a temporary folder as soon as
pytest loads it, before any test module imports Airflow. The tests never read
or write ``~/airflow``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from etl.config import Settings

REPO: Final = Path(__file__).resolve().parents[2]
DAGS: Final = REPO / "dags"
DAG_ID: Final = "a_kafka_redis_airflow"
AIRFLOW_BIN: Final = Path(sys.executable).with_name("airflow")


def _isolate_airflow() -> Path:
    """Point this process's Airflow at a fresh folder; return that folder."""
    root = Path(tempfile.mkdtemp(prefix="vitals-airflow-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    home = root / "home"
    home.mkdir()
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
    )
    return root


AIRFLOW_ROOT: Final = _isolate_airflow()


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of an ``airflow`` subprocess with its own home and database."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "VITALS_"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            # Task processes import `etl` from this checkout.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
            ),
            # A graphviz UserWarning would otherwise land in CLI output.
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.update(extra)
    return env


def vitals_env(settings: Settings, *, staging: Path) -> dict[str, str]:
    """``VITALS_*`` variables that make the DAG use ``settings`` and ``staging``."""
    values = {
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "kafka_topic": settings.kafka_topic,
        "kafka_group_id": settings.kafka_group_id,
        "redis_url": settings.redis_url.get_secret_value(),
        "redis_list_key": settings.redis_list_key,
        "redis_rejects_key": settings.redis_rejects_key,
        "redis_offsets_key": settings.redis_offsets_key,
        "redis_alerts_key": settings.redis_alerts_key,
        "redis_reports_key": settings.redis_reports_key,
        "redis_stats_key": settings.redis_stats_key,
        "kafka_timeout_s": str(settings.kafka_timeout_s),
        "redis_timeout_s": str(settings.redis_timeout_s),
    }
    env = {f"VITALS_{name.upper()}": value for name, value in values.items()}
    env["VITALS_STAGING_DIR"] = str(staging)
    return env


@pytest.fixture(scope="session")
def airflow_db_template() -> Path:
    """A SQLite file after ``airflow db migrate``, to copy into each Airflow home."""
    pytest.importorskip("airflow")
    home = AIRFLOW_ROOT / "template"
    home.mkdir(exist_ok=True)
    result = subprocess.run(
        [str(AIRFLOW_BIN), "db", "migrate"],
        env=airflow_env(home),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, (
        f"airflow db migrate failed:\n{result.stderr[-3000:]}"
    )
    return home / "airflow.db"


@pytest.fixture(scope="session")
def airflow_db(airflow_db_template: Path) -> Iterator[Path]:
    """The migrated metadata database of this process, which ``dag.test()`` needs."""
    target = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    shutil.copyfile(airflow_db_template, target)
    yield target


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
