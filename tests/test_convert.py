"""convert.py: Meta's layout (one or several shards), a torch distributed checkpoint with training
state in it, and our DeepSpeed ZeRO checkpoint, each back to a Hugging Face Llama that computes what
the source computes; and every mismatch named, with exit 2 and nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

import convert
import gguf_export
import layouts

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def hf_tiny(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # norms away from 1, so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
    return model


def to_meta_layout(model) -> dict[str, torch.Tensor]:
    """Our own independent writer of Meta's layout: HF names back to Meta's, q/k rotary pairs
    interleaved again ((i, i + d/2) -> (2i, 2i+1) per head)."""
    def interleave(w, heads):
        out_dim, in_dim = w.shape
        half = out_dim // heads // 2
        return w.view(heads, 2, half, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    sd, out = model.state_dict(), {}
    H, KV = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    out["tok_embeddings.weight"] = sd["model.embed_tokens.weight"]
    out["norm.weight"] = sd["model.norm.weight"]
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = interleave(sd[p + "self_attn.q_proj.weight"], H)
        out[f"layers.{i}.attention.wk.weight"] = interleave(sd[p + "self_attn.k_proj.weight"], KV)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return {k: v.clone() for k, v in out.items()}


PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "rope_theta": 500000.0,
          "vocab_size": 96, "multiple_of": 32}


def write_meta(d: Path, state: dict, shards: int = 1, params: dict | None = None) -> Path:
    """consolidated.NN.pth cut the way Meta's model parallelism cuts them."""
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params or PARAMS))
    for r in range(shards):
        part = {}
        for k, v in state.items():
            pattern = re.sub(r"^layers\.\d+\.", "layers.{i}.", k)
            dim = layouts.META_TO_HF.get(pattern, (None, None))[1]
            part[k] = v if dim is None else v.chunk(shards, dim=dim)[r].clone()
        part["rope.freqs"] = torch.zeros(8)  # a buffer Meta's files carry: dropped
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    return d


def logits_of(model_dir: Path, ids):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [8, 8, 3, 90, 41, 6, 7, 12]])


@pytest.mark.parametrize("shards,tied", [(1, False), (2, False), (2, True)])
def test_meta_layout_converts_to_the_same_model(tmp_path, shards, tied, capsys):
    model = hf_tiny(tied)
    src = write_meta(tmp_path / "meta", to_meta_layout(model), shards)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert convert.main(["meta", str(src), str(tmp_path / "hf"), "--tokenizer", str(tok), "--dtype", "fp32"]) == 0
    assert "checked: max |logit difference|" in capsys.readouterr().out
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tied
    assert cfg["intermediate_size"] == 96 and cfg["num_key_value_heads"] == 2 and (out / "tokenizer.json").exists()
    with torch.no_grad():
        want = model(IDS).logits
    assert float((logits_of(out, IDS) - want).abs().max()) <= 1e-5
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    for k, v in model.state_dict().items():
        if k in got:  # bit for bit: the permutation is exact
            assert torch.equal(got[k], v), k


def test_meta_in_bf16_keeps_bf16_and_checks_against_bf16(tmp_path):
    model = hf_tiny()
    state = {k: v.to(torch.bfloat16) for k, v in to_meta_layout(model).items()}
    src = write_meta(tmp_path / "meta", state)
    assert convert.main(["meta", str(src), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_dcp_checkpoint_with_training_state_converts(tmp_path):
    """torch's own DCP writer, with freqs_cis, optimizer state and a train state beside the model,
    as torchtitan saves; and with a model. prefix."""
    import torch.distributed.checkpoint as dcp

    model = hf_tiny()
    state = to_meta_layout(model)
    full = {**state, "freqs_cis": torch.randn(64, 8),
            "optimizer": {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(state.items())[:3]}},
            "train_state": {"step": torch.tensor(100)}}
    dcp.save(full, checkpoint_id=str(tmp_path / "dcp"))
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    assert convert.main(["dcp", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--params", str(tmp_path / "params.json"),
                         "--dtype", "fp32"]) == 0
    with torch.no_grad():
        want = model(IDS).logits
    assert float((logits_of(tmp_path / "hf", IDS) - want).abs().max()) <= 1e-5
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "dcp2"))
    assert convert.main(["dcp", str(tmp_path / "dcp2"), str(tmp_path / "hf2"), "--params", str(tmp_path / "params.json")]) == 0


