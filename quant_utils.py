"""Checkpoint formats: what a published model's weights are, read from its config and safetensors
headers without loading a tensor.

(4-bit NF4 conversion, LoRA and merging build on this; they are not in this version.)
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from config import BadInput

# safetensors dtype names -> torch names
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "U8": "uint8", "I8": "int8"}


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


def checkpoint_format(model_dir: Path) -> dict[str, Any]:
    """{'format': 'nf4' | 'float', 'dtype': most common weight dtype, 'tensors': count, 'files': [...]}."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise BadInput([f"{model_dir}: no config.json, not a published model. Fix: point at a model directory."])
    cfg = json.loads(cfg_path.read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BadInput([f"{model_dir}: no .safetensors weights. Fix: publish the model again."])
    dtypes: Counter[str] = Counter()
    count = 0
    for f in files:
        for t in read_safetensors_header(f)["tensors"].values():
            dtypes[_DTYPES.get(t["dtype"], t["dtype"])] += 1
            count += 1
    quant = (cfg.get("quantization_config") or {}).get("bnb_4bit_quant_type")
    return {"format": "nf4" if quant == "nf4" else "float", "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
            "tensors": count, "files": [f.name for f in files]}
