#!/usr/bin/env bash
# Run the product locally without Docker: install, start a Kafka-protocol
# broker and Redis on 127.0.0.1, produce a few hundred readings, run one batch,
# print its summary and the first rows of liste-patients, then start Airflow
# on 127.0.0.1:8080 (airflow/airflow) with the DAG unpaused and a first run.
#
#   scripts/run-local.sh         start everything and run a batch
#   scripts/run-local.sh stop    stop everything this script started
#
# Ports: Kafka 9092, Redis 6380 (6379 is often a system Redis), Airflow 8080;
# override with KAFKA_PORT, REDIS_PORT and AIRFLOW_PORT. Without KAFKA_PORT
# and REDIS_PORT, the broker and Redis keep the ports of their last start.
# When they already run on other ports than KAFKA_PORT or REDIS_PORT, the
# script stops with an error. SKIP_AIRFLOW=1 stops after the batch.
# STATE_DIR (default .local) is the folder of the broker's and Redis's files
# and logs; Airflow's go to its subfolder airflow. 'stop' needs the STATE_DIR
# of the start.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE_DIR=${STATE_DIR:-.local}
# 'stop' uses the virtualenv of the last start unless VENV is set.
if [ "${1:-}" = "stop" ] && [ -z "${VENV:-}" ] && [ -f "$STATE_DIR/venv" ]; then
  VENV=$(cat "$STATE_DIR/venv")
fi
if [ "${SKIP_AIRFLOW:-0}" = "1" ]; then
  # Without Airflow the batch needs only the base and dev dependencies.
  EXTRAS=${EXTRAS:-dev}
fi
source scripts/setup-env.sh

if [ "${1:-}" = "stop" ]; then
  if [ ! -x "$VENV/bin/etl" ]; then
    echo "error: $VENV/bin/etl not found; set VENV to the virtualenv that started the services" >&2
    exit 2
  fi
  if [ -x "$VENV/bin/airflow" ]; then
    VENV="$VENV" AIRFLOW_STATE_DIR="$STATE_DIR/airflow" scripts/airflow-local.sh stop || true
  fi
  "$VENV/bin/etl" services stop --state-dir "$STATE_DIR"
  exit 0
fi

install_redis
install_project
etl="$VENV/bin/etl"
mkdir -p "$STATE_DIR"
(cd "$VENV" && pwd) > "$STATE_DIR/venv"

# Only the ports set here are passed, so that services started before on
# other ports are reused when neither variable is set.
port_options=()
if [ -n "${KAFKA_PORT:-}" ]; then
  port_options+=(--kafka-port "$KAFKA_PORT")
fi
if [ -n "${REDIS_PORT:-}" ]; then
  port_options+=(--redis-port "$REDIS_PORT")
fi
# 'etl services start' takes the database number from VITALS_REDIS_URL, and
# the rows of this script go to database 0 of the local Redis.
export VITALS_REDIS_URL=redis://127.0.0.1/0
echo "== Starting the broker and Redis on 127.0.0.1 (state folder $STATE_DIR)"
exports=$("$etl" services start --state-dir "$STATE_DIR" "${port_options[@]}") || {
  status=$?
  # Exit code 3: the services did not start as asked (a port taken, a
  # service running on another port, a start that failed).
  if [ "$status" = 3 ]; then
    echo "scripts/run-local.sh sets --kafka-port, --redis-port and --state-dir from" \
      "KAFKA_PORT, REDIS_PORT and STATE_DIR. 'scripts/run-local.sh stop' stops the" \
      "running services and Airflow." >&2
  fi
  exit "$status"
}
# Sets VITALS_KAFKA_BOOTSTRAP_SERVERS and VITALS_REDIS_URL to the running ports.
eval "$exports"
echo "== Broker at $VITALS_KAFKA_BOOTSTRAP_SERVERS, Redis at $VITALS_REDIS_URL"

echo "== Producing 500 readings to topic ${VITALS_KAFKA_TOPIC:-vitals}"
"$etl" generate --count 500 --malformed-rate 0.02

echo "== Running one batch"
"$etl" run

# The list keeps the rows of earlier runs, so the newest rows are at its end.
redis_port=${VITALS_REDIS_URL##*:}
redis_port=${redis_port%%/*}
echo "== Last rows of liste-patients (redis-cli -p $redis_port LRANGE liste-patients -5 -1)"
"$etl" show --start -5 --stop -1

if [ "${SKIP_AIRFLOW:-0}" = "1" ]; then
  exit 0
fi
echo "== Starting Airflow on http://127.0.0.1:${AIRFLOW_PORT:-8080} (user airflow, password airflow)"
VENV="$VENV" AIRFLOW_STATE_DIR="$STATE_DIR/airflow" scripts/airflow-local.sh start
echo "The DAG a_kafka_redis_airflow is unpaused and runs every 5 minutes."
echo "Stop everything with: scripts/run-local.sh stop"