def test_every_mismatch_is_named_and_nothing_is_written(tmp_path, capsys):
    state = to_meta_layout(hf_tiny())
    missing = dict(state)
    del missing["layers.1.feed_forward.w2.weight"]
    cases = {
        "missing": (write_meta(tmp_path / "a", missing), "missing key(s): layers.1.feed_forward.w2.weight"),
        "unexpected": (write_meta(tmp_path / "b", {**state, "layers.0.attention.bias": torch.zeros(64)}),
                       "unexpected key(s): layers.0.attention.bias"),
        "layers": (write_meta(tmp_path / "c", state, params={**PARAMS, "n_layers": 3}), "missing key(s): layers.2."),
        "shape": (write_meta(tmp_path / "d", {**state, "layers.0.attention.wk.weight": torch.zeros(64, 64)}),
                  "shape mismatch: layers.0.attention.wk.weight (64, 64) (expected (32, 64))"),
    }
    for name, (src, message) in cases.items():
        out = tmp_path / f"out-{name}"
        assert convert.main(["meta", str(src), str(out)]) == 2, name
        assert message in capsys.readouterr().err, name
        assert not out.exists() and not out.with_name(out.name + ".converting").exists()
    assert convert.main(["meta", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "params.json and consolidated" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert convert.main(["meta", str(tmp_path / "a"), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    assert convert.main(["dcp", str(tmp_path / "dcp"), str(tmp_path / "y")]) == 2
    assert "--params params.json" in capsys.readouterr().err


ZERO_WRITER = r"""
import json, os, sys
from pathlib import Path
import deepspeed, torch
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[2])))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
for _ in range(3):
    x = torch.randint(0, 96, (2, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
engine.save_checkpoint(str(out), tag="global_step3")
model.config.dtype = torch.bfloat16
model.config.save_pretrained(out)
(out / "tokenizer.json").write_text("{}")
"""


def test_our_zero_checkpoint_converts_from_its_fp32_masters(tmp_path):
    """A real DeepSpeed ZeRO-2 save (bf16 weights, fp32 masters, 3 steps): the converted model is
    the masters in bf16, which is what the run's model held, logit for logit."""
    ckpt = tmp_path / "last-checkpoint"
    from jit_ops import single_rank_env

    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", **single_rank_env()}
    p = subprocess.run([sys.executable, "-c", ZERO_WRITER, str(ckpt), json.dumps({**TINY, "tie_word_embeddings": True})],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "convert.py", "zero", str(ckpt), str(tmp_path / "hf"), "--json"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] == 0.0 and result["dtype"] == "bf16" and "tokenizer.json" in result["tokenizer"]
    from safetensors.torch import load_file

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], masters["model.layers.1.mlp.down_proj.weight"].bfloat16())
    (ckpt / "latest").unlink()
    p = subprocess.run([sys.executable, "convert.py", "zero", str(ckpt), str(tmp_path / "hf2")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "not a checkpoint this pipeline wrote" in p.stderr


def test_the_check_catches_a_wrong_conversion(tmp_path, monkeypatch, capsys):
    """Without the q/k permutation the weights load and have every right shape, but compute another
    model: the logit check refuses it (exit 1) and nothing is written."""
    src = write_meta(tmp_path / "meta", to_meta_layout(hf_tiny()))
    monkeypatch.setattr(layouts, "permute_rope", lambda w, heads: w)
    assert convert.main(["meta", str(src), str(tmp_path / "hf")]) == 1
    assert "from the source's (more than 1e-05)" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.converting").exists()


def hf_dir_with_tokenizer(tmp_path: Path, tied: bool = True) -> tuple[Path, object]:
    """A tiny Llama saved as the pipeline publishes it: bf16 weights, our trained tokenizer and template."""
    from tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open() if line.strip()][:300]
    tok = train_tokenizer(texts, TINY["vocab_size"] + 200, 64)
    model = hf_tiny(tied)
    model.resize_token_embeddings(len(tok))
    model = model.to(torch.bfloat16)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


@pytest.mark.parametrize("qtype", ["bf16", "f16", "q8_0"])
def test_gguf_holds_every_tensor_and_the_tokenizer(tmp_path, qtype):
    """Read back with gguf's own reader: each tensor (in llama.cpp's interleaved q/k layout, which
    this test undoes itself), the token list and types, the merges, the special ids, the template."""
    import gguf
    from safetensors.torch import load_file

    src, tok = hf_dir_with_tokenizer(tmp_path, tied=qtype != "f16")
    out = tmp_path / f"m-{qtype}.gguf"
    assert convert.main(["gguf", str(src), str(out), "--type", qtype]) == 0
    reader = gguf.GGUFReader(str(out))
    assert gguf_export.gguf_string(reader, "general.architecture") == "llama"
    assert gguf_export.gguf_string(reader, "tokenizer.ggml.model") == "gpt2"
    assert gguf_export.gguf_string(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert gguf_export.gguf_string(reader, "tokenizer.chat_template") == (src / "chat_template.jinja").read_text()
    vocab = tok.get_vocab()
    tokens = gguf_export.gguf_strings(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and all(tokens[i] == t for t, i in vocab.items())
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert gguf_export.gguf_strings(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tok.eos_token_id
    source = load_file(src / "model.safetensors")
    by_name = {t.name: t for t in reader.tensors}
    H, KV = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    for hf_name, gg_name in gguf_export.gguf_tensor_names(TINY["num_hidden_layers"]).items():
        if hf_name not in source:
            assert gg_name not in by_name  # a tied head is not written twice
            continue
        t = by_name[gg_name]
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        back = back.reshape(tuple(reversed([int(x) for x in t.shape])))
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's layout: pairs interleaved
            heads = H if "q_proj" in hf_name else KV
            back = back.view(heads, back.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(back.shape)
        want = source[hf_name].float()
        if qtype == "q8_0" and want.dim() == 2:
            assert float((back - want).abs().max()) <= float(want.abs().max()) / 127 * 0.6, hf_name
        else:
            exact = want if qtype != "f16" or want.dim() == 1 else want.half().float()
            assert torch.equal(back, exact), hf_name


def test_gguf_refuses_what_it_cannot_write(tmp_path, capsys):
    src, _ = hf_dir_with_tokenizer(tmp_path)
    (tmp_path / "taken.gguf").write_text("x")
    assert convert.main(["gguf", str(src), str(tmp_path / "taken.gguf")]) == 2
    assert "exists" in capsys.readouterr().err
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    assert convert.main(["gguf", str(src), str(tmp_path / "m.gguf")]) == 2
    assert "neither GPT-2's nor Llama 3's" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_push_publishes_the_result_like_the_pipeline_and_checks_the_token_first(tmp_path, env):
    """--push through the real huggingface_hub client against the loopback Hub: a read-only token is
    refused before anything is converted; with a write token one commit adds the GGUF to a private
    repo and leaves the files already there; a local target gets it too."""
    from hub_double import HubDouble

    from conftest import run

    write, read = "hf_writeTokenForTheTests0123456789", "hf_readOnlyTokenForTheTests012345"
    hub = HubDouble({write: {"name": "alice", "role": "write"}, read: {"name": "alice", "role": "read"}}).start()
    try:
        src, _ = hf_dir_with_tokenizer(tmp_path)
        hub.seed("alice/chat", {"README.md": b"the model card"})
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HUB_RETRY_WAIT": "0.05", "HUB_TIMEOUT": "5",
                    "HF_TOKEN": read})
        out = tmp_path / "m.gguf"
        push = [sys.executable, "convert.py", "gguf", str(src), str(out), "--push", "alice/chat"]
        p = run(push, env, timeout=300)
        assert p.returncode == 2 and "read-only token" in p.stderr, p.stderr[-2000:]
        assert not out.exists() and len(hub.commits("alice/chat")) == 1
        p = run(push, {**env, "HF_TOKEN": write}, timeout=300)
        assert p.returncode == 0 and "published to alice/chat" in p.stdout, p.stderr[-2000:]
        assert len(hub.commits("alice/chat")) == 2
        code = (f"from huggingface_hub import HfApi; api = HfApi(token={write!r}); "
                "print(sorted(api.list_repo_files('alice/chat')), api.model_info('alice/chat').private)")
        p = run([sys.executable, "-c", code], env, timeout=120)
        assert "'README.md', 'm.gguf'" in p.stdout and p.stdout.strip().endswith("True"), p.stdout + p.stderr[-2000:]
        assert write not in p.stdout
        local = [sys.executable, "convert.py", "gguf", str(src), str(tmp_path / "n.gguf"), "--push", str(tmp_path / "local")]
        assert run(local, env, timeout=300).returncode == 0
        assert (tmp_path / "local" / "n.gguf").stat().st_size == (tmp_path / "n.gguf").stat().st_size
    finally:
        hub.stop()


@pytest.mark.slow
def test_a_lora_on_nf4_checkpoint_converts_merged_and_checked(env, tmp_path):
    """A real USE_QUANT checkpoint (trainer.sh: a float shard, then a run of NF4 + LoRA stopped by
    MAX_STEPS): its adapters merged onto the published base the pipeline's way, the loss within 0.5%
    of the adapter model's, and a loadable model in the run's dtype; a base that is not the adapters'
    is refused."""
    from conftest import run

    env.update({"SHARD_STEPS": "4", "MAX_RUNS": "1"})
    assert run(["./trainer.sh"], env, timeout=600).returncode == 0
    p = run(["./trainer.sh"], {**env, "USE_QUANT": "true", "MAX_STEPS": "1"}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    ckpt = Path(env["OUTPUT_REPO"]) / "last-checkpoint"
    assert (ckpt / "adapter_config.json").exists()
    # the run's storage dtype (bf16 on a bf16 machine, fp32 elsewhere): the base's and the adapters'
    stored = json.loads((Path(env["OUTPUT_REPO"]) / "config.json").read_text())["dtype"]
    module = torch.load(next(ckpt.glob("global_step*/mp_rank_00_model_states.pt")), map_location="cpu",
                        weights_only=False)["module"]
    assert {str(v.dtype) for k, v in module.items() if "lora_" in k} == {f"torch.{stored}"}
    p = run([sys.executable, "convert.py", "zero", str(ckpt), str(tmp_path / "merged"), "--json"], env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["lora_merged"] and result["merge_loss_delta_pct"] <= 0.5
    assert result["dtype"] == {"bfloat16": "bf16", "float32": "fp32"}[stored]
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    with torch.no_grad():
        assert torch.isfinite(logits_of(tmp_path / "merged", IDS)).all()
    # Another base beside the checkpoint: its NF4 scales are not the ones the adapters saw.
    from safetensors.torch import load_file, save_file

    weights = Path(env["OUTPUT_REPO"]) / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * 3
    save_file(state, str(weights), metadata={"format": "pt"})
    p = run([sys.executable, "convert.py", "zero", str(ckpt), str(tmp_path / "other")], env, timeout=300)
    assert p.returncode == 2 and "is not the base its adapters were trained on" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_an_nf4_base_is_requantized_from_the_dtype_its_quant_state_records(dtype, expected):
    """The base's own quant state says what it was quantized from, whatever dtype the adapters are in."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64).to(dtype), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    states = {f"base_model.model.l.base_layer.{k}": v for k, v in layer.state_dict().items()}
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    states["base_model.model.l.lora_A.default.weight"] = torch.zeros(4, 64, dtype=other)
    assert layouts.nf4_source_precision(states) == expected
    with pytest.raises(layouts.BadInput, match="no quant state"):
        layouts.nf4_source_precision({k: v for k, v in states.items() if "quant_state" not in k})


def test_push_into_a_live_pipelines_output_is_refused_before_any_work(tmp_path, env):
    """A local --push target a running pipeline holds (its OUTPUT_REPO, or its OUTPUT_REPO-it) is
    one writer too many: refused at once, naming the holder, with nothing converted or written;
    once the run is gone the push goes through."""
    from conftest import run
    from test_hardening import _holder

    src, _ = hf_dir_with_tokenizer(tmp_path)
    out = Path(env["OUTPUT_REPO"])
    holder = _holder(env)
    try:
        for target in (out, out.with_name(out.name + "-it")):
            gguf = tmp_path / f"{target.name}.gguf"
            p = run([sys.executable, "convert.py", "gguf", str(src), str(gguf), "--push", str(target)], env, timeout=300)
            assert p.returncode == 1 and f"in use by another run: pid {holder.pid}" in p.stderr, p.stdout + p.stderr
            assert not gguf.exists() and not target.exists()
    finally:
        holder.kill()
        holder.wait()
    target = out.with_name(out.name + "-it")
    p = run([sys.executable, "convert.py", "gguf", str(src), str(tmp_path / "m.gguf"), "--push", str(target)], env,
            timeout=300)
    assert p.returncode == 0 and (target / "m.gguf").is_file(), p.stdout + p.stderr
    # a chat output whose pipeline has not started yet: its lock is taken all the same, so a
    # pipeline that starts during the push waits its turn
    fresh = tmp_path / "later" / "llama-it"
    p = run([sys.executable, "convert.py", "gguf", str(src), str(tmp_path / "n.gguf"), "--push", str(fresh)], env,
            timeout=300)
    assert p.returncode == 0 and (fresh / "n.gguf").is_file() and (tmp_path / "later" / "llama.lock").is_file()
