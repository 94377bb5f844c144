"""Every 5 minutes, move new vital-sign readings from Kafka to the Redis list.

The file only wires ``etl`` functions into tasks. Polars, Pandera, the Kafka
and Redis clients and ``etl.pipeline`` are imported inside the tasks, so the
dag-processor, which parses this file every 30 s by default, never loads them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

if TYPE_CHECKING:
    from etl.config import Settings

logger = logging.getLogger(__name__)

DAG_ID: Final = "a_kafka_redis_airflow"

#: Environment variable with the default of the ``generate`` param.
GENERATE_ENV: Final = "VITALS_DEMO_GENERATE"
#: Environment variable with the root of the staging folders.
STAGING_ENV: Final = "VITALS_STAGING_DIR"

#: Upper bound of the drain's own deadline, so the drain ends well inside its
#: task's execution_timeout and the run's dagrun_timeout.
DRAIN_BUDGET_S: Final = 180.0
#: Staging folders of earlier runs older than this are removed by ``drain``:
#: they are leftovers of failed runs, kept a while for debugging.
STALE_STAGING_S: Final = 3600.0

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _generate_by_default() -> bool:
    """Read the default of the ``generate`` param from ``VITALS_DEMO_GENERATE``."""
    text = os.environ.get(GENERATE_ENV, "true").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    msg = f"{GENERATE_ENV}={text!r} is not a boolean; use true or false"
    raise ValueError(msg)


def _settings() -> Settings:
    """Build the settings from the environment and the Airflow connections."""
    from etl.airflow_settings import settings_from_airflow

    return settings_from_airflow()


def staging_root() -> Path:
    """Return the folder that contains this DAG's staging folders, one per run.

    The default lies under AIRFLOW_HOME (or a per-user temp folder) and is
    created readable by its owner only, because staged chunks hold patient
    data and several Airflow installations may share a host.
    """
    default = (
        Path(os.environ["AIRFLOW_HOME"]) / "vitals-staging"
        if os.environ.get("AIRFLOW_HOME")
        else Path(tempfile.gettempdir()) / f"vitals-staging-{os.getuid()}"
    )
    base = Path(os.environ.get(STAGING_ENV) or default)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base / DAG_ID


def staging_dir(run_id: str) -> Path:
    """Return the staging folder of one run.

    Characters other than letters, digits, ``_`` and ``-`` become ``_``, so a
    run id given through the REST API cannot leave the staging root.
    """
    return staging_root() / re.sub(r"[^A-Za-z0-9_-]", "_", run_id)


def _remove_stale_staging(keep: Path) -> int:
    """Remove staging folders of earlier runs older than ``STALE_STAGING_S``."""
    if not keep.parent.is_dir():
        return 0
    cutoff = time.time() - STALE_STAGING_S
    removed = 0
    for folder in keep.parent.iterdir():
        if folder != keep and folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


DOC_MD = f"""
# Patient vital signs: Kafka to Redis

Every 5 minutes this DAG drains the readings that reached the Kafka topic
since the last run, checks them against the data contracts, derives the
clinical fields and appends one JSON row per reading to the Redis list
`liste-patients` (key `VITALS_REDIS_LIST_KEY`).

1. `generate_readings` (demo only) produces `generate_count` synthetic
   readings to the topic when the `generate` param is true. Otherwise it does
   nothing and returns 0.
2. `drain` reads every partition from the offsets stored in Redis up to its
   end, into Arrow files in this run's staging folder. It commits nothing.
3. `transform_validate` parses the readings, applies the input and output
   contracts and derives the name split, the blood pressure class and NEWS2.
   Invalid readings become rejects with a reason code.
4. `load_redis` writes each chunk's rows, rejects, alerts and next offsets to
   Redis in one `MULTI/EXEC`, then commits the offsets to Kafka for lag
   monitoring.
5. `report` appends the batch report to the reports stream, logs the counts
   and removes the staging folder.

**Exactly once.** The next offset of every partition is stored in Redis in the
same transaction as the rows. A retried or repeated `load_redis` finds those
offsets and skips the chunks already written, so a retry, a crash or a rerun
never loses or duplicates a row. Only counts and the staging path travel
through XCom.

