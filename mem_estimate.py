"""How much memory a training run will need, from the architecture and the settings alone.

Loads nothing and imports no framework: preflight.py answers in seconds with it, and train.py's
GRADIENT_CHECKPOINTING=auto uses the same activation figures. `python bench/memory.py` measures real
runs against it.

The model of a run (per rank; one rank per GPU, or every rank in the same RAM on CPU):
- weights: the model as trained — bf16/fp16 (2 bytes) or fp32 (4); with USE_QUANT the NF4 base is
  4 bits per weight plus its double-quantized block scales, embeddings and norms stay float, and
  the LoRA adapters are added in the training precision.
- DeepSpeed ZeRO-2 on the trainable parameters: fp32 master weights, AdamW's two moments and the
  fp32 gradient partition, each split across the ranks; the half-precision gradients; its
  gradient bucket (reduce_bucket_size elements).
- activations kept for backward: per layer and token ~17·d + 4·ffn values (attention in, q/k/v,
  rotary, attention out, norms kept in fp32, the SwiGLU products); with gradient checkpointing only
  each layer's input, plus one layer recomputed during backward. The LM head runs chunked (lm_loss),
  so the full logits never exist.
- the end of the run: the published copy of the model (and, with USE_QUANT, the fp32 merge of one
  layer at a time) while the training state is still held.
- on CPU, a workspace measured on top of these (DeepSpeed's flat copies; bitsandbytes' CPU
  repacking); on GPU none, and fewer activations kept (the factor below, measured on an H200).
- the runtime: the framework itself (CUDA context, or the imported libraries on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from architecture import LORA_TARGETS, count_parameters, layer_shapes

# Measured by bench/memory.py on CPU (bf16, DeepSpeed ZeRO-2, glibc malloc): what the terms above
# do not account for, per parameter. Full training: DeepSpeed copies the weights into its flat
# contiguous groups while the originals are still alive (1.2-6 bytes/parameter measured, noisy).
# NF4 + LoRA on CPU: bitsandbytes dequantizes each layer to bf16 in its forward and backward, the
# merge builds fp32 layers one at a time beside the merged copy, and the allocator keeps those pages
# (2.1-5.4 bytes/parameter measured, the most on the smallest model).
FULL_INIT_BYTES_PER_PARAM = 3.5
NF4_CPU_BYTES_PER_PARAM = 3.0
RUNTIME_CPU_BYTES = 550 * 2**20  # torch + transformers + deepspeed + trl + bitsandbytes + peft imported (measured 506 MiB)
# Measured by bench/gpu.sh on an NVIDIA H200 (CUDA 13.0, torch 2.11, 1B preset, batch 8 x 2048, bf16;
# the peak is what torch's allocator reserved): no workspace beyond the terms above, full or NF4
# (DeepSpeed flattens the weights without a second GPU copy; the NF4 dequantization is per layer and
# transient); the activations kept are 0.68-0.79 of the values counted above (bf16 and flash-attention
# kernels keep fewer intermediates than the CPU's), so 0.75 of them; the CUDA context and kernels
# take 1.79 GB beside the allocator's memory.
GPU_ACTIVATION_FACTOR = 0.75
RUNTIME_GPU_BYTES = 1700 * 2**20
REDUCE_BUCKET = 5e7  # config.deepspeed_config's reduce_bucket_size (elements)


def _kv_dim(arch: dict[str, Any]) -> int:
    return int(arch["num_key_value_heads"]) * int(arch["head_dim"])


def lora_parameters(arch: dict[str, Any], r: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: r·(in + out) per adapted projection per layer."""
    shapes = layer_shapes(arch)
    return int(arch["num_hidden_layers"]) * sum(r * (i + o) for t, (i, o) in shapes.items() if t in targets)


def quantized_parameters(arch: dict[str, Any]) -> int:
    """Weights stored in 4 bits under USE_QUANT: every linear projection of every layer."""
    return int(arch["num_hidden_layers"]) * sum(i * o for i, o in layer_shapes(arch).values())


