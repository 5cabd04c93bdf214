"""NF4 + LoRA: merge fidelity, NF4 round trip, and training memory against full training.

    python bench/quant.py [--pretrain-steps 150] [--lora-steps 300] [--precision auto]

Everything runs in the precision a run uses on this machine (`precision` in the output; auto: bf16
on a GPU or a CPU with bf16 units, fp32 on a CPU without, where bf16 is emulated and slow). "float"
below is that precision's storage dtype: bf16 for bf16, fp32 otherwise.

1. Merge fidelity. A tiny Llama (the `cpu` preset) is pretrained in float on the embedded corpus,
   converted to NF4 (quant_utils.convert) and trained with LoRA for --lora-steps steps. Perplexity on
   held-out blocks of (a) the adapter on the dequantized base (each 4-bit base layer replaced by its
   float dequantization, adapters unmerged), (b) our merge (quant_utils.to_float: fp32 merge, plain
   float weights), (c) PEFT's merge_and_unload into the 4-bit weights.
2. NF4 -> float -> NF4 (quant_utils.convert both ways): every stored tensor compared bit for bit.
3. Peak memory of a ~110M model through train.py's own fit (3 steps of batch 4 x 256 tokens, TRL +
   DeepSpeed ZeRO-2, mixed precision with fp32 master weights and AdamW states, then the merge and the save):
   full training (USE_QUANT=false) vs NF4 base + LoRA (USE_QUANT=true, r=16 on every projection),
   each in its own process as bench/memory.py measures it, with gradient checkpointing on in both
   (the usual QLoRA setting; peak_mem_ratio) and off in both. The absolute figures are printed.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def perplexity(model, blocks, batch: int = 16) -> tuple[float, object]:
    """exp(mean next-token loss) over `blocks` (a LongTensor (N, T)), and the logits of the first batch."""
    import torch

    total, count, first = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i:i + batch]
            out = model(input_ids=x, labels=x)
            n = x[:, 1:].numel()
            total += float(out.loss) * n
            count += n
            if first is None:
                first = out.logits.float()
    return math.exp(total / count), first


def merge_fidelity(args, work: Path, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from config import architecture, load_settings
    from prep import pack, tokenize_texts
    from tokenizer import train_tokenizer
    from quant_utils import add_lora, convert, dequantized_weight, storage_dtype, to_float

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()]
    tok = train_tokenizer(texts[:3000], 4096, 128)
    blocks = torch.tensor([list(b) for b in pack(tokenize_texts(tok, texts[:4000]), tok.eos_token_id, 128)[:-1]], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    blocks = blocks[torch.randperm(len(blocks), generator=gen)]
    val, train = blocks[:64], blocks[64:]

    s = load_settings({"LORA_DROPOUT": "0"})
    arch = {**architecture(s), "vocab_size": len(tok), "max_position_embeddings": 128}
    torch.manual_seed(0)
    dtype = storage_dtype(precision)
    model = LlamaForCausalLM(LlamaConfig(**arch)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(args.pretrain_steps):
        x = train[(step * 16) % (len(train) - 16):][:16]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(work / "base")
    convert(work / "base", work / "nf4", "nf4", precision)

    def lora_model():
        return add_lora(AutoModelForCausalLM.from_pretrained(work / "nf4", device_map={"": "cpu"}), s, False, precision)

    peft = lora_model()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.lora_steps):
        x = train[(step * 16 + 7) % (len(train) - 16):][:16]
        peft(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    peft.eval()
    adapter_state = {k: v.detach().clone() for k, v in peft.state_dict().items() if "lora_" in k}

    ppl_b, logits_b = perplexity(to_float(peft, dtype), val)          # (b) our merge
    fresh = lora_model()
    fresh.load_state_dict(adapter_state, strict=False)
    ppl_c, _ = perplexity(fresh.eval().merge_and_unload(), val)                  # (c) PEFT into 4-bit
    from peft.tuners.lora import LoraLayer

    class DequantizedLinear(torch.nn.Module):
        """A 4-bit layer's weight dequantized once, computing as bitsandbytes does: in the compute
        dtype, returning the input's dtype."""

        def __init__(self, weight):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    for module in peft.get_base_model().modules():                               # (a) dequantized base
        if isinstance(module, LoraLayer):
            module.base_layer = DequantizedLinear(dequantized_weight(module.base_layer).to(dtype))
    ppl_a, logits_a = perplexity(peft, val)
    base_ppl, _ = perplexity(AutoModelForCausalLM.from_pretrained(work / "base"), val)
    return {
        "ppl_base_before_lora": round(base_ppl, 4),
        "ppl_adapter_on_dequantized_base": round(ppl_a, 4),
        "ppl_merge_float": round(ppl_b, 4),
        "ppl_merge_4bit": round(ppl_c, 4),
        "merge_float_ppl_delta_pct": round(abs(ppl_b - ppl_a) / ppl_a * 100, 4),
        "merge_4bit_ppl_delta_pct": round(abs(ppl_c - ppl_a) / ppl_a * 100, 4),
        "merge_float_max_abs_logit_diff": round(float((logits_b - logits_a).abs().max()), 4),
        "parameters": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(work / "base").parameters()),
        "pretrain_steps": args.pretrain_steps, "lora_steps": args.lora_steps,
    }


