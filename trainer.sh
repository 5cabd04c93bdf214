#!/usr/bin/env bash
# train-llama entry point: preflight -> validate -> [prep -> train -> publish -> advance] per run.
#
# Locally, runs follow one another until the pipeline is done or MAX_RUNS runs have finished.
# An explicit INIT/INST applies to the first run only; later runs follow the published record.
# In a Space (SPACE_ID set) each container start is one run: it publishes, writes INIT/INST back
# to the Space's variables (which restarts it), and pauses the Space when the pipeline is done.
# A run that reaches its time budget, or gets SIGTERM/SIGINT, stops every rank at the same step,
# publishes its full-state checkpoint (last-checkpoint/) and the next run resumes there.
# Exit codes: 0 done, MAX_RUNS reached, or (in a Space) the run published; 1 a runtime failure, or
# the output is in use by another run (the published output stays valid); 2 bad input (nothing
# written); 3 stopped by a signal (after publishing what the run had to publish, or before it had
# anything to publish: the state is then unchanged).
#
# Signals: the first SIGTERM/SIGINT stops the current phase (training: at the end of the step, then
# its full-state checkpoint is published; a publish under way is finished first); further ones are
# ignored until that is done (SIGKILL cuts it; what is published stays valid). Each phase runs in
# its own session, so a signal sent to the whole process group (Ctrl-C) reaches only this script,
# and with a parent-death signal, so that nothing outlives this script when it is killed.
#
# The status page (status_page.py) answers on PORT (default 7860) from the first second: every
# phase, the training log and each publish feed it. When the pipeline ends or fails, it keeps
# answering until the container stops if KEEP_SERVING=true (the default in a Space).
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
export HF_HUB_DISABLE_TELEMETRY=1

child=0
current=""
stopping=0
say() { printf '[trainer] %s\n' "$*"; }
descendants() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}
forward() {  # the first stop signal stops the current phase; the next ones are absorbed
  if [ "$stopping" -eq 1 ]; then
    say "$1 again: a stop is already under way (the checkpoint or publish is being written); ignored. SIGKILL cuts it."
    return 0
  fi
  stopping=1
  if [ "$child" -eq 0 ]; then say "$1: stopping"; return 0; fi
  case "$current" in
    train)  # each rank stops at the end of its step and saves (the launcher would kill them)
      say "$1: training stops at the end of this step; its full state is then saved and published"
      local p
      for p in $(descendants "$child"); do
        if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- '--local_rank'; then kill -s "$1" "$p" 2>/dev/null || true; fi
      done ;;
    publish)
      say "$1: the publish under way is finished first (it is one atomic step), then the run stops" ;;
    *)
      say "$1: stopping $current (nothing of this run is published; the state is unchanged)"
      kill -s TERM "$child" 2>/dev/null || true ;;
  esac
}
trap 'forward TERM' TERM
trap 'forward INT' INT

banner() { printf '\n=== %s ===\n' "$*"; }
status() { "$PY" status_page.py emit --dir "$TRAIN_LLAMA_STATUS_DIR" "$@" 2>/dev/null || true; }
stopped_before() {
  banner "stopped by a signal during $1: nothing of this run was published; the published output and the state are unchanged"
  exit 3
}
# A phase runs in its own session (group signals stay here) and dies with this script.
isolate="setsid"
if setpriv --pdeathsig KILL true 2>/dev/null; then isolate="setsid setpriv --pdeathsig KILL --"; fi

# phase NAME CMD...: run CMD in the background (so traps fire at once), report its duration.
phase() {
  local name=$1 start rc
  shift
  banner "$name"
  current=${name%% *}
  start=$(date +%s)
  if [ "$stopping" -eq 1 ] && [ "$current" != "publish" ]; then stopped_before "$name"; fi
  status phase "name=$current"
  $isolate "$@" &
  child=$!
  set +e
  wait "$child"
  rc=$?
  # A trapped signal interrupts `wait`; wait again for the child's own exit status.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  set -e
  child=0
  current=""
  printf -- '--- %s: %s in %ss\n' "$name" "$([ "$rc" -eq 0 ] && echo done || echo "failed (exit $rc)")" "$(( $(date +%s) - start ))"
  status phase_end "name=$current" "rc=$rc" "stopped=$([ "$stopping" -eq 1 ] && echo true || echo false)"
  if [ "$rc" -ne 0 ] && [ "$stopping" -eq 1 ]; then stopped_before "$name"; fi
  return "$rc"
}

