#!/usr/bin/env bash
# Set up mqgen on a fresh machine: the embedded dataset (Debian package) and the .venv virtualenv.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist (embedded default data)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last complete install.
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.mqgen-setup 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] installing mqgen and its dependencies into .venv (first time: a few minutes)"
    .venv/bin/pip install -q --upgrade pip
    # torch first, pinned to the build that matches torchvision (torch-fidelity needs both).
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/pip install -q -e '.[dev]'
    echo "$stamp" > .venv/.mqgen-setup
fi
echo "[setup] ok: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
