"""Run the exploration notebooks top to bottom against a Redis filled by real batches."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from etl.config import Settings
from etl.explore import settings_env
from etl.pipeline import run_batch
from tests.conftest import Broker, create_topic, encode, make_settings, produce, reading

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ["01_explore_vitals.ipynb", "02_rejects.ipynb"]
#: Figures each notebook draws when Redis contains rows, rejects and reports.
FIGURES = {"01_explore_vitals.ipynb": 4, "02_rejects.ipynb": 1}
CELL_TIMEOUT_S = 120

MALFORMED: list[bytes | None] = [
    b'{"patient_id": "PT-X1", "name": "Lina Ortega", "age": 51, "blood_pressure": "13',
    None,
    b'{"patient_id": "PT-X2", "name": "H\xe9l\xe8ne Marchetti", "age": 66}',
    encode(reading(patient_id="PT-X3", age=200)),
    encode(reading(patient_id="PT-X4", blood_pressure="80/120")),
    encode(reading(patient_id="PT-X5", temperature=None)),
    encode(reading(patient_id="PT-X6", age="forty")),
]


def readings(count: int, *, seed: int, start: float) -> list[bytes | None]:
    """Readings of six patients every 10 minutes from ``start``, half with every NEWS2 parameter."""
    rng = random.Random(seed)
    values: list[bytes | None] = []
    for index in range(count):
        patient = index % 6
        fields: dict[str, Any] = {
            "patient_id": f"PT-{patient:04d}",
            "name": [
                "Amara Okafor",
                "Lucas Brennan",
                "Ines Carvalho",
                "Mei Tanaka",
                "Pieter van den Broek",
                "Teodora",
            ][patient],
            "age": [58, 34, 71, 9, 83, 0][patient],
            "blood_pressure": f"{rng.randint(95, 175)}/{rng.randint(55, 94)}",
            "heart_rate": rng.randint(50, 130),
            "temperature": round(rng.uniform(35.5, 39.5), 1),
            "timestamp": start + 600 * index,
            "spo2": rng.randint(88, 100),
        }
        if index % 2 == 0:
            fields.update(
                respiratory_rate=rng.randint(10, 26),
                consciousness=rng.choice(["A", "A", "A", "V"]),
                on_oxygen=rng.random() < 0.2,
            )
        values.append(encode(fields))
    return values


#: Readings of PT-0001 without respiratory rate or consciousness, so that this
#: patient has the most readings and none with a NEWS2 score.
UNSCORED = [
    encode(
        {
            "patient_id": "PT-0001",
            "name": "Lucas Brennan",
            "age": 34,
            "blood_pressure": "120/80",
            "heart_rate": 70,
            "temperature": 37.0,
            "timestamp": time.time() - 3600 - 60 * minute,
        }
    )
    for minute in range(3)
]


def fill_redis(settings: Settings) -> None:
    """Produce readings with some malformed ones, and load them with two batches."""
    create_topic(settings, partitions=2)
    start = time.time() - 6 * 3600
    produce(settings, readings(30, seed=1, start=start) + MALFORMED[:4])
    run_batch(settings)
    produce(settings, readings(30, seed=2, start=start + 60) + MALFORMED[4:] + UNSCORED)
    run_batch(settings)


def kernel_manager(folder: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec runs this interpreter's ipykernel.

    A ``python3`` kernelspec found elsewhere (a user's or the system's) could
    start another Python without this project's packages.
    """
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(
        kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False
    )
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(name: str, settings: Settings, folder: Path) -> nbformat.NotebookNode:
    """Execute a notebook in a fresh kernel on ``settings``; raise on any cell error."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {
        **os.environ,
        **settings_env(settings),
        "MPLBACKEND": "Agg",
        # Import this checkout's etl and contracts, installed or not.
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    client = NotebookClient(
        notebook,
        km=kernel_manager(folder),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
    )
    client.execute(env=env, cwd=str(NOTEBOOKS))
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict[str, Any]]:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]


def count_images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs(notebook))


def printed_text(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for output in outputs(notebook)
        if output["output_type"] == "stream"
    )


@pytest.fixture(scope="module")
def filled_settings(broker: Broker, redis_service: str) -> Settings:
    """Settings whose Redis keys hold the rows, rejects and reports of two batches."""
    settings = make_settings(broker.bootstrap, redis_service)
    fill_redis(settings)
    return settings


@pytest.fixture(scope="module")
def executed(
    filled_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, nbformat.NotebookNode]:
    """Every notebook, executed once on the filled Redis."""
    return {
        name: execute(name, filled_settings, tmp_path_factory.mktemp("kernel"))
        for name in NOTEBOOK_NAMES
    }


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_draws_every_figure(
    name: str, executed: dict[str, nbformat.NotebookNode]
) -> None:
    notebook = executed[name]

    errors = [
        output for output in outputs(notebook) if output["output_type"] == "error"
    ]
    assert errors == []
    assert count_images(notebook) == FIGURES[name]


def test_explore_notebook_charts_scored_patient(
    executed: dict[str, nbformat.NotebookNode],
) -> None:
    """By default the NEWS2 chart shows the patient with the most scores, not the most readings."""
    text = printed_text(executed["01_explore_vitals.ipynb"])

    assert "Patient PT-0000: 10 readings, 10 with a NEWS2 score" in text


def test_rejects_notebook_replays_same_reasons(
    executed: dict[str, nbformat.NotebookNode], filled_settings: Settings
) -> None:
    text = printed_text(executed["02_rejects.ipynb"])

    rejected = len(MALFORMED)
    assert f"{rejected} rejects in {filled_settings.redis_rejects_key}" in text
    assert f"{rejected} of {rejected} rejects come out with the same reason" in text


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_handles_empty_redis(
    name: str, broker: Broker, redis_service: str, tmp_path: Path
) -> None:
    empty = make_settings(broker.bootstrap, redis_service)

    notebook = execute(name, empty, tmp_path)

    assert count_images(notebook) == 0
    assert "is empty" in printed_text(notebook)
