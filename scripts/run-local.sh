#!/usr/bin/env bash
# Run the product locally without Docker: install, start a Kafka-protocol
# broker and Redis on 127.0.0.1, produce a few hundred readings, run one batch,
# print its summary and the first rows of liste-patients.
#
#   scripts/run-local.sh         start everything and run a batch
#   scripts/run-local.sh stop    stop everything this script started
#
# Ports: Kafka 9092, Redis 6380 (6379 is often a system Redis); override with
# KAFKA_PORT and REDIS_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh

STATE_DIR=${STATE_DIR:-.local}
KAFKA_PORT=${KAFKA_PORT:-9092}
REDIS_PORT=${REDIS_PORT:-6380}
export VITALS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export VITALS_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0

if [ "${1:-}" = "stop" ]; then
  [ -x scripts/airflow-local.sh ] && [ -x "$VENV/bin/airflow" ] && scripts/airflow-local.sh stop || true
  "$VENV/bin/etl" services stop --state-dir "$STATE_DIR"
  exit 0
fi

install_redis
install_project
etl="$VENV/bin/etl"

echo "== Starting the broker on 127.0.0.1:$KAFKA_PORT and Redis on 127.0.0.1:$REDIS_PORT"
"$etl" services start --state-dir "$STATE_DIR" --kafka-port "$KAFKA_PORT" --redis-port "$REDIS_PORT" >/dev/null

echo "== Producing 500 readings to topic ${VITALS_KAFKA_TOPIC:-vitals}"
"$etl" generate --count 500 --malformed-rate 0.02

echo "== Running one batch"
"$etl" run

echo "== First rows of liste-patients (redis-cli -p $REDIS_PORT LRANGE liste-patients 0 4)"
"$etl" show --start 0 --stop 4
