"""The checkpoint layouts convert.py reads, mapped onto a Hugging Face Llama: Meta's consolidated
shards, torch distributed checkpoints (torchtitan's), and this pipeline's DeepSpeed ZeRO-2
`last-checkpoint/` (LoRA on NF4 merged onto its base); writing the result, and the logits check every
conversion passes before it reports success.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from errors import BadInput as PipelineBadInput  # the pipeline's settings and Hub errors are bad input too

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


def nf4_source_precision(module: dict[str, Any]) -> str:
    """'bf16' or 'fp32': the dtype the checkpoint's NF4 base was quantized from (each 4-bit weight's
    packed quant state records it), so that the published base re-quantized the same way gives the
    same scales. Not the adapters' dtype: a trainer may keep adapters in another dtype than the base."""
    packed = next((v for k, v in module.items() if k.endswith(".quant_state.bitsandbytes__nf4")), None)
    if packed is None:
        raise BadInput("the checkpoint's NF4 base has no quant state (…quant_state.bitsandbytes__nf4): not a "
                       "checkpoint this pipeline wrote")
    return "bf16" if json.loads(bytes(packed.tolist()).decode())["dtype"] == "bfloat16" else "fp32"


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
    scales = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in module.items()
              if "lora_" not in k}
    compute = nf4_source_precision(module)
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