def round_trip(work: Path, precision: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from quant_utils import convert

    convert(work / "nf4", work / "rt_float", "float", precision)
    convert(work / "rt_float", work / "rt_nf4", "nf4", precision)
    a, b = load_file(work / "nf4" / "model.safetensors"), load_file(work / "rt_nf4" / "model.safetensors")
    quantized = [k[: -len(".absmax")] for k in a if k.endswith(".absmax")]
    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return {"nf4_roundtrip_identical": same, "nf4_quantized_tensors": len(quantized)}


def peak_memory(work: Path, target: str, precision: str) -> dict:
    """Full training vs NF4 + LoRA on the same fresh model, each case measured by bench/memory.py
    (train.py's fit in its own process), with gradient checkpointing on in both and off in both."""
    from architecture import count_parameters
    from memory import make_model, run_case

    n = count_parameters(make_model(target, 256, work / "mem", precision))
    cases = {f"{case}_checkpointing_{'on' if ckpt else 'off'}": run_case(case, work / "mem", 4, 256, 3, ckpt, precision)
             for ckpt in (True, False) for case in ("full", "nf4")}
    ratio = {c: cases[f"nf4_checkpointing_{c}"]["training_peak_bytes"] / cases[f"full_checkpointing_{c}"]["training_peak_bytes"]
             for c in ("on", "off")}
    return {
        "peak_mem_ratio": round(ratio["on"], 4),
        "peak_mem_ratio_without_checkpointing": round(ratio["off"], 4),
        "peak_mem_full_adamw_bytes": cases["full_checkpointing_on"]["training_peak_bytes"],
        "peak_mem_nf4_lora_bytes": cases["nf4_checkpointing_on"]["training_peak_bytes"],
        "memory_model_parameters": n,
        "memory_cases": cases,
        "memory_method": "per case, own process (bench/memory.py): train.py's fit (validation, TRL + DeepSpeed ZeRO-2 "
                         f"training in {precision}, fp32 master weights and AdamW states on the trainable parameters, "
                         "the LoRA merge, the final save), 3 steps of batch 4 x 256, gradient checkpointing on in both "
                         "(peak_mem_ratio) or off in both; peak resident memory (VmHWM) minus resident memory with the "
                         "libraries imported",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--lora-steps", type=int, default=300)
    ap.add_argument("--memory-target", default="110M", help="size of the model of the memory comparison")
    ap.add_argument("--precision", default="auto", help="bf16 | fp32 | auto (what a run uses on this machine)")
    args = ap.parse_args(argv)
    from clean_env import machine_precision

    precision = machine_precision(args.precision)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    out = {"bench": "quant", "precision": precision, **merge_fidelity(args, work, precision), **round_trip(work, precision),
           **peak_memory(work, args.memory_target, precision),
           "machine": {"cpu": platform.machine(), "cores": os.cpu_count()}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
