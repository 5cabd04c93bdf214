"""Everything bitsandbytes / PEFT: checkpoint formats, NF4<->float conversion, LoRA, and the merge.

- `checkpoint_format` / `verify_checkpoint` read config.json and the safetensors headers only (no
  tensor is loaded): the format (NF4 or floating point, which dtype), and every missing, extra or
  mis-shaped tensor, by name, as bad input.
- `convert` writes a checkpoint in the format a run trains in: bf16/fp32 -> NF4 (bitsandbytes, double
  quantization) or NF4 -> float (each 4-bit weight dequantized by bitsandbytes).
- `add_lora` wraps a 4-bit model with LoRA adapters on the settings' target projections.
- `to_float` dequantizes a 4-bit model to fp32, adds each adapter's scale * B @ A there, and returns
  a plain float model (no quantization_config, no adapter): the adapters are never merged into 4-bit
  weights, which would round the sum back to 16 levels per block.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from config import Settings, bnb_config, lora_config
from errors import BadInput

# safetensors dtype names -> torch names
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "U8": "uint8", "I8": "int8"}
# Tensors bitsandbytes stores beside each 4-bit weight (its quantization state).
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                   ".quant_state.bitsandbytes__fp4")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets), checked against
    the file size so a truncated file is caught here rather than half-way through a load."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInput([f"{path}: truncated safetensors file ({size} bytes). Fix: publish the model again."])
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise BadInput([f"{path}: truncated safetensors file (header of {n} bytes in a {size}-byte file). "
                            "Fix: publish the model again."])
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput([f"{path}: unreadable safetensors header ({e}). Fix: publish the model again."]) from None
    meta = header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise BadInput([f"{path}: truncated safetensors file: tensors end at byte {8 + n + end}, the file has {size}. "
                        "Fix: publish the model again."])
    return {"tensors": header, "metadata": meta}


def _headers(model_dir: Path) -> tuple[dict[str, Any], dict[str, dict]]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise BadInput([f"{model_dir}: no config.json, not a published model. Fix: point at a model directory."])
    files = _weight_files(model_dir)
    if not files:
        raise BadInput([f"{model_dir}: no .safetensors weights. Fix: publish the model again."])
    tensors: dict[str, dict] = {}
    for f in files:
        for name, t in read_safetensors_header(f)["tensors"].items():
            tensors[name] = {**t, "file": f.name}
    return read_model_config(cfg_path), tensors


# The config.json fields a Llama cannot be built without, and their JSON types.
_CONFIG_FIELDS = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "intermediate_size": int,
                  "vocab_size": int}


def read_model_config(path: Path) -> dict[str, Any]:
    """config.json of a published model, checked: a JSON object describing a Llama with whole-number
    sizes (what building the architecture needs); anything else is bad input naming the field."""
    fix = "Fix: publish the model again (its config.json is written with it), or restore the file."
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput([f"{path}: not valid JSON ({e}). {fix}"]) from None
    if not isinstance(cfg, dict):
        raise BadInput([f"{path}: a JSON {type(cfg).__name__}, not an object. {fix}"])
    problems = []
    if cfg.get("model_type") != "llama":
        problems.append(f"model_type is {json.dumps(cfg.get('model_type'))}, this pipeline trains \"llama\" models")
    for k, kind in _CONFIG_FIELDS.items():
        v = cfg.get(k)
        if not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
            problems.append(f"{k} is {json.dumps(v)}, expected a positive whole number")
    if problems:
        raise BadInput([f"{path}: {'; '.join(problems)}. {fix}"])
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(f for f in model_dir.glob("*.safetensors") if f.name != SCALES_FILE)


def checkpoint_format(model_dir: Path) -> dict[str, Any]:
    """{'format': 'nf4' | 'float', 'dtype': the floating dtype of its weights, 'tensors': count, 'files': [...]}."""
    cfg, tensors = _headers(model_dir)
    quant = (cfg.get("quantization_config") or {}).get("bnb_4bit_quant_type")
    floats = Counter(_DTYPES.get(t["dtype"], t["dtype"]) for n, t in tensors.items()
                     if t["dtype"] in {"BF16", "F16", "F32", "F64"} and not n.endswith(_QUANT_SUFFIXES))
    return {"format": "nf4" if quant == "nf4" else "float", "dtype": floats.most_common(1)[0][0] if floats else None,
            "tensors": len(tensors), "files": sorted({t["file"] for t in tensors.values()})}


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model that config.json describes (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if getattr(conf, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    return shapes


def verify_checkpoint(model_dir: Path) -> dict[str, Any]:
    """Every tensor the config's architecture needs is there with its shape, and nothing else.

    For NF4 checkpoints a 4-bit weight is stored packed (two codes per byte) with its quantization
    state beside it; its element count must match the float shape. Returns checkpoint_format().
    """
    cfg, tensors = _headers(model_dir)
    try:
        want = expected_shapes(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadInput([f"{model_dir / 'config.json'}: does not describe a buildable Llama ({type(e).__name__}: "
                        f"{str(e)[:200]}). Fix: publish the model again, or restore the file."]) from None
    nf4 = (cfg.get("quantization_config") or {}).get("bnb_4bit_quant_type") == "nf4"
    stored = {n: t for n, t in tensors.items() if not n.endswith(_QUANT_SUFFIXES)}
    missing = sorted(set(want) - set(stored))
    extra = sorted(n for n in set(stored) - set(want) if not (n == "lm_head.weight" and cfg.get("tie_word_embeddings")))
    wrong = []
    for n in sorted(set(want) & set(stored)):
        shape = tuple(stored[n]["shape"])
        if nf4 and stored[n]["dtype"] == "U8":
            numel = 1
            for x in want[n]:
                numel *= x
            ok = shape[0] * (shape[1] if len(shape) > 1 else 1) * 2 == numel and f"{n}.absmax" in tensors
        else:
            ok = shape == want[n]
        if not ok:
            wrong.append(f"{n} {list(shape)} (expected {list(want[n])})")
    problems = []
    if missing:
        problems.append(f"{model_dir}: missing tensor(s): {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}.")
    if extra:
        problems.append(f"{model_dir}: unexpected tensor(s): {', '.join(extra[:10])}{' …' if len(extra) > 10 else ''}.")
    if wrong:
        problems.append(f"{model_dir}: wrong shape: {'; '.join(wrong[:10])}.")
    if problems:
        raise BadInput([p + " Fix: publish a complete model of the architecture in its config.json." for p in problems])
    return checkpoint_format(model_dir)


def non_finite_tensors(model_dir: Path) -> list[str]:
    """'file: tensor' for every floating-point tensor of the checkpoint holding NaN or infinity, read
    one tensor at a time (a model whose header is intact but whose bytes are garbage passes every
    header check and trains to NaN)."""
    import torch
    from safetensors import safe_open

    bad = []
    for f in _weight_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{f.name}: {name}")
    return bad


def _load(model_dir: Path, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, device_map=device, **kw)


def storage_dtype(precision: str):
    """The float dtype weights are kept in for a run of `precision`: bf16 for bf16, else fp32."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def dequantized_weight(layer):
    """The float weight of a bitsandbytes 4-bit linear, as its own forward would use it."""
    import bitsandbytes as bnb

    # On CPUs with AVX512-bf16, bitsandbytes repacks a 4-bit weight into its kernel's layout on the
    # first inference forward; dequantize_4bit expects the standard layout, which saving restores.
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        layer.state_dict()
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def convert(src: Path, dst: Path, to: str, compute: str) -> None:
    """Write the checkpoint `src` to `dst` as `to` ('nf4' or 'float'; float is bf16 when computing in bf16)."""
    from transformers import BitsAndBytesConfig

    dtype = storage_dtype(compute)
    if to == "nf4":
        model = _load(src, dtype=dtype, quantization_config=BitsAndBytesConfig(**bnb_config(compute)))
        _restore_scales(model, src)
        model.save_pretrained(dst, safe_serialization=True)
    else:
        model = to_float(_load(src), dtype)
        model.save_pretrained(dst, safe_serialization=True)
        _keep_scales(src, dst)
    if (src / "generation_config.json").exists() and not (dst / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")


SCALES_FILE = "nf4_scales.safetensors"


def _keep_scales(nf4_dir: Path, float_dir: Path) -> None:
    """Beside weights dequantized from NF4, keep the NF4 scales they came from (absmax and its double
    quantization). Double quantization offsets the block scales by their mean, which a re-quantization
    of the dequantized weights cannot recover; with the originals kept, NF4 -> float -> NF4 gives back
    the same codes and the same scales (see _restore_scales)."""
    from safetensors.torch import load_file, save_file

    scales = {}
    for f in _weight_files(nf4_dir):
        scales.update({k: v for k, v in load_file(f).items() if k.endswith(_QUANT_SUFFIXES)})
    if scales:
        save_file(scales, str(float_dir / SCALES_FILE))


def _restore_scales(model, float_dir: Path) -> None:
    """Where the float weights are exactly the dequantization of the new 4-bit codes under the kept
    scales (nothing trained them since), use those scales instead of the recomputed ones."""
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    path = float_dir / SCALES_FILE
    if not path.exists():
        return
    kept = load_file(path)
    weights = {}
    for f in _weight_files(float_dir):
        weights.update(load_file(f))
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or f"{name}.weight" not in weights:
            continue
        prefix = f"{name}.weight."
        parts = {k[len(prefix):]: v.to(module.weight.device) for k, v in kept.items() if k.startswith(prefix)}
        if not parts:
            continue
        state = bnb.functional.QuantState.from_dict(parts, device=module.weight.device)
        float_w = weights[f"{name}.weight"]
        deq = bnb.functional.dequantize_4bit(module.weight.data, state).to(float_w.dtype).cpu()
        if torch.equal(deq, float_w):
            module.weight.quant_state = state


def add_lora(model, s: Settings, gradient_checkpointing: bool, precision: str):
    """Freeze the 4-bit base and add trainable LoRA adapters on the settings' target projections.

    PEFT's prepare_model_for_kbit_training is not used: it upcasts every non-4-bit weight (norms,
    embeddings) to fp32, which turns the whole residual stream and its saved activations into fp32;
    measured on a 110M model, that made NF4 + LoRA need more memory than full bf16 training. Norms in
    the compute dtype (bf16) are stable; an fp16 run (`precision`) keeps the upcast (fp16 norms overflow).
    """
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # On a CPU with AVX512-bf16, bitsandbytes repacks a 4-bit weight for its inference kernel at the
    # first forward in eval mode (the validation before training) and from then on computes that
    # layer with an op that passes no gradient to its input: every LoRA below it would train on a
    # truncated gradient. Measured on a 3.2M model: validation loss 4.29 with the repacking vs 4.16
    # without after one 41-step shard. Layers being trained keep the standard path.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    if precision == "fp16":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    # Adapters in the base's compute dtype (bf16) rather than PEFT's default fp32: fp32 adapters cast
    # every projection's input to fp32 and keep it for backward (measured +0.6 GB on a 110M model,
    # batch 4 x 256). Under DeepSpeed the optimizer holds fp32 master copies either way.
    return get_peft_model(model, LoraConfig(**lora_config(s)), autocast_adapter_dtype=False)


def to_float(model, dtype):
    """A plain float copy of `model` (4-bit, with or without LoRA): every 4-bit weight dequantized to
    fp32, each adapter's scale·B@A added there, then cast to `dtype`. The merge never happens in the
    4-bit weights. Strict: every weight of the float model is assigned exactly once."""
    import bitsandbytes as bnb
    import torch

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is pinned
        LoraLayer = ()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    conf = type(base.config).from_dict(config)
    conf.dtype = dtype
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        lora = isinstance(module, LoraLayer)
        layer = module.get_base_layer() if lora else module
        if not (lora or isinstance(module, bnb.nn.Linear4bit)) or "base_layer" in name:
            continue
        w = dequantized_weight(layer) if isinstance(layer, bnb.nn.Linear4bit) else layer.weight
        w = w.detach().float().clone()
        if lora:
            for adapter in module.active_adapters:
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                w += module.scaling[adapter] * (b @ a)
        state[f"{name}.weight"] = w.to(dtype)
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().to(dtype)
    for name, p in base.state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" in name or clean in state or name.endswith(_QUANT_SUFFIXES):
            continue
        if p.dtype == torch.uint8:
            raise RuntimeError(f"to_float: {name} is 4-bit but belongs to no 4-bit layer")
        state[clean] = p.detach().to(dtype)
    with torch.device("meta"):
        out = type(base)._from_config(conf)  # the source's class: transformers' Llama, or ours (model.py)
    result = out.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and conf.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"to_float: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if conf.tie_word_embeddings:
        out.tie_weights()
    # Buffers outside the state dict (rotary inverse frequencies) are taken from the source model.
    for name, buf in base.named_buffers():
        owner, _, attr = name.replace(".base_layer", "").rpartition(".")
        mod = out.get_submodule(owner) if owner else out
        if getattr(mod, attr, None) is not None and getattr(mod, attr).is_meta:
            setattr(mod, attr, buf.detach().clone())
    leftover = [n for n, b in out.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"to_float: buffers without a value: {leftover[:5]}")
    return out
