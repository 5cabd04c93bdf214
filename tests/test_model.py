"""Our Llama (model.py) against transformers' LlamaForCausalLM: same weights, same numbers, same files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

import model as ours
from architecture import config_kwargs, count_parameters, shape

VOCAB = 300


def make_config(**over) -> LlamaConfig:
    arch = {**shape(128, 3, VOCAB, heads=4, kv_heads=2), **over.pop("arch", {})}
    return LlamaConfig(**{**config_kwargs(arch, 128), **over}, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def pair(cfg: LlamaConfig, seed: int = 0) -> tuple[HFLlama, ours.LlamaForCausalLM]:
    """Both classes with the same weights, scaled up so that the differences would show."""
    torch.manual_seed(seed)
    hf = HFLlama(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mine = ours.LlamaForCausalLM(cfg)
    mine.load_state_dict(hf.state_dict())
    return hf.eval(), mine.eval()


def test_a_seeded_init_draws_the_same_weights_as_transformers():
    cfg = make_config()
    torch.manual_seed(3)
    a = HFLlama(cfg).state_dict()
    torch.manual_seed(3)
    b = ours.LlamaForCausalLM(cfg).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_loss_and_gradients_match_transformers_in_fp32(rope, tied):
    over = {"arch": {"tie_word_embeddings": tied}}
    if rope:
        over["rope_parameters"] = rope
    hf, mine = pair(make_config(**over))
    x = torch.randint(3, VOCAB, (2, 100))
    torch.testing.assert_close(mine(x).logits, hf(x).logits, rtol=0, atol=1e-5)
    hf.train(), mine.train()
    loss_hf, loss_ours = hf(x, labels=x).loss, mine(x, labels=x).loss
    assert abs(loss_hf.item() - loss_ours.item()) <= 1e-6
    loss_hf.backward(), loss_ours.backward()
    grads = dict(mine.named_parameters())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_in_bf16_our_logits_are_as_close_to_fp32_as_transformers_are():
    """bf16 rounds differently in each implementation (transformers' bf16 model even rounds its RoPE
    frequencies); the measure is the distance to the fp32 logits, next to transformers' own."""
    hf, mine = pair(make_config())
    eager = HFLlama(make_config())
    eager.load_state_dict(hf.state_dict())
    eager.config._attn_implementation = "eager"
    x = torch.randint(3, VOCAB, (2, 100))
    with torch.no_grad():
        truth = hf(x).logits
        sdpa, ours_, eager_ = (m.to(torch.bfloat16).eval()(x).logits.float() for m in (hf, mine, eager))
    theirs = max((sdpa - truth).abs().max(), (eager_ - truth).abs().max())
    assert 0 < (ours_ - truth).abs().max() <= theirs


def test_llama31_frequency_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = make_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    mine = ours.rope_inv_freq(cfg)
    assert not torch.equal(mine, ours.rope_inv_freq(make_config()))  # the scaling changed something
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)


def test_padded_batches_match_transformers_on_every_real_token():
    hf, mine = pair(make_config())
    x = torch.randint(3, VOCAB, (3, 40))
    for mask in (torch.ones(3, 40, dtype=torch.long),
                 torch.tensor([[1] * 40, [1] * 25 + [0] * 15, [1] * 10 + [0] * 30]),   # right padding
                 torch.tensor([[1] * 40, [0] * 15 + [1] * 25, [0] * 30 + [1] * 10])):  # left padding
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        a = hf(x, attention_mask=mask, position_ids=pos).logits
        b = mine(x, attention_mask=mask, position_ids=pos).logits
        assert torch.isfinite(b).all()
        real = mask.bool()
        torch.testing.assert_close(b[real], a[real], rtol=0, atol=1e-5)


def test_our_kv_cache_generates_what_transformers_generates():
    hf, mine = pair(make_config(), seed=1)
    for prompt in (torch.randint(3, VOCAB, (1, n)) for n in (1, 7, 30)):
        theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.generate(mine, prompt, 40), theirs[:, prompt.shape[1]:])
        # and transformers' generate() drives our model (its own DynamicCache) to the same tokens
        assert torch.equal(mine.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None,
                                         pad_token_id=0), theirs)


def test_left_padded_batched_generate_matches_transformers():
    hf, mine = pair(make_config(), seed=2)
    x = torch.randint(3, VOCAB, (2, 12))
    mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine.generate(x, attention_mask=mask, **kw), hf.generate(x, attention_mask=mask, **kw))