**Switching the demo generator off.** Set `{GENERATE_ENV}=false` in the
environment of the dag-processor (it sets the param's default), or trigger a
run with the conf `{{"generate": false}}`.

**Where rows land.** Rows go to `liste-patients`, rejected readings to
`liste-patients:rejects`, rows with a NEWS2 of 5 or more (incomplete rows
too when their recorded parameters reach it) also to
`liste-patients:alerts`, and one report per run to `liste-patients:reports`.
Connections `kafka_default` and `redis_default` override the `VITALS_*`
settings when they are defined.
"""


@dag(
    dag_id=DAG_ID,
    schedule="*/5 * * * *",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # One run at a time, because two runs would drain the same offsets. The
    # Redis offsets hash would drop the duplicates, but the work is wasted.
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=4),
    default_args={
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        # A float multiplier in Task SDK 1.3.2: the first retry 30 to 59 s after
        # the failure (Airflow adds a delay fixed per task instance), then 60 s.
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=2),
    },
    tags=["vitals", "kafka", "redis", "etl"],
    doc_md=DOC_MD,
    params={
        "generate": Param(
            _generate_by_default(),
            type="boolean",
            description="Produce demo readings to the topic before the drain.",
        ),
        "generate_count": Param(
            200,
            type="integer",
            minimum=1,
            maximum=1_000_000,
            description="Number of demo readings per run when generate is true.",
        ),
    },
)
def a_kafka_redis_airflow() -> None:
    @task
    def generate_readings() -> int:
        """Produce readings if the ``generate`` param is true, and return how many."""
        params = get_current_context()["params"]
        if not params["generate"]:
            logger.info("Demo generator is off, so no readings were produced")
            return 0
        from etl.generate import produce_readings

        count = int(params["generate_count"])
        produced = produce_readings(_settings(), count=count)
        logger.info("Produced %s demo readings", produced)
        return produced

    @task(execution_timeout=timedelta(seconds=DRAIN_BUDGET_S + 30))
    def drain(produced: int) -> dict[str, Any]:
        """Drain the topic into the run's staging folder, and return path and counts."""
        from etl.pipeline import drain_to_staging

        settings = _settings()
        if settings.deadline_s > DRAIN_BUDGET_S:
            logger.warning(
                "VITALS_DEADLINE_S=%s exceeds the drain task's budget, so the "
                "drain stops after %s s",
                settings.deadline_s,
                DRAIN_BUDGET_S,
            )
            settings = settings.model_copy(update={"deadline_s": DRAIN_BUDGET_S})

        staging = staging_dir(get_current_context()["run_id"])
        removed = _remove_stale_staging(staging)
        if removed:
            logger.info("Removed %s stale staging folders", removed)

        manifest = drain_to_staging(settings, staging)
        logger.info(
            "Drained %s records in %s chunks (%s produced by the generator), stop: %s",
            manifest["read"],
            len(manifest["raw_files"]),
            produced,
            manifest["stop_reason"],
        )
        return {
            "staging": str(staging),
            "read": manifest["read"],
            "chunks": len(manifest["raw_files"]),
        }

    @task
    def transform_validate(drained: dict[str, Any]) -> dict[str, Any]:
        """Parse, validate and transform the staged chunks, and return the counts."""
        from etl.pipeline import transform_staging

        counts = transform_staging(_settings(), Path(drained["staging"]))
        logger.info(
            "Transformed %s chunks: %s rows, %s rejects, %s duplicates",
            counts.get("chunks", 0),
            counts.get("rows", 0),
            counts.get("rejects", 0),
            counts.get("duplicates", 0),
        )
        return {"staging": drained["staging"], **counts}

    @task
    def load_redis(transformed: dict[str, Any]) -> dict[str, Any]:
        """Write the staged chunks to Redis exactly once, and return the counts.

        A retry rewrites nothing: chunks whose offsets Redis already stores
        are skipped.
        """
        from etl.pipeline import load_staging

        report = load_staging(_settings(), Path(transformed["staging"]))
        logger.info(
            "Loaded into Redis: written %s, rejected %s, skipped %s, status %s",
            report.written,
            report.rejected,
            report.skipped,
            report.status,
        )
        return {
            "staging": transformed["staging"],
            "written": report.written,
            "rejected": report.rejected,
            "skipped": report.skipped,
            "status": report.status,
        }

    @task
    def report(loaded: dict[str, Any]) -> dict[str, Any]:
        """Store and log the batch report, then remove the staging folder."""
        from etl.pipeline import report_staging

        staging = Path(loaded["staging"])
        data = report_staging(_settings(), staging)
        summary = {
            key: data[key]
            for key in (
                "status",
                "read",
                "written",
                "rejected",
                "duplicates",
                "skipped",
                "alerts",
                "chunks",
                "duration_s",
            )
        }
        logger.info(
            "Batch report: status %s, read %s, written %s, rejected %s, "
            "duplicates %s, skipped %s, alerts %s, in %.2f s",
            summary["status"],
            summary["read"],
            summary["written"],
            summary["rejected"],
            summary["duplicates"],
            summary["skipped"],
            summary["alerts"],
            summary["duration_s"],
        )
        # Only after the report is stored: a retry of this task needs the folder.
        shutil.rmtree(staging, ignore_errors=True)
        return summary

    report(load_redis(transform_validate(drain(generate_readings()))))


a_kafka_redis_airflow()
