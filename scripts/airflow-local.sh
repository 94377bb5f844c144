#!/usr/bin/env bash
# Run Airflow 3 on this machine without Docker: the API server, the scheduler
# and the DAG processor as separate processes, on SQLite with LocalExecutor,
# listening on 127.0.0.1 only. State, pid files and logs go to AIRFLOW_STATE_DIR.
#
# Usage: scripts/airflow-local.sh start|stop|status
#
# Environment:
#   VENV                   virtualenv with apache-airflow installed (default: <repo>/.venv)
#   AIRFLOW_PORT           port of the API server and UI on 127.0.0.1 (default: 8080)
#   AIRFLOW_STATE_DIR      AIRFLOW_HOME: database, secrets, pid files and logs (default: <repo>/.local/airflow)
#   AIRFLOW_DAGS_FOLDER    folder of DAG files (default: <repo>/dags)
#   AIRFLOW_DAG_ID         DAG that `start` unpauses and runs (default: a_kafka_redis_airflow)
#   AIRFLOW_START_TIMEOUT  seconds `start` waits for health and for the DAG (default: 180)
#   AIRFLOW_STOP_TIMEOUT   seconds `stop` waits after SIGTERM before SIGKILL (default: 30)
#
# Login: airflow / airflow (simple auth manager). The recipe and its pitfalls
# are described in docs/airflow-local.md.
set -euo pipefail
# Without job control a background child shares this script's process group,
# so `setsid` below makes it a group leader without forking and $! is its pid.
set +m

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
COMPONENTS=(api-server scheduler dag-processor)
AIRFLOW_USER=airflow

# Absolute and without "." or ".." parts; symbolic links are kept.
absolute_path() {
    realpath --canonicalize-missing --no-symlinks -- "$1"
}

STATE_DIR=$(absolute_path "${AIRFLOW_STATE_DIR:-$REPO_ROOT/.local/airflow}")
PID_DIR=$STATE_DIR/pids
LOG_DIR=$STATE_DIR/logs
PASSWORDS_FILE=$STATE_DIR/simple_auth_manager_passwords.json
VENV=$(absolute_path "${VENV:-$REPO_ROOT/.venv}")
DAGS_FOLDER=$(absolute_path "${AIRFLOW_DAGS_FOLDER:-$REPO_ROOT/dags}")
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
DAG_ID=${AIRFLOW_DAG_ID:-a_kafka_redis_airflow}
START_TIMEOUT=${AIRFLOW_START_TIMEOUT:-180}
STOP_TIMEOUT=${AIRFLOW_STOP_TIMEOUT:-30}
BASE_URL=http://127.0.0.1:$AIRFLOW_PORT
AIRFLOW_BIN=$VENV/bin/airflow
PYTHON_BIN=$VENV/bin/python
TOKEN=

