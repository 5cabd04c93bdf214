"""Stage 2: train the prepared shard with TRL + DeepSpeed ZeRO-2; write the final model (rank 0).

    deepspeed --num_gpus N train.py     # trainer.sh picks N (the GPUs, or 1 rank on CPU)

Reads WORK_DIR/prepared (from prep.py), evaluates the validation split before and after training,
and writes WORK_DIR/final: the model in standard Hugging Face layout (safetensors), tokenizer,
generation config, TensorBoard traces in runs/, and metrics.json. A run stopped by its time budget or
by SIGTERM/SIGINT stops every rank at the same step and writes instead WORK_DIR/final/last-checkpoint
(the full training state) with a metrics.json marked partial; util.py publishes it and the next run
resumes there. Exit 0 in both cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import redact
import status_page
from files import link_or_copy, replacing
from targets import open_target
from util import run_started
from config import EXIT_BAD_INPUT, BadInput, failure_exit, quiet_disk_full_in_threads, Settings, deepspeed_config, load_settings, report, resolve_precision

# Exit code of a run stopped (signal) before its first optimizer step: nothing to publish, the
# state unchanged. trainer.sh says so and exits 3 itself.
EXIT_STOPPED = 3


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[train] {msg}", flush=True)


def use_gradient_checkpointing(s: Settings, arch: dict[str, Any], precision: str, nf4: bool) -> bool:
    """auto: on when this run's estimated peak (mem_estimate, as preflight reports it) would not fit
    the memory free now without it."""
    if s.gradient_checkpointing != "auto":
        return s.gradient_checkpointing == "true"
    import mem_estimate as me

    available, gpu, gpus = me.available_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not gpu:  # every rank shares the RAM; what is free now is already net of the ranks started
        available += world * me.RUNTIME_CPU_BYTES
    return me.plan(s, arch, precision, nf4=nf4, world=world, gpu=gpu, gpus=gpus, available=available)["checkpointing"]


def checkpointing_arg(on: bool) -> dict[str, bool]:
    """Gradient checkpointing as TrainingArguments names it: `activation_checkpointing` in the
    transformers we pin, `gradient_checkpointing` in earlier 5.x releases (a GPU machine's own)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def sequences_per_batch(s: Settings, manifest: dict[str, Any]) -> int:
    """Sequences per micro-batch. BATCH_SIZE counts chats when chats are packed: a step trains about
    as many chats as it would one per sequence, in fewer sequences, so packing removes the padding's
    compute and changes nothing else (steps per shard, tokens per step, the learning rate's meaning).
    Steps of BATCH_SIZE packed sequences instead would take ~5x fewer steps on the default set, and
    measured a validation loss 67 % higher after the same tokens."""
    if not manifest.get("packed_chats"):
        return s.batch_size
    chats_per_sequence = manifest["train_chats"] / manifest["train_sequences"]
    return max(1, round(s.batch_size / chats_per_sequence))


class PackedCollator:
    """Batches of packed chats (prep.pack_chats): input_ids, labels and position_ids, and no attention
    mask, so the attention restarts where the position ids do (our model and transformers' both read
    the boundaries from them). Shorter rows are filled at the end with pad tokens that carry no loss
    and whose positions restart at 0: they form a sequence of their own, seen by no real token."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        pos = torch.arange(T).repeat(len(examples), 1)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.as_tensor(e["input_ids"])
            labels[r, :n] = torch.as_tensor(e["labels"])
            pos[r, :n] = torch.as_tensor(e["position_ids"])
            pos[r, n:] -= n
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def build_trainer(s: Settings, prepared: Path, out: Path, precision: str, callbacks: list):
    """The trainer (lm_trainer.Trainer: TRL's SFTTrainer) over the prepared datasets, with DeepSpeed
    ZeRO-2 and this run's schedule; returns it, the tokenizer and whether gradient checkpointing is on."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from lm_trainer import DATA_ORDER, Trainer

    manifest = json.loads((prepared / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    train_ds, val_ds = load_from_disk(str(prepared / "train")), load_from_disk(str(prepared / "val"))
    micro_batch = sequences_per_batch(s, manifest)
    ckpt = use_gradient_checkpointing(s, manifest["architecture"], precision, manifest["train_format"] == "nf4")
    model = load_model(s, prepared, manifest, precision, ckpt)
    configure_trackers(s, out, manifest)
    args = trainer_args(s, out, manifest, precision, ckpt, micro_batch, len(train_ds))
    packed = manifest.get("packed_chats", False)
    earlier = prepared / "checkpoint" / DATA_ORDER
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
                      callbacks=callbacks, batch_digests=json.loads(earlier.read_text()) if earlier.exists() else [],
                      **({"data_collator": PackedCollator(tok.pad_token_id)} if packed else {}))
    return trainer, tok, ckpt


def load_model(s: Settings, prepared: Path, manifest: dict[str, Any], precision: str, ckpt: bool):
    """The prepared model as this run trains it: every weight in fp32 (mixed precision is DeepSpeed's),
    or, NF4, bitsandbytes 4-bit layers with LoRA adapters; its blocks compiled when COMPILE asks."""
    import torch

    from architecture import llama_class
    from quant_utils import add_lora

    if manifest["train_format"] == "nf4":
        # The NF4 base loads as bitsandbytes 4-bit layers (its config.json carries the quantization
        # config); only the LoRA adapters train. Under ZeRO-2 the frozen 4-bit weights stay whole on
        # every rank and DeepSpeed partitions the adapters' gradients and optimizer states.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        model = llama_class(s.model_impl).from_pretrained(prepared / "model", device_map={"": device}, attn_implementation="sdpa")
        model = add_lora(model, s, ckpt, precision)
    else:
        model = llama_class(s.model_impl).from_pretrained(prepared / "model", dtype=torch.float32, attn_implementation="sdpa")
    if s.compile:
        if manifest["train_format"] == "nf4" or ckpt:
            log(f"COMPILE=true: not compiling ({'NF4 + LoRA layers' if manifest['train_format'] == 'nf4' else 'gradient checkpointing'}: "
                "compiled blocks serve full-precision training without it)")
        else:
            model.compile_blocks()
            log("COMPILE=true: each decoder block compiles on its first step (once per shape; cached for later runs)")
    return model


def trainer_args(s: Settings, out: Path, manifest: dict[str, Any], precision: str, ckpt: bool, micro_batch: int,
                 train_rows: int):
    """The trainer's arguments: this run's schedule, precision and DeepSpeed config; saves and
    evaluations are the run's own (a stop or periodic checkpoint; evaluation.py), not the trainer's."""
    import torch
    from trl import SFTConfig

    cpu = not torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        num_train_epochs=s.epochs,
        max_steps=s.shard_steps or -1,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,
        max_grad_norm=1.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        deepspeed=deepspeed_config(s, precision),
        **checkpointing_arg(ckpt),
        seed=s.seed,
        data_seed=s.seed,
        logging_steps=max(1, min(50, train_rows // (micro_batch * 20) or 1)),
        report_to=s.trackers or "none",
        project=s.tracker_project(),
        run_name=tensorboard_run(manifest),
        trackio_static_space_id=False,  # no new static Space per run of a chain: the live one is the record
        save_strategy="no",  # saves are decided by TimeBudget: a stop, or a periodic checkpoint
        save_total_limit=1,  # older checkpoints go (a periodic one being published is a hard-linked snapshot)
        eval_strategy="no",
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=s.max_length,
        remove_unused_columns=False,
        dataloader_drop_last=False,
        disable_tqdm=int(os.environ.get("RANK", "0")) != 0,
    )


def tensorboard_run(manifest: dict[str, Any]) -> str:
    """This run's folder under runs/: the published runs/ keeps one per run for the whole pipeline,
    in pipeline order (stage, shard, the step it started at), so `tensorboard --logdir runs` shows
    every shard."""
    plan, resume = manifest["plan"], manifest.get("resume") or {}
    order = 1 if plan["stage"] == "pretrain" else 2
    return (f"{order}-{plan['stage']}-shard{int(plan['shard']):03d}-from-step{int(resume.get('step', 0)):06d}-"
            f"{manifest['run_id'][:8]}")


def configure_trackers(s: Settings, work: Path, manifest: dict[str, Any]) -> None:
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


def log_validation_loss(trainer, s: Settings, work: Path, manifest: dict[str, Any], step: int, loss: float,
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


def validation_loss(model, dataset, collator, batch_size: int, precision: str) -> float:
    """Mean next-token cross-entropy per label token over `dataset` (the same measure before and after
    training; Trainer.evaluate cannot run on a ZeRO-2 engine before training has built it)."""
    import torch

    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(0, len(dataset), batch_size):
            check_stop()  # a large validation set takes minutes: a stop request must not wait for it
            batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(model(**batch, use_cache=False).loss) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


# Set by SIGTERM/SIGINT: the trainer stops at the end of the current step, saves the full state and
# publishes it, as when the time budget runs out; before the first step, the run stops at once.
STOP: dict[str, str | None] = {"signal": None}


class StopRequested(Exception):
    """A stop signal arrived where the run has nothing worth saving yet (or is evaluating)."""


def _on_signal(signum, frame) -> None:
    # No printing here: a handler that prints while the main thread prints raises a reentrant-call
    # error. The stop is logged where it takes effect.
    STOP["signal"] = signal.Signals(signum).name


def check_stop() -> None:
    if STOP["signal"]:
        raise StopRequested(STOP["signal"])


def finite_weights(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity ([] when every weight is finite)."""
    import torch

    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def make_status_callback():
    """Feeds the status page (rank 0): where training is and each logged loss."""
    from transformers import TrainerCallback

    import status_page

    class StatusFeed(TrainerCallback):
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


def make_budget_callback(started: float, until: float, run_steps: int | None = None, periodic=None):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """At the end of each step: a stop signal received, past the deadline, or `run_steps`
        (MAX_STEPS) taken by this run? Then every rank stops at this same step (the decision is
        all-reduced) and the trainer saves its full state (model or adapters, optimizer, scheduler,
        RNG states, step) before leaving the loop. A stop at the shard's last step is no stop: the
        shard is finished. Otherwise, is a periodic checkpoint due (`periodic`, SAVE_INTERVAL)? Then
        every rank saves at this step and training goes on."""

        REASONS = {3.0: "a stop signal", 2.0: "the time budget", 1.0: f"MAX_STEPS={run_steps} (steps per run)"}

        def __init__(self) -> None:
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
                self.first_step_s = time.time() - started
            why = (3.0 if STOP["signal"] else 2.0 if time.time() > until
                   else 1.0 if run_steps and state.global_step - self.start_step >= run_steps else 0.0)
            due = self.periodic is not None and self.periodic.due()
            if dist.is_available() and dist.is_initialized():

                # Rank 0 decides whether a checkpoint is due: it alone publishes and knows what one costs.
                why, not_due = all_ranks_max([why, (0.0 if due else 1.0) if dist.get_rank() == 0 else 0.0])
                due = not_due == 0.0
            if state.global_step >= state.max_steps:
                return control  # the shard is finished: no stop, no periodic save
            if why:
                self.stopped = self.REASONS[why]
                control.should_training_stop = True
                control.should_save = True
            elif due:
                self.periodic.saving(state.global_step)
                control.should_save = True
            if not why and self.evaluator is not None and self.evaluator.due(state.global_step, state.max_steps):
                loss = self.evaluator.evaluate(state.global_step)
                if loss is None:  # a stop request came during the evaluation: stop as at any step
                    self.stopped = self.REASONS[3.0]
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

    return TimeBudget()


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

    def _publish(self, snapshot: Path, metrics: dict[str, Any], save_s: float) -> None:
        from quant_utils import non_finite_tensors
        from delivery import publish_periodic
        from hub import PublishConflict

        t = time.time()
        step = metrics["step"]
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


def describe_run(s: Settings, trainer, manifest: dict[str, Any], precision: str, ckpt: bool, until: float) -> int:
    """Log what this run trains and how; returns the number of trainable parameters."""
    import torch

    plan = manifest["plan"]
    log(f"{plan['stage']} shard {plan['shard']}: {manifest['train_sequences']} train / {manifest['val_sequences']} val "
        f"sequences of <= {s.max_length} tokens; precision {precision}; {trainer.args.world_size} rank(s) on "
        f"{'GPU' if torch.cuda.is_available() else 'CPU'}; ZeRO-2; gradient checkpointing {'on' if ckpt else 'off'}; "
        f"{max(0.0, until - time.time()) / 60:.1f} min of the time budget left")
    if manifest.get("packed_chats"):
        micro = trainer.args.per_device_train_batch_size
        log(f"chats packed: {manifest['train_chats']} training chats in {manifest['train_sequences']} sequences; "
            f"{micro} sequence(s) per micro-batch hold ~{micro * manifest['train_chats'] / manifest['train_sequences']:.0f} "
            f"chats (BATCH_SIZE={s.batch_size} counts chats)")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if manifest["train_format"] == "nf4":
        log(f"NF4 base + LoRA r={s.lora_r} alpha={s.lora_alpha:g} on {s.lora_targets}: {trainable:,} trainable parameters")
    else:
        log(f"training every weight: {trainable:,} parameters")
    return trainable


def loss_before_shard(s: Settings, trainer, work: Path, manifest: dict[str, Any], precision: str) -> float:
    """The validation loss before this shard trained: measured now, or, resuming, the one the
    checkpoint's record carries (the model has trained since). Refuses a model that starts non-finite."""
    resume, plan = manifest.get("resume"), manifest["plan"]
    if resume:
        before = float(resume["eval_loss_before"])
        log(f"resuming at step {resume['step']} of this shard from the published checkpoint "
            f"(validation loss before the shard: {before:.4f})")
    else:
        before = validation_loss(trainer.model, trainer.eval_dataset, trainer.data_collator,
                                 trainer.args.per_device_eval_batch_size, precision)
        if not math.isfinite(before):
            raise BadInput([f"{plan['source'] or 'the fresh model'}: validation loss {before} before any training: the "
                            "model's weights or the run's precision produce non-finite values. Fix: publish a healthy "
                            "model there (or INPUT_REPO), or try PRECISION=fp32."])
        log(f"validation loss before training: {before:.4f}")
    if trainer.is_world_process_zero():
        status_page.emit("eval", tokens=int(resume.get("tokens", 0)) if resume else 0, loss=before)
        if not resume:
            log_validation_loss(trainer, s, work, manifest, 0, before)
    return before


def fit(s: Settings, work: Path) -> int:
    """Train the prepared shard and write WORK_DIR/final; returns the exit code."""
    import transformers

    from jit_ops import load_comm_op

    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars; the trainer keeps its own

    prepared = work / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    precision = resolve_precision(s)
    started = run_started()
    until = started + s.time_budget_s()
    budget = make_budget_callback(started, until, s.max_steps)
    plan = manifest["plan"]
    resume = manifest.get("resume")
    try:
        load_comm_op(log)
        trainer, tok, ckpt = build_trainer(s, prepared, work, precision, [budget, make_status_callback()])
        world = trainer.args.world_size
        trainable = describe_run(s, trainer, manifest, precision, ckpt, until)
        before = loss_before_shard(s, trainer, work, manifest, precision)
        t0 = time.perf_counter()

        def partial(state, reason: str = "a periodic checkpoint") -> dict[str, Any]:
            """The metrics of a checkpoint mid-shard (periodic, or a stop) at the trainer's `state`."""
            return {"run_id": manifest["run_id"], "partial": True, "data_fingerprint": manifest["data_fingerprint"],
                    "stop_reason": reason, "step": state.global_step, "max_steps": state.max_steps,
                    "eval_loss_before": before,
                    "samples_seen": state.global_step * trainer.args.per_device_train_batch_size * s.gradient_accumulation_steps * world,
                    "tokens": int(state.num_input_tokens_seen), "train_runtime_s": time.perf_counter() - t0,
                    "first_step_s": budget.first_step_s, "tensorboard_run": tensorboard_run(manifest)}

        if s.save_interval != 0:
            weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            budget.periodic = PeriodicCheckpoint(s, work, plan["target"], weights + 12 * trainable, partial,
                                                 trainer.is_world_process_zero())
            log(budget.periodic.describe())
        evaluator = make_evaluator(s, trainer, tok, work, manifest, precision, budget)
        if evaluator is not None and resume:
            evaluator.read_from(prepared / "checkpoint")
        result = train_or_explain(trainer, budget, prepared, resume)
    except StopRequested as e:
        log(f"stopped by {e} before the first training step: nothing to save; the published output and the state are "
            "unchanged")
        return EXIT_STOPPED
    runtime = time.perf_counter() - t0
    after, evaluated = evaluate_trained(s, trainer, budget, evaluator, precision)
    if budget.periodic is not None:
        budget.periodic.wait()  # this run's next publish builds on the last periodic one
    if budget.stopped:
        step = trainer.state.global_step
        log(f"stopped by {budget.stopped} at step {step} of {trainer.state.max_steps}: saving the full training state "
            "to publish as last-checkpoint/ (the next run resumes here; the state does not advance)")
        if trainer.is_world_process_zero():
            refuse_non_finite(trainer.accelerator.unwrap_model(trainer.model_wrapped), None)
            save_checkpoint(trainer, work, {**partial(trainer.state, budget.stopped), "train_runtime_s": runtime})
        trainer.accelerator.wait_for_everyone()
        return 0
    finish_shard(s, trainer, tok, work, manifest, precision, {
        "run_id": manifest["run_id"],
        "steps": trainer.state.global_step,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "train_loss": result.training_loss,
        "eval_loss_before": before,
        "eval_loss": after,
        "perplexity": math.exp(min(after, 50)) if math.isfinite(after) else after,
        "train_runtime_s": runtime,
        "tokens_per_s": int(trainer.state.num_input_tokens_seen) / runtime if runtime > 0 else 0.0,
        "precision": precision,
        "world_size": world,
        "gradient_checkpointing": ckpt,
        "train_format": manifest["train_format"],
        "trainable_parameters": trainable,
        "first_step_s": budget.first_step_s,
        **({"resumed_from_step": int(resume["step"]), "first_resumed_step_s": budget.first_step_s} if resume else {}),
        **shard_coverage(trainer, s),
        **evaluated,
    })
    trainer.accelerator.wait_for_everyone()
    return 0


def evaluate_trained(s: Settings, trainer, budget, evaluator, precision: str) -> tuple[float | None, dict[str, Any]]:
    """The validation loss of the trained shard and, when evaluating during training, the best of the
    shard's weights (`evaluated`: what the record says of it). A stop during this evaluation keeps the
    trained shard as a checkpoint at its last step (the next run resumes there, trains nothing more,
    evaluates and publishes); then the loss is None."""
    if budget.stopped:
        return None, {}
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    try:
        after = validation_loss(model, trainer.eval_dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size, precision)
    except StopRequested:
        budget.stopped = "a stop signal"
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        return None, {}
    if evaluator is not None:
        return best_of_shard(evaluator, budget, trainer, model, after, s, precision)
    return after, {}


def finish_shard(s: Settings, trainer, tok, work: Path, manifest: dict[str, Any], precision: str,
                 metrics: dict[str, Any]) -> None:
    """A shard trained to its end: its last evaluation reported, the batch order kept, and on rank 0
    the model checked finite, merged when NF4 + LoRA, and written to WORK_DIR/final with `metrics`."""
    from lm_trainer import DATA_ORDER

    after, tokens = metrics["eval_loss"], metrics["tokens"]
    # The last step's evaluation, unless an early stop made it during training (reported then).
    if trainer.is_world_process_zero() and metrics.get("early_stopped_at") != trainer.state.global_step:
        status_page.emit("eval", tokens=tokens, loss=after)
        log_validation_loss(trainer, s, work, manifest, trainer.state.global_step, metrics.get("last_step_eval_loss", after))
    log(f"validation loss after training: {after:.4f} (perplexity {metrics['perplexity']:.2f}); "
        f"{metrics['steps']} steps, {tokens:,} tokens in {metrics['train_runtime_s']:.0f} s ({metrics['tokens_per_s']:,.0f} tokens/s)")
    metrics["data_order_sha256"] = hashlib.sha256(json.dumps(trainer.batch_digests).encode()).hexdigest()
    if trainer.is_world_process_zero():
        (work / "runs").mkdir(parents=True, exist_ok=True)
        (work / "runs" / DATA_ORDER).write_text(json.dumps(trainer.batch_digests))
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        refuse_non_finite(model, after)
        if manifest["train_format"] == "nf4":
            model = merge_checked(model, trainer, precision, after, metrics)
        save_final(model, tok, work, precision, metrics)


def make_evaluator(s: Settings, trainer, tok, work: Path, manifest: dict[str, Any], precision: str, budget):
    """The evaluation during training (evaluation.py) wired to this trainer: the validation loss of
    the model as it trains (a stop request during it, on any rank, cuts it short everywhere), the
    best weights kept by rank 0, each evaluation reported (TensorBoard eval/loss, the status page,
    sample generations) by rank 0. None when EVAL_INTERVAL=0."""
    import torch
    import torch.distributed as dist

    from evaluation import Evaluator, interval_for, load_trainable, samples, save_trainable

    interval = interval_for(s.eval_interval, s.shard_steps or epoch_steps(trainer))
    if interval == 0:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    rank0 = trainer.is_world_process_zero()

    def measure() -> float | None:
        try:
            loss, stopped = validation_loss(model, trainer.eval_dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size, precision), 0.0
        except StopRequested:
            loss, stopped = math.nan, 1.0
        if dist.is_available() and dist.is_initialized():
            (stopped,) = all_ranks_max([stopped])
        return None if stopped else loss

    def save_best(path: Path) -> None:
        if rank0:
            save_trainable(model, path)

    def report(step: int, loss: float) -> None:
        if not rank0:
            return
        status_page.emit("eval", tokens=int(trainer.state.num_input_tokens_seen), loss=loss)
        log_validation_loss(trainer, s, work, manifest, step, loss, samples(model, tok, manifest["plan"]["stage"] == "instruct"))

    evaluator = Evaluator(interval, s.early_stopping_patience, s.best_model, measure, save_best,
                          lambda path: load_trainable(model, path), work, log)
    trainer.evaluator = budget.evaluator = evaluator
    budget.on_eval = report
    log(f"evaluating every {interval} steps" + (f", early stopping after {s.early_stopping_patience} evaluations without "
        "improvement" if s.early_stopping_patience else "") + ("; the published model is the best evaluation's"
                                                                if s.best_model else ""))
    return evaluator


def best_of_shard(evaluator, budget, trainer, model, last: float, s: Settings, precision: str):
    """The shard's final evaluation joined to those during training; the best weights put back when
    an earlier evaluation beat the last step (BEST_MODEL). Returns the published model's validation
    loss and what the history says of the evaluations."""
    step = trainer.state.global_step
    if not evaluator.evals or evaluator.evals[-1][0] != step:
        evaluator.record(step, last)
    after = last
    if evaluator.restore_best(step):
        after = validation_loss(model, trainer.eval_dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size, precision)
        log(f"the published model is the best evaluation's: step {evaluator.best_step}, validation loss {after:.4f} "
            f"(the last step's: {last:.4f})")
    return after, {**evaluator.summary(), "last_step_eval_loss": last}


def epoch_steps(trainer) -> int:
    """The optimizer steps of EPOCHS passes over the shard, as the trainer counts them."""
    batches = len(trainer.get_train_dataloader())
    ga = trainer.args.gradient_accumulation_steps
    return math.ceil(trainer.args.num_train_epochs * max(batches // ga + int(batches % ga > 0), 1))


def shard_coverage(trainer, s: Settings) -> dict[str, int]:
    """With SHARD_STEPS, how many optimizer steps EPOCHS passes over the shard would have taken (as
    the trainer counts them) beside the steps trained: the data a shard skipped is never silent."""
    if not s.shard_steps:
        return {}
    natural = epoch_steps(trainer)
    trained = trainer.state.global_step
    if trained < natural:
        log(f"SHARD_STEPS={s.shard_steps}: trained {trained} of the {natural} steps of EPOCHS={s.epochs:g} over this "
            f"shard; the rest of its data is skipped")
    return {"shard_steps": natural, **({"skipped_steps": natural - trained} if trained < natural else {})}


def train_or_explain(trainer, budget, prepared: Path, resume: dict[str, Any] | None):
    """trainer.train, resuming from the prepared checkpoint when there is one. A failure while the
    trainer loads that checkpoint (before its first step) is bad input naming it: rerunning the same
    damaged checkpoint could only fail the same way."""
    try:
        return trainer.train(resume_from_checkpoint=str(prepared / "checkpoint") if resume else None)
    except StopRequested:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised; only a load failure of the checkpoint is reworded
        if resume and not budget.began:
            from run_state import CHECKPOINT_FIX

            raise BadInput([f"{resume.get('checkpoint', 'checkpoint')} of the published output (last-checkpoint/, step "
                            f"{resume['step']}): the trainer cannot load it ({type(e).__name__}: {str(e)[:200]}). "
                            f"{CHECKPOINT_FIX}"]) from e
        raise


def refuse_non_finite(model, eval_loss: float | None) -> None:
    """Nothing non-finite is published: a NaN/Inf validation loss or weight fails the run here (exit 1),
    before anything is written, and the state does not advance."""
    if eval_loss is not None and not math.isfinite(eval_loss):
        raise RuntimeError(f"the validation loss after training is {eval_loss}: the training diverged. Nothing is "
                           "published and the state does not advance. Fix: a lower LEARNING_RATE, more WARMUP_RATIO, "
                           "or PRECISION=bf16/fp32 instead of fp16.")
    bad = finite_weights(model)
    if bad:
        raise RuntimeError(f"{len(bad)} weight tensor(s) hold NaN or infinity after training (first: {bad[0]}): the "
                           "training diverged. Nothing is published and the state does not advance. Fix: a lower "
                           "LEARNING_RATE, more WARMUP_RATIO, or PRECISION=bf16/fp32 instead of fp16.")


def merge_checked(peft_model, trainer, precision: str, adapter_loss: float, metrics: dict[str, Any]):
    """The adapters merged into a plain float model (quant_utils.to_float), refused when its
    validation loss strays from the adapter's by more than 0.5%: a merge must not lose the training."""
    from quant_utils import storage_dtype, to_float

    dtype = storage_dtype(precision)
    merged = to_float(peft_model, dtype)
    merged_loss = validation_loss(merged, trainer.eval_dataset, trainer.data_collator, trainer.args.per_device_eval_batch_size, precision)
    delta = abs(merged_loss - adapter_loss) / adapter_loss if math.isfinite(merged_loss) else math.inf
    log(f"merged LoRA into plain {dtype}: validation loss {merged_loss:.4f} vs {adapter_loss:.4f} with the adapter "
        f"({delta * 100:.3f}% apart)")
    if delta > 0.005:
        raise RuntimeError(f"the merged model's validation loss {merged_loss:.4f} is {delta:.1%} away from the adapter's "
                           f"{adapter_loss:.4f}: not publishing a merge that lost the training")
    metrics.update({"merged_eval_loss": merged_loss, "merge_delta_pct": delta * 100})
    return merged


def _write_final(work: Path, fill, metrics: dict[str, Any]) -> None:
    """WORK_DIR/final = what `fill(staged)` writes plus metrics.json, written beside and renamed in."""
    with replacing(work / "final") as staged:
        fill(staged)
        (staged / "metrics.json").write_text(json.dumps(metrics, indent=2))


def save_checkpoint(trainer, work: Path, metrics: dict[str, Any]) -> None:
    """WORK_DIR/final = the trainer's full-state checkpoint (model or adapters, DeepSpeed's optimizer
    and fp32 master weights, scheduler, RNG states, trainer state) as last-checkpoint/, beside a
    metrics.json that marks the run partial."""
    from transformers.trainer_utils import get_last_checkpoint

    src = get_last_checkpoint(str(work / "trainer"))
    if src is None:
        raise RuntimeError(f"the trainer saved no checkpoint under {work / 'trainer'}")
    def fill(staged: Path) -> None:
        shutil.copytree(src, staged / "last-checkpoint", copy_function=link_or_copy)
        if (work / "runs").exists():  # this run's TensorBoard traces, published with the checkpoint
            shutil.copytree(work / "runs", staged / "runs")

    _write_final(work, fill, metrics)


def save_final(model, tok, work: Path, precision: str, metrics: dict[str, Any]) -> None:
    """The trained model in HF layout (bf16 when trained in bf16, else fp32) with its tokenizer,
    generation config and TensorBoard traces."""
    from transformers import GenerationConfig

    from quant_utils import storage_dtype

    dtype = storage_dtype(precision)

    def fill(staged: Path) -> None:
        state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
        model.config.dtype = dtype
        model.config.use_cache = True
        model.save_pretrained(staged, state_dict=state, safe_serialization=True)
        tok.save_pretrained(staged)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=128).save_pretrained(staged)
        if (work / "runs").exists():
            shutil.copytree(work / "runs", staged / "runs")

    _write_final(work, fill, metrics)


def die_with_parent() -> None:
    """A rank is killed when its launcher dies, and when its launcher is orphaned: trainer.sh's
    phase dies with trainer.sh (pdeathsig), but the deepspeed runner's child, the per-node launcher
    that starts the ranks, does not die with the runner. No rank trains on, holding the output's
    lock, after the run it belongs to is gone."""
    import ctypes
    import threading

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: trainer.sh's own cleanup is all there is
    launcher = os.getppid()
    if launcher == 1:  # the launcher died before the line above
        os._exit(1)
    above = _parent_of(launcher)
    if above is None or above <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if _parent_of(launcher) != above:  # the launcher's own parent is gone: so is the run
                if b"deepspeed.launcher" in _cmdline(launcher):
                    os.kill(launcher, signal.SIGKILL)  # and this rank with it (pdeathsig)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-run", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state; comm may hold spaces


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def main(argv: list[str] | None = None) -> int:
    redact.install()
    quiet_disk_full_in_threads()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first thing: a stop during start-up is a clean stop too
        signal.signal(sig, _on_signal)
    die_with_parent()
    try:
        s = load_settings()
    except BadInput as e:
        return report(e)
    work = Path(s.work_dir)
    if not (work / "prepared" / "manifest.json").exists():
        print(f"{work / 'prepared'}: no prepared data. Fix: run prep.py first (trainer.sh does).", file=sys.stderr)
        return EXIT_BAD_INPUT
    for stale in ("final", "runs", "trainer", "periodic"):
        if int(os.environ.get("RANK", "0")) == 0 and (work / stale).exists():
            shutil.rmtree(work / stale)
    try:
        return fit(s, work)
    except Exception as e:  # noqa: BLE001 - failure_exit re-raises what is not bad input, a RunFailure or a full disk
        return failure_exit(e)
    finally:
        finish_trackers()


if __name__ == "__main__":
    raise SystemExit(main())
