"""Architecture sizing: Llama-3-style shapes whose real parameter count lands within 10% of the target."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from architecture import PRESETS, count_parameters, rope_parameters
from config import SettingsError, architecture, load_settings

TARGETS = ["1M", "3M", "10M", "27M", "60M", "125M", "350M", "700M", "1B", "1.5B", "3B"]


def built_parameters(arch: dict) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**arch))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("target", TARGETS)
def test_target_within_10_percent(target):
    s = load_settings({"TARGET_PARAMETERS": target, "VOCAB_SIZE": "4096" if target in {"1M", "3M"} else "32000"})
    arch = architecture(s)
    n = built_parameters(arch)
    want = {"M": 10**6, "B": 10**9}[target[-1]] * float(target[:-1])
    assert abs(n - want) / want <= 0.10, (target, n, arch)
    assert n == count_parameters(arch)  # the printed/recorded count is the real one


@pytest.mark.parametrize("target", TARGETS)
def test_llama3_shape_rules(target):
    arch = architecture(load_settings({"TARGET_PARAMETERS": target, "VOCAB_SIZE": "4096"}))
    d, heads, kv = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    assert 64 <= arch["head_dim"] <= 128 and heads * arch["head_dim"] == d
    assert heads % kv == 0                                       # grouped-query attention
    assert arch["intermediate_size"] % 64 == 0
    assert abs(arch["intermediate_size"] - 8 * d / 3) <= 32       # SwiGLU ≈ 8/3·d
    assert arch["tie_word_embeddings"]


def test_factor_sets_hidden_size():
    arch = architecture(load_settings({"FACTOR": "512"}))
    assert arch["hidden_size"] == 512


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_the_parameter_count_it_states(name):
    arch = architecture(load_settings({"MODEL_SIZE": name, "VOCAB_SIZE": "32000"}))
    n = built_parameters(arch)
    assert n == count_parameters(arch)
    if isinstance(PRESETS[name], int):
        assert abs(n - PRESETS[name]) / PRESETS[name] <= 0.05


def test_tiny_is_tinyllamas_shape():
    arch = architecture(load_settings({"MODEL_SIZE": "Tiny", "VOCAB_SIZE": "32000"}))
    assert built_parameters(arch) == 1_100_048_384  # TinyLlama-1.1B's parameter count
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"], arch["num_key_value_heads"],
            arch["intermediate_size"], arch["tie_word_embeddings"]) == (2048, 22, 32, 4, 5632, False)


def test_the_old_cpu_default_name_says_what_it_became():
    with pytest.raises(SettingsError, match=r"MODEL_SIZE='?tiny'?.*renamed: use cpu"):
        load_settings({"MODEL_SIZE": "tiny"})
    assert architecture(load_settings({})) == architecture(load_settings({"MODEL_SIZE": "cpu"}))


def test_new_models_use_llama3_rope_and_old_configs_keep_theirs():
    arch = architecture(load_settings({}))
    assert arch["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert LlamaConfig(**arch).rope_parameters["rope_theta"] == 500000.0
    assert rope_parameters({"rope_theta": 10000.0}) == {"rope_type": "default", "rope_theta": 10000.0}
    scaled = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    assert rope_parameters({"rope_parameters": scaled}) == scaled
