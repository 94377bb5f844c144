"""The local stack of scripts/run-local.sh: a broker without storage beside a Redis with it."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from click.testing import CliRunner, Result

from etl.cli import main
from etl.services import (
    ServiceError,
    free_port,
    is_suspended,
    local_stack_ports,
    local_stack_status,
    port_in_use,
    start_broker,
    start_local_stack,
    start_redis,
    stop_local_stack,
    tansu_binary,
    terminate,
    wait_for_broker,
)

pytestmark = pytest.mark.integration


def start_arguments(state_dir: Path, kafka_port: int, redis_port: int) -> list[str]:
    """Return the arguments of 'etl services start' with a folder and both ports."""
    return [
        "services",
        "start",
        "--state-dir",
        str(state_dir),
        "--kafka-port",
        str(kafka_port),
        "--redis-port",
        str(redis_port),
    ]


def invoke(
    state_dir: Path,
    kafka_port: int,
    redis_port: int,
    *options: str,
    **env: str,
) -> Result:
    return CliRunner().invoke(
        main,
        [*start_arguments(state_dir, kafka_port, redis_port), *options],
        env={"VITALS_KAFKA_TOPIC": "vitals", **env},
    )


def start_without_ports(state_dir: Path) -> Result:
    """Run 'etl services start' with no port option, which takes the recorded ones."""
    return CliRunner().invoke(
        main,
        ["services", "start", "--state-dir", str(state_dir)],
        env={"VITALS_KAFKA_TOPIC": "vitals"},
    )


def start(
    state_dir: Path, kafka_port: int, redis_port: int, *options: str, **env: str
) -> Result:
    """Run 'etl services start', which must succeed."""
    result = invoke(state_dir, kafka_port, redis_port, *options, **env)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("database", [0, 2])
def test_broker_restart_forgets_stored_offsets(tmp_path: Path, database: int) -> None:
    """The offsets go from the database of VITALS_REDIS_URL, which the exported URL keeps."""
    kafka_port, redis_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/{database}"
    client = redis.Redis(port=redis_port, db=database, decode_responses=True)
    try:
        first = start(tmp_path, kafka_port, redis_port, VITALS_REDIS_URL=url)
        client.hset(
            "liste-patients:offsets",
            mapping={"vitals:0": 12, "vitals:topic_id": "old-id", "other:0": 7},
        )
        client.rpush("liste-patients", "a row")

        # Both still run, so nothing is removed.
        assert start(tmp_path, kafka_port, redis_port).stderr == ""
        kafka_pid = local_stack_status(tmp_path)["kafka"]
        assert kafka_pid is not None
        terminate(kafka_pid)
        message = start(tmp_path, kafka_port, redis_port, VITALS_REDIS_URL=url).stderr

        offsets = client.hgetall("liste-patients:offsets")
        rows = client.llen("liste-patients")
    finally:
        client.close()
        stop_local_stack(tmp_path)

    assert first.stderr == ""
    assert f"export VITALS_REDIS_URL={url}" in first.stdout
    assert "removed 1 field of liste-patients:offsets" in " ".join(message.split())
    # The old topic's id stays, so the next batch does not read Kafka's commits.
    assert offsets == {"other:0": "7", "vitals:topic_id": "old-id"}
    assert rows == 1


def test_restart_forgets_topic_option_offsets(tmp_path: Path) -> None:
    """The offsets removed are those of --topic, not of VITALS_KAFKA_TOPIC."""
    kafka_port, redis_port = free_port(), free_port()
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        start(tmp_path, kafka_port, redis_port)
        client.hset(
            "liste-patients:offsets",
            mapping={"vitals:0": 12, "ward-7:0": 7, "ward-7:topic_id": "old-id"},
        )
        kafka_pid = local_stack_status(tmp_path)["kafka"]
        assert kafka_pid is not None
        terminate(kafka_pid)
        message = start(tmp_path, kafka_port, redis_port, "--topic", "ward-7").stderr

        offsets = client.hgetall("liste-patients:offsets")
    finally:
        client.close()
        stop_local_stack(tmp_path)

    assert "offsets of topic ward-7" in " ".join(message.split())
    assert offsets == {"vitals:0": "12", "ward-7:topic_id": "old-id"}


def test_invalid_topic_option_starts_nothing(tmp_path: Path) -> None:
    result = invoke(tmp_path, free_port(), free_port(), "--topic", "no spaces")

    assert result.exit_code == 2
    assert "--topic" in result.stderr
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


def test_invalid_setting_starts_nothing(tmp_path: Path) -> None:
    result = invoke(tmp_path, free_port(), free_port(), VITALS_CHUNK_SIZE="0")

    assert result.exit_code == 2
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


def test_taken_redis_port_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = invoke(tmp_path, free_port(), taken.getsockname()[1])

    assert result.exit_code == 3
    assert "already in use" in result.stderr
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_port_taken_after_check_named(tmp_path: Path, name: str) -> None:
    """A server that exits because its port was taken after the check names the port."""
    start_server = start_broker if name == "kafka" else start_redis
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError) as failure:
            start_server(port=port, state_dir=tmp_path, timeout=15.0)

    assert f"port {port} on 127.0.0.1 is in use by another program" in str(
        failure.value
    )
    assert f"--{name}-port" in str(failure.value)


def test_free_ports_differ() -> None:
    """Calls in a row return distinct ports, as a broker and a Redis need."""
    ports = [free_port() for _ in range(64)]

    assert len(set(ports)) == 64


def test_running_ports_win_without_options(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        result = start_without_ports(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"VITALS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in result.stdout
    assert f"VITALS_REDIS_URL=redis://127.0.0.1:{redis_port}/0" in result.stdout


def test_other_redis_port_exits_3(tmp_path: Path) -> None:
    """A requested port that differs from the running one fails, naming both and the fix."""
    kafka_port, redis_port, other_port = free_port(), free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        before = local_stack_status(tmp_path)
        result = invoke(tmp_path, kafka_port, other_port)
        after = local_stack_status(tmp_path)
    finally:
        stop_local_stack(tmp_path)
    message = " ".join(result.stderr.split())

    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert f"the local redis already runs on port {redis_port}" in message
    assert f"(pid {before['redis']})" in message
    assert f"not on the requested port {other_port}" in message
    assert "the local kafka" not in message
    assert f"'etl services stop --state-dir {tmp_path}'" in message
    assert "start without --redis-port" in message
    assert after == before
    assert not port_in_use(other_port)
    assert local_stack_ports(tmp_path) == {"kafka": kafka_port, "redis": redis_port}


def test_both_other_ports_named(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    other_kafka, other_redis = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        result = invoke(tmp_path, other_kafka, other_redis)
    finally:
        stop_local_stack(tmp_path)
    message = " ".join(result.stderr.split())

    assert result.exit_code == 3, result.output
    assert f"kafka already runs on port {kafka_port}" in message
    assert f"not on the requested port {other_kafka}" in message
    assert f"redis already runs on port {redis_port}" in message
    assert f"not on the requested port {other_redis}" in message
    assert "start without --kafka-port and --redis-port" in message
    assert not port_in_use(other_kafka)
    assert not port_in_use(other_redis)


def test_other_port_starts_no_stopped_service(tmp_path: Path) -> None:
    """The broker runs elsewhere, so the Redis that died stays stopped."""
    kafka_port, redis_port, other_port = free_port(), free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        redis_pid = local_stack_status(tmp_path)["redis"]
        assert redis_pid is not None
        terminate(redis_pid)
        result = invoke(tmp_path, other_port, redis_port)
        status = local_stack_status(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 3, result.output
    assert f"kafka already runs on port {kafka_port}" in result.stderr
    assert status["kafka"] is not None
    assert status["redis"] is None
    assert not port_in_use(redis_port)


def test_same_ports_leave_services_running(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        before = local_stack_status(tmp_path)
        result = invoke(tmp_path, kafka_port, redis_port)
        after = local_stack_status(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"VITALS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in result.stdout
    assert after == before


def test_port_after_stop_starts_there(tmp_path: Path) -> None:
    """Stopped services start on a new requested port, as the error message advises."""
    redis_port, other_port = free_port(), free_port()
    try:
        start(tmp_path, free_port(), redis_port)
        stop_local_stack(tmp_path)
        result = invoke(tmp_path, free_port(), other_port)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert f"VITALS_REDIS_URL=redis://127.0.0.1:{other_port}/0" in result.stdout


@pytest.mark.parametrize("running", [False, True], ids=["started", "running"])
def test_missing_database_is_settings_error(tmp_path: Path, running: bool) -> None:
    """The local Redis lacks database 99: exit 2 naming it, with both services running."""
    kafka_port, redis_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/99"
    try:
        if running:
            start(tmp_path, kafka_port, redis_port)
        result = invoke(tmp_path, kafka_port, redis_port, VITALS_REDIS_URL=url)
        status = local_stack_status(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 2, result.output
    assert "has no database 99" in result.stderr
    assert None not in status.values()


def test_dead_service_restarts_on_its_port(tmp_path: Path) -> None:
    """Started again without ports, a Redis that died comes back on the port it had."""
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        redis_pid = local_stack_status(tmp_path)["redis"]
        assert redis_pid is not None
        terminate(redis_pid)
        result = start_without_ports(tmp_path)
        status = local_stack_status(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert f"VITALS_REDIS_URL=redis://127.0.0.1:{redis_port}/0" in result.stdout
    assert f"VITALS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in result.stdout
    assert status["redis"] is not None


def servers_in(
    state_dir: Path, names: tuple[str, ...] = ("redis", "tansu")
) -> list[int]:
    """Return the pids of the processes in ``state_dir`` whose name starts with one of ``names``."""
    return [
        process.pid
        for process in psutil.process_iter(["name", "cwd"])
        if process.info["cwd"] == str(state_dir.resolve())
        and process.info["name"].startswith(names)
    ]


def test_start_restarts_service_shutting_down(tmp_path: Path) -> None:
    """A Redis that exits while start checks it is started again, not reported as running."""
    start(tmp_path, free_port(), free_port())
    old = local_stack_status(tmp_path)["redis"]
    assert old is not None
    try:
        # Suspended, the SIGTERM waits until start resumes it.
        suspend(old)
        os.kill(old, signal.SIGTERM)
        result = start_without_ports(tmp_path)
        new = local_stack_status(tmp_path)["redis"]
        servers = servers_in(tmp_path, ("redis",))
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert new is not None
    assert new != old
    assert servers == [new]


def test_concurrent_starts_leave_one_redis(tmp_path: Path) -> None:
    """Starts at once take turns, so the pid file names the one Redis that runs."""
    start(tmp_path, free_port(), free_port())
    old = local_stack_status(tmp_path)["redis"]
    assert old is not None
    terminate(old)
    command = [sys.executable, "-m", "etl", "services", "start"]
    env = {**os.environ, "VITALS_KAFKA_TOPIC": "vitals"}
    try:
        starts = [
            subprocess.Popen(
                [*command, "--state-dir", str(tmp_path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(3)
        ]
        codes = [process.wait(timeout=60) for process in starts]
        running = local_stack_status(tmp_path)["redis"]
        servers = servers_in(tmp_path, ("redis",))
    finally:
        stop_local_stack(tmp_path)

    assert codes == [0, 0, 0]
    assert running is not None
    assert servers == [running]


def test_relative_state_dir_starts_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default --state-dir, .local, is relative to the current folder."""
    monkeypatch.chdir(tmp_path)
    state_dir = Path(".local")
    try:
        start(state_dir, free_port(), free_port())
        status = local_stack_status(state_dir)
    finally:
        stop_local_stack(state_dir)

    assert status["kafka"] is not None
    assert status["redis"] is not None
    assert (tmp_path / ".local" / "redis.pid").exists()


