"""A shard trained as a chain of interrupted runs against the same shard trained in one run.

    python bench/resume.py [--rows 400] [--epochs 2] [--seed 42]

Both with ./trainer.sh (MAX_RUNS=1 per run), the same data, settings and seed, each into its own
local output. The chain: two runs stopped by the time budget (TIME_BUDGET=1s: each trains one step
and publishes its full-state checkpoint), one stopped by SIGTERM at a random moment of its training
(--seed picks it), then one that finishes the shard. Compared: the batches trained on, in order
(runs/data_order.json), the optimizer steps, the final validation loss; and per resumed run the
time from its start to the end of its first step. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--seed", type=int, default=42, help="picks the moment of the SIGTERM")
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

        a, b = record(Path(one["OUTPUT_REPO"])), record(Path(chain["OUTPUT_REPO"]))
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
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
