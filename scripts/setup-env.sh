# Sourced by the other scripts: makes sure redis-server and a Python >= 3.11
# virtual environment with this project exist, installing them when missing.
# Variables: VENV (default .venv), EXTRAS (default dev,airflow,notebooks).

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,airflow,notebooks}

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    return 0
  fi
  echo "redis-server is missing; installing the Debian package redis-server" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "error: run 'apt-get install -y redis-server' as root, then retry" >&2
      return 1
    fi
    sudo="sudo"
  fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null
  # The package starts a system Redis on 6379; this project uses its own ports.
}

find_python() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is required (Debian/Ubuntu: apt-get install -y python3 python3-venv)" >&2
  return 1
}

install_project() {
  local python stamp
  if [ ! -x "$VENV/bin/python" ]; then
    python=$(find_python) || return 1
    "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  # What the last install read: the clone, its pins and the extras. When it
  # is unchanged, pip has nothing to do and needs no package index.
  stamp="$(pwd) $EXTRAS $(cat constraints.txt pyproject.toml | sha256sum)"
  if [ "$(cat "$VENV/.vitals-install" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  # A failed install may leave some packages changed, so it leaves no stamp.
  rm -f "$VENV/.vitals-install"
  # constraints.txt pins every package, so each install resolves the same versions.
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]" &&
    echo "$stamp" >"$VENV/.vitals-install"
}
