"""How long a stop takes: SIGTERM to a training run, to the exit of ./trainer.sh with its full-state
checkpoint published. This is the grace `docker stop --stop-timeout` (and a platform restart) must
give.

    python bench/stop_timeout.py [--size 1B] [--max-length 256]

Runs ./trainer.sh on the embedded corpus with MODEL_SIZE=SIZE (a local output), waits for the first
logged training step, sends SIGTERM and times: the step under way and the save of the full training
state, the publish, and the whole from the signal to the exit. Prints one JSON line with the
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
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1B")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="bench-stop-") as tmp:
        env = make_env(Path(tmp))
        env.update({"MODEL_SIZE": args.size, "MAX_LENGTH": str(args.max_length), "SHARD_SIZE": "200", "BATCH_SIZE": "1",
                    "VAL_FRACTION": "0.02", "SHARD_STEPS": "100000", "VOCAB_SIZE": "4096"})
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
    t0 = marks["sigterm"]
    print(json.dumps({
        "model_size": args.size, "parameters": params, "max_length": args.max_length,
        "checkpoint_bytes": size, "bytes_per_parameter": round(size / params, 2) if params else None,
        "step_end_and_save_s": round(marks["saved"] - t0, 1),  # the step under way, then the full state saved
        "publish_s": round(marks["published"] - marks["saved"], 1),
        "sigterm_to_exit_s": round(marks["exit"] - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