def services_start_process(
    state_dir: Path, kafka_port: int, redis_port: int
) -> subprocess.Popen[bytes]:
    """Start 'etl services start' in a process of its own."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etl",
            *start_arguments(state_dir, kafka_port, redis_port),
        ],
        env={**os.environ, "VITALS_KAFKA_TOPIC": "vitals"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_killed_start_leaves_pid_file(tmp_path: Path) -> None:
    """A start killed while the broker starts leaves its pid file, so stop finds it."""
    starting = services_start_process(tmp_path, free_port(), free_port())
    pid_file = tmp_path / "kafka.pid"
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        starting.kill()
        starting.wait(timeout=10)
        servers = servers_in(tmp_path)
    finally:
        stopped = stop_local_stack(tmp_path)

    assert len(servers) == 1
    assert stopped == ["kafka"]
    assert servers_in(tmp_path) == []


def test_two_folders_one_redis_port(tmp_path: Path) -> None:
    """Of two starts on one Redis port from two folders, the one whose Redis lost fails."""
    redis_port = free_port()
    folders = [tmp_path / "a", tmp_path / "b"]
    try:
        starts = [
            services_start_process(folder, free_port(), redis_port)
            for folder in folders
        ]
        codes = [process.wait(timeout=60) for process in starts]
        statuses = [local_stack_status(folder)["redis"] for folder in folders]
    finally:
        for folder in folders:
            stop_local_stack(folder)

    assert sorted(codes) == [0, 3]
    winner = codes.index(0)
    assert statuses[winner] is not None
    assert statuses[1 - winner] is None


def test_start_after_stop_reuses_ports(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        stop_local_stack(tmp_path)
        result = start_without_ports(tmp_path)
    finally:
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert f"VITALS_REDIS_URL=redis://127.0.0.1:{redis_port}/0" in result.stdout
    assert f"VITALS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in result.stdout
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


def test_status_shows_ports_and_exits_3_when_stopped(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(tmp_path, kafka_port, redis_port)
        running = CliRunner().invoke(
            main, ["services", "status", "--state-dir", str(tmp_path)]
        )
    finally:
        stop_local_stack(tmp_path)
    stopped = CliRunner().invoke(
        main, ["services", "status", "--state-dir", str(tmp_path)]
    )

    assert running.exit_code == 0, running.output
    assert f"port {kafka_port})" in running.stdout
    assert f"port {redis_port})" in running.stdout
    assert stopped.exit_code == 3
    assert "kafka: stopped" in stopped.stdout


@pytest.mark.parametrize(("command", "exit_code"), [("stop", 0), ("status", 3)])
def test_unknown_folder_named(tmp_path: Path, command: str, exit_code: int) -> None:
    """A mistyped --state-dir is named as holding no pid file, not only as stopped."""
    folder = tmp_path / "nonexistent"

    result = CliRunner().invoke(main, ["services", command, "--state-dir", str(folder)])

    assert result.exit_code == exit_code, result.output
    assert f"{folder.resolve()} holds no pid file" in " ".join(result.stdout.split())


def test_stop_resumes_suspended_redis(tmp_path: Path) -> None:
    """A frozen Redis gets SIGCONT, so it shuts down cleanly instead of being killed."""
    start(tmp_path, free_port(), free_port())
    pid = local_stack_status(tmp_path)["redis"]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)

    stop_local_stack(tmp_path)

    log = next(tmp_path.rglob("redis*.log")).read_text()
    assert "ready to exit, bye bye" in log


def suspend(pid: int) -> None:
    """Send SIGSTOP to ``pid`` and wait until its state is T, once every thread has stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not is_suspended(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def status_while_frozen(state_dir: Path, name: str) -> tuple[int, Result]:
    """Start both services, run 'etl services status' while ``name`` is suspended.

    Returns the pid of ``name`` and the command's result; stops both services.
    """
    start(state_dir, free_port(), free_port())
    pid = local_stack_status(state_dir)[name]
    assert pid is not None
    try:
        suspend(pid)
        result = CliRunner().invoke(
            main, ["services", "status", "--state-dir", str(state_dir)]
        )
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_local_stack(state_dir)
    return pid, result


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_status_names_suspended_service(tmp_path: Path, name: str) -> None:
    pid, result = status_while_frozen(tmp_path, name)

    assert result.exit_code == 3
    assert f"{name}: suspended (pid {pid}," in result.stdout
    assert f"'kill -CONT {pid}'" in result.stdout


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_start_resumes_suspended_service(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen service is resumed, so the printed address responds."""
    start(tmp_path, free_port(), free_port())
    pid = local_stack_status(tmp_path)[name]
    assert pid is not None
    try:
        suspend(pid)
        result = start_without_ports(tmp_path)
        suspended = is_suspended(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_local_stack(tmp_path)

    assert result.exit_code == 0, result.output
    assert not suspended
    assert f"The local {name} (pid {pid}) was suspended" in caplog.text


def test_start_fails_when_redis_unresponsive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running service that does not respond exits 3 and prints the stop command."""
    start(tmp_path, free_port(), free_port())
    pid = local_stack_status(tmp_path)["redis"]
    assert pid is not None
    # With is_suspended patched, the command takes the frozen Redis for a hung one.
    monkeypatch.setattr("etl.services.is_suspended", lambda _pid: False)
    monkeypatch.setattr("etl.services._RESPONSE_TIMEOUT_S", 0.5)
    try:
        suspend(pid)
        result = start_without_ports(tmp_path)
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_local_stack(tmp_path)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert f"the local redis runs (pid {pid}) but does not respond" in message
    assert f"'etl services stop --state-dir {tmp_path}'" in message


def test_status_names_unresponsive_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With is_suspended patched, the command takes the frozen Redis for a hung one.
    monkeypatch.setattr("etl.services.is_suspended", lambda _pid: False)

    pid, result = status_while_frozen(tmp_path, "redis")

    assert result.exit_code == 3
    assert f"redis: not responding (pid {pid}," in result.stdout
    assert "kafka: running" in result.stdout


def test_status_names_held_lock(tmp_path: Path) -> None:
    """While a start or stop holds the folder's lock, status reports it."""
    arguments = ["services", "status", "--state-dir", str(tmp_path)]
    with (tmp_path / "services.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        while_locked = CliRunner().invoke(main, arguments)
    after_release = CliRunner().invoke(main, arguments)

    assert while_locked.exit_code == 3
    assert "may be starting or stopping" in while_locked.stdout
    assert "kafka: stopped" in while_locked.stdout
    assert "may be starting" not in after_release.stdout


@pytest.mark.parametrize("command", ["start", "stop"])
def test_held_lock_fails_after_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A start or stop waits for another one of the folder, then gives up with exit 3."""
    monkeypatch.setattr("etl.services._LOCK_TIMEOUT_S", 0.5)
    arguments = ["services", "stop", "--state-dir", str(tmp_path)]
    if command == "start":
        arguments = start_arguments(tmp_path, free_port(), free_port())
    with (tmp_path / "services.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = CliRunner().invoke(
            main, arguments, env={"VITALS_KAFKA_TOPIC": "vitals"}
        )

    assert result.exit_code == 3, result.output
    assert "another 'etl services start' or 'stop' kept" in result.stderr
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


def test_broker_wait_wants_the_listener_pid(tmp_path: Path) -> None:
    """A broker reply counts only if the awaited process listens on the port."""
    broker = start_broker(port=free_port(), state_dir=tmp_path)
    try:
        wait_for_broker(f"127.0.0.1:{broker.port}", timeout=5, pid=broker.pid)
        with pytest.raises(ServiceError, match="another process listens there"):
            wait_for_broker(f"127.0.0.1:{broker.port}", timeout=0.5, pid=os.getpid())
    finally:
        broker.stop()


def test_wrapped_broker_starts_and_stops(tmp_path: Path) -> None:
    """A CALF_TANSU_BIN script that runs the broker as its child, without exec."""
    wrapper = tmp_path / "tansu-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n"{tansu_binary()}" "$@"\n')
    wrapper.chmod(0o755)
    state_dir = tmp_path / "state"
    try:
        start(state_dir, free_port(), free_port(), CALF_TANSU_BIN=str(wrapper))
        status = CliRunner().invoke(
            main, ["services", "status", "--state-dir", str(state_dir)]
        )
    finally:
        stopped = stop_local_stack(state_dir)

    assert status.exit_code == 0, status.output
    assert stopped == ["kafka", "redis"]
    assert servers_in(state_dir) == []


def test_terminate_warns_before_sigkill(caplog: pytest.LogCaptureFixture) -> None:
    """A process that ignores SIGTERM is killed, with a warning in the log."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    stubborn = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # the handler is set

    terminate(stubborn.pid, timeout=0.5)

    # terminate waits until the process is gone, and reaps it.
    assert not Path(f"/proc/{stubborn.pid}").exists()
    assert f"pid {stubborn.pid} did not exit within 0.5 s of SIGTERM" in caplog.text


def test_broker_wait_prints_no_librdkafka_lines() -> None:
    """librdkafka writes to file descriptor 2 directly, so only a child process shows it."""
    code = (
        "from etl.services import wait_for_broker\n"
        f"wait_for_broker('127.0.0.1:{free_port()}', timeout=1)"
    )
    waited = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert "was not ready within 1 s" in waited.stderr
    assert "rdkafka" not in waited.stderr


def test_failed_start_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The marker of a fresh broker cannot be written once the broker runs.
    monkeypatch.setattr("etl.services._FRESH_BROKER", "missing/kafka.fresh")
    kafka_port, redis_port = free_port(), free_port()

    with pytest.raises(FileNotFoundError):
        start_local_stack(tmp_path, kafka_port=kafka_port, redis_port=redis_port)

    assert not port_in_use(kafka_port)
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


def test_stop_survives_unwritable_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka_port, redis_port = free_port(), free_port()
    start(tmp_path, kafka_port, redis_port)
    write_text = Path.write_text

    def read_only_kafka_pid(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "kafka.pid":
            raise PermissionError(1, "Operation not permitted", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only_kafka_pid)
    stopped = stop_local_stack(tmp_path)

    assert stopped == ["kafka", "redis"]
    assert local_stack_status(tmp_path) == {"kafka": None, "redis": None}


@pytest.mark.parametrize("name", ["kafka", "redis"])
def test_pid_file_naming_other_service_ignored(tmp_path: Path, name: str) -> None:
    """A pid file that names a service of another folder or port signals nothing."""
    elsewhere, state_dir = tmp_path / "elsewhere", tmp_path / "state"
    state_dir.mkdir()
    if name == "kafka":
        other = start_broker(port=free_port(), state_dir=elsewhere)
    else:
        other = start_redis(port=free_port(), state_dir=elsewhere)
    try:
        (state_dir / f"{name}.pid").write_text(f"{other.pid} {free_port()}\n")
        status = local_stack_status(state_dir)
        stopped = stop_local_stack(state_dir)
        still_listening = port_in_use(other.port)
    finally:
        other.stop()

    assert status[name] is None
    assert stopped == []
    assert still_listening


def test_copied_state_folder_stops_nothing(tmp_path: Path) -> None:
    """The pid files of a copy name the original's services, which run elsewhere."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    kafka_port, redis_port = free_port(), free_port()
    try:
        start(original, kafka_port, redis_port)
        shutil.copytree(original, copy, ignore=shutil.ignore_patterns("*.aof*"))
        copy_status = local_stack_status(copy)
        stopped = stop_local_stack(copy)
        original_status = local_stack_status(original)
    finally:
        stop_local_stack(original)

    assert copy_status == {"kafka": None, "redis": None}
    assert stopped == []
    assert None not in original_status.values()


def test_airflow_script_uses_its_state_dir(tmp_path: Path) -> None:
    """scripts/airflow-local.sh uses AIRFLOW_STATE_DIR, with '..' resolved."""
    script = Path(__file__).parents[2] / "scripts" / "airflow-local.sh"
    state_dir = tmp_path / "airflow"
    result = subprocess.run(
        ["bash", str(script), "status"],
        env={
            **os.environ,
            "AIRFLOW_STATE_DIR": str(tmp_path / "other" / ".." / "airflow"),
            "AIRFLOW_PORT": str(free_port()),
            "VENV": sys.prefix,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    assert f"logs           {state_dir / 'logs'}\n" in result.stdout
    assert "scheduler      stopped" in result.stdout


def test_cut_transaction_stops_redis_start(tmp_path: Path) -> None:
    """An append-only file cut inside MULTI stops the start, and the advised fix works.

    redis-server 7.0.15 with aof-load-truncated yes kept the start of the cut
    transaction and replayed it with the next one after another restart.
    """
    port = free_port()
    service = start_redis(port=port, state_dir=tmp_path, persistent=True)
    client = redis.Redis(host="127.0.0.1", port=port)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush("rows", "first", "second")
        pipe.hset("offsets", "vitals:0", 2)
        pipe.execute()
    client.close()
    service.stop()
    # A crash while Redis appended the transaction leaves part of it.
    (incremental,) = (tmp_path / "appendonlydir").glob("*.incr.aof")
    content = incremental.read_bytes()
    incremental.write_bytes(content[: content.index(b"second") + 3])

    with pytest.raises(ServiceError) as failure:
        start_redis(port=port, state_dir=tmp_path, persistent=True)
    manifest = tmp_path / "appendonlydir" / "appendonly.aof.manifest"
    fixed = subprocess.run(
        ["redis-check-aof", "--fix", str(manifest)],
        input="y\n",
        capture_output=True,
        text=True,
        check=False,
    )
    service = start_redis(port=port, state_dir=tmp_path, persistent=True)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        rows = client.llen("rows")
        offsets = client.hgetall("offsets")
    finally:
        client.close()
        service.stop()

    assert "ends inside a write that a crash cut short" in str(failure.value)
    assert f"redis-check-aof --fix {manifest}" in str(failure.value)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert rows == 0
    assert offsets == {}


def test_start_waits_for_loading_redis(tmp_path: Path) -> None:
    """A Redis that loads its data longer than the start timeout still starts."""
    service = start_redis(
        port=free_port(),
        state_dir=tmp_path,
        extra_args=("--enable-debug-command", "yes"),
    )
    client = redis.Redis(host="127.0.0.1", port=service.port, socket_timeout=30)
    client.execute_command("DEBUG", "POPULATE", "20000")
    client.save()
    client.close()
    service.stop()
    # key-load-delay (microseconds per key, a Redis debugging setting) makes
    # the snapshot take about 5 s to load, and Redis replies LOADING meanwhile.
    slow_load = (
        *("--key-load-delay", "200"),
        *("--loading-process-events-interval-bytes", "1024"),
    )

    started = time.monotonic()
    service = start_redis(
        port=free_port(), state_dir=tmp_path, timeout=1.0, extra_args=slow_load
    )
    waited = time.monotonic() - started
    client = redis.Redis(host="127.0.0.1", port=service.port)
    try:
        keys = client.dbsize()
    finally:
        client.close()
        service.stop()

    assert keys == 20000
    assert waited > 1.0
