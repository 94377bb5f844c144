"""The DAG file: it parses, its settings, its task order, and one ``dag.test()`` run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pendulum
import pytest
import redis

from etl.config import Settings
from tests.airflow.conftest import DAG_ID, DAGS, REPO, vitals_env
from tests.conftest import create_topic, encode, produce, reading

pytestmark = pytest.mark.airflow

DAG_FILE = DAGS / "vitals_dag.py"
TASK_ORDER = [
    "generate_readings",
    "drain",
    "transform_validate",
    "load_redis",
    "report",
]
HEAVY_MODULES = ["polars", "pandera", "confluent_kafka", "redis", "etl.pipeline"]


@pytest.fixture(scope="module")
def dag_bag() -> Any:
    """The DAG folder parsed once, as the dag-processor parses it."""
    pytest.importorskip("airflow")
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dag(dag_bag: Any) -> Any:
    return dag_bag.dags[DAG_ID]


@pytest.fixture(scope="module")
def dag_module() -> ModuleType:
    """The DAG file imported as a plain module, for its helper functions."""
    pytest.importorskip("airflow")
    spec = importlib.util.spec_from_file_location("vitals_dag_under_test", DAG_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_bag_has_no_import_errors(dag_bag: Any) -> None:
    assert dag_bag.import_errors == {}
    assert DAG_ID in dag_bag.dags


def test_dag_schedule_and_run_limits(dag: Any) -> None:
    assert dag.timetable.expression == "*/5 * * * *"
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    assert dag.dagrun_timeout is not None
    assert dag.dagrun_timeout < timedelta(minutes=5)
    assert dag.start_date < pendulum.now("UTC")
    assert dag.doc_md
    assert "vitals" in dag.tags


def test_dag_tasks_run_in_order(dag: Any) -> None:
    assert sorted(dag.task_ids) == sorted(TASK_ORDER)
    for upstream, downstream in itertools.pairwise(TASK_ORDER):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.get_task(TASK_ORDER[-1]).downstream_task_ids == set()


@pytest.mark.parametrize("task_id", TASK_ORDER)
def test_dag_task_retries_and_timeouts(dag: Any, task_id: str) -> None:
    task = dag.get_task(task_id)
    assert task.retries == 2
    assert task.retry_delay == timedelta(seconds=30)
    assert task.retry_exponential_backoff == 2.0
    assert task.max_retry_delay is not None
    assert task.execution_timeout is not None
    assert task.execution_timeout < dag.dagrun_timeout


def test_dag_params_defaults(dag: Any) -> None:
    params = dag.params.dump()
    assert params["generate"] is True
    assert params["generate_count"] == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("false", False, id="false"),
        pytest.param(" OFF ", False, id="off-padded"),
        pytest.param("0", False, id="zero"),
        pytest.param("yes", True, id="yes"),
        pytest.param("True", True, id="true-capitalised"),
    ],
)
def test_dag_generate_default_from_env(
    dag_module: ModuleType, value: str, expected: bool
) -> None:
    with mock.patch.dict(os.environ, {dag_module.GENERATE_ENV: value}):
        assert dag_module._generate_by_default() is expected


def test_dag_generate_default_rejects_other_text(dag_module: ModuleType) -> None:
    with (
        mock.patch.dict(os.environ, {dag_module.GENERATE_ENV: "sometimes"}),
        pytest.raises(ValueError, match="VITALS_DEMO_GENERATE='sometimes'"),
    ):
        dag_module._generate_by_default()


@pytest.mark.parametrize(
    ("run_id", "folder"),
    [
        # A scheduled run id keeps its shape, without ':' and '+'.
        pytest.param(
            "scheduled__2026-12-04T15:15:00+00:00",
            "scheduled__2026-12-04T15_15_00_00_00",
            id="scheduled",
        ),
        # Dots would allow '..', so they never reach the path.
        pytest.param("..", "__", id="parent-folder"),
        pytest.param("a/../../etc", "a_______etc", id="slashes"),
    ],
)
def test_dag_staging_dir_stays_under_root(
    dag_module: ModuleType, tmp_path: Path, run_id: str, folder: str
) -> None:
    with mock.patch.dict(os.environ, {dag_module.STAGING_ENV: str(tmp_path)}):
        staging = dag_module.staging_dir(run_id)
    assert staging == tmp_path / DAG_ID / folder


def test_dag_file_imports_no_heavy_module() -> None:
    """Parsing the DAG file must not load the data libraries (parse cost)."""
    pytest.importorskip("airflow")
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('vitals_dag', {str(DAG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == []


# One DAG run in this process with dag.test(), against the session broker and Redis.


def connection_file(settings: Settings, path: Path) -> Path:
    """Write ``kafka_default`` and ``redis_default`` for ``settings`` as a JSON file."""
    url = redis.connection.parse_url(settings.redis_url.get_secret_value())
    connections = {
        "kafka_default": {
            "conn_type": "kafka",
            "extra": {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "group.id": settings.kafka_group_id,
            },
        },
        "redis_default": {
            "conn_type": "redis",
            "host": url["host"],
            "port": url["port"],
            "extra": {"db": url.get("db", 0)},
        },
    }
    path.write_text(json.dumps(connections))
    return path


@pytest.fixture
def dag_run_env(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """VITALS_* for the test's topic and keys, with unusable Kafka and Redis addresses.

    The addresses must come from the connection file: port 1 on 127.0.0.1 has
    no server, so a run that ignored the connections would fail.
    """
    env = vitals_env(settings, staging=tmp_path / "staging")
    env["VITALS_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"
    env["VITALS_REDIS_URL"] = "redis://127.0.0.1:1/0"
    with mock.patch.dict(os.environ, env):
        yield tmp_path / "staging"


def task_returns(dag_run: Any) -> dict[str, Any]:
    """The return value of every task of a finished run, read from the XCom table."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = XComModel.get_many(
        run_id=dag_run.run_id, dag_ids=DAG_ID, key="return_value"
    )
    with create_session() as session:
        rows = session.scalars(query).all()
        return {row.task_id: XComModel.deserialize_value(row) for row in rows}


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


