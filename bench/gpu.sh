#!/usr/bin/env bash
# The GPU path checked end to end and measured, on a machine with NVIDIA GPUs (bench/gpu.py says what
# each check does):
#
#   bench/gpu.sh [--dry-run] [--out DIR] [--only NAME,...]
#
# Inside the Docker image, or after `make setup`, everything is installed. On a machine with its own
# CUDA build of torch and only some of the libraries (no network), `make gpu-wheels` here assembles
# the missing ones as wheels in .whl/ (GPU_WHEELS): carried there, they are installed into a folder
# of their own (GPU_SITE) that comes before the machine's packages, and the machine's torch and
# transformers are used as they are (STRICT_VERSIONS=false: versions other than the pins are listed,
# and the functional checks decide).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
wheels="${GPU_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="${GPU_SITE:-${TMPDIR:-/tmp}/train-llama-site}"
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  echo "[gpu] installed $(ls "$wheels"/*.whl | wc -l) carried wheels into $site in $(( $(date +%s) - start )) s"
fi
export STRICT_VERSIONS="${STRICT_VERSIONS:-false}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py "$@"
