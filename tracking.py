"""Where training metrics go (REPORT_TO): the per-run TensorBoard folder under runs/, the
environment transformers' tracker integrations read, validation losses and sample generations
logged beside the trainer's own train/* metrics, and the trackers' runs finished cleanly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from config import Settings
from handoff import Manifest
from train_control import log


def tensorboard_run(manifest: Manifest) -> str:
    """This run's folder under runs/: the published runs/ keeps one per run for the whole pipeline,
    in pipeline order (stage, shard, the step it started at), so `tensorboard --logdir runs` shows
    every shard."""
    plan, resume = manifest.plan, manifest.resume or {}
    order = 1 if plan.stage == "pretrain" else 2
    return f"{order}-{plan.stage}-shard{plan.shard:03d}-from-step{int(resume.get('step', 0)):06d}-{manifest.run_id[:8]}"


def configure_trackers(s: Settings, work: Path, manifest: Manifest) -> None:
    """The environment transformers' tracker integrations read (REPORT_TO), set before the trainer
    exists; what the user set wins. W&B runs offline into WORK_DIR/wandb unless a key is given, and
    never captures the console (its capture would see lines before secrets are masked)."""
    # transformers' TensorBoard callback takes its directory from this variable only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "runs" / tensorboard_run(manifest))
    if "wandb" in s.trackers:
        os.environ.setdefault("WANDB_PROJECT", s.tracker_project())
        os.environ.setdefault("WANDB_DIR", str(work.resolve()))
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_CONSOLE"] = "off"


def open_trackers() -> list:
    """The trackio / W&B modules with a run open in this process (transformers' integrations open
    them; both offer log(), Table() and finish())."""
    is_open = {"wandb": lambda m: m.run is not None, "trackio": lambda m: m.context_vars.current_run.get() is not None}
    return [sys.modules[name] for name, test in is_open.items() if name in sys.modules and test(sys.modules[name])]


def finish_trackers() -> None:
    """End this process's trackio / W&B run (flushes what is buffered; a no-op when none is open).
    A tracker that cannot finish (its server unreachable) costs a log line, never the run."""
    for tracker in open_trackers():
        try:
            tracker.finish()
        except Exception as e:  # noqa: BLE001 - the model is saved; the tracker's loss is reported
            log(f"{tracker.__name__} could not finish its run ({type(e).__name__}: {e}); the model and the record are "
                "not affected")


def log_validation_loss(trainer, s: Settings, work: Path, manifest: Manifest, step: int, loss: float,
                        texts: list[dict[str, str]] | None = None) -> None:
    """Validation loss (eval/loss at `step`) into TensorBoard and the trackers, through the trainer's
    log as its train/* go; the sample generations of that evaluation into samples.jsonl beside the
    traces and into each tracker as text. Rank 0 only."""
    # Logged at trainer.state.global_step, which is `step`. A log event resets the trainer's control
    # flags (should_log): on rank 0 alone, that would skip the training log's collective that the
    # other ranks make. They are put back as they were.
    flags = dict(vars(trainer.control))
    trainer.log({"eval_loss": loss})
    vars(trainer.control).update(flags)
    if not texts:
        return
    run = work / "runs" / tensorboard_run(manifest)
    run.mkdir(parents=True, exist_ok=True)
    with (run / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps({"step": step, **t}) + "\n" for t in texts)
    if "tensorboard" in s.trackers:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run)) as w:
            for i, t in enumerate(texts):
                w.add_text(f"samples/{i}", f"**{t['prompt']}** {t['completion']}", step)
    rows = [[t["prompt"], t["completion"]] for t in texts]
    for tracker in open_trackers():
        tracker.log({"eval/samples": tracker.Table(columns=["prompt", "completion"], data=rows), "train/global_step": step})
