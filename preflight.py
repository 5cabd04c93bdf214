"""Will this run work? Checks that take seconds, before anything heavy.

    python3 preflight.py [--json]

Sections: settings (every problem at once), run state (what this run will do, and that the model it
continues from is there), data (the dataset of this stage readable, with the expected columns and
row format), output (writable), hardware (GPU/CPU, bf16, memory, disk). Exit 0 when the run can go,
2 when an input must be fixed. Loads no weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from config import EXIT_BAD_INPUT, BadInput, Settings, architecture, count_parameters, cpu_has_bf16, is_local_target, load_settings, local_path


@dataclass
class Check:
    section: str
    ok: bool
    finding: str
    fixes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def check_settings() -> tuple[Settings | None, Check]:
    try:
        s = load_settings()
    except BadInput as e:
        return None, Check("settings", False, f"{len(e.problems)} problem(s) in the settings", e.problems)
    arch = architecture(s)
    return s, Check("settings", True, f"valid; model {count_parameters(arch):,} parameters "
                    f"(d={arch['hidden_size']}, {arch['num_hidden_layers']} layers, vocabulary {arch['vocab_size']}; "
                    "a new tokenizer may end smaller on a small corpus)", data={"architecture": arch})


def check_plan(s: Settings) -> Check:
    from util import plan_run

    plan = plan_run(s)
    return Check("run state", True, plan.describe(), data={"plan": asdict(plan)})


def check_data(s: Settings) -> Check:
    """The dataset of this run's stage: readable, non-empty, expected columns, first rows well formed."""
    import datasets

    from prep import load_rows, pretrain_texts, shard_bounds, to_messages
    from util import plan_run

    datasets.disable_progress_bars()

    plan = plan_run(s)
    var, spec = ("INSTRUCT_DATASET", s.instruct_dataset) if plan.inst else ("INPUT_DATASET", s.input_dataset)
    if plan.done:
        return Check("data", True, "nothing to read: the pipeline is done")
    ds = load_rows(spec, var, s.dataset_split, s.hf_token.get_secret_value() if s.hf_token else None)
    start, _, shards = shard_bounds(len(ds), plan.shard, s.shard_size, var)
    head = ds.select(range(start, min(start + 50, len(ds))))
    if plan.inst:
        for i, row in enumerate(head):
            to_messages(row, f"{var} row {start + i}")
    else:
        pretrain_texts(head, s.text_column, var)
    return Check("data", True, f"{var}={spec}: {len(ds)} rows, {shards} shard(s) of {s.shard_size}; "
                 f"shard {plan.shard} starts well formed",
                 data={"rows": len(ds), "shards": shards})


def check_output(s: Settings) -> Check:
    if not is_local_target(s.output_repo):
        return Check("output", False, f"OUTPUT_REPO={s.output_repo}: Hub publishing is not available in this version",
                     ["Use a local OUTPUT_REPO such as ./output/llama."])
    problems = []
    for target in (s.output_repo, f"{s.output_repo}-it", s.work_dir):
        p = local_path(target) if target != s.work_dir else Path(target).resolve()
        parent = next(q for q in [p, *p.parents] if q.exists())
        if not os.access(parent, os.W_OK):
            problems.append(f"{p}: not writable (nearest existing directory {parent}). Fix: choose a writable OUTPUT_REPO / WORK_DIR.")
    if problems:
        return Check("output", False, "output location not writable", problems)
    return Check("output", True, f"writable: {local_path(s.output_repo)} (instruct: {local_path(s.output_repo)}-it)")


def check_hardware(s: Settings) -> Check:
    import psutil

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
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
    disk = shutil.disk_usage(next(q for q in [Path(s.work_dir).resolve(), *Path(s.work_dir).resolve().parents] if q.exists()))
    info["disk_free_bytes"] = disk.free
    where = (", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB{', bf16' if g['bf16'] else ''})" for g in gpus)
             if gpus else f"CPU only, {info['cpu_count']} cores{' with bf16 (AMX/AVX512-bf16)' if info['cpu_bf16'] else ''}")
    return Check("hardware", True, f"{where}; RAM {info['ram_available_bytes'] / 2**30:.1f} of "
                 f"{info['ram_bytes'] / 2**30:.1f} GiB free; disk {disk.free / 2**30:.0f} GiB free", data=info)


def run_checks() -> list[Check]:
    s, first = check_settings()
    checks = [first]
    if s is None:
        return checks
    steps: list[tuple[str, Callable[[Settings], Check]]] = [("run state", check_plan), ("data", check_data),
                                                              ("output", check_output), ("hardware", check_hardware)]
    for section, fn in steps:
        try:
            checks.append(fn(s))
        except BadInput as e:
            checks.append(Check(section, False, e.problems[0].split(":")[0] + ": cannot be used", e.problems))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="preflight.py", description="Check that a run will work, in seconds.")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    checks = run_checks()
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "seconds": round(time.perf_counter() - t0, 2), "checks": [asdict(c) for c in checks]},
                         default=str))
    else:
        for c in checks:
            print(f"[{'ok' if c.ok else 'FAIL'}] {c.section}: {c.finding}")
            for fix in c.fixes:
                print(f"       - {fix}")
        print(f"preflight: {'the run can go' if ok else 'fix the problems above first'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
