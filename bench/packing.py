"""Instruct throughput with chats packed vs padded, against pretraining on the same model.

    python bench/packing.py [--out DIR]

Runs the default pipeline (./trainer.sh: 2 pretraining shards, then the instruct shard with
PACK_CHATS=true), then the same instruct shard again from the same pretrained model with
PACK_CHATS=false. Every run is the pipeline's own, timed by its trainer; tokens/s are real tokens
(padding not counted). Prints one JSON line: `instruct_vs_pretrain` (packed instruct tokens/s over
the faster pretraining shard's), the padded ratio beside it, and the validation loss of each
instruct run after the whole shard (the same chats, so the same real tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clean_env import ROOT, pipeline_env  # noqa: E402


def trainer(env: dict[str, str], **extra: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["./trainer.sh"], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-4000:], p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"./trainer.sh exited {p.returncode}")
    return time.perf_counter() - t0


def runs(target: Path) -> list[dict]:
    return json.loads((target / "training_state.json").read_text())["history"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--tiny", action="store_true", help="the embedded data cut short, 3 steps per shard (a check of the flow)")
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-packing-"))
    env = pipeline_env(root, tiny=args.tiny, cpu=False)
    out = Path(env["OUTPUT_REPO"])
    it = out.parent / (out.name + "-it")

    wall_packed = trainer(env, PACK_CHATS="true")
    packed_runs = runs(it)
    shutil.move(it, out.parent / "packed-it")
    shutil.rmtree(env["WORK_DIR"], ignore_errors=True)
    wall_padded = trainer(env, PACK_CHATS="false", MAX_RUNS="1")
    padded_runs = runs(it)

    pre = [h for h in packed_runs if h["stage"] == "pretrain"]
    packed = [h for h in packed_runs if h["stage"] == "instruct"][-1]
    padded = [h for h in padded_runs if h["stage"] == "instruct"][-1]
    pre_rate = max(h["tokens_per_s"] for h in pre)

    def run(h: dict) -> dict:
        return {"steps": h["steps"], "tokens": h["tokens"], "tokens_per_s": round(h["tokens_per_s"]),
                "train_s": round(h["train_runtime_s"], 1), "eval_loss_before": round(h["eval_loss_before"], 4),
                "eval_loss": round(h["eval_loss"], 4)}

    print(json.dumps({
        "bench": "packing",
        "instruct_vs_pretrain": round(packed["tokens_per_s"] / pre_rate, 3),
        "instruct_vs_pretrain_padded": round(padded["tokens_per_s"] / pre_rate, 3),
        "packed_vs_padded_speed": round(packed["tokens_per_s"] / padded["tokens_per_s"], 2),
        "eval_loss_packed_vs_padded": round(packed["eval_loss"] / padded["eval_loss"] - 1, 4),
        "pretrain": [{"shard": h["shard"], "tokens_per_s": round(h["tokens_per_s"])} for h in pre],
        "instruct_packed": run(packed),
        "instruct_padded": run(padded),
        "wall_s": {"pipeline_packed": round(wall_packed, 1), "instruct_padded": round(wall_padded, 1)},
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
    }))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
