"""Evaluation during training: validation loss every EVAL_INTERVAL steps, the best weights kept,
early stopping after EARLY_STOPPING_PATIENCE evaluations without improvement, sample generations.

The state (every evaluation so far, the best one, evaluations since it) travels with the full-state
checkpoint as `eval_state.json`, and the best weights as `best_weights.safetensors` (the trainable
parameters only: the whole model, or the LoRA adapters), so a shard interrupted and resumed any
number of times evaluates, stops early and picks its best model exactly as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import status_page
from config import Settings
from handoff import Manifest
from tracking import log_validation_loss
from stopping import StopRequested, check_stop
from train_control import all_ranks_max, log

EVAL_STATE = "eval_state.json"
BEST_WEIGHTS = "best_weights.safetensors"
EVALS_PER_SHARD = 4  # EVAL_INTERVAL unset: this many evaluations over a shard, the last at its end

# Fixed prompts for the sample generations at each evaluation (the instruct stage sends them as chats).
PRETRAIN_PROMPTS = ("Once upon a time", "The most important thing about", "In the city of")
CHAT_PROMPTS = ("What does a baker do?", "Name three colors.", "How do I boil an egg?")


def interval_for(setting: int | None, max_steps: int) -> int:
    """Steps between evaluations: EVAL_INTERVAL, or unset a quarter of the shard's steps; 0 = off."""
    if setting is not None:
        return setting
    return max(1, math.ceil(max_steps / EVALS_PER_SHARD))


class Evaluator:
    """Decides when to evaluate, keeps the record of evaluations and the best one.

    `measure()` returns the validation loss of the model as it is now (the same measure as before
    and after training), or None when a stop request cut it short. `save_best()` / `load_best()`
    write and read the trainable weights (callables, so the logic here runs without a model)."""

    def __init__(self, interval: int, patience: int | None, keep_best: bool, measure: Callable[[], float | None],
                 save_best: Callable[[Path], None], load_best: Callable[[Path], None], work: Path,
                 log: Callable[[str], None] = print) -> None:
        self.interval, self.patience, self.keep_best = interval, patience, keep_best
        self.measure, self.save_best, self.load_best, self.work, self.log = measure, save_best, load_best, work, log
        self.evals: list[list[float]] = []  # [step, loss] in order
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0
        self.early_stopped_at: int | None = None

    # --- decisions -------------------------------------------------------------------------------
    def due(self, step: int, max_steps: int) -> bool:
        """At this step (not the shard's last one: the run's final evaluation is that)."""
        return self.interval > 0 and step < max_steps and step % self.interval == 0

    def evaluate(self, step: int) -> float | None:
        """Measure, record and compare; None when a stop request cut the measure short."""
        loss = self.measure()
        if loss is None:
            return None
        self.record(step, loss)
        best = f"best {self.best:.4f} at step {self.best_step}"
        self.log(f"evaluation at step {step}: validation loss {loss:.4f} ({best}"
                 + (f"; {self.since_best} evaluation(s) without improvement of {self.patience})" if self.patience else ")"))
        return loss

    def record(self, step: int, loss: float) -> None:
        self.evals.append([step, loss])
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best, self.best_step, self.since_best = loss, step, 0
            if self.keep_best:
                self.save_best(self.work / BEST_WEIGHTS)
        else:
            self.since_best += 1

    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def restore_best(self, last_step: int) -> bool:
        """Put the best weights back when they are not the current ones; whether it did."""
        if not self.keep_best or self.best_step is None or self.best_step == last_step:
            return False
        self.load_best(self.work / BEST_WEIGHTS)
        return True

    # --- the checkpoint --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"evals": self.evals, "best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def write_into(self, checkpoint: Path) -> None:
        """eval_state.json and the best weights beside the trainer's state (rank 0, after a save)."""
        (checkpoint / EVAL_STATE).write_text(json.dumps(self.state()))
        best = self.work / BEST_WEIGHTS
        if best.exists():
            shutil.copy2(best, checkpoint / BEST_WEIGHTS)

    def read_from(self, checkpoint: Path) -> None:
        """The state a resumed shard carries on from (absent in a checkpoint of an older version)."""
        p = checkpoint / EVAL_STATE
        if not p.exists():
            return
        state = json.loads(p.read_text())
        self.evals, self.best, self.best_step = state["evals"], state["best"], state["best_step"]
        self.since_best = state["since_best"]
        if (checkpoint / BEST_WEIGHTS).exists():
            shutil.copy2(checkpoint / BEST_WEIGHTS, self.work / BEST_WEIGHTS)

    def summary(self) -> dict[str, Any]:
        """What the shard's history entry says of its evaluations."""
        out: dict[str, Any] = {"evals": self.evals}
        if self.best_step is not None:
            out.update(best_step=self.best_step, best_eval_loss=self.best)
        if self.early_stopped_at is not None:
            out["early_stopped_at"] = self.early_stopped_at
        return out


def trainable_state(model) -> dict[str, Any]:
    """The trainable parameters (the whole model, or the LoRA adapters), on the CPU."""
    # No copy on a CPU (the file is written from the parameters themselves); a GPU's go to host memory.
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(trainable_state(model), str(tmp))
    tmp.replace(path)


def load_trainable(model, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n].to(p.device, p.dtype))


def samples(model, tok, chat: bool, max_new_tokens: int = 24) -> list[dict[str, str]]:
    """Greedy continuations of the fixed prompts (chats in the instruct stage): text to read beside
    the loss curve, in TensorBoard and runs/<run>/samples.jsonl."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        device = next(model.parameters()).device
        for prompt in (CHAT_PROMPTS if chat else PRETRAIN_PROMPTS):
            text = (tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                    if chat else prompt)
            ids = tok(text, return_tensors="pt", add_special_tokens=not chat).to(device)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append({"prompt": prompt, "completion": tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)})
    finally:
        model.train(was_training)
    return out


# --- wired to the trainer ---------------------------------------------------------------------------


def validation_loss(model, dataset, collator, batch_size: int, precision: str) -> float:
    """Mean next-token cross-entropy per label token over `dataset` (the same measure before and after
    training; Trainer.evaluate cannot run on a ZeRO-2 engine before training has built it). As in
    training, the decoder's hidden states go through lm_loss's chunked head, labelled positions
    only: the full logits (tokens x vocabulary, and their fp32 copy) never exist, here either."""
    import torch

    from lm_loss import causal_lm_loss

    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the Llama inside
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
                hidden = core.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
                total += float(causal_lm_loss(hidden, core.lm_head.weight, batch["labels"])) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


def make_evaluator(s: Settings, trainer, tok, work: Path, manifest: Manifest, precision: str, budget):
    """The evaluation during training (evaluation.py) wired to this trainer: the validation loss of
    the model as it trains (a stop request during it, on any rank, cuts it short everywhere), the
    best weights kept by rank 0, each evaluation reported (TensorBoard eval/loss, the status page,
    sample generations) by rank 0. None when EVAL_INTERVAL=0."""
    import torch.distributed as dist

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
        log_validation_loss(trainer, s, work, manifest, step, loss, samples(model, tok, manifest.plan.inst))

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
