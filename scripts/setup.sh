#!/usr/bin/env bash
# Set up mqgen on a fresh machine: the embedded dataset (Debian package) and the .venv virtualenv.
# Idempotent: a second run only checks what is already there.
# Quiet: one line per step; apt-get and pip write to .venv/setup.log, whose last lines are printed on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist
LOG=.venv/setup.log
log_started=""

# step DESCRIPTION COMMAND...: runs COMMAND with its output in $LOG and prints one line; on a failure, the
# end of the log, its path, and exit 1.
step() {
    local what=$1 t0=$SECONDS
    shift
    mkdir -p "$(dirname "$LOG")"
    if [ -z "$log_started" ]; then  # each run that installs something starts a fresh log
        : >"$LOG"
        log_started=1
    fi
    printf '[setup] %s ... ' "$what"
    printf '\n### %s: %s\n$ %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$what" "$*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1 </dev/null; then
        echo "ok ($((SECONDS - t0)) s)"
    else
        local rc=$?
        echo "FAILED (exit $rc)"
        {
            echo "[setup] the last 40 lines of the log:"
            tail -n 40 "$LOG"
            echo "[setup] failed: $what; full log: $PWD/$LOG"
        } >&2
        exit 1
    fi
}

SUDO=()
if [ "$(id -u)" != 0 ]; then SUDO=(sudo); fi
apt_updated=""

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    step "apt-get update" "${SUDO[@]}" apt-get update
    apt_updated=1
    step "installing Debian package dataset-fashion-mnist (embedded default data)" \
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "[setup] mqgen needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)." \
             "Install one and run again with PYTHON=python3.11 (or newer) make demo" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then  # Debian splits venv out of python3
        venv_pkg="python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        if ! command -v apt-get >/dev/null; then
            echo "[setup] $PYTHON cannot create virtual environments (no ensurepip); install its venv module" >&2
            exit 1
        fi
        [ -n "$apt_updated" ] || step "apt-get update" "${SUDO[@]}" apt-get update
        step "installing Debian package $venv_pkg (python -m venv)" \
            "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$venv_pkg"
    fi
    step "creating .venv" "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last complete install.
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.mqgen-setup 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] installing mqgen and its dependencies into .venv (a few minutes on a fresh machine; log: $LOG)"
    step "upgrading pip" .venv/bin/pip install --upgrade pip
    # torch first, pinned to the build that matches torchvision (torch-fidelity needs both).
    step "installing torch 2.14.1 and torchvision 0.29.1" .venv/bin/pip install "torch==2.14.1" "torchvision==0.29.1"
    step "installing mqgen with its dependencies (pip install -e '.[dev]')" .venv/bin/pip install -e '.[dev]'
    echo "$stamp" > .venv/.mqgen-setup
fi
echo "[setup] ok: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
