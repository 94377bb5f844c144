"""Real scheduled runs: api-server, scheduler and dag-processor on SQLite.

The three Airflow 3 components run as separate processes on 127.0.0.1 with
the LocalExecutor, as a deployment without Docker runs them. The test unpauses
the DAG, waits for the scheduler's own run, then triggers a manual run with
the demo generator off and checks that it writes nothing new.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil
import pytest
import redis

from etl.config import Settings
from etl.services import free_port
from tests.airflow.conftest import AIRFLOW_BIN, DAG_ID, airflow_env, vitals_env

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.slow]

#: Bound of the whole test, from the first process start to the last check.
#: On an idle 2-core machine the test takes about 60 s; at a load average of 9
#: to 12 the manual run finished after 146-170 s, hence the margin.
TEST_BUDGET_S: Final = 360.0
#: Readings produced by the scheduled run's generator.
GENERATE_COUNT: Final = 200
USER: Final = "airflow"
PASSWORD: Final = "airflow"
COMPONENTS: Final = {
    "api-server": ["api-server"],
    # Without --skip-serve-logs the scheduler serves logs on [::]:8793.
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
}
FINISHED: Final = {"success", "failed"}

T = TypeVar("T")


class Deadline:
    """A wall-clock budget shared by every wait of the test."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.end = self.started + seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class AirflowCluster:
    """The three Airflow processes of one test, with what the checks need."""

    base_url: str
    home: Path
    deadline: Deadline
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        """Record the time since the first process start at which ``step`` ended."""
        self.timings[step] = round(self.deadline.elapsed(), 1)

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for name in self.processes:
            path = self.home / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {name} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            code = process.poll()
            if code is not None:
                pytest.fail(
                    f"airflow {name} exited with code {code}\n{self.log_tails()}"
                )

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        """Send one JSON request to the API and return the decoded response."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(
            self.base_url + path, data=data, headers=headers, method=method
        )
        timeout = max(1.0, min(30.0, self.deadline.left()))
        with urllib.request.urlopen(call, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def wait_for(self, description: str, probe: Callable[[], T | None]) -> T:
        """Poll ``probe`` every 0.5 s until it returns a value, up to the deadline."""
        while self.deadline.left() > 0:
            self.check_alive()
            try:
                found = probe()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                found = None
            if found is not None:
                return found
            time.sleep(0.5)
        pytest.fail(
            f"timed out after {self.deadline.elapsed():.0f} s "
            f"waiting for {description}, timings so far {self.timings}\n"
            f"{self.log_tails()}"
        )

    def dag_runs(self, *, run_type: str | None = None) -> list[dict[str, Any]]:
        query = "order_by=-run_after&limit=50"
        if run_type:
            query += f"&run_type={run_type}"
        response = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?{query}")
        runs: list[dict[str, Any]] = response["dag_runs"]
        return runs

    def wait_for_run(
        self, description: str, probe: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Wait for the run from ``probe`` to finish, and fail unless it succeeded."""

        def finished() -> dict[str, Any] | None:
            run = probe()
            return run if run is not None and run["state"] in FINISHED else None

        run = self.wait_for(description, finished)
        if run["state"] != "success":
            states = self.task_states(run["dag_run_id"])
            pytest.fail(
                f"{description} ended {run['state']}: {states}\n{self.log_tails()}"
            )
        return run

    def task_states(self, run_id: str) -> dict[str, str]:
        response = self.request(
            "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
        )
        return {ti["task_id"]: ti["state"] for ti in response["task_instances"]}

    def returned(self, run_id: str, task_id: str) -> Any:
        """The return value (XCom ``return_value``) of one task of one run."""
        response = self.request(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"
            "/xcomEntries/return_value",
        )
        value = response["value"]
        return json.loads(value) if isinstance(value, str) else value


def start_components(cluster: AirflowCluster, env: dict[str, str]) -> None:
    """Start api-server, scheduler and dag-processor, each logging to a file."""
    for name, arguments in COMPONENTS.items():
        with (cluster.home / f"{name}.log").open("wb") as log:
            cluster.processes[name] = subprocess.Popen(
                [str(AIRFLOW_BIN), *arguments],
                env=env,
                cwd=cluster.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: SIGTERM reaches the component and its workers.
                start_new_session=True,
            )