log() {
    printf '%s airflow-local: %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

check_settings() {
    if ! [[ $AIRFLOW_PORT =~ ^[0-9]+$ ]] || ((AIRFLOW_PORT < 1 || AIRFLOW_PORT > 65535)); then
        die "invalid AIRFLOW_PORT=$AIRFLOW_PORT: expected a TCP port number from 1 to 65535"
    fi
    [[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die "invalid AIRFLOW_START_TIMEOUT=$START_TIMEOUT: expected whole seconds"
    [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "invalid AIRFLOW_STOP_TIMEOUT=$STOP_TIMEOUT: expected whole seconds"
}

check_venv() {
    [[ -x $AIRFLOW_BIN && -x $PYTHON_BIN ]] ||
        die "bin/airflow or bin/python not found in VENV=$VENV. Create the virtualenv with: python3.11 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[airflow]'"
    command -v curl >/dev/null || die "curl not found on PATH; install it (Debian package curl)"
    command -v setsid >/dev/null || die "setsid not found on PATH; install util-linux"
}

# Settings shared by every Airflow command that this script runs.
export_airflow_env() {
    export AIRFLOW_HOME=$STATE_DIR
    export AIRFLOW__CORE__DAGS_FOLDER=$DAGS_FOLDER
    export AIRFLOW__CORE__LOAD_EXAMPLES=False
    export AIRFLOW__CORE__EXECUTOR=LocalExecutor
    # LocalExecutor forks this many workers when the scheduler starts (32 by default).
    export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
    export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$STATE_DIR/airflow.db
    export AIRFLOW__API__HOST=127.0.0.1
    export AIRFLOW__API__PORT=$AIRFLOW_PORT
    # Task processes call the execution API at this address. Without it they
    # use http://localhost:8080 and fail on any other port.
    export AIRFLOW__API__BASE_URL=$BASE_URL
    export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=$BASE_URL/execution/
    # The first execution API call builds its versioned routers and can take
    # longer than the default timeout of 5 s.
    export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT=30
    export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
    export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK=False
    export AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager
    export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=$AIRFLOW_USER:admin
    export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$PASSWORDS_FILE
    # The scheduler signs task tokens that the API server checks, so both need
    # the same secret. It is generated once and kept in the state folder.
    AIRFLOW__API_AUTH__JWT_SECRET=$(cat "$STATE_DIR/jwt_secret")
    AIRFLOW__API__SECRET_KEY=$(cat "$STATE_DIR/api_secret_key")
    export AIRFLOW__API_AUTH__JWT_SECRET AIRFLOW__API__SECRET_KEY
}

# Create the state folder, the secrets and the passwords file once.
prepare_state() {
    mkdir -p "$PID_DIR" "$LOG_DIR"
    (
        umask 077
        local name
        for name in jwt_secret api_secret_key; do
            if [[ ! -s $STATE_DIR/$name ]]; then
                # 64 random bytes: shorter JWT keys trigger InsecureKeyLengthWarning.
                "$PYTHON_BIN" -c 'import secrets; print(secrets.token_urlsafe(64))' >"$STATE_DIR/$name"
            fi
        done
        if [[ ! -s $PASSWORDS_FILE ]]; then
            printf '{"%s": "%s"}\n' "$AIRFLOW_USER" "$AIRFLOW_USER" >"$PASSWORDS_FILE"
        fi
    )
    # An empty airflow.cfg stops Airflow from writing a full default one.
    # Every setting comes from the environment.
    [[ -e $STATE_DIR/airflow.cfg ]] || : >"$STATE_DIR/airflow.cfg"
}

read_pid() {
    local file=$PID_DIR/$1.pid pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s\n' "$pid"
}

# True when the pid runs an airflow command, so that a pid reused by an
# unrelated program is not signalled.
is_airflow_process() {
    local cmdline
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $cmdline == *airflow* ]]
}

running_pid() {
    local pid
    pid=$(read_pid "$1") || return 1
    is_airflow_process "$pid" || return 1
    printf '%s\n' "$pid"
}

# Print the pids of the given process groups, one per line.
group_members() {
    ps -e -o pid=,pgid= | awk -v groups="$*" '
        BEGIN { n = split(groups, g, " "); for (i = 1; i <= n; i++) wanted[g[i]] = 1 }
        ($2 in wanted) { print $1 }'
}

# True when a process of the group still runs an airflow command, even if
# the group leader has exited.
group_alive() {
    local member
    while read -r member; do
        is_airflow_process "$member" && return 0
    done < <(group_members "$1")
    return 1
}

# Print the pids of every descendant of the given pids, one per line.
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            changed = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; found[p] = 1; changed = 1 }
            }
            for (p in found) print p
        }'
}

# Print the end of the log of each component launched by this start.
tail_logs() {
    local name
    for name in "${COMPONENTS[@]}"; do
        [[ -e $PID_DIR/$name.pid && -s $LOG_DIR/$name.log ]] || continue
        log "last lines of $LOG_DIR/$name.log:"
        tail -n 15 "$LOG_DIR/$name.log" >&2
    done
}

