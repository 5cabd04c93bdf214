"""The outside world: the run-state record, planning the next run, and publishing a finished run.

    python3 util.py plan      # say what the next run will do; exit 0 = work to do, 3 = pipeline done
    python3 util.py publish   # publish work/final (model, tokenizer, card, state) and advance the state

The record of truth is ``training_state.json`` inside the published output (OUTPUT_REPO for
pretraining, OUTPUT_REPO-it for instruction tuning). A run advances the state only by publishing a
new record together with its model, in one atomic step: a run that fails or is killed leaves the
previous output and record untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import BadInput, Settings, is_local_target, load_settings, local_path, report

EXIT_DONE = 3
STATE_FILE = "training_state.json"
RECORD_FORMAT = 1


@dataclass(frozen=True)
class RunPlan:
    """What one run does: train `shard` of `stage`, starting from `source` (None = fresh weights)."""

    stage: str  # "pretrain" | "instruct"
    shard: int
    target: str  # where this run publishes
    source: str | None  # published model this run continues from
    done: bool = False

    @property
    def inst(self) -> bool:
        return self.stage == "instruct"

    def describe(self) -> str:
        if self.done:
            return (f"the pipeline is done: every pretraining and instruct shard is trained and published; "
                    f"the chat model is in {self.target}")
        start = "fresh weights and a new tokenizer" if self.source is None else self.source
        return f"{self.stage} shard {self.shard} from {start} -> {self.target}"


def instruct_target(s: Settings) -> str:
    return f"{s.output_repo}-it"


# --- the record ------------------------------------------------------------------------------------


def read_record(target: str) -> dict[str, Any] | None:
    """The published training_state.json of `target`, or None when nothing was published there."""
    if not is_local_target(target):
        raise BadInput([f"OUTPUT_REPO={target!r}: publishing to the Hub is not available in this version. "
                        "Fix: use a local OUTPUT_REPO such as ./output/llama."])
    root = local_path(target)
    recover_local(root)
    path = root / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput([f"{path}: the run-state record is not valid JSON ({e}). Fix: restore it, or remove the "
                        f"output directory {root} to start over."]) from None


def has_model(target: str) -> bool:
    root = local_path(target)
    return (root / "config.json").exists() and any(root.glob("*.safetensors"))


def next_after(stage: str, shard: int, shards_total: int) -> dict[str, Any] | None:
    """The state after finishing `shard` of `stage`: next shard, the instruct stage, or None (done)."""
    if shard + 1 < shards_total:
        return {"inst": stage == "instruct", "init": shard + 1}
    if stage == "pretrain":
        return {"inst": True, "init": 0}
    return None


def plan_run(s: Settings) -> RunPlan:
    """Decide this run from the published record; an explicit INIT/INST in the settings overrides it."""
    rec_it = read_record(instruct_target(s))
    rec_pre = read_record(s.output_repo)
    record = rec_it or rec_pre
    if s.init is not None or s.inst is not None:
        inst = bool(s.inst) if s.inst is not None else bool(record and record.get("next") and record["next"]["inst"])
        init = s.init if s.init is not None else 0
    elif record is None:
        inst, init = False, 0
    elif record.get("next") is None:
        return RunPlan(stage="instruct", shard=record.get("shard", 0), target=instruct_target(s), source=None, done=True)
    else:
        inst, init = bool(record["next"]["inst"]), int(record["next"]["init"])

    if not inst:
        source = None if init == 0 else s.output_repo
        plan = RunPlan(stage="pretrain", shard=init, target=s.output_repo, source=source)
    else:
        source = (s.input_repo or s.output_repo) if init == 0 else instruct_target(s)
        plan = RunPlan(stage="instruct", shard=init, target=instruct_target(s), source=source)
    if plan.source is not None and not has_model(plan.source):
        what = "INIT" if not inst else ("INPUT_REPO/OUTPUT_REPO" if init == 0 else "INIT")
        raise BadInput([f"{what}: this run ({plan.describe()}) continues from the model in {plan.source}, but no "
                        "published model is there. Fix: run the earlier shards first (unset INIT and INST to follow "
                        "the record), or point OUTPUT_REPO/INPUT_REPO at the published model."])
    return plan


# --- publishing ------------------------------------------------------------------------------------


def recover_local(root: Path) -> None:
    """Finish a publish that was killed between its two renames: the old output is put back."""
    old = root.with_name(root.name + ".old")
    if not root.exists() and old.exists():
        old.rename(root)
    elif root.exists() and old.exists():
        shutil.rmtree(old)


def _swap_in(staged: Path, root: Path) -> None:
    """Make `staged` the published `root` with renames only, so a reader sees the old or the new output."""
    old = root.with_name(root.name + ".old")
    if root.exists():
        root.rename(old)
    staged.rename(root)
    if old.exists():
        shutil.rmtree(old)


def build_record(s: Settings, plan: RunPlan, manifest: dict[str, Any], metrics: dict[str, Any],
                 previous: dict[str, Any] | None) -> dict[str, Any]:
    """The new training_state.json: this run appended to the history, and what the next run does."""
    history = list((previous or {}).get("history", []))
    entry = {"stage": plan.stage, "shard": plan.shard, "shards_total": manifest["shards_total"],
             "rows": manifest["rows"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **{k: metrics[k] for k in ("steps", "tokens", "train_loss", "eval_loss_before", "eval_loss",
                                        "perplexity", "train_runtime_s", "tokens_per_s", "precision",
                                        "world_size", "train_format", "trainable_parameters", "merged_eval_loss",
                                        "merge_delta_pct") if k in metrics}}
    history.append(entry)
    nxt = next_after(plan.stage, plan.shard, manifest["shards_total"])
    return {
        "format": RECORD_FORMAT,
        "stage": plan.stage,
        "shard": plan.shard,
        "shards_total": manifest["shards_total"],
        "next": nxt,
        "done": nxt is None,
        "steps": sum(h.get("steps", 0) for h in history),
        "tokens": sum(h.get("tokens", 0) for h in history),
        "architecture": manifest["architecture"],
        "parameters": manifest["parameters"],
        "history": history,
        "settings": s.redacted(),
    }


def publish(s: Settings, work: Path) -> tuple[dict[str, Any], RunPlan]:
    """Publish work/final to the plan's target with its card and record; return the new record and the plan."""
    from model_card import render_card

    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    plan = RunPlan(**manifest["plan"])
    final = work / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    if metrics.get("run_id") != manifest["run_id"]:
        raise RuntimeError(f"{final} was not trained from the prepared data of this run "
                           f"(run {metrics.get('run_id')} vs {manifest['run_id']}): run train.py again.")
    root = local_path(plan.target)
    previous = read_record(plan.target)
    if plan.stage == "instruct" and previous is None:
        previous = read_record(s.output_repo)  # the instruct record continues the pretraining history
    record = build_record(s, plan, manifest, metrics, previous)

    root.parent.mkdir(parents=True, exist_ok=True)
    staged = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(final, staged, ignore=shutil.ignore_patterns("metrics.json"))
    (staged / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (staged / "README.md").write_text(render_card(record, plan.target))
    _fsync_tree(staged)
    _swap_in(staged, root)
    return record, plan


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename publishes complete files even after a power cut."""
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def summary(record: dict[str, Any], target: str) -> str:
    last = record["history"][-1]
    lines = [f"published: {last['stage']} shard {last['shard']} ({last['shard'] + 1} of {last['shards_total']}) -> {local_path(target)}",
             f"validation loss: {last.get('eval_loss_before', float('nan')):.3f} -> {last.get('eval_loss', float('nan')):.3f}"
             f" (perplexity {last.get('perplexity', float('nan')):.1f}); {last.get('steps', 0)} steps, {last.get('tokens', 0):,} tokens"]
    nxt = record["next"]
    if nxt is None:
        lines.append("next run: none, the pipeline is done")
    else:
        lines.append(f"next run: {'instruct' if nxt['inst'] else 'pretrain'} shard {nxt['init']} (INST={str(nxt['inst']).lower()} INIT={nxt['init']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="util.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["plan", "publish"])
    args = ap.parse_args(argv)
    try:
        s = load_settings()
        if args.command == "plan":
            plan = plan_run(s)
            print(f"this run: {plan.describe()}")
            return EXIT_DONE if plan.done else 0
        record, plan = publish(s, Path(s.work_dir))
        print(summary(record, plan.target))
        return 0
    except BadInput as e:
        return report(e)


if __name__ == "__main__":
    raise SystemExit(main())