def stop_cluster(cluster: AirflowCluster, *, grace_s: float = 15.0) -> list[str]:
    """Stop the components (SIGTERM, then SIGKILL) and return the killed leftovers."""
    # Task processes run in process groups of their own: collect them first,
    # because they are reparented once their supervisor exits.
    tree: list[psutil.Process] = []
    for process in cluster.processes.values():
        try:
            parent = psutil.Process(process.pid)
            tree.extend([parent, *parent.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for process in cluster.processes.values():
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue

    _stopped, alive = psutil.wait_procs(tree, timeout=grace_s)
    killed = []
    for leftover in alive:
        try:
            killed.append(f"{leftover.pid} {leftover.name()}")
            leftover.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    for process in cluster.processes.values():
        process.wait(timeout=5)
    return killed


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    airflow_db_template: Path,
    settings: Settings,
    tmp_path: Path,
) -> Iterator[AirflowCluster]:
    """api-server, scheduler and dag-processor with their own AIRFLOW_HOME."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    # A copy of a migrated database saves the seconds of 'airflow db migrate'.
    # An empty airflow.cfg keeps three processes from racing to write one.
    shutil.copyfile(airflow_db_template, home / "airflow.db")
    (home / "airflow.cfg").write_text("")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))

    port = free_port()
    env = airflow_env(
        home,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        # Task processes call the execution API at this address, not at the
        # default localhost:8080.
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        # The first execution API call sets up its routers, which took 4-7 s
        # on a 2-core machine: more than the task processes' default 5 s.
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="30",
        # The scheduler signs task tokens and the api-server checks them.
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(64),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        # One DAG file, parsed once at start: re-parsing every 30 s (the
        # default) only competes for the CPU with the runs under test.
        AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="600",
        VITALS_DEMO_GENERATE="true",
        **vitals_env(settings, staging=tmp_path / "staging"),
    )

    started = AirflowCluster(f"http://127.0.0.1:{port}", home, Deadline(TEST_BUDGET_S))
    try:
        start_components(started, env)
        yield started
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(started.log_tails())
        killed = stop_cluster(started)
        print(f"Airflow timings (s since start): {started.timings}")
        if killed:
            print(f"Killed after SIGTERM grace period: {killed}")


def boot(cluster: AirflowCluster) -> None:
    """Wait for the API, warm up the execution API, log in, wait for the DAG."""
    cluster.wait_for(
        "/api/v2/monitor/health",
        lambda: cluster.request("GET", "/api/v2/monitor/health"),
    )
    cluster.mark("healthy")
    cluster.request("GET", "/execution/health")
    cluster.mark("execution_api_warm")

    token = cluster.request(
        "POST", "/auth/token", {"username": USER, "password": PASSWORD}
    )
    cluster.token = token["access_token"]

    def dag_visible() -> dict[str, Any] | None:
        errors = cluster.request("GET", "/api/v2/importErrors")
        if errors["total_entries"]:
            pytest.fail(f"the DAG folder has import errors: {errors['import_errors']}")
        try:
            found: dict[str, Any] = cluster.request("GET", f"/api/v2/dags/{DAG_ID}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return found

    cluster.wait_for(f"DAG {DAG_ID} to be parsed", dag_visible)
    cluster.mark("dag_visible")


def written_by_successful_runs(cluster: AirflowCluster) -> int:
    """Rows written by every successful run so far, from their report XComs."""
    total = 0
    for run in cluster.dag_runs():
        if run["state"] == "success":
            total += cluster.returned(run["dag_run_id"], "report")["written"]
    return total


def test_scheduler_runs_dag_exactly_once(
    cluster: AirflowCluster, settings: Settings, redis_client: redis.Redis
) -> None:
    boot(cluster)

    # Unpaused with catchup off, the DAG gets a run for the latest 5-minute tick.
    cluster.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    cluster.mark("unpaused")
    first = cluster.wait_for_run(
        "the first scheduled run",
        lambda: next(iter(cluster.dag_runs(run_type="scheduled")), None),
    )
    cluster.mark("scheduled_run_success")

    produced = cluster.returned(first["dag_run_id"], "generate_readings")
    summary = cluster.returned(first["dag_run_id"], "report")
    listed = redis_client.llen(settings.redis_list_key)
    assert produced == GENERATE_COUNT
    assert summary["read"] == GENERATE_COUNT
    assert summary["written"] + summary["rejected"] == GENERATE_COUNT
    assert summary["written"] > 0
    assert listed == summary["written"]

    # A manual run without the generator finds nothing new to write.
    manual = cluster.request(
        "POST",
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        {"logical_date": None, "conf": {"generate": False}},
    )
    cluster.wait_for_run(
        "the manual run",
        lambda: next(
            (r for r in cluster.dag_runs() if r["dag_run_id"] == manual["dag_run_id"]),
            None,
        ),
    )
    cluster.mark("manual_run_success")

    assert cluster.returned(manual["dag_run_id"], "generate_readings") == 0
    assert cluster.returned(manual["dag_run_id"], "report")["written"] == 0

    # A run at the next 5-minute tick generates more readings. Once every run
    # has finished, each row in Redis must come from exactly one run.
    cluster.wait_for(
        "the runs still active",
        lambda: (
            True if all(r["state"] in FINISHED for r in cluster.dag_runs()) else None
        ),
    )
    assert redis_client.llen(settings.redis_list_key) == written_by_successful_runs(
        cluster
    )
