"""What happens around the training steps: a stop (SIGTERM/SIGINT, the time budget, MAX_STEPS)
taken by every rank at the same step with the full state saved; periodic checkpoints saved and
published in the background while training goes on; the status page fed; and no rank left
training once the run it belongs to is gone.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

import status_page
from config import Settings
from files import link_or_copy
from handoff import CheckpointMetrics
from stopping import STOP, check_stop
from targets import open_target


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[train] {msg}", flush=True)


class StatusFeed(TrainerCallback):
    """Feeds the status page (rank 0): where training is and each logged loss."""

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            status_page.emit("train_begin", step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if state.is_world_process_zero and "loss" in logs:
            status_page.emit("log", step=state.global_step, max_steps=state.max_steps,
                             tokens=int(state.num_input_tokens_seen), loss=float(logs["loss"]),
                             learning_rate=logs.get("learning_rate"),
                             tokens_per_s=logs.get("train_tokens_per_second"))


def make_status_callback() -> StatusFeed:
    return StatusFeed()


def all_ranks_max(values: list[float]) -> list[float]:
    """The element-wise maximum over every rank. The tensor lives where the process group's backend
    reduces: on this rank's GPU under NCCL (which has no CPU tensors), in RAM under gloo."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class TimeBudget(TrainerCallback):
    """At the end of each step: a stop signal received, past the deadline, or `run_steps`
    (MAX_STEPS) taken by this run? Then every rank stops at this same step (the decision is
    all-reduced) and the trainer saves its full state (model or adapters, optimizer, scheduler,
    RNG states, step) before leaving the loop. A stop at the shard's last step is no stop: the
    shard is finished. Otherwise, is a periodic checkpoint due (`periodic`, SAVE_INTERVAL)? Then
    every rank saves at this step and training goes on."""

    def __init__(self, started: float, until: float, run_steps: int | None = None, periodic=None) -> None:
        self.started, self.until, self.run_steps = started, until, run_steps
        self.reasons = {3.0: "a stop signal", 2.0: "the time budget", 1.0: f"MAX_STEPS={run_steps} (steps per run)"}
        self.stopped: str | None = None
        self.began = False  # the trainer is set up (a resumed checkpoint loaded) and about to step
        self.first_step_s: float | None = None  # from the run's start to the end of its first step
        self.start_step = 0  # the step this run began at (a resumed run's checkpoint step)
        self.periodic = periodic  # a PeriodicCheckpoint, or None (SAVE_INTERVAL=0)
        self.evaluator = None  # an evaluation.Evaluator, or None (EVAL_INTERVAL=0)
        self.on_eval = None  # called with (step, loss) after each evaluation (rank 0 reports it)

    def on_train_begin(self, args, state, control, **kw):
        import torch.distributed as dist

        from jit_ops import release_comm_buffers

        self.began = True
        self.start_step = state.global_step
        # DeepSpeed's engine is up (its CPU comm op created a /dev/shm buffer per rank and mapped
        # every rank's): once every rank is past that, each unlinks its own file.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        release_comm_buffers()
        if self.periodic is not None:
            self.periodic.begin()

    def on_step_begin(self, args, state, control, **kw):
        if self.first_step_s is None:  # no step taken by this run yet: nothing to checkpoint
            check_stop()

    def on_step_end(self, args, state, control, **kw):
        import torch.distributed as dist

        if self.first_step_s is None:
            self.first_step_s = time.time() - self.started
        why = (3.0 if STOP["signal"] else 2.0 if time.time() > self.until
               else 1.0 if self.run_steps and state.global_step - self.start_step >= self.run_steps else 0.0)
        due = self.periodic is not None and self.periodic.due()
        if dist.is_available() and dist.is_initialized():

            # Rank 0 decides whether a checkpoint is due: it alone publishes and knows what one costs.
            why, not_due = all_ranks_max([why, (0.0 if due else 1.0) if dist.get_rank() == 0 else 0.0])
            due = not_due == 0.0
        if state.global_step >= state.max_steps:
            return control  # the shard is finished: no stop, no periodic save
        if why:
            self.stopped = self.reasons[why]
            control.should_training_stop = True
            control.should_save = True
        elif due:
            self.periodic.saving(state.global_step)
            control.should_save = True
        if not why and self.evaluator is not None and self.evaluator.due(state.global_step, state.max_steps):
            loss = self.evaluator.evaluate(state.global_step)
            if loss is None:  # a stop request came during the evaluation: stop as at any step
                self.stopped = self.reasons[3.0]
                control.should_training_stop = True
                control.should_save = True
                return control
            if self.on_eval is not None:
                self.on_eval(state.global_step, loss)
            if self.evaluator.should_stop():
                self.evaluator.early_stopped_at = state.global_step
                log(f"early stopping at step {state.global_step}: {self.evaluator.since_best} evaluations without "
                    f"improvement on {self.evaluator.best:.4f} (step {self.evaluator.best_step}); the shard is finished")
                control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kw):
        if self.periodic is not None and not self.stopped:
            self.periodic.saved(Path(args.output_dir) / f"checkpoint-{state.global_step}", state)


def make_budget_callback(started: float, until: float, run_steps: int | None = None, periodic=None) -> TimeBudget:
    return TimeBudget(started, until, run_steps, periodic)


