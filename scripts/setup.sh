#!/usr/bin/env bash
# One-time set-up for `make demo` and `make test`; safe to re-run (a stamp file makes re-runs instant).
#
# System packages (Debian, via apt-get, only when missing):
#   openjdk-17-jre-headless  when `java` is not on PATH   (Spark runs on the JVM)
#   dataset-fashion-mnist    when /usr/share/datasets/fashion-mnist is absent (the demo's data)
#   chromium                 when /usr/bin/chromium is missing (the web UI's browser test)
#   postgresql               when no PostgreSQL server binaries (initdb) are found (the job
#                            registry's PostgreSQL tests start their own throwaway server from them)
# Python: a virtual environment in .venv (python3.11) with torch, torchvision and sparkvision[test]
# (the test extra includes psycopg, the PostgreSQL driver).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
STAMP="$VENV/.sparkvision-setup"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --------------------------------------------------------------------------- system packages
apt_missing=()
command -v java >/dev/null 2>&1 || apt_missing+=(openjdk-17-jre-headless)
[ -d /usr/share/datasets/fashion-mnist ] || apt_missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 \
    || apt_missing+=(postgresql)

if [ ${#apt_missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to apt-get install ${apt_missing[*]}"; exit 1; }
        SUDO=sudo
    fi
    log "installing ${apt_missing[*]} with apt-get"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# --------------------------------------------------------------------------- python environment
# The stamp records what the venv was built from; any change to pyproject.toml or this script
# re-runs the pip installs (pip itself skips what is already there).
want="$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || { log "$PYTHON not found: sparkvision needs Python 3.11+ (set PYTHON=...)"; exit 1; }
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
log "installing ${TORCH_PINS[*]}"
"$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
log "installing sparkvision[test] (editable)"
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "$want" >"$STAMP"
log "done: $VENV is ready"
