"""model_card.py: the published card says truthfully what the model started from."""

from __future__ import annotations

from architecture import config_kwargs, count_parameters, preset_shape
from model_card import render_card


def _record(origin=None) -> dict:
    arch = config_kwargs(preset_shape("cpu", 1000), 256)
    entry = {"stage": "pretrain", "shard": 0, "shards_total": 2, "rows": 200, "steps": 6, "tokens": 9000,
             "eval_loss_before": 6.9, "eval_loss": 5.1, "perplexity": 164.0}
    if origin:
        entry["origin"] = origin
    settings = {"INPUT_DATASET": "data/pretrain.jsonl", "INSTRUCT_DATASET": "data/instruct.jsonl", "SHARD_SIZE": 200,
                "MAX_LENGTH": 256, "BATCH_SIZE": 16, "GRADIENT_ACCUMULATION_STEPS": 1, "LEARNING_RATE": 3e-4,
                "WARMUP_RATIO": 0.05, "WEIGHT_DECAY": 0.1, "SEED": 42}
    return {"architecture": arch, "parameters": count_parameters(arch), "history": [entry], "settings": settings,
            "done": False, "next": {"inst": False, "init": 1}, "steps": 6, "tokens": 9000}


def test_a_model_built_here_says_so():
    card = render_card(_record(), "./out/llama")
    assert "a byte-level BPE tokenizer trained on its data and fresh weights" in card
    assert "| 6.900 | 5.100 |" in card and "next run trains pretrain shard 1" in card


def test_a_model_started_from_a_base_names_it_and_the_copy():
    origin = {"base_model": {"source": "someone/base", "copied": 38, "complete": True, "missing": [], "unused": [],
                             "mismatched": []}, "tokenizer": "someone/base"}
    card = render_card(_record(origin), "someone/llama")
    assert "the tokenizer of `someone/base` and the weights of `someone/base` (38 tensors copied)" in card
    partial = {**origin, "base_model": {**origin["base_model"], "complete": False}}
    assert "(38 tensors copied, the rest fresh)" in render_card(_record(partial), "someone/llama")
    assert "the tokenizer of `me/tok` and fresh weights" in render_card(_record({"tokenizer": "me/tok"}), "x/y")
