#!/usr/bin/env bash
# Fetches, on a machine with network access, the Python wheels that bench/gpu_check.sh needs
# on the GPU machine and that its image lacks, into .whl/ (ignored by git; the device call
# carries it). The GPU machine runs Python 3.12 and already has torch and triton, so only
# Liger-Kernel itself is fetched (a pure-Python wheel; its other requirements, torch and
# triton, are there). Idempotent: a wheel already present is kept.
#
#   bash bench/fetch_gpu_wheels.sh            # the pinned version
#   LIGER_VERSION=0.8.5 bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Checked against bench/_contenders.py's liger contender (liger_kernel.transformers.functional.
# liger_cross_entropy(input, target) returning the mean loss tensor).
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
DEST=.whl
mkdir -p "$DEST"

if ls "$DEST"/liger_kernel-"$LIGER_VERSION"-*.whl >/dev/null 2>&1; then
  echo "[fetch] $DEST already holds liger_kernel $LIGER_VERSION"
else
  rm -f "$DEST"/liger_kernel-*.whl  # one version only: two would stop the install there
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "liger-kernel==$LIGER_VERSION"
fi
ls -l "$DEST"
du -sh "$DEST"
