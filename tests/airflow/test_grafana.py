"""Checks of the Grafana provisioning files and of the dashboard's Redis queries.

`dashboard_redis_commands` turns each panel target into the Redis command that
the Redis data source plugin (redis-datasource 2.x, RedisGrafana) sends, so the
integration test can run the same commands on a real redis-server.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "docker" / "grafana"
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "redis.yaml"
PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "provider.yaml"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "vitals.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"

DATASOURCE_UID = "redis-vitals"
DATASOURCE_TYPE = "redis-datasource"

# Commands that take one key and return one value (pkg/query.go of the plugin).
KEY_COMMANDS = {"type", "get", "ttl", "hlen", "xlen", "llen", "scard"}

# Keys of one row of liste-patients, in the order the ETL writes them.
OUTPUT_ROW_KEYS = (
    "patient_id",
    "first_name",
    "last_name",
    "age",
    "blood_pressure",
    "blood_pressure_status",
    "heart_rate",
    "temperature",
    "timestamp",
    "systolic",
    "diastolic",
    "spo2",
    "respiratory_rate",
    "news2_score",
    "news2_risk",
    "rule_set",
    "source",
)
REPORT_FIELDS = (
    "read",
    "written",
    "rejected",
    "tombstones",
    "duplicates",
    "duration_s",
    "rate_per_s",
    "report",
)


def redis_command(target: dict[str, Any]) -> list[str]:
    """Return the Redis command, as an argument list, that a panel target sends.

    A non-empty ``query`` is a free-text command that the plugin splits like a
    POSIX shell and runs as is. Otherwise ``command`` picks a built-in query.
    For XRANGE without ``start``/``end`` Grafana fills in the dashboard time
    range; this function uses ``-`` and ``+`` (the whole stream) instead.

    Raises
    ------
    ValueError
        When the target uses a command that this function does not translate.
    """
    query = (target.get("query") or "").strip()
    if query:
        return shlex.split(query)

    command = (target.get("command") or "").lower()
    key = target.get("keyName", "")
    if command in KEY_COMMANDS or command in {"hgetall", "smembers", "hkeys"}:
        return [command.upper(), key]
    if command == "hget":
        return ["HGET", key, target["field"]]
    if command in {"xrange", "xrevrange"}:
        start = target.get("start") or "-"
        end = target.get("end") or "+"
        bounds = [start, end] if command == "xrange" else [end, start]
        count = target.get("count") or 0
        extra = ["COUNT", str(count)] if count > 0 else []
        return [command.upper(), key, *bounds, *extra]
    msg = f"target {target.get('refId')!r} uses command {command!r}, which redis_command does not translate; add it there"
    raise ValueError(msg)


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_redis_commands(dashboard: dict[str, Any]) -> list[list[str]]:
    """Return the Redis command of every panel target, in panel order."""
    return [
        redis_command(target)
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def panel_by_title(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    """Return the panel with this title or fail the test."""
    for panel in iter_panels(dashboard["panels"]):
        if panel.get("title") == title:
            return panel
    pytest.fail(f"no panel titled {title!r} in {DASHBOARD_FILE.name}")


def transformation(panel: dict[str, Any], transformation_id: str) -> dict[str, Any]:
    """Return the options of the panel's first transformation with this id."""
    for step in panel.get("transformations", []):
        if step["id"] == transformation_id:
            return step["options"]
    pytest.fail(f"panel {panel['title']!r} has no {transformation_id} transformation")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The provisioned dashboard, parsed from JSON."""
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


# --- Provisioning files ----------------------------------------------------------


def test_datasource_provisioning() -> None:
    config = yaml.safe_load(DATASOURCE_FILE.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    assert len(config["datasources"]) == 1
    datasource = config["datasources"][0]
    assert datasource["type"] == DATASOURCE_TYPE
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["url"] == "redis://redis:6379"
    assert datasource["access"] == "proxy"
    assert datasource["jsonData"]["client"] == "standalone"
    assert datasource["secureJsonData"]["password"] == "$REDIS_PASSWORD"


def test_dashboard_provider_matches_compose_mount() -> None:
    config = yaml.safe_load(PROVIDER_FILE.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    assert len(config["providers"]) == 1
    provider = config["providers"][0]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{path}:ro" in volumes


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] == "Patient vital signs"
    assert dashboard["uid"] == "patient-vitals"
    ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_uses_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    expected = {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]


# --- Redis commands of the panels ------------------------------------------------


def test_dashboard_redis_commands(dashboard: dict[str, Any]) -> None:
    assert dashboard_redis_commands(dashboard) == [
        ["LLEN", "liste-patients"],
        ["LLEN", "liste-patients:rejects"],
        ["LLEN", "liste-patients:alerts"],
        ["HGETALL", "liste-patients:stats"],
        ["HGETALL", "liste-patients:stats"],
        ["XRANGE", "liste-patients:reports", "-", "+"],
        ["LRANGE", "liste-patients", "-50", "-1"],
    ]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Free text wins over command, and quotes group one argument.
        (
            {"query": "HGET 'my key' field", "command": "llen"},
            ["HGET", "my key", "field"],
        ),
        ({"command": "xlen", "keyName": "s"}, ["XLEN", "s"]),
        (
            {"command": "xrange", "keyName": "s", "start": "1-0", "count": 10},
            ["XRANGE", "s", "1-0", "+", "COUNT", "10"],
        ),
        ({"command": "xrevrange", "keyName": "s"}, ["XREVRANGE", "s", "+", "-"]),
        ({"command": "hget", "keyName": "h", "field": "f"}, ["HGET", "h", "f"]),
    ],
)
def test_redis_command_translation(target: dict[str, Any], expected: list[str]) -> None:
    assert redis_command(target) == expected


def test_redis_command_rejects_unknown() -> None:
    with pytest.raises(ValueError, match=r"command 'ts\.mrange'"):
        redis_command({"refId": "A", "command": "ts.mrange", "keyName": "k"})


def test_table_extracts_output_row_fields(dashboard: dict[str, Any]) -> None:
    panel = panel_by_title(dashboard, "Latest readings")
    options = transformation(panel, "extractFields")
    assert options["source"] == "Value"
    assert options["format"] == "json"
    paths = [item["path"] for item in options["jsonPaths"]]
    assert set(paths) <= set(OUTPUT_ROW_KEYS)
    assert "timestamp" in paths


def test_bar_charts_filter_stats_fields(dashboard: dict[str, Any]) -> None:
    for title, prefix in [
        ("Blood-pressure category (all readings)", "bp_status"),
        ("NEWS2 risk (all readings)", "news2_risk"),
    ]:
        panel = panel_by_title(dashboard, title)
        assert panel["type"] == "barchart"
        options = transformation(panel, "filterFieldsByName")
        assert options["include"]["pattern"] == f"^{prefix}:.*"


def test_bp_chart_names_unclassified_readings(dashboard: dict[str, Any]) -> None:
    """The stats field bp_status:none shows as the label the notebook gives it."""
    panel = panel_by_title(dashboard, "Blood-pressure category (all readings)")
    renames = [
        step["options"]
        for step in panel["transformations"]
        if step["id"] == "renameByRegex"
    ]

    assert {"regex": "^none$", "renamePattern": "Not classified"} in renames


def test_time_series_plots_report_fields(dashboard: dict[str, Any]) -> None:
    panel = panel_by_title(
        dashboard, "Batches: rows written, rows rejected and throughput"
    )
    assert panel["type"] == "timeseries"
    names = transformation(panel, "filterFieldsByName")["include"]["names"]
    assert set(names) - {"$time"} <= set(REPORT_FIELDS)


# --- The same commands on a real redis-server ----------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def redis_client(tmp_path: Path) -> Iterator[redis.Redis]:
    """Start a throwaway redis-server on a free 127.0.0.1 port and yield a client."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server not found on PATH; install the Debian package redis-server"
        )

    port = _free_port()
    log_path = tmp_path / "redis-server.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(
        host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5
    )

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = log_path.read_text(errors="replace")
                    pytest.fail(f"redis-server on port {port} did not start:\n{output}")
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sample_row(patient_id: str, **overrides: Any) -> dict[str, Any]:
    """Return one liste-patients row in the shape the ETL writes."""
    row: dict[str, Any] = {
        "patient_id": patient_id,
        "first_name": "Jeanne",
        "last_name": "Martin",
        "age": 67,
        "blood_pressure": "128/82",
        "blood_pressure_status": "Stage 1",
        "heart_rate": 76.0,
        "temperature": 36.9,
        "timestamp": "2026-12-04T10:15:00+00:00",
        "systolic": 128,
        "diastolic": 82,
        "spo2": 97.0,
        "respiratory_rate": 16.0,
        "news2_score": 0,
        "news2_risk": "Low",
        "rule_set": "acc_aha_2017",
        "source": {"topic": "vitals", "partition": 0, "offset": 0},
    }
    row.update(overrides)
    assert tuple(row) == OUTPUT_ROW_KEYS
    return row


