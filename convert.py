"""Checkpoints from other trainers and this pipeline's own mid-shard checkpoint as Hugging Face
Llama models, and a Hugging Face Llama as a GGUF file for llama.cpp.

    python3 convert.py meta SRC OUT [--tokenizer DIR] [--dtype bf16|fp16|fp32]
    python3 convert.py dcp  SRC OUT (--params params.json | --preset NAME) [--tokenizer DIR] [--dtype ...]
    python3 convert.py zero SRC OUT [--dtype ...]
    python3 convert.py gguf SRC OUT.gguf [--type bf16|f16|q8_0]
    ... [--push OWNER/NAME | DIR] [--json]

- meta: Meta's original layout: `consolidated.*.pth` (one or several model-parallel shards, merged)
  and `params.json`, with `tokenizer.model` copied along when present.
- dcp: a torch distributed checkpoint (`.metadata` + `__*_*.distcp`, e.g. torchtitan's), with or
  without training state in it: only the model's weights are read; `freqs_cis` and the other
  non-parameter buffers are dropped. Keys may carry a `model.` prefix. torchtitan's Llama uses
  Meta's names and layout; the shape comes from `--params` (Meta's params.json) or a preset.
- zero: our `last-checkpoint/` (DeepSpeed ZeRO-2): the fp32 master weights, in the dtype the run
  trained in, with its config and tokenizer: a standalone model of a shard stopped midway. LoRA
  adapters on an NF4 base are merged onto the model published beside the checkpoint (their base).
- gguf: a Hugging Face Llama (with its tokenizer.json) as one GGUF file, tokenizer and chat template
  inside, through the `gguf` package.

Meta, torchtitan and llama.cpp rotate query/key pairs (2i, 2i+1); Hugging Face's Llama rotates
(i, i + d/2): q and k are permuted on the way. Every conversion checks itself before it reports
success: the converted model's fp32 logits on fixed token sequences against the source's own
forward (for meta/dcp a forward in the source's layout, for zero the checkpoint's model states, for
gguf the weights read back from the file); more than 1e-5 apart fails (q8_0 is lossy: reported; a
LoRA merge is held to the pipeline's 0.5% of loss). A checkpoint that does not match the
architecture exits 2 naming the missing, unexpected or misshapen keys: nothing is filled in. OUT
must not exist (or be empty); it is written beside and renamed into place. --push then publishes
the result the way the pipeline publishes.

Exit codes: 0 converted and checked; 1 the check failed (or the Hub did); 2 bad input.

Examples:
    python3 convert.py meta ~/Llama-3.2-1B/original ./llama-3.2-1b-hf --tokenizer ~/Llama-3.2-1B
    python3 convert.py dcp outputs/checkpoint/step-1000 ./step1000-hf --params params.json
    python3 convert.py zero output/llama/last-checkpoint ./mid-shard
    python3 convert.py gguf output/llama-it ./llama-it-q8_0.gguf --type q8_0 --push alice/llama-it-gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from config import BadInput as PipelineBadInput  # the pipeline's settings and Hub errors are bad input too

TOLERANCE = 1e-5
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Meta / torchtitan name -> Hugging Face name ({i}: layer); the last field says how shards are cut.
META_TO_HF = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{i}.attention.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", 0),
    "layers.{i}.attention.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", 0),
    "layers.{i}.attention.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", 0),
    "layers.{i}.attention.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", 1),
    "layers.{i}.feed_forward.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight", 0),
    "layers.{i}.feed_forward.w2.weight": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "layers.{i}.feed_forward.w3.weight": ("model.layers.{i}.mlp.up_proj.weight", 0),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight", None),
    "layers.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", None),
}
BUFFERS = ("freqs_cis", "rope.freqs", "inv_freq")  # computed, never weights


class BadInput(PipelineBadInput):
    def __init__(self, message: str) -> None:
        super().__init__([message])


class CheckFailed(Exception):
    pass


# --- the Meta layout --------------------------------------------------------------------------------


def meta_config(params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Our architecture dict from Meta's params.json, sizes that params.json leaves out read off the
    weights (the FFN width, a vocabulary of -1)."""
    need = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if need:
        raise BadInput(f"params.json lacks {', '.join(need)}")
    dim, heads = int(params["dim"]), int(params["n_heads"])
    emb = state.get("tok_embeddings.weight")
    w1 = state.get("layers.0.feed_forward.w1.weight")
    if emb is None or w1 is None:
        raise BadInput("the checkpoint has no tok_embeddings.weight or layers.0.feed_forward.w1.weight: "
                       f"not a Llama in Meta's layout (keys: {', '.join(sorted(state)[:8])}, ...)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))}
    if params.get("use_scaled_rope"):  # Llama 3.1+: the scaling Meta's reference applies
        sf = params.get("rope_scaling", {}) if isinstance(params.get("rope_scaling"), dict) else {}
        rope.update({"rope_type": "llama3", "factor": float(sf.get("factor", params.get("rope_scale_factor", 8.0))),
                     "low_freq_factor": float(sf.get("low_freq_factor", 1.0)),
                     "high_freq_factor": float(sf.get("high_freq_factor", 4.0)),
                     "original_max_position_embeddings": int(sf.get("original_max_position_embeddings", 8192))})
    return {"hidden_size": dim, "num_hidden_layers": int(params["n_layers"]), "num_attention_heads": heads,
            "num_key_value_heads": int(params.get("n_kv_heads") or heads), "head_dim": dim // heads,
            "intermediate_size": int(w1.shape[0]), "vocab_size": int(emb.shape[0]),
            "rms_norm_eps": float(params.get("norm_eps", 1e-5)), "rope_parameters": rope,
            "tie_word_embeddings": "output.weight" not in state,
            "max_position_embeddings": int(params.get("max_seq_len", 8192))}


def expected_meta_keys(arch: dict[str, Any]) -> set[str]:
    keys = set()
    for pattern in META_TO_HF:
        if "{i}" in pattern:
            keys.update(pattern.format(i=i) for i in range(arch["num_hidden_layers"]))
        elif pattern != "output.weight" or not arch["tie_word_embeddings"]:
            keys.add(pattern)
    return keys


def meta_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, ffn, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    q, kv = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
    per_layer = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
                 "attention.wo.weight": (d, q), "feed_forward.w1.weight": (ffn, d), "feed_forward.w2.weight": (d, ffn),
                 "feed_forward.w3.weight": (ffn, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(arch["num_hidden_layers"]):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def check_keys(state: dict[str, Any], expected: set[str], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Exit-2 material when the checkpoint and the architecture disagree: every key named."""
    weights = {k for k in state if not k.endswith(BUFFERS)}
    missing, unexpected = sorted(expected - weights), sorted(weights - expected)
    misshapen = sorted(f"{k} {tuple(state[k].shape)} (expected {shapes[k]})" for k in expected & weights
                       if k in shapes and tuple(state[k].shape) != shapes[k])
    problems = []
    if missing:
        problems.append(f"missing key(s): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected key(s): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}")
    if misshapen:
        problems.append(f"shape mismatch: {', '.join(misshapen[:6])}")
    if problems:
        raise BadInput(f"{where} does not match the architecture: " + "; ".join(problems))


def permute_rope(w, heads: int):
    """Meta's interleaved (2i, 2i+1) rotary pairs -> Hugging Face's (i, i + d/2), per head."""
    out_dim, in_dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf(state: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for i in range(arch["num_hidden_layers"]):
        for pattern, (hf, _) in META_TO_HF.items():
            if "{i}" not in pattern:
                continue
            w = state[pattern.format(i=i)]
            if pattern.endswith("wq.weight"):
                w = permute_rope(w, arch["num_attention_heads"])
            elif pattern.endswith("wk.weight"):
                w = permute_rope(w, arch["num_key_value_heads"])
            out[hf.format(i=i)] = w
    out["model.embed_tokens.weight"] = state["tok_embeddings.weight"]
    out["model.norm.weight"] = state["norm.weight"]
    if not arch["tie_word_embeddings"]:
        out["lm_head.weight"] = state["output.weight"]
    return out


def meta_logits(state: dict[str, Any], arch: dict[str, Any], ids):
    """The source's own forward in fp32, in Meta's layout: interleaved complex rotary, as Meta's
    reference model computes it (the permutation is checked against this, not assumed)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig

    from model import rope_inv_freq

    def w(k):
        return state[k].float()

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch["rms_norm_eps"]) * weight

    B, T = ids.shape
    H, KV, hd = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    inv = rope_inv_freq(LlamaConfig(**arch))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), inv))

    def rotate(x):  # (B, T, heads, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)

    h = w("tok_embeddings.weight")[ids]
    for i in range(arch["num_hidden_layers"]):
        p = f"layers.{i}."
        x = norm(h, w(p + "attention_norm.weight"))
        q = rotate((x @ w(p + "attention.wq.weight").T).view(B, T, H, hd))
        k = rotate((x @ w(p + "attention.wk.weight").T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ w(p + "attention.wv.weight").T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + a.transpose(1, 2).reshape(B, T, H * hd) @ w(p + "attention.wo.weight").T
        x = norm(h, w(p + "ffn_norm.weight"))
        h = h + (F.silu(x @ w(p + "feed_forward.w1.weight").T) * (x @ w(p + "feed_forward.w3.weight").T)) @ w(
            p + "feed_forward.w2.weight").T
    h = norm(h, w("norm.weight"))
    return h @ (w("tok_embeddings.weight") if arch["tie_word_embeddings"] else w("output.weight")).T


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Meta's model-parallel shards into one state dict: column-parallel weights join on dim 0,
    row-parallel ones (and the embedding) on dim 1, norms are the same in every shard."""
    import torch

    if len(shards) == 1:
        return shards[0]
    merged = {}
    for key in shards[0]:
        pattern = re.sub(r"^layers\.\d+\.", "layers.{i}.", key)
        dim = META_TO_HF.get(pattern, (None, None))[1]
        if dim is None or shards[0][key].dim() < 2:
            merged[key] = shards[0][key]
        else:
            merged[key] = torch.cat([s[key] for s in shards], dim=dim)
    return merged


def read_meta(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    params_file = src / "params.json"
    files = sorted(src.glob("consolidated.*.pth"))
    if not params_file.exists() or not files:
        raise BadInput(f"{src}: expected params.json and consolidated.*.pth (Meta's layout); found "
                       f"{', '.join(sorted(p.name for p in src.iterdir())[:10]) if src.is_dir() else 'no such directory'}")
    params = json.loads(params_file.read_text())
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state = {k: v for k, v in merge_shards(shards).items() if not k.endswith(BUFFERS)}
    return state, params


# --- torch distributed checkpoints ------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP hands nested state dicts back nested: {"model": {"a.weight": t}} -> {"model.a.weight": t}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_dcp(src: Path) -> dict[str, Any]:
    """The model's tensors of a DCP checkpoint, without loading its training state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not (src / ".metadata").exists():
        raise BadInput(f"{src}: no .metadata: not a torch distributed checkpoint")
    meta = FileSystemReader(str(src)).read_metadata().state_dict_metadata
    tensors = {k for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    # torchtitan saves the model's keys at the top level beside optimizer.*, lr_scheduler, dataloader
    # and train_state; other writers put them under model.
    prefixed = "model.tok_embeddings.weight" in tensors
    if prefixed:
        wanted = {k for k in tensors if k.startswith("model.")}
    else:
        wanted = {k for k in tensors if not k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state"))}
    wanted = {k for k in wanted if not k.endswith(BUFFERS)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        loaded = flatten(_load_state_dict_from_keys(keys=wanted, checkpoint_id=str(src)))
    state = {(k[len("model."):] if prefixed else k): v for k, v in loaded.items()}
    return {k: v for k, v in state.items() if not k.endswith(BUFFERS)}


def preset_params(name: str, state: dict[str, Any]) -> dict[str, Any]:
    """Meta-style params from one of our presets (heads); sizes from the weights."""
    from architecture import PRESETS, preset_shape

    if name not in PRESETS:
        raise BadInput(f"--preset {name!r}: one of {', '.join(PRESETS)}")
    emb = state.get("tok_embeddings.weight")
    if emb is None:
        raise BadInput("the checkpoint has no tok_embeddings.weight: not a Llama in Meta's/torchtitan's layout")
    shape = preset_shape(name, int(emb.shape[0]))
    return {"dim": shape["hidden_size"], "n_layers": shape["num_hidden_layers"], "n_heads": shape["num_attention_heads"],
            "n_kv_heads": shape["num_key_value_heads"], "rope_theta": shape["rope_parameters"]["rope_theta"]}


# --- our ZeRO checkpoint ----------------------------------------------------------------------------


def read_zero(src: Path) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """(fp32 master weights, the model states saved beside them, the model's config) of a ZeRO
    checkpoint. A checkpoint of LoRA adapters on an NF4 base holds the adapters and the base's NF4
    scales, not the frozen base weights: the base is the model published beside it (OUTPUT_REPO,
    which the shard started from); its config is returned, and no masters are read (the merge uses
    the adapters as the run's model held them)."""
    import contextlib
    import io
    import logging
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a conversion runs on the CPU, whatever the machine has
    from deepspeed.utils import zero_to_fp32

    latest = src / "latest"
    if not latest.exists():
        raise BadInput(f"{src}: no 'latest': not a checkpoint this pipeline wrote (last-checkpoint/)")
    tag = latest.read_text().strip()
    states = src / tag / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise BadInput(f"{src}: {tag}/mp_rank_00_model_states.pt is missing")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    if any("lora_" in k for k in module):
        base = src.parent
        if not (src / "adapter_config.json").exists() or not (base / "config.json").exists():
            raise BadInput(f"{src}: LoRA adapters on an NF4 base need adapter_config.json in the checkpoint and the "
                           f"model they were trained on beside it ({base}: the published output the checkpoint is in)")
        return None, module, json.loads((base / "config.json").read_text())
    if not (src / "config.json").exists():
        raise BadInput(f"{src}: no config.json: not a checkpoint this pipeline wrote (last-checkpoint/)")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress lines
        masters = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(src), tag=tag)
    return masters, module, json.loads((src / "config.json").read_text())


MERGE_TOLERANCE = 0.005  # train.merge_checked's: the merged model's loss within 0.5% of the adapter's


def merge_lora_checkpoint(src: Path, module: dict[str, Any], out: Path, dtype: str,
                          extras: list[Path]) -> tuple[Path, float, float, int]:
    """The base the adapters trained on (the published model beside the checkpoint, quantized to
    NF4 the way prep does, its scales checked against the checkpoint's) with the adapters as the run
    held them, merged the pipeline's way (quant_utils.to_float: dequantized in fp32, scale·B@A added,
    cast once), then checked the pipeline's way: the merged model's loss on the probe sequences
    within 0.5% of the adapter model's. Returns (staged directory, relative loss difference, max
    |logit difference|, parameters)."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from quant_utils import convert as quantize, to_float

    lora = {k: v for k, v in module.items() if "lora_" in k}
    compute = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(iter(lora.values())).dtype, "fp32")
    scales = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in module.items()
              if "lora_" not in k}
    with tempfile.TemporaryDirectory(prefix="convert-nf4-") as tmp:
        quantize(src.parent, Path(tmp) / "nf4", "nf4", compute)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "nf4", device_map="cpu")
    ours = model.state_dict()
    differ = sorted(k for k, v in scales.items() if k in ours and not torch.equal(ours[k].cpu(), v.to(ours[k].dtype)))
    unknown = sorted(k for k in scales if k not in ours)
    if differ or unknown:
        raise BadInput(f"{src}: the model beside it ({src.parent}) is not the base its adapters were trained on: "
                       f"NF4 scales differ ({', '.join((differ + unknown)[:4])})")
    config = model.config
    adapter = json.loads((src / "adapter_config.json").read_text())
    keep = {k: adapter[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias") if k in adapter}
    peft_model = get_peft_model(model, LoraConfig(**keep, task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    loaded = peft_model.load_state_dict(lora, strict=False)
    if loaded.unexpected_keys:
        raise BadInput(f"{src}: its adapters do not match adapter_config.json (unexpected {loaded.unexpected_keys[:4]})")
    peft_model.eval()
    ids = probe_ids(config.vocab_size)
    target = getattr(torch, DTYPES[dtype])
    merged = to_float(peft_model, target).eval()

    def loss_and_logits(m):
        with torch.no_grad():
            logits = m(ids).logits.float()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))), logits

    adapter_loss, adapter_logits = loss_and_logits(peft_model)
    merged_loss, merged_logits = loss_and_logits(merged)
    delta = abs(merged_loss - adapter_loss) / adapter_loss
    if not delta <= MERGE_TOLERANCE:
        raise CheckFailed(f"the merged model's loss {merged_loss:.4f} is {delta:.2%} from the adapter's {adapter_loss:.4f} "
                          f"(more than {MERGE_TOLERANCE:.1%}): not writing a merge that lost the training")
    staged = out.with_name(out.name + ".converting")
    shutil.rmtree(staged, ignore_errors=True)
    merged.config.dtype = target
    merged.save_pretrained(staged)
    for f in extras:
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, staged / f.name)
    return staged, delta, float((merged_logits - adapter_logits).abs().max()), sum(p.numel() for p in merged.parameters())


# --- GGUF (llama.cpp, Ollama, LM Studio) ---------------------------------------------------------

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
}
GPT2_SPLIT = None  # the byte-level pre-tokenizer with its built-in regex is GPT-2's
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


def unpermute_rope(w, heads: int):
    """Hugging Face's half-split rotary pairs -> the interleaved ones llama.cpp's Llama expects."""
    out_dim, in_dim = w.shape
    return w.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def gguf_tensor_names(num_layers: int) -> dict[str, str]:
    names = {}
    for hf, gg in GGUF_NAMES.items():
        if "{i}" in hf:
            names.update({hf.format(i=i): gg.format(i=i) for i in range(num_layers)})
        else:
            names[hf] = gg
    return names


def read_tokenizer(src: Path, vocab_size: int) -> dict[str, Any]:
    """What GGUF's byte-level BPE tokenizer needs, from tokenizer.json: tokens by id with their
    types, merges, special ids, whether BOS is added, the pre-tokenizer's name, the chat template."""
    tj = src / "tokenizer.json"
    if not tj.exists():
        raise BadInput(f"{src}: no tokenizer.json: GGUF embeds the tokenizer, and this needs the fast tokenizer's file")
    tok = json.loads(tj.read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").exists() else {}
    if tok.get("model", {}).get("type") != "BPE":
        raise BadInput(f"{tj}: a {tok.get('model', {}).get('type')} tokenizer: GGUF export handles byte-level BPE ones")
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pre_name = "gpt-2"
    elif pre.get("type") == "Sequence" and any(p.get("type") == "Split" and p.get("pattern", {}).get("Regex") == LLAMA3_SPLIT
                                               for p in pre.get("pretokenizers", [])):
        pre_name = "llama-bpe"
    else:
        raise BadInput(f"{tj}: its pre-tokenizer ({json.dumps(pre)[:120]}) is neither GPT-2's nor Llama 3's byte-level "
                       "split, the two this export names for llama.cpp")
    import gguf

    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for text, i in tok["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # the model's vocabulary beyond the tokenizer's
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}

    def special(name):
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v) if v else None

    template = (src / "chat_template.jinja").read_text() if (src / "chat_template.jinja").exists() else cfg.get("chat_template")
    post = json.dumps(tok.get("post_processor") or {})
    bos = special("bos_token")
    add_bos = bos is not None and f'"id": "{tokens[bos]}"' in post.replace("'", '"')
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "pre": pre_name, "bos": bos,
            "eos": special("eos_token"), "pad": special("pad_token"), "unk": special("unk_token"), "add_bos": add_bos,
            "chat_template": template}


def write_gguf(src: Path, out: Path, qtype: str) -> dict[str, Any]:
    """The HF Llama in SRC as one GGUF file (llama architecture, tokenizer and chat template inside)."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig

    from model import rope_inv_freq

    if not (src / "config.json").exists():
        raise BadInput(f"{src}: no config.json: not a Hugging Face model directory")
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise BadInput(f"{src}: model_type {cfg.get('model_type')!r}: this export writes Llama models")
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    L, H, KV = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
    tokenizer = read_tokenizer(src, config.vocab_size)
    names = gguf_tensor_names(L)
    files = sorted(src.glob("*.safetensors"))
    state = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            state.update({k: sf.get_tensor(k) for k in sf.keys()})
    expected = set(names) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    check_keys(state, expected, {}, f"{src}")
    file_type, ggml = {"bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
                       "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
                       "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}[qtype]
    staged = out.with_name(out.name + ".converting")
    w = gguf.GGUFWriter(str(staged), "llama")
    w.add_name(cfg.get("_name_or_path") and Path(cfg["_name_or_path"]).name or src.name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(L)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    w.add_token_merges(tokenizer["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if tokenizer[key] is not None:
            add(tokenizer[key])
    w.add_add_bos_token(tokenizer["add_bos"])
    if tokenizer["chat_template"]:
        w.add_chat_template(tokenizer["chat_template"])
    if rope.get("rope_type", "default") == "llama3":  # llama.cpp applies the scaling as per-frequency factors
        plain = rope_inv_freq(LlamaConfig(**{**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": rope["rope_theta"]}}))
        w.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(config)).numpy().astype(np.float32))
    for hf, gg in names.items():
        if hf not in state:
            continue
        t = state[hf].float()
        if hf.endswith("q_proj.weight"):
            t = unpermute_rope(t, H)
        elif hf.endswith("k_proj.weight"):
            t = unpermute_rope(t, KV)
        data = t.numpy()
        if data.ndim == 1:  # norms stay f32, as llama.cpp's own converter keeps them
            w.add_tensor(gg, data.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(gg, data.astype(np.float16))
        else:
            w.add_tensor(gg, gguf.quants.quantize(data, ggml), raw_dtype=ggml)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"staged": staged, "state": state, "config": config, "tokenizer": tokenizer, "names": names}


def read_gguf(path: Path, config, names: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """The GGUF file's tensors back as Hugging Face weights (dequantized, rotary pairs half-split
    again), and its reader (for the metadata)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    back = {}
    for hf, gg in names.items():
        t = by_name.get(gg)
        if t is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(arr.astype("float32").copy()).reshape(tuple(reversed([int(x) for x in t.shape])))
        if hf.endswith("q_proj.weight"):
            w = permute_rope(w, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = permute_rope(w, config.num_key_value_heads)
        back[hf] = w
    return back, reader


def gguf_string(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def gguf_strings(reader, key: str) -> list[str]:
    field = reader.fields.get(key)
    return [bytes(field.parts[i]).decode() for i in field.data] if field is not None else []


def convert_gguf(args) -> dict[str, Any]:
    """hf -> gguf, then the file read back: every tensor against the source (exact for bf16/f16,
    within q8_0's rounding bound), the tokenizer, and the logits of the weights read back."""
    import torch

    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if out.exists():
        raise BadInput(f"{out} exists: choose a new file name")
    if not out.name.endswith(".gguf"):
        raise BadInput(f"{out}: a GGUF file's name ends in .gguf")
    qtype = args.type
    written = write_gguf(src, out, qtype)
    staged, state, config, tokenizer = written["staged"], written["state"], written["config"], written["tokenizer"]
    try:
        back, reader = read_gguf(staged, config, written["names"])
        store = {"bf16": torch.bfloat16, "f16": torch.float16}.get(qtype)
        worst_rel = 0.0
        for k, v in state.items():
            if k not in back:
                raise CheckFailed(f"{k} is missing from the written file")
            want = v.float() if v.dim() == 1 or store is None else v.to(store).float()
            if v.dim() == 1 or store is not None:
                if not torch.equal(back[k], want):
                    raise CheckFailed(f"{k}: read back, it differs from the source by {float((back[k] - want).abs().max()):.3g}")
            else:  # q8_0: each block of 32 within half a step of its scale (amax / 127, stored in fp16)
                blocks = want.reshape(-1, 32)
                bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2**-10) + 1e-12
                err = (back[k].reshape(-1, 32) - blocks).abs()
                if bool((err > bound).any()):
                    raise CheckFailed(f"{k}: q8_0 values beyond their blocks' rounding bound")
                worst_rel = max(worst_rel, float((err / (blocks.abs().amax(1, keepdim=True) + 1e-12)).max()))
        if gguf_strings(reader, "tokenizer.ggml.tokens") != tokenizer["tokens"]:
            raise CheckFailed("the token list read back differs from the tokenizer's")
        if gguf_strings(reader, "tokenizer.ggml.merges") != tokenizer["merges"]:
            raise CheckFailed("the merges read back differ from the tokenizer's")
        if tokenizer["chat_template"] and gguf_string(reader, "tokenizer.chat_template") != tokenizer["chat_template"]:
            raise CheckFailed("the chat template read back differs")
        ids = probe_ids(config.vocab_size)
        source = hf_model(src)
        with torch.no_grad():
            if store is not None:  # the source's weights at the file's precision: what the file holds
                source.load_state_dict({k: v.to(store).float() for k, v in state.items()}, strict=False)
            reference = source(ids).logits
            source.load_state_dict(back, strict=False)
            if config.tie_word_embeddings:
                source.tie_weights()
            got = source(ids).logits
        diff = float((reference - got).abs().max())
        if store is not None:
            check(reference, got, f"hf -> gguf {qtype}")
    except CheckFailed:
        staged.unlink(missing_ok=True)
        raise
    staged.rename(out)
    return {"kind": "gguf", "source": str(src), "output": str(out), "dtype": qtype,
            "parameters": sum(v.numel() for v in state.values()), "max_abs_logit_diff": diff,
            "q8_0_max_rel_error": round(worst_rel, 6) if qtype == "q8_0" else None,
            "tokenizer": [f"{len(tokenizer['tokens'])} tokens", f"{len(tokenizer['merges'])} merges",
                          f"pre-tokenizer {tokenizer['pre']}"] + (["chat template"] if tokenizer["chat_template"] else []),
            "bytes": out.stat().st_size}


# --- writing and checking ---------------------------------------------------------------------------


def hf_config(arch: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**arch)


def write_model(state: dict[str, Any], config, out: Path, dtype: str, extras: list[Path]) -> Path:
    """The HF model (strict: every weight present, nothing left over) written beside OUT."""
    import torch
    from transformers import LlamaForCausalLM

    staged = out.with_name(out.name + ".converting")
    shutil.rmtree(staged, ignore_errors=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k in model.state_dict() if not k.endswith(BUFFERS)}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(state, expected, shapes, "the converted weights")
    target = getattr(torch, DTYPES[dtype])
    model = model.to_empty(device="cpu").to(target)
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = target
    model.save_pretrained(staged)
    for f in extras:
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, staged / f.name)
    return staged


def hf_model(model_dir: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model_dir: Path, ids):
    import torch

    with torch.no_grad():
        return hf_model(model_dir)(ids).logits


def probe_ids(vocab: int):
    """Fixed token sequences for the check: 3 of 16 tokens, seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (3, 16), generator=g)


def check(source, converted, what: str) -> float:
    diff = float((source - converted).abs().max())
    if not diff <= TOLERANCE:
        raise CheckFailed(f"{what}: the converted model's logits are {diff:.3g} from the source's (more than {TOLERANCE:g}): "
                          "not writing it")
    return diff


def tokenizer_files(d: Path | None) -> list[Path]:
    if d is None:
        return []
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "tokenizer.model", "generation_config.json")
    found = [d / n for n in names if (d / n).exists()]
    if not found:
        raise BadInput(f"--tokenizer {d}: no tokenizer files there ({', '.join(names[:2])} ...)")
    return found


def convert(args) -> dict[str, Any]:
    import torch

    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty: choose a new directory")
    extras = tokenizer_files(Path(args.tokenizer).expanduser() if args.tokenizer else None)
    if args.kind in ("meta", "dcp"):
        if args.kind == "meta":
            state, params = read_meta(src)
            if (src / "tokenizer.model").exists() and not any(f.name == "tokenizer.model" for f in extras):
                extras.append(src / "tokenizer.model")
        else:
            state = read_dcp(src)
            if args.params:
                params = json.loads(Path(args.params).read_text())
            elif args.preset:
                params = preset_params(args.preset, state)
            else:
                raise BadInput("dcp needs the model's shape: --params params.json (Meta's format) or --preset NAME")
        arch = meta_config(params, state)
        check_keys(state, expected_meta_keys(arch), meta_shapes(arch), f"{src}")
        dtype = args.dtype or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(state["tok_embeddings.weight"].dtype, "fp32")
        staged = write_model(meta_to_hf(state, arch), hf_config(arch), out, dtype, extras)
        ids = probe_ids(arch["vocab_size"])
        # The source's forward at the stored precision of the output: what the converted model holds.
        stored = {k: v.to(getattr(torch, DTYPES[dtype])) for k, v in state.items()}
        with torch.no_grad():
            reference = meta_logits(stored, arch, ids)
        parameters = sum(v.numel() for v in state.values())
    else:
        masters, module, cfg = read_zero(src)
        extras = extras or tokenizer_files(src)
        if masters is None:  # LoRA on NF4: merged and checked the pipeline's way
            dtype = args.dtype or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                next(v.dtype for k, v in module.items() if "lora_" in k), "fp32")
            staged, delta, diff, parameters = merge_lora_checkpoint(src, module, out, dtype, extras)
            if out.exists():
                out.rmdir()
            staged.rename(out)
            return {"kind": "zero", "source": str(src), "output": str(out), "dtype": dtype, "lora_merged": True,
                    "merge_loss_delta_pct": round(delta * 100, 4), "max_abs_logit_diff": diff,
                    "parameters": parameters,
                    "tokenizer": sorted(f.name for f in extras)}
        dtype = args.dtype or {"bfloat16": "bf16", "float16": "fp16"}.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "fp32")
        from transformers import LlamaConfig

        config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
        if config.tie_word_embeddings:  # the shared head comes back under both names
            masters.pop("lm_head.weight", None)
        staged = write_model(masters, config, out, dtype, extras)
        ids = probe_ids(config.vocab_size)
        # The source: the model states saved beside the masters (what the run's model held), in fp32,
        # in the same transformers model (its computed buffers, e.g. RoPE's, built as it loads).
        ref_model = hf_model(staged)
        missing, unexpected = ref_model.load_state_dict({k: v.float() for k, v in module.items()}, strict=False)
        if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
            raise BadInput(f"{src}: its model states do not match its config.json (missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]})")
        if config.tie_word_embeddings:
            ref_model.tie_weights()
        with torch.no_grad():
            reference = ref_model(ids).logits
        parameters = sum(v.numel() for v in masters.values())
    try:
        diff = check(reference, hf_logits(staged, ids), f"{args.kind} -> hf")
    except CheckFailed:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staged.rename(out)
    return {"kind": args.kind, "source": str(src), "output": str(out), "dtype": dtype, "parameters": parameters,
            "max_abs_logit_diff": diff, "tokenizer": sorted(f.name for f in (extras or []))}


class Pusher:
    """--push: the pipeline's publish path (targets.Target.deliver). A Hub repo's write access is checked
    before anything is converted; the publish is one commit adding or replacing the converted files
    and leaving the repo's other files; a local directory gets them swapped in the same way."""

    def __init__(self, target: str) -> None:
        from config import SettingsError, load_settings
        from targets import open_target

        try:
            self.s = load_settings({**os.environ, "OUTPUT_REPO": target})
        except SettingsError as e:
            raise BadInput(f"--push {target}: {e}") from e
        self.target = open_target(target, self.s)
        if self.target.needs_token and not self.s.hf_token:
            raise BadInput(f"--push {target}: no HF_TOKEN. Fix: export HF_TOKEN (a token with write access)")
        if self.target.needs_token:  # a local directory's write access shows when it is written
            from targets import access_problems

            problems = access_problems([self.target], self.s)
            if problems:
                raise BadInput("; ".join(problems))

    def push(self, output: Path, kind: str) -> str:
        import tempfile
        import uuid

        files = [output] if output.is_file() else sorted(output.iterdir())
        revision = self.target.head()

        def fill(staged: Path) -> None:
            for f in files:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, staged / f.name)

        with tempfile.TemporaryDirectory(prefix="convert-push-") as work:
            self.target.deliver(Path(work), fill, f"convert.py {kind}: {output.name}", uuid.uuid4().hex,
                                revision, only=[f.name + ("/" if f.is_dir() else "") for f in files])
        return self.target.spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("Examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["meta", "dcp", "zero", "gguf"], help="the source's layout, or gguf: a Hugging Face "
                    "model to a GGUF file")
    ap.add_argument("src", help="the source checkpoint's (or model's) directory")
    ap.add_argument("out", help="the Hugging Face model directory to write (new or empty), or the .gguf file")
    ap.add_argument("--type", choices=["bf16", "f16", "q8_0"], default="bf16", help="gguf: the weights' type (default bf16)")
    ap.add_argument("--params", help="dcp: Meta's params.json with the model's shape")
    ap.add_argument("--preset", help="dcp: the shape of one of our presets (MODEL_SIZE names)")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to save with the model")
    ap.add_argument("--dtype", choices=list(DTYPES), help="the weights' dtype (default: the source's)")
    ap.add_argument("--push", metavar="OWNER/NAME", help="then publish the result there, as the pipeline publishes: a Hub "
                    "repo (private unless PRIVATE=false; HF_TOKEN checked before converting; one commit that adds or "
                    "replaces the converted files) or a local directory")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    import redact

    redact.install()
    import transformers

    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        pusher = Pusher(args.push) if args.push else None  # the token and the repo checked before any work
        result = convert_gguf(args) if args.kind == "gguf" else convert(args)
        if pusher:
            result["pushed"] = pusher.push(Path(result["output"]), args.kind)
    except PipelineBadInput as e:  # ours, and the pipeline's (settings, a token the Hub refuses)
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the pipeline's own failures (an outage, a conflict, a full disk)
        from config import report_failure

        if report_failure(e) is None:
            raise
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"converted {result['kind']} {result['source']} -> {result['output']}: {result['parameters']:,} parameters "
              f"in {result['dtype']}; checked: "
              + (f"LoRA merged into the NF4 base: loss {result['merge_loss_delta_pct']:.3f}% from the adapter model's (at most "
                 f"{MERGE_TOLERANCE:.1%}), max |logit difference| {result['max_abs_logit_diff']:.2g} (fp32, 3 sequences of "
                 "16 tokens)" if result.get("lora_merged") else
                 f"max |logit difference| {result['max_abs_logit_diff']:.2g} (fp32, 3 sequences of 16 tokens; "
                 + ("q8_0 is lossy: reported)" if result["dtype"] == "q8_0" else f"at most {TOLERANCE:g})"))
              + (f"; tokenizer: {', '.join(result['tokenizer'])}" if result["tokenizer"] else "; no tokenizer (--tokenizer DIR)")
              + (f"\npublished to {result['pushed']}" if result.get("pushed") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
