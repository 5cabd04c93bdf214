"""Our Llama-3: the network, read top to bottom, HF-compatible.

RMSNorm, rotary embeddings (Llama-3.1 frequency scaling included), grouped-query attention, the
SwiGLU MLP, a decoder block, the decoder, and the causal LM with a preallocated KV cache and a plain
`generate` loop; and `copy_weights`, which fills it from any HF Llama checkpoint with a report of
what was and was not copied. Its shapes come from `architecture.py`.

It is a transformers `PreTrainedModel` configured by a `LlamaConfig`, with transformers' module and
tensor names (`model.layers.N.self_attn.q_proj.weight` …), and it saves under the name
`LlamaForCausalLM`: a model trained with it loads with `AutoModelForCausalLM` untouched and carries
nothing of ours. TRL, DeepSpeed, PEFT (q_proj … down_proj), bitsandbytes NF4, gradient
checkpointing, `generate()` and `pipeline()` see a Llama.

Where it differs from transformers' class: attention is one `scaled_dot_product_attention` call
with the GQA groups broadcast instead of copied and no mask tensor unless left padding, packed sequences or a cache
needs one; generation runs a plain loop over a preallocated cache; the LM loss goes through
`lm_loss`'s chunked head without full logits. Concatenating q/k/v and gate/up into one matmul each
was measured and dropped: no gain in a training step on this CPU, and a loss when decoding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from lm_loss import causal_lm_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in fp32, scaled in the input's dtype (as Llama's reference does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# --- rotary position embeddings ----------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) of the config's RoPE: plain, or Llama-3.1's scaling, which
    keeps high frequencies, divides low ones by `factor` and blends the band between."""
    rope = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r}: this model implements 'default' and 'llama3'")
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos, sin (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


# --- attention and MLP --------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                  # (B, nkv, past+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, ffn, bias=bias)
        self.up_proj = nn.Linear(d, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(GradientCheckpointingLayer):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        # registration order = transformers' order, so a seeded init draws the same weights
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.compiled = None  # this block's forward through torch.compile (LlamaForCausalLM.compile_blocks)

    def forward(self, x, cos, sin, mask, causal, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- the decoder and the causal LM ---------------------------------------------------------------------


def attention_mask_for(attention_mask: torch.Tensor | None, T: int, past: int,
                       device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA over T new tokens after `past` cached ones.

    No mask where causality alone is exact: no padding, or padding only at the end of each row
    (right-padded batches: real tokens never see the pads after them), and no cache unless one new
    token. Otherwise a boolean mask, bottom-right causal, (T, past+T) or with left padding
    (B, 1, T, past+T); every query also sees itself, so a row of pads stays finite instead of NaN.
    """
    if attention_mask is not None:
        keep = attention_mask.bool()
        right_padded = past == 0 and bool((keep[:, 1:] <= keep[:, :-1]).all())
        if right_padded or bool(keep.all()):
            attention_mask = None
    if attention_mask is None and past == 0:
        return None, T > 1
    if attention_mask is None and T == 1:
        return None, False
    total = past + T
    q_pos = torch.arange(past, total, device=device)[:, None]   # (T, 1)
    k_pos = torch.arange(total, device=device)[None, :]         # (1, total)
    mask = k_pos <= q_pos                                        # (T, total)
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, -total:]) | (k_pos == q_pos)
    return mask, False


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The causal mask (B, 1, T, T) of rows that hold several sequences, None for one sequence per row.

    A packed row's position ids restart at 0 where each sequence starts (prep packs chats that way):
    a token sees the earlier tokens of its own sequence only, never those of the sequence before.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    segment = starts.cumsum(-1)                                            # (B, T): the sequence of each token
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (segment[:, :, None] == segment[:, None, :])[:, None] & causal   # (B, 1, T, T)


class Decoder(LlamaPreTrainedModel):
    """Embeddings, the blocks and the final norm: hidden states (B, T, d), as transformers' LlamaModel."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # RoPE's frequencies are derived from the config when first needed, never saved or loaded (a
        # buffer would be left uninitialised by from_pretrained's meta-device construction)
        self._inv_freq: torch.Tensor | None = None
        self.gradient_checkpointing = False
        self.post_init()

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, hd) for these positions, computed in fp32."""
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.config).to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq   # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, d)
        B, T, _ = x.shape
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]   # (1, T): one table for the batch
        mask, causal = attention_mask_for(attention_mask, T, past, x.device)
        if attention_mask is None and past == 0 and T > 1:
            packed = packed_mask(position_ids)
            if packed is not None:
                mask, causal = packed, False
        cos, sin = self.rope(position_ids, x.dtype)
        for block in self.layers:
            if block.compiled is not None and past_key_values is None:  # generation (a cache) stays eager
                x = block.compiled(x, cos, sin, mask, causal)
            else:
                x = block(x, cos, sin, mask, causal, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class LlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """The causal LM. Named as transformers' class because `save_pretrained` records the class name in
    config.json's `architectures`: what we save is, by that name, a transformers Llama."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def compile_blocks(self) -> None:
        """torch.compile each decoder block (its norms, RoPE, attention and SwiGLU fused into fewer
        kernels), with dynamic shapes from the start: batches of other sizes and lengths (the last
        batch, validation, padded chats) reuse the same compiled code instead of recompiling. Calls
        with a KV cache (generation) run eager: a growing cache would recompile at every token."""
        for block in self.model.layers:
            block.compiled = torch.compile(block.forward)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, num_items_in_batch=None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """With `labels`: the mean next-token loss through the chunked head, and no logits (they are
        never materialised). Without: logits of the last `logits_to_keep` positions (0 = all)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if labels is not None:
            loss = causal_lm_loss(h, self.lm_head.weight, labels, num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, past_key_values=out.past_key_values)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


# --- generation -------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: (B, nkv, max_len, hd) each.
    Same `update` / `get_seq_length` calls as transformers' caches, so the attention takes either."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        size = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, head_dim)
        self.k = torch.empty(size, dtype=dtype, device=device)
        self.v = torch.empty(size, dtype=dtype, device=device)
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer_idx, :, :, self.length:end] = k
        self.v[layer_idx, :, :, self.length:end] = v
        if layer_idx == len(self.k) - 1:
            self.length = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


@torch.inference_mode()
def generate(model: LlamaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
             eos_token_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each row of `input_ids` (B, T), same length, no padding: greedy at temperature 0,
    else sampled (top_k optional). Stops at `max_new_tokens`, or when every row has produced
    `eos_token_id`. Returns the new tokens (B, ≤ max_new_tokens); rows that ended pad with eos."""
    B, T = input_ids.shape
    cache = KVCache(model.config, B, T + max_new_tokens, model.dtype, input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, new = input_ids, []
    for _ in range(max_new_tokens):
        h = model.model(input_ids=ids, past_key_values=cache).last_hidden_state[:, -1]   # (B, d)
        logits = model.lm_head(h).float()                                                 # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        new.append(nxt)
        ids = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.stack(new, dim=1)


# --- weights from an existing Llama -------------------------------------------------------------------

# Buffers some checkpoints carry (older transformers' rotary inverse frequencies, Meta/torchtitan's
# freqs_cis): derived from the config here, never read.
DERIVED_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "freqs_cis")


@dataclass
class CopyReport:
    """What a weight copy did, tensor by tensor (names in the transformers Llama layout)."""

    source: str
    copied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)         # ours, left with their fresh initialisation
    unused: list[str] = field(default_factory=list)          # the source's, matching nothing of ours
    mismatched: list[str] = field(default_factory=list)      # "name: source (a, b) vs ours (c, d)"
    ignored_buffers: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unused or self.mismatched)

    def describe(self) -> list[str]:
        lines = [f"weights from {self.source}: {len(self.copied)} tensors copied, {len(self.missing)} left fresh, "
                 f"{len(self.unused)} source tensors unused, {len(self.mismatched)} shape mismatches"
                 + (f" ({len(self.ignored_buffers)} derived buffers ignored)" if self.ignored_buffers else "")]
        for label, names in (("left fresh", self.missing), ("unused", self.unused), ("mismatched", self.mismatched)):
            if names:
                lines.append(f"  {label}: {', '.join(names[:6])}{f' … ({len(names)} in all)' if len(names) > 6 else ''}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "copied": len(self.copied), "missing": self.missing, "unused": self.unused,
                "mismatched": self.mismatched, "complete": self.complete}


def _source_tensors(source_dir: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (one file, or shards named by an index)."""
    index = source_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: source_dir / f for name, f in weight_map.items()}
    single = source_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{source_dir}: no model.safetensors (or its index); only safetensors weights are read")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def copy_weights(model: nn.Module, source_dir: Path, source: str | None = None) -> CopyReport:
    """Copy every tensor of the HF Llama checkpoint in `source_dir` into `model`, component by component
    (embeddings, each block's projections and norms, the final norm, the head), one tensor at a time
    from the memory-mapped files: no second copy of the model is held. A tied source head feeds an
    untied one. Returns the report; the caller decides whether a partial copy is acceptable."""
    from safetensors import safe_open

    report = CopyReport(source or str(source_dir))
    where = _source_tensors(source_dir)
    ours = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    used: set[str] = set()
    handles: dict[Path, Any] = {}

    def read(name: str):
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f]

    for name, param in ours.items():
        src = name if name in where else None
        if src is None and name == "lm_head.weight" and "model.embed_tokens.weight" in where:
            src = "model.embed_tokens.weight"  # a tied source: its head is its embedding
        if src is None:
            report.missing.append(name)
            continue
        used.add(src)
        shape = tuple(read(src).get_slice(src).get_shape())
        if shape != tuple(param.shape):
            report.mismatched.append(f"{name}: source {shape} vs ours {tuple(param.shape)}")
            continue
        param.copy_(read(src).get_tensor(src))
        report.copied.append(name)
    tied_head = "lm_head.weight" not in ours
    for name in where:
        if name in used or (tied_head and name == "lm_head.weight" and "model.embed_tokens.weight" in used
                            and _same(read(name), name, read("model.embed_tokens.weight"), "model.embed_tokens.weight")):
            continue
        (report.ignored_buffers if name.endswith(DERIVED_BUFFERS) else report.unused).append(name)
    return report


def _same(fa, a: str, fb, b: str) -> bool:
    """A source that stores its tied head twice: the two tensors are equal."""
    return fa.get_slice(a).get_shape() == fb.get_slice(b).get_shape() and torch.equal(fa.get_tensor(a), fb.get_tensor(b))
