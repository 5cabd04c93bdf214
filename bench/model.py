"""Our Llama (model.py) against transformers' LlamaForCausalLM, measured in the same run.

    python bench/model.py [--steps 20] [--prompts 20] [--new-tokens 64]

- parity (fp32, same weights): max |Δlogit| on random weights, on a briefly trained model, and with
  left-padded batches; the loss and the largest gradient difference;
- greedy generation: 64 tokens on 20 prompts with our KV cache (`model.generate`) against
  transformers' `generate()`; the share of prompts with identical tokens, and tokens/s of both at
  batch 1;
- weight copy (`model.copy_weights`) of a 1B-preset checkpoint (vocabulary 32,000, bf16 safetensors)
  into our model, in a fresh process: seconds, and peak RSS against the model's own bytes plus the
  memory-mapped source's (what is above both is what the copy holds at once: one tensor);
- training step: the throughput benchmark's ~27M model (d=512, 6 layers, vocab 8192, untied,
  sequences of 512, batch 8; --seq/--batch) in the precision PRECISION=auto gives here (bf16 on a
  CPU with bf16 units or a bf16 GPU, fp32 otherwise: emulated bf16 is not what a run would use),
  the step the trainer runs (decoder → chunked LM-head loss → backward → AdamW), alternated between transformers' class, ours, and ours with COMPILE (each
  block through torch.compile, dynamic shapes); the median step time of each, and the compile's
  one-time cost (its first step less the median).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # throughput.py (after the root: this file is also "model")


def pair(cfg, seed: int, noise: float = 0.05):
    import torch
    from transformers import LlamaForCausalLM as HF

    import model as ours

    torch.manual_seed(seed)
    hf = HF(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    mine = ours.LlamaForCausalLM(cfg)
    mine.load_state_dict(hf.state_dict())
    return hf.eval(), mine.eval()


def parity(cfg, vocab: int) -> dict[str, float]:
    import torch

    from lm_loss import causal_lm_loss

    hf, mine = pair(cfg, 0)
    x = torch.randint(3, vocab, (4, 128))
    random_diff = (hf(x).logits - mine(x).logits).abs().max().item()
    # a briefly trained model: 30 AdamW steps on a repeating sequence pull the weights off their init
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    hf.train()
    for _ in range(30):
        out = hf.model(input_ids=x)
        causal_lm_loss(out.last_hidden_state, hf.lm_head.weight, x).backward()
        opt.step(), opt.zero_grad()
    hf.eval()
    mine.load_state_dict(hf.state_dict())
    trained_diff = (hf(x).logits - mine(x).logits).abs().max().item()
    mask = torch.ones_like(x)
    mask[1, :40] = 0
    mask[2, 90:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a, b = hf(x, attention_mask=mask, position_ids=pos).logits, mine(x, attention_mask=mask, position_ids=pos).logits
    padded_diff = (a - b)[mask.bool()].abs().max().item()
    hf.train(), mine.train()
    la, lb = hf(x, labels=x).loss, mine(x, labels=x).loss
    la.backward(), lb.backward()
    grads = dict(mine.named_parameters())
    grad_rel = max(((grads[n].grad - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item()
                   for n, p in hf.named_parameters())
    # bf16: ours against transformers (SDPA), next to transformers against itself (SDPA vs eager)
    from transformers import LlamaForCausalLM as HF

    import copy

    eager = HF(copy.deepcopy(cfg))  # its own config: the attention backend is set on it
    eager.load_state_dict(hf.state_dict())
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        truth = hf.eval()(x).logits.float()  # fp32
        sdpa, ours_, eager_ = (m.to(torch.bfloat16).eval()(x).logits.float() for m in (hf, mine, eager))
    return {"max_abs_logit_diff_fp32": max(random_diff, trained_diff, padded_diff),
            "bf16_diff_ours_vs_transformers": (ours_ - sdpa).abs().max().item(),
            "bf16_diff_transformers_sdpa_vs_eager": (sdpa - eager_).abs().max().item(),
            # against the fp32 logits: transformers' bf16 model also rounds its RoPE frequencies to bf16
            "bf16_error_vs_fp32_ours": (ours_ - truth).abs().max().item(),
            "bf16_error_vs_fp32_transformers": (sdpa - truth).abs().max().item(),
            "bf16_error_vs_fp32_transformers_eager": (eager_ - truth).abs().max().item(),
            "logit_diff_random": random_diff, "logit_diff_trained": trained_diff, "logit_diff_padded": padded_diff,
            "loss_diff": abs(la.item() - lb.item()), "max_grad_diff_rel": grad_rel}


def generation(cfg, vocab: int, prompts: int, new_tokens: int) -> dict[str, float]:
    import torch

    import model as ours

    hf, mine = pair(cfg, 1)
    same, t_hf, t_ours = 0, 0.0, 0.0
    gen = torch.Generator().manual_seed(7)
    for i in range(prompts):
        prompt = torch.randint(3, vocab, (1, 8 + (i * 5) % 40), generator=gen)
        t = time.perf_counter()
        theirs = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
        t_hf += time.perf_counter() - t
        t = time.perf_counter()
        mine_out = ours.generate(mine, prompt, new_tokens)
        t_ours += time.perf_counter() - t
        same += bool(torch.equal(theirs, mine_out))
    n = prompts * new_tokens
    return {"greedy_identical": same / prompts, "generate_tokens_per_s_ours": round(n / t_ours, 1),
            "generate_tokens_per_s_transformers": round(n / t_hf, 1), "generate_speedup": round(t_hf / t_ours, 3)}


def train_step_times(steps: int, seq: int, batch: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig

    from architecture import config_kwargs
    from clean_env import machine_precision
    from lm_loss import causal_lm_loss
    from quant_utils import storage_dtype
    from throughput import VOCAB, bench_architecture

    precision = machine_precision()
    dtype = storage_dtype(precision)
    cfg = LlamaConfig(**config_kwargs(bench_architecture(seq=seq), seq), pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    hf, mine = pair(cfg, 2, noise=0.0)
    _, compiled = pair(cfg, 2, noise=0.0)
    compiled.compile_blocks()
    models = {"transformers": hf.to(dtype).train(), "ours": mine.to(dtype).train(),
              "ours_compiled": compiled.to(dtype).train()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    first: dict[str, float] = {}
    for i in range(steps + 1):
        for k, m in models.items():
            t = time.perf_counter()
            out = m.model(input_ids=x, attention_mask=mask, use_cache=False)
            causal_lm_loss(out.last_hidden_state, m.lm_head.weight, x).backward()
            opts[k].step(), opts[k].zero_grad()
            if i:  # the first step of each warms up (and compiles)
                times[k].append(time.perf_counter() - t)
            else:
                first[k] = time.perf_counter() - t
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"train_precision": precision, "train_seq": seq, "train_batch": batch,
            "train_step_s_ours": round(med["ours"], 4), "train_step_s_transformers": round(med["transformers"], 4),
            "train_step_s_ours_compiled": round(med["ours_compiled"], 4),
            "train_speedup": round(med["transformers"] / med["ours"], 3),
            "train_speedup_compiled": round(med["transformers"] / med["ours_compiled"], 3),
            "compile_s": round(first["ours_compiled"] - med["ours_compiled"], 1)}


def copy_child(source: Path) -> None:
    """In a fresh process: our model (uninitialised bf16 storage) filled from `source`; prints JSON."""
    import resource

    import torch
    from transformers import LlamaConfig

    import model as ours

    config = LlamaConfig.from_pretrained(source)
    with torch.device("meta"):
        target = ours.LlamaForCausalLM(config)
    target = target.to_empty(device="cpu").to(torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    report = ours.copy_weights(target, source)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "rss_before_copy": before, "peak_rss": peak, "complete": report.complete,
                      "copied": len(report.copied)}))


def weight_copy(size: str) -> dict[str, Any]:
    import subprocess
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from architecture import config_kwargs, count_parameters, preset_shape

    arch = preset_shape(size, 32000)
    config = LlamaConfig(**config_kwargs(arch, 2048), dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        config.save_pretrained(src)
        with torch.device("meta"):
            names = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
        gen = torch.Generator().manual_seed(0)
        save_file({n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in names.items()},
                  src / "model.safetensors", metadata={"format": "pt"})
        source_bytes = (src / "model.safetensors").stat().st_size
        out = subprocess.run([sys.executable, __file__, "--copy-child", str(src)], capture_output=True, text=True,
                             check=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
    model_bytes = 2 * count_parameters(arch)
    held = child["peak_rss"] - child["rss_before_copy"]
    return {"copy_preset": size, "copy_parameters": count_parameters(arch), "copy_complete": child["complete"],
            "copy_seconds": round(child["seconds"], 2), "copy_model_bytes": model_bytes, "copy_source_bytes": source_bytes,
            "copy_peak_rss_bytes": child["peak_rss"], "copy_rss_growth_bytes": held,
            "copy_growth_over_source": round(held / source_bytes, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per class (alternated; the median is kept)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512, help="training step: sequence length (the throughput model's)")
    ap.add_argument("--batch", type=int, default=8, help="training step: sequences per step")
    ap.add_argument("--copy-size", default="1B", help="preset whose checkpoint the weight copy reads")
    ap.add_argument("--copy-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.copy_child:
        copy_child(args.copy_child)
        return 0

    import torch
    from transformers import LlamaConfig

    from architecture import config_kwargs, preset_shape

    vocab = 2048
    cfg = LlamaConfig(**config_kwargs(preset_shape("cpu", vocab), 256), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    t0 = time.perf_counter()
    result = {**parity(cfg, vocab), **generation(cfg, vocab, args.prompts, args.new_tokens),
              **train_step_times(args.steps, args.seq, args.batch), **weight_copy(args.copy_size)}
    import transformers

    result.update({"seconds": round(time.perf_counter() - t0, 1),
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                   "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
