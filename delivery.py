"""Publishing to a target, for every stage that publishes: the gates a publish passes (the target
still holds what this run planned from; every loss and weight finite) and the publish of a stopped
or periodically saved shard's full-state checkpoint as last-checkpoint/, with a record that says
where to resume. The final model's publish is publish.py's; train.py publishes periodic checkpoints
while it trains.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from config import Settings
from errors import RunFailure
from files import link_or_copy
from handoff import CheckpointMetrics, Manifest, read_manifest
from hub import PublishConflict
from run_state import RECORD_FORMAT, STATE_FILE, RunPlan
from targets import Published, open_target

PUBLISHED_BY_RUN = "published-by-this-run.json"  # in WORK_DIR: this run's last periodic checkpoint publish


class NonFinite(RunFailure):
    """What was trained holds NaN or infinity: it is never published."""

    label = "publish refused"


def unchanged_since(s: Settings, work: Path, manifest: Manifest) -> tuple[Published, dict[str, Any] | None]:
    """What is published at the target of this run's plan (`manifest`'s), checked to be what this run
    last saw there (the plan's base, or this run's own last periodic checkpoint); and the record to
    continue."""
    plan = manifest.plan
    base = plan.base
    mine = work / PUBLISHED_BY_RUN
    if mine.exists():
        own = json.loads(mine.read_text())
        if own.get("run_id") == manifest.run_id:
            base = own["publish_id"]
    current = open_target(plan.target, s).read_published()
    if current.publish_id != base:
        raise PublishConflict(f"{plan.target} changed while this run trained: it held "
                              f"{'no record' if not base else 'publish ' + base} when this run last looked and holds "
                              f"{'no record' if not current.publish_id else 'publish ' + current.publish_id} now (another run "
                              "published there). Nothing was published and the state is not advanced. Fix: run again: "
                              "the next run continues from what is published now.")
    previous = current.record
    if plan.stage == "instruct" and previous is None:
        previous = open_target(s.output_repo, s).read_record()  # the instruct record continues the pretraining history
    return current, previous


def publish_periodic(s: Settings, work: Path, checkpoint: Path, metrics: CheckpointMetrics) -> dict[str, Any]:
    """A periodic checkpoint (SAVE_INTERVAL) published as last-checkpoint/ while the run trains on:
    the same checks and layout as a stopped run's, and the run remembers what it published so that
    its next publish builds on it."""
    manifest = read_manifest(work)
    plan = manifest.plan
    current, previous = unchanged_since(s, work, manifest)
    record = publish_checkpoint(s, plan, work, checkpoint, metrics, previous, current.revision, interrupted=False)
    staged = work / f"{PUBLISHED_BY_RUN}.tmp"
    staged.write_text(json.dumps({"run_id": manifest.run_id, "publish_id": record["publish_id"], "step": metrics.step}))
    staged.replace(work / PUBLISHED_BY_RUN)
    return record


def refuse_non_finite(final: Path, losses: dict[str, float]) -> None:
    """The last gate before anything is published: every loss the metrics state (`losses`) and every
    weight of what is about to be published is finite (a NaN model must never replace a good one,
    whichever path produced it)."""
    from quant_utils import non_finite_tensors

    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    for d in (final, final / "last-checkpoint"):
        if d.is_dir() and any(d.glob("*.safetensors")):
            bad += non_finite_tensors(d)
    if bad:
        raise NonFinite(f"{final}: not published, it holds non-finite values ({', '.join(bad[:3])}"
                        f"{', …' if len(bad) > 3 else ''}): the training diverged. The published output and the state "
                        "are unchanged. Fix: a lower LEARNING_RATE, more WARMUP_RATIO, or PRECISION=bf16/fp32.")


def publish_checkpoint(s: Settings, plan: RunPlan, work: Path, checkpoint: Path, metrics: CheckpointMetrics,
                       previous: dict[str, Any] | None, revision: str | None, interrupted: bool = True) -> dict[str, Any]:
    """A shard stopped mid-way (or saved periodically, not `interrupted`): publish its full-state
    checkpoint as last-checkpoint/ with a record that says where to resume, and nothing else. The
    published model stays the last finished one and the state does not advance."""
    record = dict(previous or {"format": RECORD_FORMAT, "history": [], "steps": 0, "tokens": 0,
                              "next": {"inst": plan.inst, "init": plan.shard}, "done": False})
    if record.get("next") is None or (record["next"]["inst"], record["next"]["init"]) != (plan.inst, plan.shard):
        record["next"] = {"inst": plan.inst, "init": plan.shard}
        record["done"] = False
    earlier = record.get("resume") or {}
    same = earlier.get("stage") == plan.stage and earlier.get("shard") == plan.shard
    record["resume"] = {
        "stage": plan.stage, "shard": plan.shard, "step": metrics.step, "max_steps": metrics.max_steps,
        "samples_seen": metrics.samples_seen, "tokens": metrics.tokens, "stop_reason": metrics.stop_reason,
        "eval_loss_before": earlier.get("eval_loss_before") if same else metrics.eval_loss_before,
        "data_fingerprint": metrics.data_fingerprint,
        "interruptions": (earlier.get("interruptions", 0) if same else 0) + int(interrupted),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record["publish_id"] = f"{metrics.run_id}-{uuid.uuid4().hex[:12]}"
    record["settings"] = s.redacted()

    traces = checkpoint.parent / "runs" / metrics.tensorboard_run
    traces = traces if metrics.tensorboard_run and traces.is_dir() else None

    def fill(staged: Path) -> None:
        shutil.copytree(checkpoint, staged / "last-checkpoint", copy_function=link_or_copy)
        (staged / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if traces is not None:  # a stopped run's TensorBoard traces, beside those of the runs before it
            shutil.rmtree(staged / "runs" / traces.name, ignore_errors=True)  # links to an earlier copy, if any
            shutil.copytree(traces, staged / "runs" / traces.name)

    open_target(plan.target, s).deliver(work, fill, f"{plan.stage} shard {plan.shard}: checkpoint at step {metrics.step}",
                                        record["publish_id"], revision,
                                        only=["last-checkpoint/", STATE_FILE] + ([f"runs/{traces.name}/"] if traces is not None else []))
    return record
