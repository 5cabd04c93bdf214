"""The preflight memory estimate (mem_estimate.py) against measured training runs on this machine.

    python bench/memory.py [--sizes 20M,60M,120M] [--batch 4] [--seq 256] [--steps 3] [--checkpointing off,on]

For each model size (a parameter count, or a preset name such as 1B) x {full training, NF4 base +
LoRA} x gradient checkpointing, in the precision a run uses on this machine (--precision; auto:
bf16 on a GPU or a CPU with bf16 units, fp32 on a CPU without), one process runs train.py's own
`fit` (TRL + DeepSpeed ZeRO-2, validation before and after, the LoRA merge, the final save) on a prepared directory with a
fresh model of that size. Measured on CPU: the process's peak resident memory (VmHWM) minus its
resident memory once the libraries are imported (what `training_bytes` of the estimate stands for),
and the whole process's peak beside the estimate with the runtime included. On a GPU: the peak GPU
memory the run reserved (torch's allocator) for the training figure, and that plus the CUDA
context (the device's used memory beyond what torch reserved) for the whole. Prints one JSON line
with `cases`, `table` and `max_abs_rel_error` (over the training figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def process_gpu_bytes() -> int | None:
    """GPU memory the driver counts for this process (NVML), or None where it cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid() and p.usedGpuMemory:
                return int(p.usedGpuMemory)
    except Exception:  # noqa: BLE001 - no NVML, another PID namespace: no figure
        return None
    return None


