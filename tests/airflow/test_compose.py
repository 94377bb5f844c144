"""Checks of docker-compose.yml and docker/Dockerfile without Docker or network.

The Compose file is validated against the Compose Specification JSON schema
vendored in tests/data/compose-spec, whose README names its source and licence.
The other tests check the rules of this project: loopback-only host ports,
health checks, the service names and logins that docs/docker.md promises, and
pinned image tags.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"
ENV_EXAMPLE = ROOT / "docker" / "env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
ONE_SHOT_SERVICES = {"airflow-init", "kafka-init"}
AIRFLOW_VERSION = "3.3.2"

# Compose interpolation: "$$" is a literal "$". Variables are written ${NAME},
# ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME:+replacement} or $NAME.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<operator>:?[-?+])?(?P<word>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Apply Compose variable interpolation to one string value."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        operator = match["operator"] or ""
        value = env.get(name)
        if operator in {":-", "-"}:
            missing = value is None or (operator == ":-" and value == "")
            return match["word"] if missing else str(value)
        if operator in {":+", "+"}:
            present = value is not None and (operator == "+" or value != "")
            return match["word"] if present else ""
        if operator in {":?", "?"} and not value:
            msg = f"required variable {name} is not set: {match['word']}"
            raise ValueError(msg)
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string value of a parsed Compose file, leaving keys unchanged."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def iter_strings(node: Any) -> list[str]:
    """Return every string value of a parsed YAML tree, depth first."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in iter_strings(value)]
    if isinstance(node, list):
        return [text for item in node for text in iter_strings(item)]
    return [node] if isinstance(node, str) else []


def variable_references(node: Any) -> list[re.Match[str]]:
    """Return the ${NAME...} and $NAME references of a parsed Compose file."""
    matches = []
    for text in iter_strings(node):
        for match in _INTERPOLATION.finditer(text):
            if not match["escaped"]:
                matches.append(match)
    return matches


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse the NAME=value lines of an env file, skipping comments and blank lines."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, separator, value = stripped.partition("=")
        assert separator, f"{path.name}: line without '=': {line!r}"
        values[name.strip()] = value.strip()
    return values


def parse_port(spec: str | int | dict[str, Any]) -> tuple[str | None, str | None, str]:
    """Split a port mapping into (host_ip, host_port, container_port).

    The short syntax is [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL].
    """
    if isinstance(spec, dict):
        published = spec.get("published")
        return (
            spec.get("host_ip"),
            None if published is None else str(published),
            str(spec["target"]),
        )
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, None, parts[0]


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    """docker-compose.yml as parsed YAML, before interpolation (anchors merged)."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """docker-compose.yml interpolated with no .env file and no variables set."""
    return interpolate_tree(raw_compose, env={})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services mapping of the interpolated Compose file."""
    return compose["services"]


# --- Compose Specification -----------------------------------------------------


