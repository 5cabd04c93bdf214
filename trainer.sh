#!/usr/bin/env bash
# train-llama entry point: preflight -> validate -> [prep -> train -> publish -> advance] per run.
#
# Locally, runs follow one another until the pipeline is done or MAX_RUNS runs have finished.
# An explicit INIT/INST applies to the first run only; later runs follow the published record.
# Exit codes: 0 done or MAX_RUNS reached; 2 bad input (nothing written); 3 stopped by the time
# budget (state unchanged); other non-zero: a runtime failure (the published output stays valid).
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
export HF_HUB_DISABLE_TELEMETRY=1

child=0
forward() {  # signals reach the Python process (and, through the launcher, every rank)
  if [ "$child" -ne 0 ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

banner() { printf '\n=== %s ===\n' "$*"; }

# phase NAME CMD...: run CMD in the background (so traps fire at once), report its duration.
phase() {
  local name=$1 start rc
  shift
  banner "$name"
  start=$(date +%s)
  "$@" &
  child=$!
  set +e
  wait "$child"
  rc=$?
  # A trapped signal interrupts `wait`; wait again for the child's own exit status.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  set -e
  child=0
  printf -- '--- %s: %s in %ss\n' "$name" "$([ "$rc" -eq 0 ] && echo done || echo "failed (exit $rc)")" "$(( $(date +%s) - start ))"
  return "$rc"
}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$gpus" -eq 0 ]; then export DS_ACCELERATOR=cpu; fi

phase "preflight" "$PY" preflight.py
phase "validate setup" "$PY" validate_setup.py

# Settings come from the environment and CONFIG_FILE alike: ask config.py, not the environment.
{ read -r max_runs; read -r nproc_; } < <("$PY" config.py get MAX_RUNS NUM_PROCESSES)
# Ranks: NUM_PROCESSES, else one per visible GPU, else 1 on CPU. CPU threads are shared out between ranks.
if [ "$nproc_" -eq 0 ]; then nproc_=$(( gpus > 0 ? gpus : 1 )); fi
if [ "$gpus" -eq 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc_ > 0 ? $(nproc) / nproc_ : 1 ))}"
fi
port=$(( 29500 + RANDOM % 2000 ))

runs=0
while :; do
  set +e
  "$PY" util.py plan >/dev/null 2>&1
  planned=$?
  set -e
  if [ "$planned" -eq 3 ]; then
    banner "done"
    "$PY" util.py plan || true
    exit 0
  fi
  runs=$(( runs + 1 ))
  banner "run $runs"
  phase "prep" "$PY" prep.py
  phase "train ($nproc_ rank(s))" deepspeed --log_level error --num_gpus "$nproc_" --master_port "$port" train.py
  phase "publish" "$PY" util.py publish
  # Later runs follow the published record, not the first run's explicit INIT/INST.
  unset INIT INST
  if [ "$max_runs" -gt 0 ] && [ "$runs" -ge "$max_runs" ]; then
    banner "stopping after MAX_RUNS=$max_runs run(s)"
    "$PY" util.py plan || true
    exit 0
  fi
done