def _in_features(arch: dict[str, Any], target: str) -> int:
    return int(arch["intermediate_size"]) if target == "down_proj" else int(arch["hidden_size"])


def activation_values_per_token(arch: dict[str, Any], checkpointing: bool, lora: tuple[int, list[str], float] | None = None) -> float:
    """Values kept for backward per token of a micro-batch (all layers). `lora` = (r, targets,
    dropout): each adapter keeps its own dropped-out copy of the projection's input (none without
    dropout) and its rank-r intermediate."""
    d, ffn, layers = int(arch["hidden_size"]), int(arch["intermediate_size"]), int(arch["num_hidden_layers"])
    per_layer = 17 * d + 4 * ffn + 3 * _kv_dim(arch)
    if lora is not None:
        r, targets, dropout = lora
        per_layer += sum((_in_features(arch, t) if dropout > 0 else 0) + r for t in targets)
    if checkpointing:
        # each layer's input, plus one layer's activations and their gradients while it is recomputed
        return layers * d + 2 * per_layer
    return layers * per_layer + 2 * d


def activation_bytes(arch: dict[str, Any], batch: int, seq: int, precision: str, checkpointing: bool,
                     lora: tuple[int, list[str], float] | None = None) -> int:
    value = 4 if precision == "fp32" else 2
    return int(batch * seq * activation_values_per_token(arch, checkpointing, lora) * value)


@dataclass
class Estimate:
    device: str  # "gpu" or "cpu"
    world: int
    per_rank: dict[str, int]
    runtime_bytes: int
    peak_bytes: int  # per GPU on GPU; the whole machine's RAM on CPU (every rank)
    training_bytes: int  # per rank, without the runtime: what bench/memory.py measures

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "world": self.world, "per_rank": self.per_rank,
                "runtime_bytes": self.runtime_bytes, "training_bytes": self.training_bytes,
                "estimated_peak_bytes": self.peak_bytes}


