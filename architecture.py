"""The architecture's numbers: named presets, the shape rules, parameter counts, the LoRA target
names and the per-layer shapes the memory estimate uses, all in one place.

Plain Python on purpose: the settings and preflight read shapes from here in a fraction of a second,
without importing torch and transformers (~5 s); the network these shapes describe is `model.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Named model sizes (MODEL_SIZE). Explicit shapes, by hidden size d, layers, heads and KV heads
# (SwiGLU width ≈ 8/3·d unless given; the vocabulary is always VOCAB_SIZE / the tokenizer's):
#   cpu    the CPU default, ~1-2M parameters: a first run in minutes on 2 cores
#   small  ~27M at an 8k vocabulary: a quick GPU try
#   Nano   d=384, 6 layers, 6 heads (2 KV): ~10M + embeddings, torchtitan-style debug size
#   Micro  d=768, 12 layers, 12 heads (4 KV): ~85M + embeddings, GPT-2-small-like
#   Tiny   TinyLlama-1.1B's shape: d=2048, 22 layers, 32 heads (4 KV), SwiGLU 5632, untied
# and parameter targets, sized by `size_for_target` for the vocabulary in use (Llama-3-style
# width/depth, GQA 4:1): 125M, 350M, 0.5B, 1B, 1.5B, 3B.
PRESETS: dict[str, dict[str, int] | int] = {
    "cpu": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4},
    "Nano": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2},
    "Micro": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4},
    "Tiny": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "intermediate_size": 5632, "tie_word_embeddings": False},
    "125M": 125_000_000,
    "350M": 350_000_000,
    "0.5B": 500_000_000,
    "1B": 1_000_000_000,
    "1.5B": 1_500_000_000,
    "3B": 3_000_000_000,
}
DEFAULT_PRESET = "cpu"
# Names a preset no longer has, with what to use instead.
RENAMED_PRESETS = {"tiny": "cpu (the CPU default; Tiny is TinyLlama-1.1B's shape)"}

# Every linear projection of a block, by its transformers name: the default LoRA targets.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# RoPE base of new models, as Llama 3 (500 000: wavelengths long enough for long contexts); a model
# that continues keeps the RoPE parameters its config.json has.
ROPE_THETA = 500000.0


def layer_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear projection of one block, by LoRA target name."""
    d, ffn = int(arch["hidden_size"]), int(arch["intermediate_size"])
    q = int(arch["num_attention_heads"]) * int(arch["head_dim"])
    kv = int(arch["num_key_value_heads"]) * int(arch["head_dim"])
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}


def count_parameters(arch: dict[str, Any]) -> int:
    """Parameters of a Llama with this shape (the same count as sum(p.numel()) of the built model)."""
    d, v = int(arch["hidden_size"]), int(arch["vocab_size"])
    per_layer = sum(i * o for i, o in layer_shapes(arch).values()) + 2 * d  # projections + 2 RMSNorms
    emb = v * d * (1 if arch["tie_word_embeddings"] else 2)
    return emb + int(arch["num_hidden_layers"]) * per_layer + d


def shape(d: int, layers: int, vocab: int, heads: int | None = None, kv_heads: int | None = None) -> dict[str, Any]:
    """A Llama-3-style shape for hidden size d: head dim 64 (128 past 2048), GQA 4:1, SwiGLU ≈ 8/3·d."""
    head_dim = 128 if d > 2048 and d % 128 == 0 else 64
    heads = heads or d // head_dim
    head_dim = d // heads
    if kv_heads is None:
        kv_heads = max(k for k in range(1, max(1, heads // 4) + 1) if heads % k == 0)
    ffn = max(64, int(round(8 * d / 3 / 64)) * 64)
    return {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": ffn, "vocab_size": vocab,
            "tie_word_embeddings": True}


def size_for_target(target: int, vocab: int) -> dict[str, Any]:
    """The shape whose parameter count is closest to `target` with a Llama-like width/depth ratio.

    Among hidden sizes d with a whole number of layers landing within 5% of the target, pick the one
    whose d/layers is closest to 64 (small models) or 128 (≥ 500M), as the Llama family does; fall
    back to the closest count. ValueError when no shape has 1-128 layers.
    """
    ratio = 64 if target < 500_000_000 else 128
    best, best_key = None, None
    # Widths that give whole GQA groups: any multiple of 64 below 512, then multiples of 256
    # (heads of 64 in groups of 4), then of 512 (heads of 128 in groups of 4).
    widths = [*range(64, 512, 64), *range(512, 2048 + 1, 256), *range(2560, 8192 + 1, 512)]
    for d in widths:
        probe = shape(d, 1, vocab)
        fixed = count_parameters({**probe, "num_hidden_layers": 0})
        per_layer = count_parameters(probe) - fixed
        layers = round((target - fixed) / per_layer)
        if not 1 <= layers <= 128:
            continue
        arch = shape(d, layers, vocab)
        err = abs(count_parameters(arch) - target) / target
        key = (err > 0.05, abs(math.log((d / layers) / ratio)), err)
        if best_key is None or key < best_key:
            best, best_key = arch, key
    if best is None:
        raise ValueError(f"no Llama shape of {target:,} parameters fits a vocabulary of {vocab}")
    return best


def preset_shape(name: str, vocab: int) -> dict[str, Any]:
    """The shape of a named preset at this vocabulary size."""
    preset = PRESETS[name]
    if isinstance(preset, int):
        return size_for_target(preset, vocab)
    arch = shape(preset["hidden_size"], preset["num_hidden_layers"], vocab,
                 preset["num_attention_heads"], preset["num_key_value_heads"])
    return {**arch, **{k: v for k, v in preset.items() if k in ("intermediate_size", "tie_word_embeddings")}}


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The full RoPE parameters of a config.json (transformers 5 keeps them in `rope_parameters`;
    earlier configs had a top-level `rope_theta`, default 10 000)."""
    return config.get("rope_parameters") or {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}


def llama_config(var: str, spec: str, src: Path) -> dict[str, Any]:
    """The config.json in `src` (what setting `var` = `spec` names), which must describe a Llama."""
    from errors import BadInput

    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput([f"{var}={spec!r}: no readable config.json ({type(e).__name__}). "
                        "Fix: a saved Hugging Face Llama (a local directory or a Hub repo id)."]) from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        raise BadInput([f"{var}={spec!r}: model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, "
                        "not 'llama'. Fix: a Llama-architecture model."])
    return cfg


def arch_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture (as the record keeps it) of a Llama config.json."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings")
    arch = {k: config.get(k) for k in keys}
    if arch["head_dim"] is None and arch["hidden_size"] and arch["num_attention_heads"]:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    if arch["tie_word_embeddings"] is None:
        arch["tie_word_embeddings"] = False  # LlamaConfig's default
    return {**arch, "rope_parameters": rope_parameters(config)}


def config_kwargs(arch: dict[str, Any], max_length: int) -> dict[str, Any]:
    """LlamaConfig keyword arguments for a shape trained on sequences of `max_length` tokens."""
    return {**arch, "max_position_embeddings": max_length,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False}


def llama_class(impl: str):
    """The Llama class MODEL_IMPL names ('ours': model.py; 'transformers': transformers'). Both read
    and write the same transformers Llama files, and a seeded init draws the same weights."""
    if impl == "ours":
        from model import LlamaForCausalLM
    else:
        from transformers import LlamaForCausalLM
    return LlamaForCausalLM