def test_generation_stops_at_eos_per_row():
    _, mine = pair(make_config(), seed=4)
    x = torch.randint(3, VOCAB, (2, 5))
    free = ours.generate(mine, x, 30)
    eos = int(free[0, 3])  # make the 4th token of row 0 the end
    out = ours.generate(mine, x, 30, eos_token_id=eos)
    assert torch.equal(out[0, :4], free[0, :4]) and (out[0, 4:] == eos).all()


def test_saves_as_transformers_llama_and_round_trips(tmp_path):
    _, mine = pair(make_config(arch={"tie_word_embeddings": False}))
    mine.save_pretrained(tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert "auto_map" not in conf
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is HFLlama
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert set(saved) == set(HFLlama(loaded.config).state_dict())   # transformers' names, no rotary buffer
    back = ours.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    for k, v in mine.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randint(3, VOCAB, (1, 20))
    torch.testing.assert_close(back(x).logits, loaded(x).logits, rtol=0, atol=1e-5)


def test_parameter_count_is_the_built_models():
    for arch in (shape(128, 3, VOCAB, heads=4, kv_heads=2), {**shape(192, 2, VOCAB, heads=3, kv_heads=1),
                                                              "tie_word_embeddings": False}):
        m = ours.LlamaForCausalLM(LlamaConfig(**config_kwargs(arch, 64)))
        assert sum(p.numel() for p in m.parameters()) == count_parameters(arch)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, a = pair(make_config())
    _, b = pair(make_config())
    b.gradient_checkpointing_enable()
    a.train(), b.train()
    x = torch.randint(3, VOCAB, (2, 32))
    a(x, labels=x).loss.backward(), b(x, labels=x).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_peft_lora_on_our_model_trains_only_the_adapters_and_merges():
    from peft import LoraConfig, get_peft_model

    from architecture import LORA_TARGETS

    _, mine = pair(make_config())
    x = torch.randint(3, VOCAB, (2, 16))
    before = mine(x).logits
    peft = get_peft_model(mine, LoraConfig(r=4, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    adapted = {n.split(".base_layer")[0].split(".")[-1] for n, _ in peft.named_modules() if n.endswith("base_layer")}
    assert adapted == set(LORA_TARGETS)
    torch.testing.assert_close(peft(x).logits, before)   # LoRA B starts at zero: the model is unchanged
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    peft.train()
    peft(x, labels=x).loss.backward()
    opt.step()
    peft.eval()
    tuned = peft(x).logits
    assert not torch.allclose(tuned, before)
    merged = peft.merge_and_unload()
    assert type(merged) is ours.LlamaForCausalLM
    torch.testing.assert_close(merged(x).logits, tuned, rtol=0, atol=1e-4)


def test_nf4_loads_into_our_model_and_runs(tmp_path):
    from transformers import BitsAndBytesConfig

    _, mine = pair(make_config())
    mine.save_pretrained(tmp_path / "m")
    q = ours.LlamaForCausalLM.from_pretrained(
        tmp_path / "m", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=torch.bfloat16))
    import bitsandbytes as bnb

    assert isinstance(q.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    x = torch.randint(3, VOCAB, (1, 16))
    ref = mine.to(torch.bfloat16)(x).logits.float()
    got = q(x).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().mean() < 0.25 * ref.abs().mean()   # 4-bit weights: close, not equal


@pytest.mark.slow
def test_the_pipeline_trains_with_our_model_and_publishes_a_transformers_llama(tmp_path):
    """MODEL_IMPL=ours with COMPILE through trainer.sh: full-precision shard 0 (compiled blocks), then
    NF4 + LoRA on shard 1 (merged; not compiled), against MODEL_IMPL=transformers on the same shard 0."""
    from conftest import make_env, record, run

    base = {**make_env(tmp_path), "MAX_RUNS": "1"}
    theirs_env = {**base, "OUTPUT_REPO": str(tmp_path / "theirs" / "llama"), "WORK_DIR": str(tmp_path / "w2")}
    p = run(["./trainer.sh"], {**theirs_env, "MODEL_IMPL": "transformers"}, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for use_quant, shard in (("false", 0), ("true", 1)):
        p = run(["./trainer.sh"], {**base, "MODEL_IMPL": "ours", "USE_QUANT": use_quant, "COMPILE": "true"}, timeout=600)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        assert ("each decoder block compiles on its first step" if shard == 0 else "COMPILE=true: not compiling (NF4") in p.stdout
        assert "recompile" not in p.stdout + p.stderr
        last = record(base["OUTPUT_REPO"])["history"][-1]
        assert last["shard"] == shard and last["eval_loss"] < last["eval_loss_before"]
        conf = json.loads((tmp_path / "out" / "llama" / "config.json").read_text())
        assert conf["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in conf
        assert type(AutoModelForCausalLM.from_pretrained(base["OUTPUT_REPO"])) is HFLlama
    assert last["train_format"] == "nf4" and last["merge_delta_pct"] <= 0.5
    ours_0, theirs_0 = record(base["OUTPUT_REPO"])["history"][0], record(theirs_env["OUTPUT_REPO"])["history"][0]
    # same seeded weights and data: the same loss before training; after 6 bf16 steps, within rounding
    assert abs(ours_0["eval_loss_before"] - theirs_0["eval_loss_before"]) <= 1e-3 * theirs_0["eval_loss_before"]
    assert abs(ours_0["eval_loss"] - theirs_0["eval_loss"]) <= 0.01 * theirs_0["eval_loss"]


# --- weight copy ------------------------------------------------------------------------------------


def _saved(tmp_path, name, cfg, seed=0, **kw):
    hf, _ = pair(cfg, seed)
    hf.save_pretrained(tmp_path / name, **kw)
    return hf, tmp_path / name


def test_a_complete_copy_reproduces_the_source_model(tmp_path):
    hf, src = _saved(tmp_path, "src", make_config(), max_shard_size="100KB")   # sharded, with an index
    assert (src / "model.safetensors.index.json").exists()
    torch.manual_seed(9)
    target = ours.LlamaForCausalLM(make_config())
    report = ours.copy_weights(target, src, "someone/base")
    assert report.complete and len(report.copied) == len(dict(target.named_parameters()))
    x = torch.randint(3, VOCAB, (1, 30))
    torch.testing.assert_close(target.eval()(x).logits, hf(x).logits, rtol=0, atol=1e-5)
    assert report.describe()[0].startswith("weights from someone/base: ")


def test_the_report_catches_missing_unused_and_mismatched_tensors(tmp_path):
    _, deeper = _saved(tmp_path, "deeper", make_config(arch={"num_hidden_layers": 4}))
    report = ours.copy_weights(ours.LlamaForCausalLM(make_config()), deeper)   # ours has 3 layers
    assert not report.complete and not report.missing and not report.mismatched
    assert report.unused and all(n.startswith("model.layers.3.") for n in report.unused)

    _, shallower = _saved(tmp_path, "shallower", make_config(arch={"num_hidden_layers": 2}))
    target = ours.LlamaForCausalLM(make_config())
    fresh = target.model.layers[2].mlp.up_proj.weight.clone()
    report = ours.copy_weights(target, shallower)
    assert report.missing and all(n.startswith("model.layers.2.") for n in report.missing)
    assert torch.equal(target.model.layers[2].mlp.up_proj.weight, fresh)   # left as it was, not zeroed

    _, wider = _saved(tmp_path, "vocab", make_config(arch={"vocab_size": VOCAB + 10}))
    report = ours.copy_weights(ours.LlamaForCausalLM(make_config()), wider)
    assert report.mismatched == [f"model.embed_tokens.weight: source ({VOCAB + 10}, 128) vs ours ({VOCAB}, 128)"]
    assert "mismatched" in report.to_json() and not report.to_json()["complete"]


def test_derived_buffers_are_ignored_and_a_tied_source_feeds_an_untied_head(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, src = _saved(tmp_path, "src", make_config())          # tied: no lm_head.weight saved
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    tensors["freqs_cis"] = torch.ones(4, 32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    untied = ours.LlamaForCausalLM(make_config(arch={"tie_word_embeddings": False}))
    report = ours.copy_weights(untied, src)
    assert report.complete and sorted(report.ignored_buffers) == ["freqs_cis", "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert torch.equal(untied.lm_head.weight, hf.model.embed_tokens.weight)


def test_transformers_pipeline_chats_with_our_model():
    from transformers import pipeline

    from tokenizer import train_tokenizer

    tok = train_tokenizer(["a baker bakes bread every day", "the cat sleeps on the mat"] * 50, 300, 128)
    cfg = make_config(arch={"vocab_size": len(tok)})
    torch.manual_seed(0)
    mine = ours.LlamaForCausalLM(cfg).eval()
    chat = pipeline("text-generation", model=mine, tokenizer=tok)
    out = chat([{"role": "user", "content": "What does a baker do?"}], max_new_tokens=6, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    new = mine.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, enc["input_ids"].shape[1]:]
    assert torch.equal(new, ours.generate(mine, enc["input_ids"], 6)[0])