def estimate(arch: dict[str, Any], *, precision: str, batch: int, seq: int, checkpointing: bool, nf4: bool,
             lora_r: int = 16, lora_targets: list[str] | None = None, lora_dropout: float = 0.05, world: int = 1,
             gpu: bool = False) -> Estimate:
    """Peak memory of one run of train.py with these settings (see the module doc for the model)."""
    params = count_parameters(arch)
    half = 4 if precision == "fp32" else 2
    if nf4:
        quantized = quantized_parameters(arch)
        trainable = lora_parameters(arch, lora_r, lora_targets or list(LORA_TARGETS))
        # 4-bit codes + one fp8 scale per block of 64 + fp32 scales of those per 256 blocks
        weights = int(quantized * (0.5 + 1 / 64 + 4 / (64 * 256))) + (params - quantized) * half + trainable * half
        loading = weights
        workspace = 0 if gpu else int(params * NF4_CPU_BYTES_PER_PARAM)
    else:
        trainable = params
        weights = params * half
        loading = params * 4  # from_pretrained in fp32, then cast
        workspace = 0 if gpu else int(params * FULL_INIT_BYTES_PER_PARAM)
    states = 16 if precision != "fp32" else 12  # master fp32 (not in fp32 runs) + m + v + fp32 grads
    optimizer = -(-trainable * states // world)
    gradients = trainable * half + int(REDUCE_BUCKET * half)  # DeepSpeed allocates the whole bucket
    lora = (lora_r, lora_targets or list(LORA_TARGETS), lora_dropout) if nf4 else None
    activations = activation_bytes(arch, batch, seq, precision, checkpointing, lora)
    if gpu:
        activations = int(activations * GPU_ACTIVATION_FACTOR)
    # After training: the published copy in the storage dtype beside everything above.
    final_copy = params * half
    train_phase = weights + optimizer + gradients + activations
    per_rank = {"weights": weights, "optimizer_states": optimizer, "gradients": gradients, "activations": activations,
                "final_copy": final_copy, "loading": loading, "workspace": workspace}
    training = max(train_phase, weights + optimizer + gradients + final_copy, loading) + workspace
    runtime = RUNTIME_GPU_BYTES if gpu else RUNTIME_CPU_BYTES
    peak = training + runtime if gpu else world * (training + runtime)
    return Estimate("gpu" if gpu else "cpu", world, per_rank, runtime, peak, training)


HEADROOM = 0.9  # a run is planned to fit in 90% of the memory it has


def available_memory() -> tuple[int, bool, int]:
    """(bytes one rank can use, on GPU?, GPUs): the smallest GPU's free memory, or the free RAM."""
    import psutil

    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return min(torch.cuda.mem_get_info(i)[0] for i in range(n)), True, n
    except ImportError:
        pass
    return psutil.virtual_memory().available, False, 0


def world_size(s, gpus: int) -> int:
    """Training ranks: NUM_PROCESSES, else one per GPU, or 1 on CPU (as trainer.sh launches)."""
    return s.num_processes or max(1, gpus)


def plan(s, arch: dict[str, Any], precision: str, *, nf4: bool, world: int, gpu: bool, gpus: int,
         available: int, first_run: bool = False) -> dict[str, Any]:
    """The estimate for these settings, whether it fits `available`, the gradient checkpointing
    setting the run will use (GRADIENT_CHECKPOINTING=auto: on only when needed), and, when it does
    not fit, the changes that would make it fit, each with its estimate. `first_run`: the run that
    creates the model, which trains every weight even with USE_QUANT."""
    budget = int(available * HEADROOM)

    from config import lora_config

    def est(**over) -> Estimate:
        kw = {"batch": s.batch_size, "nf4": nf4, "world": world, "checkpointing": False, **over}
        return estimate(arch, precision=precision, seq=s.max_length, lora_r=s.lora_r,
                        lora_targets=lora_config(s)["target_modules"], lora_dropout=s.lora_dropout, gpu=gpu, **kw)

    if s.gradient_checkpointing == "auto":
        ckpt = est().peak_bytes > budget
    else:
        ckpt = s.gradient_checkpointing == "true"
    chosen = est(checkpointing=ckpt)
    fits = chosen.peak_bytes <= budget
    suggestions: list[dict[str, Any]] = []
    if not fits:
        options: list[tuple[str, dict[str, Any]]] = []
        if not ckpt:
            options.append(("GRADIENT_CHECKPOINTING=true", {"checkpointing": True}))
        b = s.batch_size
        while b > 1:
            b //= 2
            accum = s.gradient_accumulation_steps * s.batch_size // b
            options.append((f"BATCH_SIZE={b} GRADIENT_ACCUMULATION_STEPS={accum} (same tokens per step)",
                            {"batch": b, "checkpointing": ckpt}))
            if est(batch=b, checkpointing=ckpt).peak_bytes <= budget:
                break
        quant = not nf4 and not first_run
        if quant:
            options.append(("USE_QUANT=true (NF4 base + LoRA)", {"nf4": True, "checkpointing": True}))
        if gpu and gpus > world:
            options.append((f"NUM_PROCESSES={gpus} (every GPU; ZeRO-2 splits the optimizer states)",
                            {"world": gpus, "checkpointing": ckpt}))
        options.append(("BATCH_SIZE=1 GRADIENT_CHECKPOINTING=true" + (" USE_QUANT=true" if quant else ""),
                        {"batch": 1, "checkpointing": True, "nf4": nf4 or quant}))
        for change, over in options:
            e = est(**over)
            suggestions.append({"change": change, "estimated_peak_bytes": e.peak_bytes, "fits": e.peak_bytes <= budget})
    return {"estimate": chosen, "checkpointing": ckpt, "fits": fits, "budget_bytes": budget,
            "suggestions": suggestions}


def gib(n: int) -> str:
    """Bytes for a person: MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