class PeriodicCheckpoint:
    """SAVE_INTERVAL: every so many minutes of training every rank saves the full training state, as
    a budget stop does, and training goes on while rank 0 publishes it as last-checkpoint/ in a
    background thread (a hard-linked snapshot: the trainer may rotate its own copy away). A save is
    due only when the previous upload is done, so at most one is in flight and none is skipped for
    long; a failed upload is logged and the next checkpoint tries again (each publish is atomic: a
    local swap or one Hub commit). Unset, the interval is 20x the checkpoint's save time (saving is
    at most 5 % of training), at least 10 minutes, re-measured at each save.

    The interval runs from the step the last checkpoint holds (or this run's first step), and a save
    starts early by what the last save and publish took: a kill at any moment loses at most about
    the interval of training, the save and publish under way included."""

    MIN_AUTO_S = 600.0
    SHARE = 0.05  # of training time spent saving, at most, when the interval is automatic

    def __init__(self, s: Settings, work: Path, target: str, checkpoint_bytes: int, metrics, rank0: bool) -> None:
        self.s, self.work, self.target, self.metrics, self.rank0 = s, work, target, metrics, rank0
        self.auto = s.save_interval is None
        # Local disks write a few hundred MB/s; 200 MB/s keeps the first estimate on the safe side.
        self.estimated_save_s = 1.0 + checkpoint_bytes / 200e6
        self.interval_s = (max(self.MIN_AUTO_S, self.estimated_save_s / self.SHARE) if self.auto
                           else s.save_interval * 60)
        self.mark = time.time()  # when the training the last checkpoint holds ended (or this run's training began)
        self.cost_s = self.estimated_save_s  # the last save + publish (the estimate until one is measured)
        self.save_began: float | None = None
        self.upload = None  # the background publish under way
        self.published: list[dict[str, Any]] = []  # {step, save_s, upload_s} per published checkpoint
        self.conflict: Exception | None = None
        if rank0:
            from output_lock import acquire

            self.locks = acquire(s)  # train.py run alone publishes too: it holds the output (a no-op under trainer.sh)

    def describe(self) -> str:
        how = (f"automatic: the checkpoint saves in ~{self.estimated_save_s:.0f} s, saving stays under "
               f"{self.SHARE:.0%} of training" if self.auto else "SAVE_INTERVAL")
        return f"a periodic checkpoint every {self.interval_s / 60:.1f} min of training ({how})"

    def begin(self) -> None:
        self.mark = time.time()

    def due(self) -> bool:
        busy = self.upload is not None and self.upload.is_alive()
        lead = min(self.cost_s, self.interval_s / 2)
        return self.conflict is None and not busy and time.time() - self.mark >= self.interval_s - lead

    def saving(self, step: int) -> None:
        self.save_began = time.time()
        log(f"saving a periodic checkpoint at step {step} (training goes on)")

    def saved(self, checkpoint: Path, state) -> None:
        import threading

        save_s = time.time() - (self.save_began or time.time())
        self.mark = self.save_began or time.time()
        if self.auto and save_s / self.SHARE > self.interval_s:
            self.interval_s = save_s / self.SHARE
            log(f"the save took {save_s:.1f} s: periodic checkpoints now every {self.interval_s / 60:.1f} min")
        if not self.rank0:
            return
        snapshot = self.work / "periodic" / checkpoint.name
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(checkpoint, snapshot, copy_function=link_or_copy)
        metrics = self.metrics(state)
        self.upload = threading.Thread(target=self._publish, args=(snapshot, metrics, save_s),
                                       name="publish-checkpoint", daemon=True)
        self.upload.start()

    def _publish(self, snapshot: Path, metrics: CheckpointMetrics, save_s: float) -> None:
        from quant_utils import non_finite_tensors
        from delivery import publish_periodic
        from hub import PublishConflict

        t = time.time()
        step = metrics.step
        try:
            bad = non_finite_tensors(snapshot)
            if bad:
                log(f"periodic checkpoint at step {step} not published: it holds non-finite values ({bad[0]}); "
                    "the published checkpoint stays the previous one")
                return
            record = publish_periodic(self.s, self.work, snapshot, metrics)
            upload_s = time.time() - t
            self.cost_s = save_s + upload_s
            self.published.append({"step": step, "save_s": round(save_s, 2), "upload_s": round(upload_s, 2)})
            where = open_target(self.target).where
            log(f"periodic checkpoint at step {step} published to {where}/last-checkpoint (saved in {save_s:.1f} s, "
                f"published in {upload_s:.1f} s in the background); a run killed from now on resumes there")
            status_page.emit("publish", where=f"{where}/last-checkpoint", url=None,
                             summary=f"checkpoint at step {step} of shard {record['resume']['shard']}",
                             history=record.get("history", []), next_run=f"resume at step {step}")
        except PublishConflict as e:
            self.conflict = e
            log(f"periodic checkpoint at step {step} not published and no more will be: {e}")
        except Exception as e:  # noqa: BLE001 - the training goes on; the next checkpoint tries again
            log(f"periodic checkpoint at step {step} not published ({type(e).__name__}: {str(e)[:300]}); "
                "training goes on and the next checkpoint tries again")
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> None:
        """The upload under way finished (before the run writes its own result or stops)."""
        if self.upload is not None and self.upload.is_alive():
            log("waiting for the periodic checkpoint's publish under way to finish")
            self.upload.join()
