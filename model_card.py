"""The model card (README.md) published with every run: what the model is, how it was trained, how to load it."""

from __future__ import annotations

from typing import Any

from targets import open_target


def _steps(h: dict[str, Any]) -> str:
    """The steps a shard trained, and of how many when SHARD_STEPS skipped part of it."""
    return f"{h.get('steps', '')} of {h['shard_steps']}" if h.get("skipped_steps") else f"{h.get('steps', '')}"


def _start(record: dict[str, Any]) -> str:
    """What the first run started from: trained tokenizer and fresh weights, or what BASE_MODEL / TOKENIZER named."""
    origin = (record["history"][0] if record["history"] else {}).get("origin") or {}
    base = origin.get("base_model")
    weights = (f"the weights of `{base['source']}` ({base['copied']} tensors copied"
               f"{'' if base['complete'] else ', the rest fresh'})" if base else "fresh weights")
    tokenizer = f"the tokenizer of `{origin['tokenizer']}`" if origin.get("tokenizer") else "a byte-level BPE tokenizer trained on its data"
    return f"{tokenizer} and {weights}"


def render_card(record: dict[str, Any], target: str) -> str:
    """Markdown with Hub front matter, built only from the run-state record (which holds no secrets)."""
    arch = record["architecture"]
    last = record["history"][-1]
    chat = last["stage"] == "instruct"
    where = open_target(target).load_id
    rows = "\n".join(
        f"| {h['stage']} | {h['shard'] + 1}/{h['shards_total']} | {h.get('rows', '')} | {_steps(h)} | "
        f"{h.get('tokens', 0):,} | {h.get('eval_loss_before', float('nan')):.3f} | {h.get('eval_loss', float('nan')):.3f} | "
        f"{h.get('perplexity', float('nan')):.2f} |"
        for h in record["history"])
    s = record["settings"]
    status = ("finished" if record["done"] else
              f"in progress: next run trains {'instruct' if record['next']['inst'] else 'pretrain'} shard {record['next']['init']}")
    usage = ('messages = [{"role": "user", "content": "What does a baker do?"}]\n'
             'print(pipe(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])' if chat else
             'print(pipe("Once upon a time", max_new_tokens=64)[0]["generated_text"])')
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- train-llama
{"- conversational" if chat else "- pretraining"}
---

# {where.rsplit('/', 1)[-1]}

A Llama-architecture {"chat" if chat else "base"} model trained by train-llama: {_start(record)}, pretrained
shard by shard{", then instruction-tuned" if chat else ""}.
Status: {status}.

## Architecture

| parameters | hidden size | layers | heads (kv) | head dim | MLP width | vocabulary | context |
|---|---|---|---|---|---|---|---|
| {record['parameters']:,} | {arch['hidden_size']} | {arch['num_hidden_layers']} | {arch['num_attention_heads']} ({arch['num_key_value_heads']}) | {arch['head_dim']} | {arch['intermediate_size']} | {arch['vocab_size']} | {arch['max_position_embeddings']} |

Tied input/output embeddings: {str(arch['tie_word_embeddings']).lower()}. Weights: safetensors.

## Training

Pretraining data: `{s['INPUT_DATASET']}`; instruct data: `{s['INSTRUCT_DATASET']}`; {s['SHARD_SIZE']} rows per shard,
sequences of {s['MAX_LENGTH']} tokens, batch {s['BATCH_SIZE']} × {s['GRADIENT_ACCUMULATION_STEPS']} accumulation,
learning rate {s['LEARNING_RATE']} (cosine, warmup {s['WARMUP_RATIO']}), weight decay {s['WEIGHT_DECAY']}, seed {s['SEED']}.
Total: {record['steps']:,} optimizer steps, {record['tokens']:,} tokens.

| stage | shard | rows | steps | tokens | val loss before | val loss after | val perplexity |
|---|---|---|---|---|---|---|---|
{rows}

Validation loss is measured on a held-out part of each shard, before and after that shard's training.
`training_state.json` holds the full record; `runs/` the TensorBoard traces.

## Use

```python
from transformers import pipeline

pipe = pipeline("text-generation", model="{where}")
{usage}
```
"""
