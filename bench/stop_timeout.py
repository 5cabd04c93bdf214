"""How long a stop takes: SIGTERM to a training run, to the exit of ./trainer.sh with its full-state
checkpoint published. This is the grace `docker stop --stop-timeout` (and a platform restart) must
give.

    python bench/stop_timeout.py [--size 1B] [--max-length 256] [--batch 1] [--resume]

Runs ./trainer.sh on the embedded corpus with MODEL_SIZE=SIZE (a local output), waits for the first
logged training step, sends SIGTERM and times: the step under way and the save of the full training
state, the publish, and the whole from the signal to the exit. With --resume, then starts the next
run and times it from its start to the checkpoint loaded ("resuming at step ...") and to its first
logged step, then kills it. Runs on the GPU when there is one. Prints one JSON line with the
parameters, the checkpoint's size on disk and the seconds of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from clean_env import gpu_count, pipeline_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1B")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="also time the next run's resume from the checkpoint")
    args = ap.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    gpu = gpu_count() > 0
    resumed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stop-") as tmp:
        env = pipeline_env(Path(tmp), tiny=True, cpu=not gpu)
        env.update({"MODEL_SIZE": args.size, "MAX_LENGTH": str(args.max_length), "SHARD_SIZE": "200",
                    "BATCH_SIZE": str(args.batch), "VAL_FRACTION": "0.02", "SHARD_STEPS": "100000", "VOCAB_SIZE": "4096"})
        proc = subprocess.Popen(["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        marks: dict[str, float] = {}
        log = []
        params = None
        for line in proc.stdout:
            log.append(line)
            now = time.perf_counter()
            m = re.search(r"training every weight: ([\d,]+) parameters", line)
            if m:
                params = int(m.group(1).replace(",", ""))
            if "sigterm" not in marks and "'loss'" in line:  # the first logged step
                proc.send_signal(signal.SIGTERM)
                marks["sigterm"] = now
            if "sigterm" in marks:
                if line.startswith("--- train"):
                    marks.setdefault("saved", now)
                if line.startswith("--- publish"):
                    marks.setdefault("published", now)
        code = proc.wait()
        marks["exit"] = time.perf_counter()
        if "sigterm" not in marks or code != 3:
            print("".join(log[-40:]), file=sys.stderr)
            raise SystemExit(f"the run did not stop as expected (exit {code})")
        ckpt = Path(env["OUTPUT_REPO"]) / "last-checkpoint"
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        if args.resume:
            resumed = time_resume({**env, "MAX_RUNS": "1"})
    t0 = marks["sigterm"]
    print(json.dumps({
        "model_size": args.size, "parameters": params, "max_length": args.max_length,
        "checkpoint_bytes": size, "bytes_per_parameter": round(size / params, 2) if params else None,
        "step_end_and_save_s": round(marks["saved"] - t0, 1),  # the step under way, then the full state saved
        "publish_s": round(marks["published"] - marks["saved"], 1),
        "sigterm_to_exit_s": round(marks["exit"] - t0, 1),
        **resumed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, " + (gpu_name() if gpu else "CPU only"),
    }))
    return 0


def gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout
    return ", ".join(out.split("\n")[:1]).strip()


def time_resume(env: dict[str, str]) -> dict[str, float]:
    """The next run from its start: to its training phase, and to its first logged step, which comes after
    the checkpoint's load (then it is killed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    marks: dict[str, float] = {}
    log = []
    for line in proc.stdout:
        log.append(line)
        now = time.perf_counter()
        if line.startswith("=== train"):
            marks.setdefault("train_start", now)
        if "resuming at step" in line:
            marks.setdefault("resuming", now)
        if "'loss'" in line and "resuming" in marks:
            marks["first_step"] = now
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    if "first_step" not in marks:
        print("".join(log[-40:]), file=sys.stderr)
        raise SystemExit("the next run did not resume from the checkpoint")
    return {"resume_start_to_train_phase_s": round(marks.get("train_start", t0) - t0, 1),
            "resume_train_phase_to_first_step_s": round(marks["first_step"] - marks.get("train_start", t0), 1),
            "resume_start_to_first_step_s": round(marks["first_step"] - t0, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