launch() {
    local name=$1 pid
    shift
    printf '\n=== %s start %s ===\n' "$(date -Is)" "$name" >>"$LOG_DIR/$name.log"
    setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PID_DIR/$name.pid"
    log "started $name (pid $pid, log $LOG_DIR/$name.log)"
}

# Fail the start when a component that was launched has exited.
check_alive() {
    local name
    for name in "${COMPONENTS[@]}"; do
        [[ -e $PID_DIR/$name.pid ]] || continue
        running_pid "$name" >/dev/null || fail_start "$name exited"
    done
}

fail_start() {
    log "error: $*"
    tail_logs
    log "stopping the components that did start"
    stop_components
    exit 1
}

port_is_free() {
    "$PYTHON_BIN" - "$AIRFLOW_PORT" <<'EOF'
import socket
import sys

with socket.socket() as sock:
    # SO_REUSEADDR, as the API server sets it: connections left in TIME_WAIT
    # by a previous run do not block the port, a listening socket does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

# api METHOD PATH [JSON_BODY]: call the REST API with the bearer token.
api() {
    local method=$1 path=$2 body=${3:-}
    local args=(-sS --fail-with-body -m 30 -X "$method" -H "Authorization: Bearer $TOKEN")
    if [[ -n $body ]]; then
        args+=(-H 'Content-Type: application/json' -d "$body")
    fi
    curl "${args[@]}" "$BASE_URL$path"
}

# json_field NAME: print one top-level field of the JSON document on stdin.
json_field() {
    "$PYTHON_BIN" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# Log in with the password from the passwords file and keep the token in TOKEN.
fetch_token() {
    local body response
    body=$("$PYTHON_BIN" - "$PASSWORDS_FILE" "$AIRFLOW_USER" <<'EOF'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as passwords_file:
    passwords = json.load(passwords_file)
print(json.dumps({"username": sys.argv[2], "password": passwords[sys.argv[2]]}))
EOF
    ) || return 1
    response=$(curl -sS --fail-with-body -m 30 -X POST -H 'Content-Type: application/json' \
        -d "$body" "$BASE_URL/auth/token") || {
        log "login as $AIRFLOW_USER at $BASE_URL/auth/token failed: $response"
        return 1
    }
    TOKEN=$(json_field access_token <<<"$response")
}

# components_healthy PART...: true when /api/v2/monitor/health returns 200 and
# reports each part (metadatabase, scheduler, dag_processor) healthy.
components_healthy() {
    local health
    health=$(curl -sf -m 5 "$BASE_URL/api/v2/monitor/health") || return 1
    "$PYTHON_BIN" -c '
import json, sys
health = json.loads(sys.argv[1])
sys.exit(0 if all(health.get(p, {}).get("status") == "healthy" for p in sys.argv[2:]) else 1)
' "$health" "$@"
}

# wait_until_healthy PART...: poll the health endpoint until each part is healthy.
wait_until_healthy() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until components_healthy "$@"; do
        check_alive
        ((SECONDS < deadline)) || fail_start "$* not healthy at $BASE_URL after ${START_TIMEOUT}s"
        sleep 0.5
    done
    log "healthy: $*"
}

# dag_parsed_since ISO_TIME: true when the DAG comes from a file in the DAG
# folder that the DAG processor parsed after ISO_TIME. A DAG row left in the
# database by an earlier start, or from another folder, does not count.
dag_parsed_since() {
    local dag
    dag=$(api GET "/api/v2/dags/$DAG_ID" 2>/dev/null) || return 1
    "$PYTHON_BIN" -c '
import json, sys
from datetime import datetime
dag, since, folder = json.loads(sys.argv[1]), datetime.fromisoformat(sys.argv[2]), sys.argv[3]
parsed = dag.get("last_parsed_time")
ok = (
    not dag.get("is_stale", False)
    and (dag.get("fileloc") or "").startswith(folder.rstrip("/") + "/")
    and parsed is not None
    and datetime.fromisoformat(parsed.replace("Z", "+00:00")) >= since
)
sys.exit(0 if ok else 1)
' "$dag" "$1" "$DAGS_FOLDER"
}

# wait_for_dag ISO_TIME: wait until the DAG processor has parsed the DAG file.
wait_for_dag() {
    local deadline=$((SECONDS + START_TIMEOUT)) errors
    until dag_parsed_since "$1"; do
        check_alive
        if ((SECONDS >= deadline)); then
            errors=$(api GET /api/v2/importErrors 2>&1 || true)
            fail_start "DAG $DAG_ID not found in $DAGS_FOLDER after ${START_TIMEOUT}s; import errors: $errors"
        fi
        sleep 1
    done
}

# Unpause the DAG, then trigger a run unless the scheduler has created one.
unpause_and_run() {
    local runs total=0 response
    api PATCH "/api/v2/dags/$DAG_ID" '{"is_paused": false}' >/dev/null ||
        fail_start "could not unpause DAG $DAG_ID"
    log "unpaused DAG $DAG_ID"
    # A DAG with catchup=False and a past start_date gets its latest scheduled
    # run about 1 s after it is unpaused; give the scheduler a few seconds.
    for _ in {1..20}; do
        runs=$(api GET "/api/v2/dags/$DAG_ID/dagRuns?limit=1&order_by=-run_after") ||
            fail_start "could not list the runs of DAG $DAG_ID: $runs"
        total=$(json_field total_entries <<<"$runs")
        ((total > 0)) && break
        sleep 0.5
    done
    if ((total == 0)); then
        response=$(api POST "/api/v2/dags/$DAG_ID/dagRuns" '{"logical_date": null}') ||
            fail_start "could not trigger DAG $DAG_ID: $response"
        log "triggered run $(json_field dag_run_id <<<"$response")"
    else
        log "DAG $DAG_ID already has $total run(s); no manual trigger"
    fi
}

start() {
    check_venv
    local name running=() parse_start
    for name in "${COMPONENTS[@]}"; do
        if running_pid "$name" >/dev/null; then running+=("$name"); fi
    done
    if ((${#running[@]} == ${#COMPONENTS[@]})); then
        log "already running: $BASE_URL"
        return 0
    fi
    if ((${#running[@]} > 0)); then
        die "only ${running[*]} running, so the others have exited; run '$0 stop', then start again"
    fi
    [[ -d $DAGS_FOLDER ]] || die "DAG folder $DAGS_FOLDER not found; set AIRFLOW_DAGS_FOLDER"
    port_is_free || die "port $AIRFLOW_PORT on 127.0.0.1 is in use; set AIRFLOW_PORT to a free port"

    prepare_state
    export_airflow_env
    log "migrating the metadata database ($STATE_DIR/airflow.db)"
    "$AIRFLOW_BIN" db migrate >>"$LOG_DIR/db-migrate.log" 2>&1 ||
        die "airflow db migrate failed; see $LOG_DIR/db-migrate.log"

    # The API server starts first because a DAG left unpaused by an earlier
    # start gets a run as soon as the scheduler is up, and its tasks fail while
    # the execution API is not reachable.
    launch api-server "$AIRFLOW_BIN" api-server --host 127.0.0.1 --port "$AIRFLOW_PORT"
    wait_until_healthy metadatabase
    # Warm-up: the first request to the execution API builds its versioned
    # routers (several seconds), which would otherwise delay the first task.
    curl -sf -m 60 -o /dev/null "$BASE_URL/execution/health" ||
        log "warning: warm-up request to $BASE_URL/execution/health failed"

    parse_start=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
    # --skip-serve-logs: no log server on all interfaces (port 8793). The API
    # server reads task logs from the shared log folder.
    launch scheduler "$AIRFLOW_BIN" scheduler --skip-serve-logs
    launch dag-processor "$AIRFLOW_BIN" dag-processor
    wait_until_healthy scheduler dag_processor

    fetch_token || fail_start "could not log in to the API server"
    wait_for_dag "$parse_start"
    unpause_and_run
    local stop_command="$0 stop"
    if [[ -n ${AIRFLOW_STATE_DIR:-} ]]; then
        stop_command="AIRFLOW_STATE_DIR=$(printf '%q' "$STATE_DIR") $stop_command"
    fi
    log "UI: $BASE_URL (user $AIRFLOW_USER, password $AIRFLOW_USER unless changed in $PASSWORDS_FILE); stop with: $stop_command"
}

# Send SIGTERM to each component's process group, wait, then SIGKILL what is
# left, including descendants that moved to another process group.
stop_components() {
    # A command that finds nothing (no children, process already gone) must
    # not abort the cleanup half way.
    set +e +o pipefail
    local name pid groups=() members=() deadline left
    for name in "${COMPONENTS[@]}"; do
        # Each component was started with setsid, so its pid is its group id.
        if pid=$(read_pid "$name") && group_alive "$pid"; then groups+=("$pid"); fi
    done
    if ((${#groups[@]} == 0)); then
        log "no component running"
        rm -f "$PID_DIR"/*.pid
        set -e -o pipefail
        return 0
    fi

    mapfile -t members < <(group_members "${groups[@]}")
    mapfile -t -O "${#members[@]}" members < <(descendants "${members[@]}")
    log "sending SIGTERM to process groups ${groups[*]}"
    for pid in "${groups[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for pid in "${members[@]}"; do kill -TERM "$pid" 2>/dev/null; done

    deadline=$((SECONDS + STOP_TIMEOUT))
    while ((SECONDS < deadline)); do
        left=()
        for pid in "${members[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        ((${#left[@]} == 0)) && break
        sleep 0.5
    done
    left=()
    for pid in "${members[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    if ((${#left[@]} > 0)); then
        log "still running after ${STOP_TIMEOUT}s, sending SIGKILL to ${left[*]}"
        for pid in "${groups[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
        for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    fi
    rm -f "$PID_DIR"/*.pid
    log "stopped"
    set -e -o pipefail
}

stop() {
    stop_components
}

status() {
    local name pid alive=0 health runs
    for name in "${COMPONENTS[@]}"; do
        if pid=$(running_pid "$name"); then
            printf '%-14s running (pid %s)\n' "$name" "$pid"
            alive=$((alive + 1))
        else
            printf '%-14s stopped\n' "$name"
        fi
    done
    printf '%-14s %s\n' "url" "$BASE_URL" "logs" "$LOG_DIR"
    if health=$(curl -sf -m 5 "$BASE_URL/api/v2/monitor/health"); then
        printf '%-14s %s\n' "health" "$health"
        if [[ -s $PASSWORDS_FILE ]] && fetch_token 2>/dev/null &&
            runs=$(api GET "/api/v2/dags/$DAG_ID/dagRuns?limit=1&order_by=-run_after" 2>/dev/null); then
            printf '%-14s %s\n' "latest run" "$("$PYTHON_BIN" -c '
import json, sys
runs = json.loads(sys.argv[1])["dag_runs"]
print(runs[0]["dag_run_id"] + " " + runs[0]["state"] if runs else "none")
' "$runs")"
        fi
    fi
    ((alive == ${#COMPONENTS[@]}))
}

main() {
    check_settings
    case ${1:-} in
        start) start ;;
        stop) stop ;;
        status)
            [[ -x $PYTHON_BIN ]] || die "bin/python not found in VENV=$VENV; set VENV to the project's virtualenv"
            status
            ;;
        *)
            printf 'Usage: %s start|stop|status\n' "$0" >&2
            exit 2
            ;;
    esac
}

main "$@"