# The status page first: it answers within a second of the start, whatever happens next.
TRAIN_LLAMA_STATUS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/train-llama-status.XXXXXX")"
export TRAIN_LLAMA_STATUS_DIR
status start
$isolate "$PY" status_page.py serve --port "${PORT:-7860}" --dir "$TRAIN_LLAMA_STATUS_DIR" &
page=$!
ended=""
on_exit() {  # the page says how the pipeline ended, and stays up where it is the only window on it
  local rc=$1
  trap - EXIT
  if [ -z "$ended" ]; then
    if [ "$rc" -eq 0 ]; then status end state=done; elif [ "$rc" -eq 3 ]; then status end state=stopped;
    else status end state=failed; fi
  fi
  if [ "$stopping" -eq 0 ] && [ "${KEEP_SERVING:-$([ -n "${SPACE_ID:-}" ] && echo true || echo false)}" = "true" ]; then
    say "the run is over (exit $rc); the status page stays up on port ${PORT:-7860} until the container stops"
    # Short waits, so a stop signal (which sets `stopping`) ends this within a second.
    while [ "$stopping" -eq 0 ] && kill -0 "$page" 2>/dev/null; do sleep 1 & wait $! || true; done
  fi
  kill "$page" 2>/dev/null || true
  rm -rf "$TRAIN_LLAMA_STATUS_DIR"
  exit "$rc"
}
trap 'on_exit $?' EXIT

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$gpus" -eq 0 ]; then export DS_ACCELERATOR=cpu; fi

# One writer per output: the locks are held on this script's descriptors for the whole pipeline
# (output_lock.py). Settings that do not parse are left to preflight to report.
if lock_paths=$("$PY" output_lock.py paths 2>/dev/null); then
  lock_fds=()
  while IFS= read -r lock_path; do exec {fd}>>"$lock_path"; lock_fds+=("$fd"); done <<< "$lock_paths"
  "$PY" output_lock.py take --owner $$ "${lock_fds[@]}" || exit 1
  export TRAIN_LLAMA_LOCKED=1
fi

phase "preflight" "$PY" preflight.py
phase "validate setup" "$PY" validate_setup.py

# Settings come from the environment and CONFIG_FILE alike: ask config.py, not the environment.
{ read -r max_runs; read -r nproc_; read -r space; } < <("$PY" config.py get MAX_RUNS NUM_PROCESSES SPACE_ID)
[ "$space" = "None" ] && space=""
# Ranks: NUM_PROCESSES, else one per visible GPU, else 1 on CPU. CPU threads are shared out between ranks.
if [ "$nproc_" -eq 0 ]; then nproc_=$(( gpus > 0 ? gpus : 1 )); fi
if [ "$gpus" -eq 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc_ > 0 ? $(nproc) / nproc_ : 1 ))}"
fi
port=$(( 29500 + RANDOM % 2000 ))

# The run's clock (its time budget counts from here): the container's start for the first run.
export RUN_STARTED_AT="${RUN_STARTED_AT:-$(date +%s)}"
runs=0
while :; do
  set +e
  "$PY" publish.py plan --hand-on >/dev/null 2>&1
  planned=$?
  set -e
  if [ "$planned" -eq 3 ]; then
    banner "done"
    "$PY" publish.py plan || true
    status end state=done "message=the pipeline is done: every shard is trained and published"
    ended=1
    if [ -n "$space" ]; then "$PY" publish.py pause; fi
    exit 0
  fi
  runs=$(( runs + 1 ))
  if [ "$runs" -gt 1 ]; then RUN_STARTED_AT=$(date +%s); fi
  banner "run $runs"
  status run "run=$runs"
  phase "prep" "$PY" prep.py
  # WORK_DIR/final then holds the finished model, or the full-state checkpoint of a stopped shard.
  phase "train ($nproc_ rank(s))" deepspeed --log_level error --num_gpus "$nproc_" --master_port "$port" train.py
  phase "publish" "$PY" publish.py publish
  # Later runs follow the published record, not the first run's explicit INIT/INST.
  unset INIT INST
  if [ -n "$space" ]; then
    banner "this container's run is over: the Space restarts for the next one"
    status end state=stopped "message=this container's run is over: the Space restarts for the next one"
    ended=1
    exit 0
  fi
  if [ "$stopping" -eq 1 ]; then
    banner "stopped by a signal: what this run had trained is published (see above); the next run continues from it"
    exit 3
  fi
  if [ "$max_runs" -gt 0 ] && [ "$runs" -ge "$max_runs" ]; then
    banner "stopping after MAX_RUNS=$max_runs run(s)"
    status end state=stopped "message=stopped after MAX_RUNS=$max_runs run(s)"
    ended=1
    "$PY" publish.py plan || true
    exit 0
  fi
done
