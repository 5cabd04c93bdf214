"""Will this run work? Checks that take seconds, before anything heavy.

    python3 preflight.py [--json]

Sections: settings (every problem at once), run state (what this run will do, and that the model it
continues from is there), data (the dataset of this stage readable, with the expected columns and
row format), output (writable), tracking (REPORT_TO's libraries installed, where the metrics go),
hardware (GPUs with memory and bf16, CPU features, RAM), memory (the estimated peak of this run
against the memory it has, and what would make it fit), disk
(what the run writes against the free space). Exit 0 when the run can go, 2 when an input must be
fixed. Loads no weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import redact
from architecture import count_parameters
from config import Settings, architecture, cpu_has_bf16, load_settings
from errors import EXIT_BAD_INPUT, BadInput
from architecture import llama_config
from hub import HubError
from run_state import RunPlan, plan_run
from targets import access_problems, fetch, open_target, outputs, writable_problems


@dataclass
class Check:
    section: str
    ok: bool
    finding: str
    fixes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    # A failure of the world (the Hub did not answer), not of the input: exit 1, not 2, when it is
    # the only kind of failure (retrying later can succeed; changing the input is not the fix).
    outage: bool = False


def check_settings() -> tuple[Settings | None, Check]:
    try:
        s = load_settings()
    except BadInput as e:
        return None, Check("settings", False, f"{len(e.problems)} problem(s) in the settings", e.problems)
    arch = architecture(s)
    return s, Check("settings", True, f"valid; model {count_parameters(arch):,} parameters "
                    f"(d={arch['hidden_size']}, {arch['num_hidden_layers']} layers, vocabulary {arch['vocab_size']}; "
                    "a new tokenizer may end smaller on a small corpus)", data={"architecture": arch})


def check_plan(s: Settings, plan: RunPlan) -> Check:
    """The plan from the record (read and checked against its schema by plan_run) and, for a local
    output, the checkpoint it resumes from (a Hub checkpoint is checked by prep, once downloaded)."""
    from run_state import validate_checkpoint

    target = open_target(plan.target, s)
    if plan.resume and target.local_dir is not None:
        validate_checkpoint(target.materialize(Path(s.work_dir)) / "last-checkpoint", int(plan.resume["step"]),
                            f"{plan.target}/last-checkpoint")
    return Check("run state", True, plan.describe(), data={"plan": plan.to_json()})


def check_data(s: Settings, plan: RunPlan) -> Check:
    """The dataset of this run's stage: readable, non-empty, expected columns, first rows well formed."""
    import datasets

    from tokenizer import to_messages
    from sources import Corpus, parse_sources, shard_bounds

    datasets.disable_progress_bars()

    var, spec = ("INSTRUCT_DATASET", s.instruct_dataset) if plan.inst else ("INPUT_DATASET", s.input_dataset)
    if plan.done:
        return Check("data", True, "nothing to read: the pipeline is done")
    corpus = Corpus(parse_sources(spec, var), var, s.text_column, s.dataset_split,
                    s.hf_token.get_secret_value() if s.hf_token else None, s.seed)
    start, _, shards = shard_bounds(len(corpus), plan.shard, s.shard_size, var)
    head = min(start + 50, len(corpus))
    if plan.inst:
        rows, which = corpus.records(start, head)
        for i, (row, w) in enumerate(zip(rows, which)):
            to_messages(row, corpus.where(start + i, w))
    else:
        corpus.texts(start, head)
    return Check("data", True, f"{var}={corpus.describe()}, {shards} shard(s) of {s.shard_size}; "
                 f"shard {plan.shard} starts well formed",
                 data={"rows": len(corpus), "shards": shards})


def check_output(s: Settings) -> Check:
    """The output location writable: local directories, or on the Hub the token valid, not read-only,
    and allowed to write OUTPUT_REPO and OUTPUT_REPO-it (and, in a Space, the Space's variables)."""
    from output_lock import probe

    holder = probe(s)
    if holder is not None:
        return Check("output", False, "in use by another run",
                     [f"{s.output_repo} / WORK_DIR {s.work_dir} are held by {holder}. One run writes an output at a time: "
                      "wait for it to finish or stop it, or give this run its own OUTPUT_REPO and WORK_DIR."])
    out, out_it = outputs(s)
    problems = writable_problems(Path(s.work_dir).resolve()) + access_problems([out, out_it], s)
    if problems:
        return Check("output", False, "cannot publish there", problems)
    if out.local_dir is not None:
        where = f"{out.where} (instruct: {out_it.where})"
    else:
        where = f"Hub repos {out.spec} and {out_it.spec} ({'private' if s.private else 'public'} when created)"
    return Check("output", True, f"writable: {where}" + (f"; Space {s.space_id} variables writable" if s.space_id else ""))