@pytest.mark.integration
@pytest.mark.slow
# Airflow 3.3.2 imports fastapi.testclient for the in-process execution API.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_dag_test_loads_rows_once(
    dag: Any,
    airflow_db: Path,
    settings: Settings,
    redis_client: redis.Redis,
    dag_run_env: Path,
    tmp_path: Path,
) -> None:
    create_topic(settings, partitions=2)
    readings = [encode(reading(patient_id=f"PT-{i:03d}")) for i in range(30)]
    produce(settings, [*readings, b"{not json"])
    connections = str(connection_file(settings, tmp_path / "connections.json"))

    first = dag.test(run_conf={"generate": False}, conn_file_path=connections)

    assert task_states(first) == dict.fromkeys(TASK_ORDER, "success")
    returns = task_returns(first)
    listed = redis_client.llen(settings.redis_list_key)
    assert listed == 30
    assert returns["generate_readings"] == 0
    assert returns["drain"]["read"] == 31
    assert returns["report"]["written"] == listed
    assert returns["report"]["rejected"] == 1
    assert redis_client.llen(settings.redis_rejects_key) == 1
    # XCom carries the staging path and counts, and report removes the folder.
    assert set(returns["load_redis"]) == {
        "staging",
        "written",
        "rejected",
        "skipped",
        "status",
    }
    assert not Path(returns["drain"]["staging"]).exists()
    assert Path(returns["drain"]["staging"]).parent.parent == dag_run_env

    second = dag.test(run_conf={"generate": False}, conn_file_path=connections)

    assert task_states(second) == dict.fromkeys(TASK_ORDER, "success")
    again = task_returns(second)
    assert again["drain"]["read"] == 0
    assert again["report"]["written"] == 0
    assert redis_client.llen(settings.redis_list_key) == listed


def test_dag_variables_known_to_settings(dag_module: ModuleType) -> None:
    """The settings do not warn about the VITALS_* variables that the DAG file reads."""
    from etl.config import DAG_VARIABLES

    assert {dag_module.GENERATE_ENV, dag_module.STAGING_ENV} == DAG_VARIABLES
