"""Are the dependencies installed, at the pinned versions, and do they work on this machine?

    python3 validate_setup.py [--json]

Each package of requirements.txt (plus torch and deepspeed) is imported and its version compared
with the pin; then functional checks run on the current accelerator (GPU if there is one, else
CPU): a 4-bit NF4 linear forward through bitsandbytes, a LoRA wrap through PEFT, a DeepSpeed
ZeRO-2 engine initialised and stepped once, a tiny BPE trained with tokenizers, and the `deepspeed`
launcher on PATH. Each check passes or fails with its fix; exit 1 on any failure.

A pass is remembered for this environment (the interpreter, its import path, every installed
distribution and its version, the accelerator devices and variables, the `deepspeed` launcher and
this script with its pins), under ~/.cache/train-llama: the next run in the same environment
reports that pass instead of spending ~7 s repeating it. Anything that changes re-runs the checks;
`--force` always does. Failures are never remembered.

STRICT_VERSIONS=false (environment) accepts other versions than the pins: each difference is
still listed, and the functional checks decide. For a machine with its own CUDA build of torch and
libraries (bench/gpu.sh), not for the image or `make setup`, which install the pins.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import redact

HERE = Path(__file__).resolve().parent
# bitsandbytes' warning about an optional CPU kernel package (see config.py); this script must not
# import config, whose own dependencies it checks.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"huggingface_hub": "huggingface_hub", "pydantic-settings": "pydantic_settings", "pyyaml": "yaml"}
EXTRA_PINS = ("torch", "deepspeed")  # pinned in constraints.txt: installed outside requirements.txt
# Installed with the rest, but only the settings named here use them (preflight's tracking section
# checks that the chosen one is there): missing, they are no failure of the setup.
OPTIONAL = {"trackio": "REPORT_TO=trackio", "wandb": "REPORT_TO=wandb"}


def _pinned(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def pins() -> dict[str, str]:
    extra = _pinned(HERE / "constraints.txt")
    return {**{name: extra[name] for name in EXTRA_PINS}, **_pinned(HERE / "requirements.txt")}


def strict_versions() -> bool:
    """STRICT_VERSIONS (default true): a version other than the pin fails the check."""
    return os.environ.get("STRICT_VERSIONS", "true").strip().lower() not in {"false", "0", "no"}


def check_package(dist: str, pinned: str) -> dict:
    fix = f"make setup (or: pip install {dist}=={pinned})"
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        if dist in OPTIONAL:
            return {"name": dist, "ok": True, "finding": f"not installed (only {OPTIONAL[dist]} needs it)", "fix": None}
        return {"name": dist, "ok": False, "finding": "not installed", "fix": fix}
    try:
        importlib.import_module(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    except Exception as e:  # noqa: BLE001 - any import failure makes the package unusable
        return {"name": dist, "ok": False, "finding": f"installed {version} but import fails: {type(e).__name__}: {e}", "fix": fix}
    # A local build label (+cpu, +cu128) is the same release.
    same = version.split("+")[0] == pinned
    if not same and not strict_versions():
        return {"name": dist, "ok": True, "finding": f"{version} (pinned {pinned}; accepted: STRICT_VERSIONS=false)", "fix": None}
    return {"name": dist, "ok": same, "finding": f"{version}" + ("" if same else f" (pinned {pinned})"), "fix": None if same else fix}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fn_bnb() -> str:
    """A bitsandbytes NF4 linear quantizes a weight and computes close to the float result."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    lin = lin.to(_device())
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=_device())
    err = float(((lin(x).float() - x.float() @ w.to(x.device).T).abs().max()) / (x.float() @ w.to(x.device).T).abs().max())
    if lin.weight.dtype != torch.uint8 or err > 0.2:
        raise RuntimeError(f"4-bit forward off by {err:.2f} relative (weight dtype {lin.weight.dtype})")
    return f"NF4 linear forward on {_device()}, relative error {err:.3f}"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32))


def fn_peft() -> str:
    """PEFT wraps a Llama with LoRA adapters and only they train."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not 0 < trainable < sum(p.numel() for p in model.parameters()) / 2:
        raise RuntimeError(f"unexpected trainable parameter count {trainable}")
    return f"LoRA wrap: {trainable} trainable parameters"


def fn_deepspeed() -> str:
    """A DeepSpeed ZeRO-2 engine starts on this accelerator (one local rank) and takes a step."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from jit_ops import load_comm_op, single_rank_env

    # Before DeepSpeed starts its comm backend, which would build the op under torch's bare lock.
    built = load_comm_op(lambda m: print(f"[validate] {m}", flush=True))
    if not dist.is_initialized():
        for k, v in single_rank_env().items():
            os.environ.setdefault(k, v)
        deepspeed.init_distributed(verbose=False)
    model = _tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
    x = torch.randint(0, 128, (1, 8), device=engine.device)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return f"ZeRO-2 engine on {engine.device} ({deepspeed.get_accelerator().communication_backend_name()}; {built}), one step"