def fill_sample_keys(client: redis.Redis) -> None:
    """Write a few rows and counters in the shapes of every key the ETL writes."""
    high = sample_row(
        "P-002",
        first_name="Paul",
        last_name="Durand",
        blood_pressure="182/121",
        blood_pressure_status="Hypertensive crisis",
        heart_rate=131.0,
        temperature=39.4,
        timestamp="2026-12-04T10:16:00+00:00",
        systolic=182,
        diastolic=121,
        spo2=90.0,
        respiratory_rate=26.0,
        news2_score=11,
        news2_risk="High",
        source={"topic": "vitals", "partition": 1, "offset": 0},
    )
    rows = [sample_row("P-001"), high]
    compact = {"separators": (",", ":")}

    client.rpush("liste-patients", *(json.dumps(row, **compact) for row in rows))
    client.rpush("liste-patients:alerts", json.dumps(high, **compact))

    reject = {
        "reason": "missing_field",
        "field": "age",
        "detail": "required field is missing",
        "source": {"topic": "vitals", "partition": 2, "offset": 0},
    }
    client.rpush("liste-patients:rejects", json.dumps(reject, **compact))

    client.hset(
        "liste-patients:offsets", mapping={"vitals:0": 1, "vitals:1": 1, "vitals:2": 1}
    )
    client.hset(
        "liste-patients:stats",
        mapping={
            "written": 2,
            "rejected": 1,
            "bp_status:Stage 1": 1,
            "bp_status:Hypertensive crisis": 1,
            "news2_risk:Low": 1,
            "news2_risk:High": 1,
            "reject_reason:missing_field": 1,
        },
    )

    report = {"read": 3, "written": 2, "rejected": 1, "tombstones": 0, "duplicates": 0}
    client.xadd(
        "liste-patients:reports",
        {**report, "duration_s": 0.42, "rate_per_s": 7.1, "report": json.dumps(report)},
    )


@pytest.mark.integration
def test_dashboard_commands_return_data(
    redis_client: redis.Redis, dashboard: dict[str, Any]
) -> None:
    fill_sample_keys(redis_client)

    for command in dashboard_redis_commands(dashboard):
        result = redis_client.execute_command(*command)
        assert result, f"{' '.join(command)} returned no data: {result!r}"
        if command[0] == "LLEN":
            assert isinstance(result, int)

    # The columns, bars and series that the panels pick exist in the data.
    rows = [json.loads(item) for item in redis_client.lrange("liste-patients", -50, -1)]
    paths = transformation(
        panel_by_title(dashboard, "Latest readings"), "extractFields"
    )
    for item in paths["jsonPaths"]:
        assert all(item["path"] in row for row in rows), item["path"]
    stats = redis_client.hgetall("liste-patients:stats")
    assert any(field.startswith("bp_status:") for field in stats)
    assert any(field.startswith("news2_risk:") for field in stats)
    entries = redis_client.xrange("liste-patients:reports")
    for _entry_id, fields in entries:
        assert {"written", "rejected", "rate_per_s"} <= fields.keys()