def check_tracking(s: Settings) -> Check:
    """REPORT_TO: each tracker's library installed, and where its metrics will go."""
    import importlib.util

    if not s.trackers:
        return Check("tracking", True, "REPORT_TO=none: metrics only in the log and the record's history")
    missing = [t for t in s.trackers if importlib.util.find_spec(t) is None]
    if missing:
        return Check("tracking", False, f"REPORT_TO names {', '.join(missing)}, not installed", [
            f"REPORT_TO={s.report_to}: the {t} package is missing. Fix: install requirements.txt (it pins {t}), or drop "
            f"{t} from REPORT_TO." for t in missing])
    where = []
    for t in s.trackers:
        if t == "tensorboard":
            where.append("tensorboard: runs/ in the published output (the Hub's metrics tab)")
        elif t == "trackio":
            space = os.environ.get("TRACKIO_SPACE_ID")
            local = os.environ.get("TRACKIO_DIR") or str(Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"),
                                                              "trackio"))
            where.append(f"trackio: Space {space}" if space else f"trackio: local, {local} (view: trackio show)")
        else:
            key = bool(os.environ.get("WANDB_API_KEY"))
            mode = os.environ.get("WANDB_MODE") or ("online" if key else "offline")
            where.append(f"wandb: {mode}" + (f", {Path(os.environ.get('WANDB_DIR') or s.work_dir) / 'wandb'} "
                                             "(upload later: wandb sync)" if mode == "offline" else ""))
    return Check("tracking", True, f"project {s.tracker_project()!r}; " + "; ".join(where))


def check_hardware(s: Settings) -> Check:
    import psutil

    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    features = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_bf16(), "cpu_features": features,
                            "ram_bytes": psutil.virtual_memory().total,
                            "ram_available_bytes": psutil.virtual_memory().available}
    gpus = []
    try:
        import torch

        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": p.total_memory, "bf16": p.major >= 8})
    except ImportError:
        pass
    info["gpus"] = gpus
    where = (", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB{', bf16' if g['bf16'] else ''})" for g in gpus)
             if gpus else f"CPU only, {info['cpu_count']} cores ({' '.join(features) or 'no AVX2'}"
             f"{'; bf16 is fast' if info['cpu_bf16'] else '; no bf16 units: fp32'})")
    return Check("hardware", True, f"{where}; RAM {info['ram_available_bytes'] / 2**30:.1f} of "
                 f"{info['ram_bytes'] / 2**30:.1f} GiB free", data=info)


