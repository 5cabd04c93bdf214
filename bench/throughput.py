"""Training throughput of our training path against a seed-like baseline, measured in the same run.

    python bench/throughput.py --corpus data/pretrain.jsonl [--steps 8] [--preset 1B --seq 2048 --batch 8]

Model: by default a ~27M Llama (d=512, 6 layers, 8 heads, untied embeddings, vocab 8192, sequences
of 512), batch 8; `--preset NAME` takes a preset's shape instead (at a vocabulary of 32000), `--seq`
and `--batch` the sequence length and batch. Precision: what PRECISION=auto resolves to here (bf16
on this CPU and on Ampere+ GPUs). Both paths run the same TRL trainer on the same DeepSpeed ZeRO-2
engine in this process (one rank, the GPU when there is one):

- ours: prep.py's packed sequences (no padding), no gradient checkpointing, the model's own loss;
- baseline (configured like the seed pipeline): one document per row, no packing, TRL's
  DataCollatorForLanguageModeling with pad_to_multiple_of=8, gradient checkpointing, TRL's loss.

Prints one JSON line: real (non-pad) tokens per second of each, the speed-up, and MFU against this
machine's matmul peak in that precision measured here (model FLOPs per token = 6·N_matmul +
12·layers·d·seq). On a GPU also each path's peak GPU memory beside preflight's estimate for ours.
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


def bench_architecture(preset: str | None = None, seq: int = SEQ) -> dict:
    """The benchmark's model: the shape rules at d=D (SwiGLU 1344), untied embeddings; or a preset's
    shape at a vocabulary of 32000."""
    from architecture import preset_shape, shape

    if preset:
        return {**preset_shape(preset, 32000), "max_position_embeddings": seq}
    return {**shape(D, LAYERS, VOCAB, HEADS, KV_HEADS), "tie_word_embeddings": False, "max_position_embeddings": seq}


def matmul_peak_flops(dtype_name: str, n: int | None = None, reps: int = 6) -> float:
    """Best observed FLOP/s of an n×n matmul in `dtype_name` on this machine (all threads)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (8192 if dev == "cuda" else 4096)  # a GPU needs the larger product to reach its peak
    if dev == "cuda":
        reps = max(reps, 20)
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


def flops_per_token(arch: dict, seq: int = SEQ) -> float:
    from architecture import count_parameters

    # Every weight that multiplies activations: the layers and the LM head, not the embedding lookup.
    n_matmul = count_parameters({**arch, "tie_word_embeddings": True}) - arch["hidden_size"]
    return 6 * n_matmul + 12 * arch["num_hidden_layers"] * arch["hidden_size"] * seq


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


