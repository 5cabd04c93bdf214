"""The trainer: TRL's SFTTrainer with this project's loss (chunked, no full logits), a digest of
every micro-batch in training order, and what a checkpoint carries beyond the trainer's own state.

Imported by train.py once the heavy libraries are wanted (trl pulls in transformers and torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trl import SFTTrainer

from lm_loss import causal_lm_loss

DATA_ORDER = "data_order.json"  # the micro-batch digests, in a checkpoint and in runs/


class Trainer(SFTTrainer):
    # One digest per micro-batch, in training order (a resumed shard starts with the digests of
    # the steps before the interruption, carried in the checkpoint): runs/data_order.json shows
    # that a chain of runs trained on exactly the batches of one uninterrupted run.
    evaluator = None  # an evaluation.Evaluator when evaluating during training

    def __init__(self, *args, batch_digests: list[str] | None = None, **kwargs) -> None:
        # TRL casts the trainable weights of a quantized model (the LoRA adapters) to bf16 whatever
        # the run's precision; the adapters keep the dtype quant_utils.add_lora gave them for this
        # precision: fp32 on a CPU without bf16 units (emulated bf16 is slow), fp32 under PEFT's fp16
        # recipe (a T4 has no bf16), bf16 in a bf16 run (unchanged there).
        model = kwargs.get("model")
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad} if model is not None else {}
        super().__init__(*args, **kwargs)
        for n, p in self.model.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])
        self.batch_digests = list(batch_digests or [])  # a resumed shard's: those of the steps before

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"].detach().cpu().numpy().tobytes()
        self.batch_digests.append(hashlib.sha1(ids).hexdigest()[:16])
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(self.args.output_dir)
            Path(last, DATA_ORDER).write_text(json.dumps(self.batch_digests))
            if self.evaluator is not None:
                self.evaluator.write_into(Path(last))

    # TRL's default loss also computes per-token entropy and accuracy metrics; on CPU that halved
    # throughput (measured 1.2k vs 2.3k tokens/s on a 22M model). Here: the decoder's hidden
    # states, then lm_loss's chunked head + cross-entropy (no full logits). The decoder is called
    # directly rather than through the DeepSpeed engine's forward, which under ZeRO-2 only adds
    # timers; backward still goes through the engine.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self.accelerator.unwrap_model(model)
        if hasattr(core, "get_base_model"):  # PEFT: the Llama with the LoRA layers in it
            core = core.get_base_model()
        out = core.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                         position_ids=inputs.get("position_ids"), use_cache=False)
        loss = causal_lm_loss(out.last_hidden_state, core.lm_head.weight, inputs["labels"], num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens and the ranks' gradients are averaged
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss
