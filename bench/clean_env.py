"""Environments for benchmarks that run ./trainer.sh, without the test suite (pytest is not in the
image): none of the caller's settings, everything under one folder, a free port for the page."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings_vars() -> set[str]:
    """The settings' environment names: a benchmark starts from none of the caller's."""
    sys.path.insert(0, str(ROOT))
    from config import known_names

    return known_names() | {"MAX_RUNS", "CONFIG_FILE"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_count() -> int:
    """NVIDIA GPUs that nvidia-smi lists (0 without the tool or a driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU") for line in out.splitlines())


def machine_precision(asked: str = "auto") -> str:
    """The precision a run trains in on this machine when PRECISION=`asked` (auto: bf16 on a GPU or a
    CPU with bf16 units, fp16 on an older GPU, fp32 on a CPU without: emulated bf16 is many times
    slower and no run would use it). Benchmarks measure what a run here would do."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from config import resolve_precision

    return resolve_precision(SimpleNamespace(precision=asked))


def head_jsonl(src: Path, dst: Path, n: int) -> Path:
    with src.open() as f, dst.open("w") as g:
        for _, line in zip(range(n), f):
            g.write(line)
    return dst


def pipeline_env(root: Path, tiny: bool, cpu: bool) -> dict[str, str]:
    """Output, work dir, HF home and port under `root`; with `tiny`, the embedded data cut to 400
    pretraining and 160 instruct rows in shards of 200, sequences of 64, 3 steps per shard; with
    `cpu`, DeepSpeed's CPU accelerator."""
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in settings_vars()}
    env.update({"OUTPUT_REPO": str(root / "out" / "llama"), "WORK_DIR": str(root / "work"), "HF_HOME": str(root / "hf"),
                "HF_HUB_OFFLINE": "1", "PORT": str(free_port()), "PYTHONUNBUFFERED": "1", "KEEP_SERVING": "false",
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    if tiny:
        data = root / "data"
        data.mkdir(exist_ok=True)
        env.update({"INPUT_DATASET": str(head_jsonl(ROOT / "data" / "pretrain.jsonl", data / "pretrain.jsonl", 400)),
                    "INSTRUCT_DATASET": str(head_jsonl(ROOT / "data" / "instruct.jsonl", data / "instruct.jsonl", 160)),
                    "SHARD_SIZE": "200", "MAX_LENGTH": "64", "BATCH_SIZE": "8", "SHARD_STEPS": "3", "VAL_FRACTION": "0.1"})
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env