def make_model(target: str, seq: int, out: Path, precision: str) -> dict:
    """A fresh Llama of about `target` parameters (the pipeline's own shape rule) saved in `out`, and
    its NF4 conversion for a run of `precision` in `out`-nf4."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from architecture import PRESETS
    from config import architecture, load_settings
    from quant_utils import convert

    transformers.utils.logging.disable_progress_bar()

    size = {"MODEL_SIZE": target} if target in PRESETS else {"TARGET_PARAMETERS": target}
    arch = architecture(load_settings({**size, "MAX_LENGTH": str(seq)}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**arch)).save_pretrained(out)
    convert(out, out.with_name(out.name + "-nf4"), "nf4", precision)
    return arch


def measure(case: str, model_dir: str, batch: int, seq: int, steps: int, checkpointing: bool, precision: str) -> dict:
    """Runs in its own process: train.fit on a prepared directory holding the model; peak memory."""
    import torch

    cuda = torch.cuda.is_available()
    from jit_ops import single_rank_env

    for k, v in {**single_rank_env(), **({} if cuda else {"DS_ACCELERATOR": "cpu"})}.items():
        os.environ.setdefault(k, v)
    import contextlib
    import io

    import bitsandbytes  # noqa: F401 - imported before the baseline: the libraries are the runtime
    import datasets
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers
    import trl  # noqa: F401

    import train
    from architecture import count_parameters
    from config import load_settings
    from handoff import MANIFEST_FILE, Manifest
    from prep import to_dataset
    from run_state import RunPlan
    from tokenizer import train_tokenizer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix=f"mem-{case}-"))
    prepared = work / "prepared"
    src = Path(model_dir) if case == "full" else Path(model_dir + "-nf4")
    shutil.copytree(src, prepared / "model")
    arch = json.loads((prepared / "model" / "config.json").read_text())
    tok = train_tokenizer(["a small corpus for the tokenizer of the memory benchmark"] * 20, 300, 256)
    tok.save_pretrained(prepared / "tokenizer")
    torch.manual_seed(0)
    n_train, n_val = batch * steps, batch
    rows = torch.randint(0, arch["vocab_size"], (n_train + n_val, seq)).tolist()
    to_dataset(rows[:n_train]).save_to_disk(prepared / "train")
    to_dataset(rows[n_train:]).save_to_disk(prepared / "val")
    Manifest.outside_prep(run_id="bench-memory", plan=RunPlan("pretrain", 0, str(work / "out"), None),
                          architecture=arch, parameters=count_parameters(arch),
                          train_format="float" if case == "full" else "nf4", train_sequences=n_train,
                          val_sequences=n_val, tokens=(n_train + n_val) * seq).write(prepared / MANIFEST_FILE)
    # Training's peak alone: no evaluations during training, no periodic checkpoint.
    s = load_settings({"BATCH_SIZE": str(batch), "MAX_LENGTH": str(seq), "SHARD_STEPS": str(steps), "TIME_BUDGET": "10h",
                       "EVAL_INTERVAL": "0", "SAVE_INTERVAL": "0",
                       "GRADIENT_CHECKPOINTING": "true" if checkpointing else "false", "WORK_DIR": str(work),
                       "USE_QUANT": "false" if case == "full" else "true", "PRECISION": precision})
    before = rss_kib("VmRSS")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train.fit(s, work)
    peak = rss_kib("VmHWM")
    shutil.rmtree(work, ignore_errors=True)
    if rc != 0:
        raise RuntimeError(f"train.fit exited {rc}")
    if cuda:
        used = process_gpu_bytes()  # this process's use of the GPU, as the driver counts it
        if used is None:  # no per-process figure: the device's (this process alone on it)
            free, total = torch.cuda.mem_get_info()
            used = total - free
        context = max(0, used - torch.cuda.memory_reserved())  # what torch's allocator does not hold
        reserved = torch.cuda.max_memory_reserved()
        return {"gpu": torch.cuda.get_device_name(0), "peak_reserved_bytes": reserved,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(), "cuda_context_bytes": context,
                "training_peak_bytes": reserved, "process_peak_bytes": reserved + context, "host_peak_kib": peak}
    return {"runtime_kib": before, "peak_kib": peak, "training_peak_bytes": (peak - before) * 1024,
            "process_peak_bytes": peak * 1024}


def run_case(case: str, model_dir: Path, batch: int, seq: int, steps: int, checkpointing: bool, precision: str) -> dict:
    """`measure` in a fresh process (so that each peak is its own)."""
    p = subprocess.run([sys.executable, __file__, "--measure", case, str(model_dir), str(batch), str(seq), str(steps),
                        "on" if checkpointing else "off", precision], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20M,60M,120M", help="model sizes (parameter counts), comma-separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run: off, on or both")
    ap.add_argument("--precision", default="auto", help="bf16 | fp16 | fp32 | auto (what a run uses on this machine)")
    ap.add_argument("--measure", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make:
        target, seq, out, precision = args.make
        print(json.dumps(make_model(target, int(seq), Path(out), precision)))
        return 0
    if args.measure:
        case, model_dir, batch, seq, steps, ckpt, precision = args.measure
        print(json.dumps(measure(case, model_dir, int(batch), int(seq), int(steps), ckpt == "on", precision)))
        return 0
    from clean_env import machine_precision

    precision = machine_precision(args.precision)

    import torch

    from architecture import count_parameters
    from mem_estimate import estimate

    gpu = torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cases, table = [], []
    for size in args.sizes.split(","):
        # In its own process: the NF4 conversion runs on the GPU, whose memory this one must not hold.
        made = subprocess.run([sys.executable, __file__, "--make", size, str(args.seq), str(work / size), precision],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"building the {size} model failed:\n{made.stderr[-4000:]}")
        arch = json.loads(made.stdout.strip().splitlines()[-1])
        n = count_parameters(arch)
        for case in ("full", "nf4"):
            for ckpt in args.checkpointing.split(","):
                on = ckpt == "on"
                est = estimate(arch, precision=precision, batch=args.batch, seq=args.seq, checkpointing=on, nf4=case == "nf4", gpu=gpu)
                got = run_case(case, work / size, args.batch, args.seq, args.steps, on, precision)
                err = est.training_bytes / got["training_peak_bytes"] - 1
                cases.append({"size": size, "parameters": n, "mode": f"{precision} full" if case == "full" else "NF4+LoRA",
                              "checkpointing": on, "measured": got, "estimate": est.as_dict(), "rel_error": round(err, 4),
                              "process_rel_error": round((est.training_bytes + est.runtime_bytes) / got["process_peak_bytes"] - 1, 4)})
                table.append(f"{size:>6} {n / 1e6:6.1f}M {cases[-1]['mode']:<9} ckpt {ckpt:<3} "
                             f"measured {got['training_peak_bytes'] / 2**20:7.0f} MiB  estimated {est.training_bytes / 2**20:7.0f} MiB  "
                             f"{err * 100:+6.1f}%")
                print(table[-1], file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "memory", "cases": cases, "table": table,
                      "max_abs_rel_error": round(max(abs(c["rel_error"]) for c in cases), 4),
                      "max_abs_process_rel_error": round(max(abs(c["process_rel_error"]) for c in cases), 4),
                      "batch": args.batch, "seq": args.seq, "steps": args.steps, "precision": precision,
                      "machine": {"cpu": platform.machine(), "cores": os.cpu_count(),
                                  "gpu": torch.cuda.get_device_name(0) if gpu else None}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