def test_vendored_schema_is_valid_json_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def test_compose_file_matches_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = Draft202012Validator(schema)
    errors = [
        f"{'/'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert errors == []


def test_schema_check_rejects_unknown_key(compose: dict[str, Any]) -> None:
    """The validation above can fail: a misspelt service key is an error."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["healthchek"] = {"test": ["CMD", "true"]}
    assert not Draft202012Validator(schema).is_valid(broken)


# --- Variables and the env file ------------------------------------------------


def test_every_variable_has_default(raw_compose: dict[str, Any]) -> None:
    """The stack must start without a .env file, so each ${NAME} needs a :- default."""
    without_default = sorted(
        {
            match["name"] or match["bare"]
            for match in variable_references(raw_compose)
            if match["operator"] != ":-"
        }
    )
    assert without_default == []


def test_env_example_lists_every_variable(raw_compose: dict[str, Any]) -> None:
    documented = parse_env_file(ENV_EXAMPLE)
    used = {
        match["name"] or match["bare"] for match in variable_references(raw_compose)
    }
    assert sorted(used - documented.keys()) == []
    assert sorted(documented.keys() - used) == []


def test_env_example_values_match_defaults(raw_compose: dict[str, Any]) -> None:
    documented = parse_env_file(ENV_EXAMPLE)
    for match in variable_references(raw_compose):
        name = match["name"] or match["bare"]
        assert documented.get(name) == (match["word"] or ""), (
            f"default of {name} differs"
        )


def test_interpolation_prefers_set_variable() -> None:
    assert interpolate("${PORT:-8080}", {"PORT": "9090"}) == "9090"
    assert interpolate("${PORT:-8080}", {"PORT": ""}) == "8080"
    assert interpolate("${PORT-8080}", {"PORT": ""}) == ""
    assert interpolate("$${HOSTNAME}", {}) == "${HOSTNAME}"
    assert interpolate("${A:+set}", {"A": "x"}) == "set"
    with pytest.raises(ValueError, match="required variable B"):
        interpolate("${B:?must be set}", {})


# --- Ports and health checks ---------------------------------------------------


def test_host_ports_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for spec in service.get("ports", []):
            host_ip, host_port, _ = parse_port(spec)
            assert host_port, f"{name}: port {spec!r} has no fixed host port"
            assert host_ip == "127.0.0.1", (
                f"{name}: port {spec!r} is not bound to 127.0.0.1"
            )


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    published = {
        name: [parse_port(spec) for spec in service.get("ports", [])]
        for name, service in services.items()
        if service.get("ports")
    }
    assert published == {
        "airflow-apiserver": [("127.0.0.1", "8080", "8080")],
        "kafka": [("127.0.0.1", "29092", "29092")],
        "redis": [("127.0.0.1", "6379", "6379")],
        "grafana": [("127.0.0.1", "3001", "3000")],
    }


def test_one_shot_services(services: dict[str, dict[str, Any]]) -> None:
    """The services awaited with service_completed_successfully are the one-shots."""
    awaited = {
        dependency
        for service in services.values()
        for dependency, rule in (service.get("depends_on") or {}).items()
        if isinstance(rule, dict)
        and rule.get("condition") == "service_completed_successfully"
    }
    assert awaited == ONE_SHOT_SERVICES
    for name in ONE_SHOT_SERVICES:
        assert services[name].get("restart") == "no", name
        assert "healthcheck" not in services[name], name


@pytest.mark.parametrize(
    "name",
    [
        "postgres",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "kafka",
        "redis",
        "grafana",
    ],
)
def test_long_running_service_has_healthcheck(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)
    assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}
    assert services[name].get("restart") == "always"


def test_every_service_is_classified(services: dict[str, dict[str, Any]]) -> None:
    long_running = {
        name for name, service in services.items() if "healthcheck" in service
    }
    assert long_running | ONE_SHOT_SERVICES == set(services)


# --- Services the documentation relies on --------------------------------------


def test_redis_service(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["container_name"] == "redis"
    assert redis["image"] == "redis:7.2-bookworm"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["environment"]["REDIS_PASSWORD"] == ""
    assert "--appendonly yes --aof-load-truncated no" in redis["command"][-1]


def test_grafana_service(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_USER"] == "admin"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    assert env["GF_PLUGINS_PREINSTALL_SYNC"] == "redis-datasource@2.2.0"
    assert (
        "./docker/grafana/provisioning:/etc/grafana/provisioning:ro"
        in grafana["volumes"]
    )
    assert (
        "./docker/grafana/dashboards:/var/lib/grafana/dashboards:ro"
        in grafana["volumes"]
    )
    assert grafana["depends_on"]["redis"]["condition"] == "service_healthy"


def test_airflow_init_creates_user(services: dict[str, dict[str, Any]]) -> None:
    init = services["airflow-init"]
    env = init["environment"]
    assert env["_AIRFLOW_DB_MIGRATE"] == "true"
    assert env["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert env["_AIRFLOW_WWW_USER_USERNAME"] == "airflow"
    assert env["_AIRFLOW_WWW_USER_PASSWORD"] == "airflow"
    # _AIRFLOW_WWW_USER_* only works with the FAB auth manager.
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("FabAuthManager")
    assert "/entrypoint airflow version" in init["command"][-1]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_settings(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    env = service["environment"]
    assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "false"
    assert (
        env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
        == "http://airflow-apiserver:8080/execution/"
    )
    assert env["VITALS_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["VITALS_KAFKA_TOPIC"] == "vitals"
    assert env["VITALS_REDIS_URL"].endswith("@redis:6379/0")
    assert env["VITALS_DEMO_GENERATE"] == "true"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_airflow_services_share_secrets(services: dict[str, dict[str, Any]]) -> None:
    keys = (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    )
    for key in keys:
        values = {services[name]["environment"][key] for name in AIRFLOW_SERVICES}
        assert len(values) == 1, f"{key} differs between Airflow services"
    jwt_secret = services["airflow-apiserver"]["environment"][
        "AIRFLOW__API_AUTH__JWT_SECRET"
    ]
    # A shorter key makes PyJWT emit InsecureKeyLengthWarning.
    assert len(jwt_secret.encode()) >= 64


def test_airflow_connections(services: dict[str, dict[str, Any]]) -> None:
    env = services["airflow-scheduler"]["environment"]
    kafka = json.loads(env["AIRFLOW_CONN_KAFKA_DEFAULT"])
    assert kafka["conn_type"] == "kafka"
    assert kafka["extra"]["bootstrap.servers"] == "kafka:9092"
    assert kafka["extra"]["group.id"] == "vitals-etl"
    # The batch sets these itself and warns about a connection that sets them.
    assert "enable.auto.commit" not in kafka["extra"]
    assert "auto.offset.reset" not in kafka["extra"]
    redis = json.loads(env["AIRFLOW_CONN_REDIS_DEFAULT"])
    assert redis["conn_type"] == "redis"
    assert redis["host"] == "redis"
    assert redis["port"] == 6379
    # RedisHook reads the database number from extra, not from the URI path.
    assert redis["extra"] == {"db": 0}


def test_scheduler_waits_for_topic_and_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    depends_on = services["airflow-scheduler"]["depends_on"]
    assert depends_on["kafka-init"]["condition"] == "service_completed_successfully"
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["airflow-init"]["condition"] == "service_completed_successfully"


def test_kafka_listeners(services: dict[str, dict[str, Any]]) -> None:
    env = services["kafka"]["environment"]
    listeners = env["KAFKA_LISTENERS"].split(",")
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "PLAINTEXT://:9092" in listeners
    assert "PLAINTEXT_HOST://:29092" in listeners
    assert "PLAINTEXT://kafka:9092" in advertised
    assert "PLAINTEXT_HOST://127.0.0.1:29092" in advertised
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == 0
    assert services["kafka"]["hostname"] == "kafka"
    assert (
        "--bootstrap-server kafka:9092" in services["kafka"]["healthcheck"]["test"][1]
    )


def test_kafka_init_creates_topic(services: dict[str, dict[str, Any]]) -> None:
    init = services["kafka-init"]
    script = init["command"][0]
    assert "--create --if-not-exists" in script
    assert "--partitions 3" in script
    assert init["environment"]["VITALS_KAFKA_TOPIC"] == "vitals"
    assert init["image"] == services["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"


# --- Images and the Dockerfile -------------------------------------------------


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, separator, tag = image.rpartition(":")
        assert separator and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} uses latest"
        assert repository


def test_kafka_image_is_apache_4x(services: dict[str, dict[str, Any]]) -> None:
    image = services["kafka"]["image"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", image), image


def test_dockerfile_pins_airflow() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    base_images = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert base_images == [f"apache/airflow:{AIRFLOW_VERSION}-python3.11"]
    assert f"ARG AIRFLOW_VERSION={AIRFLOW_VERSION}" in text
    assert (
        'pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" ".[airflow]"'
        in text
    )


def test_dockerfile_installs_as_airflow_user() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    user_line = lines.index("USER airflow")
    pip_line = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert user_line < pip_line
    assert "COPY --chown=airflow:0 dags /opt/airflow/dags" in lines


def test_dockerignore_excludes_local_state() -> None:
    patterns = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    for pattern in (".env", ".git", ".venv", ".local"):
        assert pattern in patterns, pattern
