"""A Hugging Face Llama as one GGUF file for llama.cpp (Ollama, LM Studio): weights in bf16, f16 or
q8_0, the tokenizer and chat template inside, read back and checked against the model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layouts import BadInput, CheckFailed, check, check_keys, hf_model, permute_rope, probe_ids

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
    rope = config.rope_parameters
    _write_metadata(w, config, cfg.get("_name_or_path") and Path(cfg["_name_or_path"]).name or src.name, head_dim,
                    file_type, tokenizer)
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


def _write_metadata(w, config, name: str, head_dim: int, file_type, tokenizer: dict[str, Any]) -> None:
    """The GGUF key/values llama.cpp reads: the model's shape, rope, file type, and the tokenizer
    with its special tokens and chat template."""
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
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
