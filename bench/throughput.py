"""Training throughput of our training path against a seed-like baseline, measured in the same run.

    python bench/throughput.py --corpus data/pretrain.jsonl [--steps 8]

Model: a ~27M Llama (d=512, 6 layers, 8 heads, untied embeddings, vocab 8192, sequences of 512), batch 8, in the
precision PRECISION=auto resolves to here (bf16 on this CPU). Both paths run the same TRL trainer
on the same DeepSpeed ZeRO-2 engine in this process (one rank):

- ours: prep.py's packed sequences (no padding), no gradient checkpointing, the model's own loss;
- baseline (configured like the seed pipeline): one document per row, no packing, TRL's
  DataCollatorForLanguageModeling with pad_to_multiple_of=8, gradient checkpointing, TRL's loss.

Prints one JSON line: real (non-pad) tokens per second of each, the speed-up, and MFU against this
machine's bf16 matmul peak measured here (model FLOPs per token = 6·N_matmul + 12·layers·d·seq).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

D, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, BATCH = 512, 6, 8, 8, 8192, 512, 8


def bench_architecture() -> dict:
    """The benchmark's model: the shape rules at d=D (SwiGLU 1344), untied embeddings."""
    from architecture import shape

    return {**shape(D, LAYERS, VOCAB, HEADS, KV_HEADS), "tie_word_embeddings": False, "max_position_embeddings": SEQ}


def matmul_peak_flops(dtype_name: str, n: int = 4096, reps: int = 6) -> float:
    """Best observed FLOP/s of an n×n matmul in `dtype_name` on this machine (all threads)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    best = 0.0
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_token(arch: dict) -> float:
    from architecture import count_parameters

    # Every weight that multiplies activations: the layers and the LM head, not the embedding lookup.
    n_matmul = count_parameters({**arch, "tie_word_embeddings": True}) - arch["hidden_size"]
    return 6 * n_matmul + 12 * arch["num_hidden_layers"] * arch["hidden_size"] * SEQ


class StepClock:
    """Wall time and non-pad tokens at the end of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.marks: list[tuple[float, int]] = []

            def on_step_end(self, args, state, control, **kw):
                self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        return _Clock()


def measure(trainer, clock, warmup: int) -> float:
    trainer.train()
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    return (n1 - n0) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="jsonl file with a 'text' column")
    ap.add_argument("--steps", type=int, default=8, help="measured optimizer steps per path (after 2 warm-up steps)")
    args = ap.parse_args(argv)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29400 + os.getpid() % 500)}.items():
        os.environ.setdefault(k, v)

    import datasets
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import train
    from config import deepspeed_config, load_settings, resolve_precision
    from prep import pack, to_dataset, tokenize_texts, train_tokenizer

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    warmup = 2
    total_steps = warmup + args.steps
    texts = [json.loads(line)["text"] for line in open(args.corpus) if line.strip()]
    tok = train_tokenizer(texts[:20000], VOCAB, SEQ)
    docs = tokenize_texts(tok, texts)
    s = load_settings({"BATCH_SIZE": str(BATCH), "MAX_LENGTH": str(SEQ), "SHARD_STEPS": str(total_steps),
                       "GRADIENT_CHECKPOINTING": "false", "TIME_BUDGET": "10h", "WORK_DIR": tempfile.mkdtemp()})
    precision = resolve_precision(s)
    arch = bench_architecture()

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**arch, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))

    need = BATCH * total_steps
    # Ours: prep's packing, then train.py's trainer (same builder the pipeline uses).
    work = Path(s.work_dir)
    prepared = work / "prepared"
    blocks = pack(docs, tok.eos_token_id, SEQ)[:need]
    to_dataset(blocks).save_to_disk(prepared / "train")
    to_dataset(blocks[:BATCH]).save_to_disk(prepared / "val")
    tok.save_pretrained(prepared / "tokenizer")
    model().save_pretrained(prepared / "model")
    (prepared / "manifest.json").write_text(json.dumps({"architecture": arch, "train_format": "float", "run_id": "bench",
                                                        "plan": {"stage": "pretrain", "shard": 0}}))
    # DeepSpeed's CPU comm op is built under our build lock, as train.fit does: another process
    # building it at the same time would otherwise make this engine's own build fail.
    from jit_ops import load_comm_op

    load_comm_op(lambda msg: None)
    clock = StepClock()
    trainer, _, _ = train.build_trainer(s, prepared, work, precision, [clock])
    ours = measure(trainer, clock, warmup)
    del trainer

    # Baseline: the seed's configuration.
    rows = [d[:SEQ - 1] + [tok.eos_token_id] for d in docs[:need]]
    base_args = SFTConfig(output_dir=str(work / "baseline"), per_device_train_batch_size=BATCH, max_steps=total_steps,
                          learning_rate=1e-4, bf16=precision == "bf16", fp16=precision == "fp16",
                          use_cpu=not torch.cuda.is_available(), deepspeed=deepspeed_config(s, precision),
                          activation_checkpointing=True, packing=False, report_to=[], save_strategy="no",
                          include_num_input_tokens_seen="non_padding", dataset_kwargs={"skip_prepare_dataset": True},
                          remove_unused_columns=False, disable_tqdm=True, logging_steps=10**6, max_length=SEQ)
    clock_b = StepClock()
    baseline = SFTTrainer(model=model(), args=base_args, train_dataset=to_dataset(rows), processing_class=tok,
                          data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8),
                          callbacks=[clock_b])
    base = measure(baseline, clock_b, warmup)

    peak = matmul_peak_flops(precision)
    fpt = flops_per_token(arch)
    print(json.dumps({
        "bench": "throughput",
        "model": {**arch, "parameters": sum(p.numel() for p in model().parameters()), "seq": SEQ, "batch": BATCH},
        "precision": precision,
        "real_tokens_per_s": round(ours, 1),
        "baseline_real_tokens_per_s": round(base, 1),
        "speedup": round(ours / base, 2),
        "mfu": round(ours * fpt / peak, 4),
        "baseline_mfu": round(base * fpt / peak, 4),
        "flops_per_token": fpt,
        "peak_matmul_flops": round(peak),
        "measured_steps": args.steps,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
