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
  local python digest
  if [ ! -x "$VENV/bin/python" ]; then
    python=$(find_python) || return 1
    "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  # The stamp records what the last install read: the clone, the hash of its
  # pins, and the extras. While the clone and the pins are the same and the
  # extras include those of EXTRAS, pip has nothing to do and needs no
  # package index.
  digest=$(cat constraints.txt pyproject.toml | sha256sum)
  if stamp_covers "$VENV/.vitals-install" "$(pwd)" "$digest" "$EXTRAS"; then
    return 0
  fi
  # A failed install may leave some packages changed, so it leaves no stamp.
  rm -f "$VENV/.vitals-install"
  # constraints.txt pins every package, so each install resolves the same versions.
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]" &&
    printf '%s\n%s\n%s\n' "$(pwd)" "$digest" "$EXTRAS" >"$VENV/.vitals-install"
}

# stamp_covers STAMP CLONE DIGEST EXTRAS: succeed when the install that wrote
# STAMP was of CLONE with pins of DIGEST and every extra of EXTRAS.
stamp_covers() {
  local stamp=$1 extra installed
  local -a wanted
  [ -f "$stamp" ] || return 1
  [ "$(sed -n 1p "$stamp")" = "$2" ] || return 1
  [ "$(sed -n 2p "$stamp")" = "$3" ] || return 1
  installed=",$(sed -n 3p "$stamp"),"
  IFS=, read -ra wanted <<<"$4"
  for extra in "${wanted[@]}"; do
    [[ $installed == *",$extra,"* ]] || return 1
  done
}
