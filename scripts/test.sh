#!/usr/bin/env bash
# Install everything the tests need, then run lint, type checks and the whole
# test suite (unit, integration, Airflow, notebooks; slow tests included).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh

install_redis
install_project

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
"$VENV/bin/pytest" "$@"
