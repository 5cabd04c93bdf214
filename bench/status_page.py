"""What the status page costs: how soon it answers after the container starts, and the training
throughput with the page served and polled every second against no page at all.

    python bench/status_page.py [--steps 40] [--pairs 3]

First answer: `./trainer.sh` started, /status.json polled every 20 ms until it answers (3 starts,
the run stopped right after). Throughput: one prepared shard of the ~27M "small" model (sequences
of 256, batch 8), trained by train.py under the deepspeed launcher `--pairs` times with and without
the page (server running, events written, a client fetching /status.json every second),
alternating, so both see the same machine. Prints one JSON line: first-answer seconds (each and the
worst), the median real tokens/s of each arm and the cost in percent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, make_env  # noqa: E402


def first_answer(tmp: Path) -> float:
    env = make_env(tmp)
    url = f"http://127.0.0.1:{env['PORT']}/status.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                return time.perf_counter() - t0
            except OSError:
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("the page never answered")
                time.sleep(0.02)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def train_once(env: dict[str, str], page: bool, port: int) -> float:
    """tokens/s of one training of the prepared shard; with the page served and polled if `page`."""
    env = dict(env)
    server = None
    stop = threading.Event()
    if page:
        status_dir = Path(tempfile.mkdtemp(prefix="status-"))
        env["TRAIN_LLAMA_STATUS_DIR"] = str(status_dir)
        server = subprocess.Popen([sys.executable, "status_page.py", "serve", "--port", str(port), "--dir", str(status_dir)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def poll() -> None:
            while not stop.wait(1.0):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=2).read()
                except OSError:
                    pass

        threading.Thread(target=poll, daemon=True).start()
    try:
        p = subprocess.run(["deepspeed", "--log_level", "error", "--num_gpus", "1", "--master_port", str(free_port()),
                            "train.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        return json.loads((Path(env["WORK_DIR"]) / "final" / "metrics.json").read_text())["tokens_per_s"]
    finally:
        stop.set()
        if server is not None:
            server.kill()
            server.wait()
            shutil.rmtree(env["TRAIN_LLAMA_STATUS_DIR"], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--starts", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        tmp = Path(tmp)
        answers = []
        for i in range(args.starts):
            (tmp / f"s{i}").mkdir()
            answers.append(round(first_answer(tmp / f"s{i}"), 3))
        (tmp / "t").mkdir()
        env = make_env(tmp / "t")
        env.update({"MODEL_SIZE": "small", "MAX_LENGTH": "256", "SHARD_SIZE": "400", "SHARD_STEPS": str(args.steps),
                    "EPOCHS": "20", "BATCH_SIZE": "8", "VOCAB_SIZE": "4096"})
        p = subprocess.run([sys.executable, "prep.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        port = free_port()
        arms: dict[str, list[float]] = {"without": [], "with": []}
        for i in range(args.pairs):
            for arm in (("without", "with") if i % 2 == 0 else ("with", "without")):
                arms[arm].append(train_once(env, arm == "with", port))
    base, served = statistics.median(arms["without"]), statistics.median(arms["with"])
    print(json.dumps({
        "first_answer_s": answers, "first_answer_worst_s": max(answers),
        "tokens_per_s_without_page": round(base, 1), "tokens_per_s_with_page_polled_1hz": round(served, 1),
        "cost_pct": round(100 * (base - served) / base, 2), "runs": {k: [round(x, 1) for x in v] for k, v in arms.items()},
        "steps": args.steps, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
