"""Shared fixtures: an isolated environment per test (its own output, work dir and caches) and
helpers that run the real entry points as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (`make test` runs one worker per core, up to 4) the cores are shared out: each
# worker and every pipeline it starts computes on cores/workers threads. Two jobs each spinning
# all-cores thread pools on the same cores slow each other many times over (OpenMP waits spin).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
sys.path.append(str(ROOT / "bench"))  # after the project: bench/ has its own convert.py, model.py, status_page.py

from clean_env import free_port, head_jsonl  # noqa: E402,F401 - the benchmarks' helpers, shared by the tests
from config import known_names  # noqa: E402

# Every name a setting answers to (from config), and the libraries' own variables a run reads:
# a test starts from an environment without any of them.
SETTINGS_VARS = known_names() | {"HF_ENDPOINT", "HF_HUB_DISABLE_XET", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT",
                                 "WANDB_DIR", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


def make_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for one pipeline: tiny data, short runs, everything under tmp_path."""
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    data = tmp_path / "data"
    data.mkdir()
    base.update({
        "PATH": f"{Path(sys.executable).parent}:{base.get('PATH', '')}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "INPUT_DATASET": str(head_jsonl(ROOT / "data" / "pretrain.jsonl", data / "pretrain.jsonl", 400)),
        "INSTRUCT_DATASET": str(head_jsonl(ROOT / "data" / "instruct.jsonl", data / "instruct.jsonl", 160)),
        "SHARD_SIZE": "200",
        "MAX_LENGTH": "64",
        "BATCH_SIZE": "8",
        "SHARD_STEPS": "6",
        "VAL_FRACTION": "0.1",
        "OUTPUT_REPO": str(tmp_path / "out" / "llama"),
        "WORK_DIR": str(tmp_path / "work"),
        "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": "cpu",
        "PORT": str(free_port()),
    })
    return base


def run(args: list[str], env: dict[str, str], timeout: int = 600, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def tree_digest(root: Path) -> str:
    """Hash of every file's path and bytes under root ('' when it does not exist)."""
    if not root.exists():
        return ""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def record(target: str | Path) -> dict | None:
    p = Path(target) / "training_state.json"
    return json.loads(p.read_text()) if p.exists() else None


def start_trainer(env: dict[str, str], cmd: list[str] | None = None) -> subprocess.Popen:
    """./trainer.sh (or `cmd`) in its own process group, its output readable line by line."""
    return subprocess.Popen(cmd or ["./trainer.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    """Read `proc`'s output until a line contains `needle`; what was read."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-4000:]}")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for `proc`; its exit code and the rest of its output. Its process group is killed after."""
    try:
        rest = proc.communicate(timeout=timeout)[0]
        return proc.returncode, rest
    except subprocess.TimeoutExpired:
        return -999, "timed out"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def a_manifest(plan, **fields):
    """A manifest as prep writes one, for `plan`: every field stated; `fields` override."""
    from handoff import Manifest

    base = dict(run_id="run1", plan=plan, dataset="data/pretrain.jsonl", rows=10, documents=10, shards_total=2,
                tokens=1000, sequences=10, train_sequences=9, val_sequences=1, packed_chats=False, raw_bytes=4000,
                tokenize_seconds=0.1, architecture={}, parameters=5, train_format="float", source_format=None,
                prep_seconds=1.0, data_fingerprint="f" * 16)
    return Manifest(**{**base, **fields})


def shard_metrics(**fields):
    """A finished shard's metrics as train writes them: every required field stated; `fields` override
    or add."""
    from handoff import ShardMetrics

    base = dict(run_id="run1", steps=3, tokens=100, train_loss=2.0, eval_loss_before=7.0, eval_loss=1.5,
                perplexity=4.5, train_runtime_s=10.0, tokens_per_s=10.0, precision="fp32", world_size=1,
                train_format="float", trainable_parameters=5, gradient_checkpointing=False, first_step_s=1.0)
    return ShardMetrics(**{**base, **fields})


def call_main(main, argv: list[str], env: dict[str, str], monkeypatch, capsys) -> tuple[int, str, str]:
    """An entry point's `main(argv)` run in this process with `env` as its whole environment, as its
    command line runs it: the exit code, stdout and stderr. The datasets cache follows env's HF_HOME
    (the library reads the variable once, at import)."""
    import datasets

    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_HOME"]) / "datasets")
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err