def measure(trainer, clock, warmup: int) -> tuple[float, dict | None]:
    """Real tokens/s after `warmup` steps, and on a GPU the peak memory of the run (bytes)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    memory = None
    if cuda:
        memory = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                  "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    return (n1 - n0) / (t1 - t0), memory


def baseline_path(tok, docs, need, seq, batch, total_steps, warmup, precision, s, work, model) -> tuple[float, dict | None]:
    """The seed's configuration: one document per row, padded batches, gradient checkpointing, TRL's loss."""
    import torch
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import train
    from config import deepspeed_config
    from prep import to_dataset

    rows = [d[:seq - 1] + [tok.eos_token_id] for d in (docs * -(-need // len(docs)))[:need]]
    base_args = SFTConfig(output_dir=str(work / "baseline"), per_device_train_batch_size=batch, max_steps=total_steps,
                          learning_rate=1e-4, bf16=precision == "bf16", fp16=precision == "fp16",
                          use_cpu=not torch.cuda.is_available(), deepspeed=deepspeed_config(s, precision),
                          **train.checkpointing_arg(True), packing=False, report_to=[], save_strategy="no",
                          include_num_input_tokens_seen="non_padding", dataset_kwargs={"skip_prepare_dataset": True},
                          remove_unused_columns=False, disable_tqdm=True, logging_steps=10**6, max_length=seq)
    clock_b = StepClock()
    baseline = SFTTrainer(model=model(), args=base_args, train_dataset=to_dataset(rows), processing_class=tok,
                          data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8),
                          callbacks=[clock_b])
    return measure(baseline, clock_b, warmup)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="jsonl file with a 'text' column")
    ap.add_argument("--steps", type=int, default=8, help="measured optimizer steps per path (after 2 warm-up steps)")
    ap.add_argument("--preset", help="a preset's shape (MODEL_SIZE names, e.g. 1B) instead of the ~27M model")
    ap.add_argument("--seq", type=int, default=SEQ, help=f"sequence length (default {SEQ})")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"sequences per step (default {BATCH})")
    ap.add_argument("--impl", choices=["transformers", "ours"], default="transformers", help="MODEL_IMPL of our path")
    ap.add_argument("--compile", action="store_true", help="COMPILE=true for our path (needs --impl ours)")
    ap.add_argument("--no-baseline", action="store_true", help="measure our path only")
    args = ap.parse_args(argv)
    seq, batch = args.seq, args.batch
    from jit_ops import single_rank_env

    for k, v in single_rank_env().items():
        os.environ.setdefault(k, v)

    import datasets
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    import train
    from architecture import count_parameters
    from config import load_settings, resolve_precision
    from handoff import MANIFEST_FILE, Manifest
    from run_state import RunPlan
    from prep import pack, to_dataset, tokenize_texts
    from tokenizer import train_tokenizer

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    warmup = 2
    total_steps = warmup + args.steps
    texts = [json.loads(line)["text"] for line in open(args.corpus) if line.strip()]
    tok = train_tokenizer(texts[:20000], VOCAB, seq)
    docs = tokenize_texts(tok, texts)
    s = load_settings({"BATCH_SIZE": str(batch), "MAX_LENGTH": str(seq), "SHARD_STEPS": str(total_steps),
                       "GRADIENT_CHECKPOINTING": "false", "TIME_BUDGET": "10h", "WORK_DIR": tempfile.mkdtemp(),
                       "MODEL_IMPL": args.impl, "COMPILE": str(args.compile).lower()})
    precision = resolve_precision(s)
    arch = bench_architecture(args.preset, seq)

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**arch, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))

    need = batch * total_steps
    # Ours: prep's packing, then train.py's trainer (same builder the pipeline uses).
    work = Path(s.work_dir)
    prepared = work / "prepared"
    blocks = pack(docs, tok.eos_token_id, seq)
    blocks = (blocks * -(-need // len(blocks)))[:need]  # a small corpus is repeated to fill the steps
    to_dataset(blocks).save_to_disk(prepared / "train")
    to_dataset(blocks[:batch]).save_to_disk(prepared / "val")
    tok.save_pretrained(prepared / "tokenizer")
    model().save_pretrained(prepared / "model")
    Manifest.outside_prep(run_id="bench", plan=RunPlan("pretrain", 0, str(work / "out"), None), architecture=arch,
                          parameters=count_parameters(arch), train_format="float", train_sequences=need,
                          val_sequences=batch, tokens=(need + batch) * seq).write(prepared / MANIFEST_FILE)
    # DeepSpeed's CPU comm op is built under our build lock, as train.fit does: another process
    # building it at the same time would otherwise make this engine's own build fail.
    from jit_ops import load_comm_op

    load_comm_op(lambda msg: None)
    clock = StepClock()
    trainer, _, _ = train.build_trainer(s, prepared, work, precision, [clock])
    ours, ours_memory = measure(trainer, clock, warmup)
    del trainer
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    base, base_memory = (0.0, None)
    if not args.no_baseline:
        base, base_memory = baseline_path(tok, docs, need, seq, batch, total_steps, warmup, precision, s, work, model)

    import shutil

    from architecture import count_parameters

    shutil.rmtree(work, ignore_errors=True)  # the prepared copy of the model (GBs for a large preset)
    peak = matmul_peak_flops(precision)
    fpt = flops_per_token(arch, seq)
    memory = None
    if ours_memory:
        from mem_estimate import estimate

        est = estimate(arch, precision=precision, batch=batch, seq=seq, checkpointing=False, nf4=False, gpu=True)
        memory = {"ours": ours_memory, "baseline": base_memory, "estimate_training_bytes": est.training_bytes,
                  # the estimate's training figure stands for what the run takes from the GPU (reserved)
                  "estimate_rel_error": round(est.training_bytes / ours_memory["peak_reserved_bytes"] - 1, 4)}
    print(json.dumps({
        "bench": "throughput",
        "model": {**arch, "parameters": count_parameters(arch), "seq": seq, "batch": batch,
                  "preset": args.preset},
        "precision": precision,
        "real_tokens_per_s": round(ours, 1),
        "baseline_real_tokens_per_s": None if args.no_baseline else round(base, 1),
        "speedup": None if args.no_baseline else round(ours / base, 2),
        "mfu": round(ours * fpt / peak, 4),
        "baseline_mfu": None if args.no_baseline else round(base * fpt / peak, 4),
        "model_impl": args.impl, "compile": args.compile,
        "flops_per_token": fpt,
        "peak_matmul_flops": round(peak),
        "memory": memory,
        "measured_steps": args.steps,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
