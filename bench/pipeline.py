"""The whole default pipeline on this machine: wall time, learning per shard, and a chat model that stops.

    python bench/pipeline.py

Runs ./trainer.sh with the embedded defaults (2 pretraining shards + 1 instruct shard) into a
temporary OUTPUT_REPO and WORK_DIR, then asks the instruct model 100 fresh questions from the same
invented world (greedy, at most 64 new tokens). Prints one JSON line: total seconds, validation loss
before/after each shard, the share of answers that end with EOS, and the share answered exactly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))


def main() -> int:
    from make_data import qa

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = {k: v for k, v in os.environ.items() if k not in {"INIT", "INST", "OUTPUT_REPO", "WORK_DIR", "MAX_RUNS"}}
    env.update({"OUTPUT_REPO": str(tmp / "llama"), "WORK_DIR": str(tmp / "work"),
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"})
    t0 = time.perf_counter()
    p = subprocess.run(["./trainer.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stdout[-5000:], p.stderr[-5000:], file=sys.stderr)
        return p.returncode

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = str(tmp / "llama-it")
    record = json.loads((Path(target) / "training_state.json").read_text())
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    rng = random.Random(99)
    questions = [qa(rng) for _ in range(100)]
    questions = [(q, a) for q, a in questions if q != "Tell me a short story."][:100]
    ended, exact = 0, 0
    with torch.no_grad():
        for q, a in questions:
            enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            out = model.generate(**enc, max_new_tokens=64, do_sample=False)[0, enc["input_ids"].shape[1]:]
            ended += int(tok.eos_token_id in out.tolist())
            exact += int(tok.decode(out, skip_special_tokens=True).strip() == a)
    print(json.dumps({
        "bench": "pipeline",
        "total_seconds": round(total, 1),
        "runs": [{"stage": h["stage"], "shard": h["shard"], "steps": h["steps"], "tokens": h["tokens"],
                  "eval_loss_before": round(h["eval_loss_before"], 4), "eval_loss": round(h["eval_loss"], 4)}
                 for h in record["history"]],
        "pretrain_val_loss_falls": all(b["eval_loss"] < a["eval_loss"] for a, b in
                                       zip(record["history"][:1], record["history"][1:2])),
        "answers_end_with_eos": round(ended / len(questions), 3),
        "answers_exact": round(exact / len(questions), 3),
        "questions": len(questions),
        "output": target,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
