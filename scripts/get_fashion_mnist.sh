#!/usr/bin/env bash
# Obtain Fashion-MNIST (the embedded default dataset) under data/raw/fashion-mnist.
# Debian's dataset-fashion-mnist package where we are root; otherwise torchvision's
# download (needs a network). Idempotent: a verified copy is left alone.
set -euo pipefail
ROOT=$(realpath -m "${1:-data/raw}")
# `refilled` from REFILLED, else the repository's .venv, else PATH (a plain `pip install -e .`)
R=${REFILLED:-$(realpath -m "$(dirname "$0")/../.venv/bin/refilled")}
[ -x "$R" ] || R=refilled
cd "$(dirname "$0")/.."
PKG_DIR=/usr/share/datasets/fashion-mnist
# apt-get only when the files are missing (a verified copy is left alone below)
if ! ls "$ROOT"/fashion-mnist/*-ubyte* >/dev/null 2>&1 && [ ! -d "$PKG_DIR" ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
  echo "installing Debian package dataset-fashion-mnist"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "apt-get could not install dataset-fashion-mnist; falling back to torchvision's download"
fi
"$R" data fetch --dataset fashion-mnist --root "$ROOT"
