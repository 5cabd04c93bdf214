"""A shard trained as a chain of interrupted runs against the same shard trained in one run; what
kill -9 loses with periodic checkpoints; what saving costs; early stopping's published model.

    python bench/resume.py [--rows 400] [--epochs 6] [--seed 42] [--kills 5] [--save-interval 0.1]

All with ./trainer.sh (MAX_RUNS=1 per run), the same data, settings and seed, each into its own
local output. Prints one JSON line.

- The chain: two runs stopped by the time budget (TIME_BUDGET=1s: each trains one step and
  publishes its full-state checkpoint), one stopped by SIGTERM at a random moment of its training
  (--seed picks it), then one that finishes the shard. Compared with one uninterrupted run: the
  batches trained on, in order (runs/data_order.json), the optimizer steps, the final validation
  loss; and per resumed run the time from its start to the end of its first step.
- kill -9: with SAVE_INTERVAL=--save-interval minutes, --kills runs are killed (the whole process
  group, SIGKILL) at random moments of their training, then one run finishes the shard. Per kill,
  the training lost: the steps done past the published checkpoint (read from the progress bar as it
  is written) times the uninterrupted run's time per step, plus the part of the step under way
  (`kill9_max_lost_s`, against `save_interval_s`). Then the final validation loss against the
  uninterrupted run's (`kill9_final_loss_delta_pct`) and the batches in order.
- Saving's cost: each periodic save's wall time as the runs logged it; `save_overhead_pct` is that
  time as a share of training at the interval SAVE_INTERVAL's default picks for this checkpoint
  (saves every max(10 min, 20x the save) — the default's share is not waited for here), and
  `save_overhead_pct_measured` the share measured in the kill -9 runs at their short interval.
- Early stopping: a 36-document shard trained for many passes with an evaluation every 4 steps and
  EARLY_STOPPING_PATIENCE=3: the published model's validation loss (measured again on the published
  weights) against the best evaluation's (`early_stop_best_equals_published`: within 1e-6, and
  below the last step's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def base_env(tmp: Path, rows: int, epochs: float) -> dict[str, str]:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    with (ROOT / "data" / "pretrain.jsonl").open() as f, (data / "pretrain.jsonl").open("w") as g:
        g.writelines(line for _, line in zip(range(rows), f))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "INIT", "INST", "TIME_BUDGET", "MAX_", "SHARD_STEPS", "SAVE_", "EVAL_"))}
    return {**keep, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "INPUT_DATASET": str(data / "pretrain.jsonl"),
            "SHARD_SIZE": str(rows), "MAX_LENGTH": "64", "BATCH_SIZE": "8", "VAL_FRACTION": "0.1", "EPOCHS": str(epochs),
            "MAX_RUNS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def trainer(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run(["./trainer.sh"], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"trainer.sh exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def sigterm_run(env: dict[str, str], delay: float) -> int:
    """A run that gets SIGTERM `delay` seconds after its training loop resumed; returns its exit code."""
    proc = subprocess.Popen(["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("[train] resuming at step"):
                time.sleep(delay)
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        return proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def record(out: Path) -> dict:
    return json.loads((out / "training_state.json").read_text())


PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # the trainer's progress bar: steps done / steps of the shard
SAVED = re.compile(r"periodic checkpoint at step (\d+) published .* \(saved in ([\d.]+) s")


def killed_run(env: dict[str, str], after_s: float) -> dict:
    """A run killed with SIGKILL (its whole process group) `after_s` seconds into its training;
    what its output said, timestamped as it was written (the progress bar too, fragment by fragment)."""
    proc = subprocess.Popen(["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: list[tuple[float, str]] = []

    def read() -> None:
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            now, parts = time.time(), re.split(rb"[\r\n]", pending + chunk)
            pending = parts.pop()
            seen.extend((now, p.decode(errors="replace")) for p in parts if p.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        began = None
        while proc.poll() is None:
            steps = [(t, int(m.group(1))) for t, text in list(seen) if (m := PROGRESS.search(text))]
            if began is None and len({s for _, s in steps}) > 1:  # a step done in this run: training is under way
                began = steps[-1][0]
            if began is not None and time.time() - began >= after_s:
                killed_at = time.time()
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            killed_at = None  # the shard ended first
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = [(t, int(m.group(1))) for t, text in seen if (m := PROGRESS.search(text)) and (killed_at is None or t <= killed_at)]
    return {"killed_at": killed_at, "steps": done, "saves": [(int(m.group(1)), float(m.group(2)))
                                                              for _, text in seen if (m := SAVED.search(text))],
            "lines": [text for _, text in seen]}


def kill9_chain(env: dict[str, str], kills: int, interval_min: float, step_s: float, rng: random.Random) -> dict:
    """--kills runs killed at random moments, then one that finishes the shard."""
    out = Path(env["OUTPUT_REPO"])
    env = {**env, "SAVE_INTERVAL": str(interval_min)}
    lost, saves, train_s = [], [], 0.0
    for _ in range(kills):
        run = killed_run(env, rng.uniform(0.5, 2.5) * interval_min * 60)
        saves += run["saves"]
        if run["killed_at"] is None:
            raise RuntimeError("the shard ended before the kill: give it more --epochs\n" + "\n".join(run["lines"][-30:]))
        state = record(out) if (out / "training_state.json").exists() else {}
        resumed_at = int((state.get("resume") or {}).get("step", 0))
        (t_last, last), first = run["steps"][-1], run["steps"][0]
        train_s += run["killed_at"] - first[0]
        lost.append({"killed_at_step": last, "resumes_at_step": resumed_at,
                     "lost_s": round((last - resumed_at) * step_s + (run["killed_at"] - t_last), 2)})
    t = time.perf_counter()
    p = trainer(env)
    train_s += time.perf_counter() - t
    saves += [(int(m.group(1)), float(m.group(2))) for m in SAVED.finditer(p.stdout)]
    return {"lost": lost, "saves": saves, "train_wall_s": train_s}


def early_stop(env: dict[str, str]) -> dict:
    """The overfitting shard of the evaluation test, as a benchmark."""
    env = {**env, "SHARD_SIZE": "40", "EPOCHS": "40", "LEARNING_RATE": "3e-3", "WARMUP_RATIO": "0", "EVAL_INTERVAL": "4",
           "EARLY_STOPPING_PATIENCE": "3"}
    trainer(env)
    h = record(Path(env["OUTPUT_REPO"]))["history"][-1]
    return {"early_stopped_at": h.get("early_stopped_at"), "best_step": h.get("best_step"), "evals": len(h.get("evals", [])),
            "published_eval_loss": h["eval_loss"], "best_eval_loss": h.get("best_eval_loss"),
            "last_step_eval_loss": h.get("last_step_eval_loss"),
            "early_stop_best_equals_published": ("early_stopped_at" in h and abs(h["eval_loss"] - h["best_eval_loss"]) <= 1e-6
                                                 and h["last_step_eval_loss"] > h["eval_loss"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--seed", type=int, default=42, help="picks the moments of the SIGTERM and the kills")
    ap.add_argument("--kills", type=int, default=5, help="runs killed with SIGKILL before one finishes the shard")
    ap.add_argument("--save-interval", type=float, default=0.1, help="SAVE_INTERVAL (minutes) of the killed runs")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        env = base_env(tmp, args.rows, args.epochs)
        one = {**env, "OUTPUT_REPO": str(tmp / "one" / "llama"), "WORK_DIR": str(tmp / "work-one")}
        chain = {**env, "OUTPUT_REPO": str(tmp / "chain" / "llama"), "WORK_DIR": str(tmp / "work-chain")}
        t = time.perf_counter()
        trainer(one)
        one_s = time.perf_counter() - t

        stops = []
        t = time.perf_counter()
        for _ in range(2):
            trainer(chain, TIME_BUDGET="1s")
            stops.append(record(Path(chain["OUTPUT_REPO"]))["resume"])
        delay = random.Random(args.seed).uniform(0.5, 3.0)
        rc = sigterm_run(chain, delay)
        state = record(Path(chain["OUTPUT_REPO"]))
        stops.append(state.get("resume"))
        trainer(chain)
        chain_s = time.perf_counter() - t

        rng = random.Random(args.seed)
        a = record(Path(one["OUTPUT_REPO"]))
        step_s = a["history"][-1]["train_runtime_s"] / a["history"][-1]["steps"]
        killed = {**env, "OUTPUT_REPO": str(tmp / "killed" / "llama"), "WORK_DIR": str(tmp / "work-killed")}
        k9 = kill9_chain(killed, args.kills, args.save_interval, step_s, rng)
        hk = record(Path(killed["OUTPUT_REPO"]))["history"][-1]
        order_k = json.loads((Path(killed["OUTPUT_REPO"]) / "runs" / "data_order.json").read_text())
        save_s = [s for _, s in k9["saves"]]
        mean_save_s = sum(save_s) / len(save_s) if save_s else None
        default_interval_s = max(600.0, mean_save_s / 0.05) if save_s else None
        stopping = early_stop({**env, "OUTPUT_REPO": str(tmp / "overfit" / "llama"), "WORK_DIR": str(tmp / "work-overfit")})

        b = record(Path(chain["OUTPUT_REPO"]))
        ha, hb = a["history"][-1], b["history"][-1]
        order_a = json.loads((Path(one["OUTPUT_REPO"]) / "runs" / "data_order.json").read_text())
        order_b = json.loads((Path(chain["OUTPUT_REPO"]) / "runs" / "data_order.json").read_text())
        out = {
            "bench": "resume",
            "stops": [{"step": s["step"], "of": s["max_steps"], "by": s["stop_reason"]} if s else None for s in stops],
            "sigterm_exit": rc, "sigterm_after_s": round(delay, 2),
            "same_batches_in_order": order_a == order_b, "batches": len(order_a),
            "steps_one_run": ha["steps"], "steps_chain": hb["steps"],
            "eval_loss_one_run": ha["eval_loss"], "eval_loss_chain": hb["eval_loss"],
            "eval_loss_rel_diff": abs(hb["eval_loss"] - ha["eval_loss"]) / ha["eval_loss"],
            "interruptions": hb.get("interruptions"),
            "first_resumed_step_s": hb.get("first_resumed_step_s"),
            "wall_one_run_s": round(one_s, 1), "wall_chain_s": round(chain_s, 1),
            "checkpoint_left_after_finish": (Path(chain["OUTPUT_REPO"]) / "last-checkpoint").exists(),
            "step_s": round(step_s, 4),
            "save_interval_s": args.save_interval * 60,
            "kills": k9["lost"],
            "kill9_max_lost_s": max(k["lost_s"] for k in k9["lost"]),
            "kill9_same_batches_in_order": order_k == order_a,
            "kill9_steps": hk["steps"],
            "kill9_final_loss_delta_pct": 100 * abs(hk["eval_loss"] - ha["eval_loss"]) / ha["eval_loss"],
            "periodic_saves": len(save_s),
            "save_s_mean": round(mean_save_s, 3) if save_s else None,
            "save_overhead_pct": round(100 * mean_save_s / default_interval_s, 3) if save_s else None,
            "default_save_interval_s": default_interval_s,
            "save_overhead_pct_measured": round(100 * sum(save_s) / k9["train_wall_s"], 2) if save_s else None,
            **stopping,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