def fn_tokenizers() -> str:
    """tokenizers trains a byte-level BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the cat sat on the mat"] * 50,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return f"byte-level BPE trained, {tok.get_vocab_size()} tokens"


FUNCTIONAL: list[tuple[str, Callable[[], str], str]] = [
    ("bitsandbytes 4-bit", fn_bnb, "reinstall bitsandbytes (make setup); on GPU check the CUDA driver matches torch"),
    ("peft LoRA", fn_peft, "reinstall peft (make setup)"),
    ("deepspeed engine", fn_deepspeed, "reinstall deepspeed against the installed torch (make setup); on CPU set DS_ACCELERATOR=cpu"),
    ("tokenizers BPE", fn_tokenizers, "reinstall tokenizers (make setup)"),
]


def run_checks() -> list[dict]:
    results = [check_package(d, v) for d, v in pins().items()]
    broken = {r["name"] for r in results if not r["ok"] and r["finding"] == "not installed" or "import fails" in r["finding"]}
    for name, fn, fix in FUNCTIONAL:
        if name.split()[0] in broken:
            results.append({"name": name, "ok": False, "finding": "skipped: the package does not import", "fix": fix})
            continue
        t = time.perf_counter()
        try:
            finding = fn()
            results.append({"name": name, "ok": True, "finding": f"{finding} ({time.perf_counter() - t:.1f} s)", "fix": None})
        except Exception as e:  # noqa: BLE001 - a check reports any failure with its fix
            results.append({"name": name, "ok": False, "finding": f"{type(e).__name__}: {str(e)[:300]}", "fix": fix})
    launcher = shutil.which("deepspeed")
    results.append({"name": "deepspeed launcher", "ok": launcher is not None, "finding": launcher or "not on PATH",
                    "fix": None if launcher else "activate the environment (. .venv/bin/activate) or make setup"})
    return results


def environment_fingerprint() -> str:
    """What the checks' outcome depends on, hashed; cheap (no torch import)."""
    dists = sorted(f"{d.metadata['Name']}=={d.version}@{getattr(d, '_path', '')}" for d in md.distributions())
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia*"))
    parts = [os.path.realpath(sys.executable), sys.version, *sys.path, *dists, *devices,
             *(f"{k}={os.environ.get(k, '')}" for k in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH",
                                                       "STRICT_VERSIONS")),
             str(shutil.which("deepspeed")), Path(__file__).read_text(), (HERE / "requirements.txt").read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_file(fingerprint: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "train-llama" / "validated" / f"{fingerprint}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="validate_setup.py", description="Check the installed dependencies.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--force", action="store_true", help="run every check even if this environment passed before")
    args = ap.parse_args(argv)
    redact.install()
    cache = cache_file(environment_fingerprint())
    cached = None
    if not args.force and cache.exists():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None
    results = cached["checks"] if cached else run_checks()
    ok = all(r["ok"] for r in results)
    if cached:
        msg = (f"validate_setup: this environment passed all {len(results)} checks at {cached['at']} and has not "
               "changed since (--force runs them again)")
        print(json.dumps({"ok": ok, "cached": True, "checks": results}) if args.json else msg)
        return 0
    if ok:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            staged = cache.with_suffix(f".tmp{os.getpid()}")
            staged.write_text(json.dumps({"at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "checks": results}))
            staged.replace(cache)
        except OSError:
            pass  # a read-only home only costs the next run the checks
    if args.json:
        print(json.dumps({"ok": ok, "checks": results}))
    else:
        for r in results:
            if (r["name"] in {n for n, _, _ in FUNCTIONAL} or not r["ok"] or "accepted: STRICT_VERSIONS" in r["finding"]
                    or "not installed" in r["finding"]):
                print(f"[{'ok' if r['ok'] else 'FAIL'}] {r['name']}: {r['finding']}" + ("" if r["ok"] else f"\n       - fix: {r['fix']}"))
        bad = sum(not r["ok"] for r in results)
        print(f"validate_setup: {len(results) - bad}/{len(results)} checks passed (package versions included)"
              + ("" if ok else "; fix the failures above"))
    if not ok:
        import status_page

        status_page.emit("failure", phase="validate setup", message="\n".join(
            f"[FAIL] {r['name']}: {r['finding']} - fix: {r['fix']}" for r in results if not r["ok"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
