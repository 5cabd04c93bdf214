"""Stage 2: train the prepared shard with TRL + DeepSpeed ZeRO-2; write the final model (rank 0).

    deepspeed --num_gpus N train.py     # trainer.sh picks N (the GPUs, or 1 rank on CPU)

Reads WORK_DIR/prepared (from prep.py), evaluates the validation split before and after training,
and writes WORK_DIR/final: the model in standard Hugging Face layout (safetensors), tokenizer,
generation config, TensorBoard traces in runs/, and metrics.json. A run stopped by its time budget or
by SIGTERM/SIGINT stops every rank at the same step and writes instead WORK_DIR/final/last-checkpoint
(the full training state) with a metrics.json marked partial; publish.py publishes it and the next run
resumes there. Exit 0 in both cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import stopping

if __name__ == "__main__":  # first thing, before the imports below (transformers: ~10 s): a stop during start-up is clean
    stopping.install()

import redact
import status_page
from config import Settings, deepspeed_config, load_settings, resolve_precision  # first: it quiets bitsandbytes' import
from errors import EXIT_BAD_INPUT, BadInput, failure_exit, quiet_disk_full_in_threads, report
from evaluation import best_of_shard, epoch_steps, make_evaluator, validation_loss
from files import link_or_copy, replacing
from handoff import MANIFEST_FILE, METRICS_FILE, CheckpointMetrics, Manifest, ShardMetrics
from tracking import configure_trackers, finish_trackers, log_validation_loss, tensorboard_run
from train_control import PeriodicCheckpoint, log, make_budget_callback, make_status_callback
from util import run_started

# Exit code of a run stopped (signal) before its first optimizer step: nothing to publish, the
# state unchanged. trainer.sh says so and exits 3 itself.
EXIT_STOPPED = 3


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


def sequences_per_batch(s: Settings, manifest: Manifest) -> int:
    """Sequences per micro-batch. BATCH_SIZE counts chats when chats are packed: a step trains about
    as many chats as it would one per sequence, in fewer sequences, so packing removes the padding's
    compute and changes nothing else (steps per shard, tokens per step, the learning rate's meaning).
    Steps of BATCH_SIZE packed sequences instead would take ~5x fewer steps on the default set, and
    measured a validation loss 67 % higher after the same tokens."""
    if not manifest.packed_chats:
        return s.batch_size
    return max(1, round(s.batch_size / manifest.chats_per_sequence))


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

    manifest = Manifest.read(prepared / MANIFEST_FILE)
    tok = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    train_ds, val_ds = load_from_disk(str(prepared / "train")), load_from_disk(str(prepared / "val"))
    micro_batch = sequences_per_batch(s, manifest)
    ckpt = use_gradient_checkpointing(s, manifest.architecture, precision, manifest.train_format == "nf4")
    model = load_model(s, prepared, manifest, precision, ckpt)
    configure_trackers(s, out, manifest)
    args = trainer_args(s, out, manifest, precision, ckpt, micro_batch, len(train_ds))
    packed = manifest.packed_chats
    earlier = prepared / "checkpoint" / DATA_ORDER
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
                      callbacks=callbacks, batch_digests=json.loads(earlier.read_text()) if earlier.exists() else [],
                      **({"data_collator": PackedCollator(tok.pad_token_id)} if packed else {}))
    return trainer, tok, ckpt


def load_model(s: Settings, prepared: Path, manifest: Manifest, precision: str, ckpt: bool):
    """The prepared model as this run trains it: every weight in fp32 (mixed precision is DeepSpeed's),
    or, NF4, bitsandbytes 4-bit layers with LoRA adapters; its blocks compiled when COMPILE asks."""
    import torch

    from architecture import llama_class
    from quant_utils import add_lora

    if manifest.train_format == "nf4":
        # The NF4 base loads as bitsandbytes 4-bit layers (its config.json carries the quantization
        # config); only the LoRA adapters train. Under ZeRO-2 the frozen 4-bit weights stay whole on
        # every rank and DeepSpeed partitions the adapters' gradients and optimizer states.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        model = llama_class(s.model_impl).from_pretrained(prepared / "model", device_map={"": device}, attn_implementation="sdpa")
        model = add_lora(model, s, ckpt, precision)
    else:
        model = llama_class(s.model_impl).from_pretrained(prepared / "model", dtype=torch.float32, attn_implementation="sdpa")
    if s.compile:
        if manifest.train_format == "nf4" or ckpt:
            log(f"COMPILE=true: not compiling ({'NF4 + LoRA layers' if manifest.train_format == 'nf4' else 'gradient checkpointing'}: "
                "compiled blocks serve full-precision training without it)")
        else:
            model.compile_blocks()
            log("COMPILE=true: each decoder block compiles on its first step (once per shape; cached for later runs)")
    return model


def trainer_args(s: Settings, out: Path, manifest: Manifest, precision: str, ckpt: bool, micro_batch: int,
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


def finite_weights(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity ([] when every weight is finite)."""
    import torch

    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]


def describe_run(s: Settings, trainer, manifest: Manifest, precision: str, ckpt: bool, until: float) -> int:
    """Log what this run trains and how; returns the number of trainable parameters."""
    import torch

    plan = manifest.plan
    log(f"{plan.stage} shard {plan.shard}: {manifest.train_sequences} train / {manifest.val_sequences} val "
        f"sequences of <= {s.max_length} tokens; precision {precision}; {trainer.args.world_size} rank(s) on "
        f"{'GPU' if torch.cuda.is_available() else 'CPU'}; ZeRO-2; gradient checkpointing {'on' if ckpt else 'off'}; "
        f"{max(0.0, until - time.time()) / 60:.1f} min of the time budget left")
    if manifest.packed_chats:
        micro = trainer.args.per_device_train_batch_size
        log(f"chats packed: {manifest.train_chats} training chats in {manifest.train_sequences} sequences; "
            f"{micro} sequence(s) per micro-batch hold ~{micro * manifest.chats_per_sequence:.0f} "
            f"chats (BATCH_SIZE={s.batch_size} counts chats)")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if manifest.train_format == "nf4":
        log(f"NF4 base + LoRA r={s.lora_r} alpha={s.lora_alpha:g} on {s.lora_targets}: {trainable:,} trainable parameters")
    else:
        log(f"training every weight: {trainable:,} parameters")
    return trainable


def loss_before_shard(s: Settings, trainer, work: Path, manifest: Manifest, precision: str) -> float:
    """The validation loss before this shard trained: measured now, or, resuming, the one the
    checkpoint's record carries (the model has trained since). Refuses a model that starts non-finite."""
    resume, plan = manifest.resume, manifest.plan
    if resume:
        before = float(resume["eval_loss_before"])
        log(f"resuming at step {resume['step']} of this shard from the published checkpoint "
            f"(validation loss before the shard: {before:.4f})")
    else:
        before = validation_loss(trainer.model, trainer.eval_dataset, trainer.data_collator,
                                 trainer.args.per_device_eval_batch_size, precision)
        if not math.isfinite(before):
            raise BadInput([f"{plan.source or 'the fresh model'}: validation loss {before} before any training: the "
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
    manifest = Manifest.read(prepared / MANIFEST_FILE)
    precision = resolve_precision(s)
    started = run_started()
    until = started + s.time_budget_s()
    budget = make_budget_callback(started, until, s.max_steps)
    plan, resume = manifest.plan, manifest.resume
    try:
        load_comm_op(log)
        trainer, tok, ckpt = build_trainer(s, prepared, work, precision, [budget, make_status_callback()])
        world = trainer.args.world_size
        trainable = describe_run(s, trainer, manifest, precision, ckpt, until)
        before = loss_before_shard(s, trainer, work, manifest, precision)
        t0 = time.perf_counter()

        def partial(state, reason: str = "a periodic checkpoint", runtime: float | None = None) -> CheckpointMetrics:
            """The metrics of a checkpoint mid-shard (periodic, or a stop) at the trainer's `state`,
            `runtime` seconds into training (None: now)."""
            return CheckpointMetrics(
                run_id=manifest.run_id, partial=True, data_fingerprint=manifest.data_fingerprint, stop_reason=reason,
                step=state.global_step, max_steps=state.max_steps, eval_loss_before=before,
                samples_seen=state.global_step * trainer.args.per_device_train_batch_size * s.gradient_accumulation_steps * world,
                tokens=int(state.num_input_tokens_seen),
                train_runtime_s=time.perf_counter() - t0 if runtime is None else runtime,
                first_step_s=budget.first_step_s, tensorboard_run=tensorboard_run(manifest))

        budget.periodic = periodic_checkpoints(s, work, trainer, plan.target, trainable, partial)
        evaluator = make_evaluator(s, trainer, tok, work, manifest, precision, budget)
        if evaluator is not None and resume:
            evaluator.read_from(prepared / "checkpoint")
        result = train_or_explain(trainer, budget, prepared, resume)
    except stopping.StopRequested as e:
        log(f"stopped by {e} before the first training step: nothing to save; the published output and the state are "
            "unchanged")
        return EXIT_STOPPED
    runtime = time.perf_counter() - t0
    after, evaluated = evaluate_trained(s, trainer, budget, evaluator, precision)
    if budget.periodic is not None:
        budget.periodic.wait()  # this run's next publish builds on the last periodic one
    if budget.stopped:
        save_stopped(trainer, work, budget.stopped, partial(trainer.state, budget.stopped, runtime))
        return 0
    metrics = shard_metrics(s, trainer, manifest, precision, ckpt=ckpt, trainable=trainable, first_step_s=budget.first_step_s,
                            train_loss=result.training_loss, before=before, after=after, runtime=runtime)
    finish_shard(s, trainer, tok, work, manifest, precision, metrics.with_fields(evaluated))
    trainer.accelerator.wait_for_everyone()
    return 0


def shard_metrics(s: Settings, trainer, manifest: Manifest, precision: str, *, ckpt: bool, trainable: int,
                  first_step_s: float | None, train_loss: float, before: float, after: float, runtime: float) -> ShardMetrics:
    """What a finished shard's metrics.json says of its training (the evaluations during training
    and the merge add theirs); publish.py keeps them in the record's history."""
    resume = manifest.resume
    tokens = int(trainer.state.num_input_tokens_seen)
    return ShardMetrics(
        run_id=manifest.run_id, steps=trainer.state.global_step, tokens=tokens, train_loss=train_loss,
        eval_loss_before=before, eval_loss=after,
        perplexity=math.exp(min(after, 50)) if math.isfinite(after) else after,
        train_runtime_s=runtime, tokens_per_s=tokens / runtime if runtime > 0 else 0.0, precision=precision,
        world_size=trainer.args.world_size, train_format=manifest.train_format, trainable_parameters=trainable,
        **({"resumed_from_step": int(resume["step"]), "first_resumed_step_s": first_step_s} if resume else {}),
        **shard_coverage(trainer, s),
        gradient_checkpointing=ckpt, first_step_s=first_step_s,
    )


def periodic_checkpoints(s: Settings, work: Path, trainer, target: str, trainable: int, metrics) -> PeriodicCheckpoint | None:
    """SAVE_INTERVAL's periodic checkpoints (None when 0), sized by what a checkpoint of this model holds."""
    if s.save_interval == 0:
        return None
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    periodic = PeriodicCheckpoint(s, work, target, weights + 12 * trainable, metrics, trainer.is_world_process_zero())
    log(periodic.describe())
    return periodic


def save_stopped(trainer, work: Path, reason: str, metrics: CheckpointMetrics) -> None:
    """A shard stopped mid-way: its full training state written (rank 0) to publish as last-checkpoint/."""
    log(f"stopped by {reason} at step {trainer.state.global_step} of {trainer.state.max_steps}: saving the full training "
        "state to publish as last-checkpoint/ (the next run resumes here; the state does not advance)")
    if trainer.is_world_process_zero():
        refuse_non_finite(trainer.accelerator.unwrap_model(trainer.model_wrapped), None)
        save_checkpoint(trainer, work, metrics)
    trainer.accelerator.wait_for_everyone()


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
    except stopping.StopRequested:
        budget.stopped = "a stop signal"
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        return None, {}
    if evaluator is not None:
        return best_of_shard(evaluator, budget, trainer, model, after, s, precision)
    return after, {}


def finish_shard(s: Settings, trainer, tok, work: Path, manifest: Manifest, precision: str,
                 metrics: ShardMetrics) -> None:
    """A shard trained to its end: its last evaluation reported, the batch order kept, and on rank 0
    the model checked finite, merged when NF4 + LoRA, and written to WORK_DIR/final with `metrics`."""
    from lm_trainer import DATA_ORDER

    after, tokens = metrics.eval_loss, metrics.tokens
    # The last step's evaluation, unless an early stop made it during training (reported then).
    if trainer.is_world_process_zero() and metrics.early_stopped_at != trainer.state.global_step:
        status_page.emit("eval", tokens=tokens, loss=after)
        log_validation_loss(trainer, s, work, manifest, trainer.state.global_step,
                            metrics.last_step_eval_loss if metrics.last_step_eval_loss is not None else after)
    log(f"validation loss after training: {after:.4f} (perplexity {metrics.perplexity:.2f}); "
        f"{metrics.steps} steps, {tokens:,} tokens in {metrics.train_runtime_s:.0f} s ({metrics.tokens_per_s:,.0f} tokens/s)")
    metrics.data_order_sha256 = hashlib.sha256(json.dumps(trainer.batch_digests).encode()).hexdigest()
    if trainer.is_world_process_zero():
        (work / "runs").mkdir(parents=True, exist_ok=True)
        (work / "runs" / DATA_ORDER).write_text(json.dumps(trainer.batch_digests))
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        refuse_non_finite(model, after)
        if manifest.train_format == "nf4":
            model = merge_checked(model, trainer, precision, after, metrics)
        save_final(model, tok, work, precision, metrics)


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
    except stopping.StopRequested:
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


def merge_checked(peft_model, trainer, precision: str, adapter_loss: float, metrics: ShardMetrics):
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
    metrics.merged_eval_loss, metrics.merge_delta_pct = merged_loss, delta * 100
    return merged


def _write_final(work: Path, fill, metrics: ShardMetrics | CheckpointMetrics) -> None:
    """WORK_DIR/final = what `fill(staged)` writes plus metrics.json, written beside and renamed in."""
    with replacing(work / "final") as staged:
        fill(staged)
        metrics.write(staged / METRICS_FILE)


def save_checkpoint(trainer, work: Path, metrics: CheckpointMetrics) -> None:
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


def save_final(model, tok, work: Path, precision: str, metrics: ShardMetrics) -> None:
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


def main(argv: list[str] | None = None) -> int:
    redact.install()
    quiet_disk_full_in_threads()
    stopping.install()  # a no-op when run as a script: done before the imports
    try:
        s = load_settings()
    except BadInput as e:
        return report(e)
    work = Path(s.work_dir)
    if not (work / "prepared" / MANIFEST_FILE).exists():
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
