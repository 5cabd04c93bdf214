"""Publishing under Hub faults: what is retried, how often, and whether the commit lands exactly once.

    python bench/hub_faults.py

Trains one tiny shard (prep.py + train.py under the deepspeed launcher), then publishes it with
`publish.py publish` — the real huggingface_hub client — to the loopback Hub of the tests
(tests/hub_double.py, HF_HUB_DISABLE_XET=1) with one fault injected per case: 5xx on the commit,
429 with Retry-After, a dropped connection during an LFS upload, a stalled commit (past
HUB_TIMEOUT), a commit that lands but whose answer is lost, a 403, a bad token, and a Hub that never
recovers. Per case: exit code, faults the Hub served (each one a failed request the client had to
get past: retried by this project's wrapper, which logs a line per retry, or by huggingface_hub's own
backoff for single requests), retries logged, commits that landed, whether the published record is
the run's, seconds, and for a failed publish whether a rerun without the fault publishes. Prints one
JSON line.

Faults on reads (the record failing, dropped or stalled, the repo info, the model and the checkpoint
downloads failing for good) are in bench/chaos.py's hub group: a whole run each, checked to plan
nothing from the failed read and to publish nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hub_double import HubDouble  # noqa: E402

TOKEN = "hf_benchWriteToken0123456789abcdef"
REPO = "alice/llama"

# name -> (faults as HubDouble.fail keyword sets, expected to publish?)
CASES: dict[str, tuple[list[dict], bool]] = {
    "none": ([], True),
    "commit 503 x2": ([{"method": "POST", "pattern": r"/commit/", "status": 503, "times": 2}], True),
    "preupload 500 x1": ([{"method": "POST", "pattern": r"/preupload/", "status": 500, "times": 1}], True),
    "preupload 429 Retry-After 1s x2": ([{"method": "POST", "pattern": r"/preupload/", "status": 429, "times": 2,
                                          "retry_after": 1}], True),
    "lfs upload dropped x1": ([{"method": "PUT", "pattern": r"/lfs-upload/", "kind": "drop", "times": 1}], True),
    "commit stalls past HUB_TIMEOUT x1": ([{"method": "POST", "pattern": r"/commit/", "kind": "delay", "seconds": 4,
                                            "times": 1}], True),
    "commit lands, answer lost x1": ([{"method": "POST", "pattern": r"/commit/", "kind": "drop_after", "times": 1}], True),
    "commit 403": ([{"method": "POST", "pattern": r"/commit/", "status": 403, "times": 1}], False),
    "401 (token revoked)": ([], False),
    "commit 503 forever": ([{"method": "POST", "pattern": r"/commit/", "status": 503, "times": 1000}], False),
}


def env_for(work: Path, endpoint: str) -> dict[str, str]:
    data = work.parent / "data"
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUB_"))},
            "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HOME": str(work.parent / "hf"),
            "OUTPUT_REPO": REPO, "WORK_DIR": str(work), "INPUT_DATASET": str(data / "pretrain.jsonl"),
            "SHARD_SIZE": "200", "MAX_LENGTH": "64", "BATCH_SIZE": "8", "SHARD_STEPS": "2", "VAL_FRACTION": "0.1",
            "HUB_RETRY_WAIT": "0.2", "HUB_RETRIES": "4", "HUB_TIMEOUT": "2", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1"}


def trained_work(tmp: Path) -> Path:
    """WORK_DIR after prep + train of one tiny shard (the publish step's input)."""
    (tmp / "data").mkdir(parents=True)
    with (ROOT / "data" / "pretrain.jsonl").open() as f, (tmp / "data" / "pretrain.jsonl").open("w") as g:
        g.writelines(line for _, line in zip(range(400), f))
    work = tmp / "work"
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        env = env_for(work, hub.endpoint)
        for cmd in ([sys.executable, "prep.py"],
                    ["deepspeed", "--log_level", "error", "--num_gpus", "1", "--master_port", str(29700 + os.getpid() % 200),
                     "train.py"]):
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{cmd} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    finally:
        hub.stop()
    return work


def publish_case(work: Path, name: str, faults: list[dict]) -> dict:
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        injected = [hub.fail(**f) for f in faults]
        case_work = work.with_name(f"work-{re.sub(r'[^a-z0-9]+', '-', name.lower())}")
        shutil.copytree(work, case_work, dirs_exist_ok=True)
        env = env_for(case_work, hub.endpoint)
        if name.startswith("401"):
            env["HF_TOKEN"] = "hf_revoked"  # not a token this Hub knows
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "publish.py", "publish"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        retries = len(re.findall(r"^\[hub\] .*retry \d+ of", p.stdout, re.M))
        # the faults served before the rerun below clears them
        landed = hub.commits(REPO)
        record = json.loads(hub.repos[REPO].files["training_state.json"]) if landed else None
        rerun = None
        if p.returncode != 0:  # the fault gone, the same publish goes through
            hub.clear_faults()
            env["HF_TOKEN"] = TOKEN
            q = subprocess.run([sys.executable, "publish.py", "publish"], cwd=ROOT, env=env, capture_output=True, text=True)
            rerun = {"exit": q.returncode, "commits": len(hub.commits(REPO))}
        leaked = any(TOKEN in x for x in (p.stdout, p.stderr)) or any(
            TOKEN.encode() in b for r in hub.repos.values() for b in r.files.values())
        return {"case": name, "exit": p.returncode, "faults_served": sum(f.fired for f in injected),
                "retries_logged": retries, "commits": len(landed),
                "record_landed": record is not None and record.get("next") == {"inst": False, "init": 1},
                "seconds": round(seconds, 2), "rerun": rerun, "token_leaked": leaked,
                "error": (p.stderr.strip().splitlines() or [""])[-1][:300] if p.returncode else None}
    finally:
        hub.stop()


def main(argv: list[str] | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    try:
        work = trained_work(tmp)
        results = [publish_case(work, name, faults) for name, (faults, _) in CASES.items()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    expected = {name: ok for name, (_, ok) in CASES.items()}
    print(json.dumps({"bench": "hub_faults", "cases": results,
                      "all_as_expected": all((r["exit"] == 0 and r["commits"] == 1) == expected[r["case"]]
                                             and (r["rerun"] is None or r["rerun"] == {"exit": 0, "commits": 1})
                                             and not r["token_leaked"] for r in results)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