def check_start(s: Settings, plan: RunPlan) -> Check:
    """What the first run starts from when it is not built here: BASE_MODEL's config.json (a Llama),
    weights and tokenizer, and TOKENIZER's files. Its architecture replaces the settings' shape."""
    from architecture import arch_from_config

    found, data = [], {}
    if s.base_model:
        src = fetch("BASE_MODEL", s.base_model, s, ["config.json", "model.safetensors.index.json"])
        cfg = llama_config("BASE_MODEL", s.base_model, src)
        local = open_target(s.base_model, s).local_dir is not None  # a Hub repo's weights are checked when downloaded
        if local and not ((src / "model.safetensors").exists() or (src / "model.safetensors.index.json").exists()):
            raise BadInput([f"BASE_MODEL={s.base_model!r}: no model.safetensors (or its index). Fix: save the model with "
                            "safetensors (save_pretrained does by default)."])
        data["architecture"] = arch = arch_from_config(cfg)
        found.append(f"BASE_MODEL {s.base_model}: a Llama of {count_parameters(arch):,} parameters "
                     f"(d={arch['hidden_size']}, {arch['num_hidden_layers']} layers, vocabulary {arch['vocab_size']})")
    tok_var, tok_spec = ("TOKENIZER", s.tokenizer) if s.tokenizer else ("BASE_MODEL", s.base_model)
    if tok_spec and open_target(tok_spec, s).local_dir is not None:
        if not any((fetch(tok_var, tok_spec, s, []) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise BadInput([f"{tok_var}={tok_spec!r}: no tokenizer there (tokenizer.json, tokenizer.model or vocab.json). "
                            "Fix: save the tokenizer beside it (tokenizer.save_pretrained), or set TOKENIZER."])
        found.append(f"tokenizer from {tok_spec}")
    elif tok_spec:
        found.append(f"tokenizer from the Hub repo {tok_spec} (checked when downloaded)")
    return Check("starting point", True, "; ".join(found), data=data)


def check_memory(s: Settings, plan: RunPlan, arch: dict[str, Any] | None = None) -> Check:
    """The estimated peak of this run (mem_estimate.py) against the memory it will have."""
    import mem_estimate as me
    from config import resolve_precision

    arch, nf4 = arch or architecture(s), plan.train_format(s.use_quant) == "nf4"
    if plan.done:
        return Check("memory", True, "nothing to train: the pipeline is done")
    available, gpu, gpus = me.available_memory()
    world = me.world_size(s, gpus)
    precision = resolve_precision(s)
    p = me.plan(s, arch, precision, nf4=nf4, world=world, gpu=gpu, gpus=gpus, available=available,
                first_run=plan.source is None)
    est = p["estimate"]
    where = f"per GPU ({gpus} GPU(s), {world} rank(s))" if gpu else f"RAM ({world} rank(s) on CPU)"
    data = {"estimated_peak_bytes": est.peak_bytes, "available_bytes": available, "budget_bytes": p["budget_bytes"],
            "fits": p["fits"], "gradient_checkpointing": p["checkpointing"], "precision": precision,
            "train_format": "nf4" if nf4 else "float", **est.as_dict(), "suggestions": p["suggestions"]}
    mode = (f"{'NF4 + LoRA r=' + str(s.lora_r) if nf4 else 'every weight'}, {precision}, batch {s.batch_size} x "
            f"{s.max_length}, gradient checkpointing {'on' if p['checkpointing'] else 'off'}")
    finding = (f"{mode}: needs about {me.gib(est.peak_bytes)} {where} of {me.gib(available)} free "
               f"(weights {me.gib(est.per_rank['weights'])}, optimizer {me.gib(est.per_rank['optimizer_states'])}, "
               f"activations {me.gib(est.per_rank['activations'])}, runtime {me.gib(est.runtime_bytes)})")
    if p["fits"]:
        return Check("memory", True, finding, data=data)
    fixes = [f"{o['change']}: about {me.gib(o['estimated_peak_bytes'])}{'' if o['fits'] else ' (still too much)'}"
             for o in p["suggestions"]]
    if not any(o["fits"] for o in p["suggestions"]):
        fixes.append("a smaller model (smaller TARGET_PARAMETERS / MODEL_SIZE), a shorter MAX_LENGTH, or more memory")
    if plan.source is None:
        fixes.append("USE_QUANT (NF4 + LoRA) applies from the second run on: the run that creates the model trains every weight.")
    return Check("memory", False, "will not fit: " + finding, fixes, data=data)


def _size_of(spec: str) -> int | None:
    p = Path(spec).expanduser()
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None  # a Hub dataset: its size is not known before it is downloaded


def disk_needed(s: Settings, plan: RunPlan, rows: int | None, arch: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes this run writes: the datasets cache (a local file is converted to Arrow once), the
    prepared shard (token ids as int32 plus labels, ~2 tokens per 4 bytes of text), the models (the
    prepared copy, the trained one, the published one and the previous publish kept until the new
    one is in place) and the full-state checkpoint (weights, fp32 master, AdamW moments): two of them
    with periodic checkpoints (the next is written before the last is removed)."""

    n = count_parameters(arch or architecture(s))
    nf4 = plan.train_format(s.use_quant) == "nf4"
    from sources import parse_sources

    var, spec = ("INSTRUCT_DATASET", s.instruct_dataset) if plan.inst else ("INPUT_DATASET", s.input_dataset)
    raw = sum(_size_of(src.path) or 0 for src in parse_sources(spec, var))
    shard = raw * min(1.0, s.shard_size / rows) if rows else raw
    model = 2 * n
    trainable = int(n * 0.05) if nf4 else n
    return {"dataset_cache": int(raw * 1.5), "prepared_data": int(shard * 2.5),
            "models": (4 * n if plan.source is None else model) + 3 * model,
            "checkpoint": ((int(n * 0.6) if nf4 else model) + 12 * trainable) * (1 if s.save_interval == 0 else 2)}


def check_disk(s: Settings, plan: RunPlan, rows: int | None = None, arch: dict[str, Any] | None = None) -> Check:
    import mem_estimate as me

    need = disk_needed(s, plan, rows, arch)
    total = sum(need.values())
    dirs = {Path(s.work_dir).resolve(), Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).resolve()}
    out = open_target(s.output_repo, s).local_dir
    if out is not None:
        dirs.add(out)
    frees = {}
    for d in dirs:
        existing = next(q for q in [d, *d.parents] if q.exists())
        frees[str(d)] = shutil.disk_usage(existing).free
    free = min(frees.values())
    data = {"needed_bytes": total, "free_bytes": free, "needed": need, "free_by_path": frees}
    parts = ", ".join(f"{k.replace('_', ' ')} {me.gib(v)}" for k, v in need.items())
    if total * 1.1 > free:
        low = min(frees, key=frees.get)
        return Check("disk", False, f"needs about {me.gib(total)} ({parts}), {me.gib(free)} free at {low}",
                     [f"Free space at {low}, or point WORK_DIR / HF_HOME / OUTPUT_REPO to a larger disk "
                      "(a persistent /data volume on a Space)."], data)
    return Check("disk", True, f"needs about {me.gib(total)} ({parts}); {me.gib(free)} free", data=data)


def run_checks() -> list[Check]:
    s, first = check_settings()
    checks = [first]
    if s is None:
        return checks

    # The plan is read once (from the Hub, several requests); the checks that need it fail with its
    # problem when it cannot be made.
    try:
        plan, plan_error = plan_run(s), None
    except (BadInput, HubError) as e:
        plan, plan_error = None, e

    def planned(fn: Callable[..., Check], *args) -> Callable[[], Check]:
        def check() -> Check:
            if plan_error is not None:
                raise plan_error
            return fn(s, plan, *args)
        return check

    def guarded(section: str, fn: Callable[[], Check]) -> Check:
        try:
            check = fn()
        except BadInput as e:
            check = Check(section, False, e.problems[0].split(":")[0] + ": cannot be used", e.problems)
        except HubError as e:
            check = Check(section, False, "the Hub did not answer", [str(e)], outage=True)
        checks.append(check)
        return check

    guarded("run state", planned(check_plan))
    data = guarded("data", planned(check_data))
    guarded("output", lambda: check_output(s))
    guarded("tracking", lambda: check_tracking(s))
    guarded("hardware", lambda: check_hardware(s))
    arch = None
    if (s.base_model or s.tokenizer) and plan is not None and plan.source is None:
        arch = guarded("starting point", planned(check_start)).data.get("architecture")
    guarded("memory", planned(check_memory, arch))
    guarded("disk", planned(check_disk, data.data.get("rows"), arch))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="preflight.py", description="Check that a run will work, in seconds.")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args(argv)
    redact.install()
    t0 = time.perf_counter()
    checks = run_checks()
    ok = all(c.ok for c in checks)
    if args.json:
        memory = next((c.data for c in checks if c.section == "memory"), {})
        print(json.dumps({"ok": ok, "seconds": round(time.perf_counter() - t0, 2), "memory": memory,
                          "checks": [asdict(c) for c in checks]}, default=str))
    else:
        for c in checks:
            print(f"[{'ok' if c.ok else 'FAIL'}] {c.section}: {c.finding}")
            for fix in c.fixes:
                print(f"       - {fix}")
        print(f"preflight: {'the run can go' if ok else 'fix the problems above first'} ({time.perf_counter() - t0:.1f} s)")
    if not ok:  # the status page shows what the log shows
        import status_page

        status_page.emit("failure", phase="preflight", message="\n".join(
            f"[FAIL] {c.section}: {c.finding}" + "".join(f"\n  - {fix}" for fix in c.fixes) for c in checks if not c.ok))
    if ok:
        return 0
    return 1 if all(c.outage for c in checks if not c.ok) else EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
