"""quant_utils: formats, strict checkpoint checks, NF4<->float conversion, LoRA merge fidelity."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import call_main, py, run, tree_digest
from config import load_settings
from errors import BadInput
from quant_utils import add_lora, checkpoint_format, convert, to_float, verify_checkpoint


def _tiny_model(dst: Path, dtype=torch.bfloat16, tie=True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["the cat says meow and the dog says woof"] * 20, 300, 64)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                                         max_position_embeddings=64))
    model.to(dtype).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    bf16 = _tiny_model(root / "bf16")
    convert(bf16, root / "nf4", "nf4", "bf16")
    for f in [*bf16.glob("tokenizer*"), bf16 / "chat_template.jinja"]:
        shutil.copy2(f, root / "nf4" / f.name)  # a published NF4 model comes with its tokenizer
    return root


def test_formats_are_read_from_headers(models):
    assert checkpoint_format(models / "bf16") | {"files": None} == {"format": "float", "dtype": "bfloat16", "tensors": 20, "files": None}
    nf4 = verify_checkpoint(models / "nf4")
    assert nf4["format"] == "nf4"


def test_nf4_float_nf4_round_trip_is_identical(models, tmp_path):
    from safetensors.torch import load_file

    convert(models / "nf4", tmp_path / "float", "float", "bf16")
    assert checkpoint_format(tmp_path / "float")["format"] == "float"
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    convert(tmp_path / "float", tmp_path / "nf4", "nf4", "bf16")
    a, b = load_file(models / "nf4" / "model.safetensors"), load_file(tmp_path / "nf4" / "model.safetensors")
    assert set(a) == set(b)
    assert sum(k.endswith(".absmax") for k in a) == 14   # every linear of both layers was quantized
    for k in a:
        assert torch.equal(a[k], b[k]), k                # codes and scales, bit for bit


def _break(src: Path, dst: Path, how: str) -> str:
    """A copy of `src` broken in one way; returns the name the error must mention."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(f)
    if how == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
        name = "model.layers.1.mlp.up_proj.weight"
    elif how == "extra":
        state["model.layers.9.mystery.weight"] = torch.zeros(3)
        name = "model.layers.9.mystery.weight"
    elif how == "shape":
        state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 64, dtype=torch.bfloat16)
        name = "model.layers.0.self_attn.q_proj.weight"
    else:  # truncated
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    save_file(state, str(f), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["missing", "extra", "shape", "truncated"])
def test_broken_checkpoint_is_named(models, tmp_path, how):
    name = _break(models / "bf16", tmp_path / "m", how)
    with pytest.raises(BadInput) as e:
        verify_checkpoint(tmp_path / "m")
    assert name in str(e.value) and "Fix" in str(e.value)


@pytest.mark.parametrize("how", ["missing", "extra", "shape", "truncated"])
def test_broken_published_model_stops_the_run_with_exit_2(env, models, how, monkeypatch, capsys):
    """A run continuing from a broken published model exits 2 naming it, and publishes nothing
    (prep's main() in this process; its command line's exit code is test_prep's)."""
    import prep

    out = Path(env["OUTPUT_REPO"])
    name = _break(models / "bf16", out, how)
    (out / "training_state.json").write_text(json.dumps({"stage": "pretrain", "shard": 0, "next": {"inst": False, "init": 1},
                                                         "history": []}))
    before = tree_digest(out)
    env["USE_QUANT"] = "true"
    rc, _, err = call_main(prep.main, [], env, monkeypatch, capsys)
    assert rc == 2 and name in err, err
    assert tree_digest(out) == before and not (Path(env["WORK_DIR"]) / "prepared").exists()


def _train_lora(nf4_dir: Path, targets: str, steps: int = 30):
    """A few optimizer steps of LoRA on the 4-bit model (so B != 0); returns the PEFT model."""
    from transformers import AutoModelForCausalLM

    s = load_settings({"LORA_TARGETS": targets, "LORA_DROPOUT": "0"})
    model = add_lora(AutoModelForCausalLM.from_pretrained(nf4_dir, device_map={"": "cpu"}), s, False, "bf16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(0)
    x = torch.randint(0, 200, (4, 32))
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


@pytest.mark.parametrize("targets", ["q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "q_proj,v_proj"])
def test_merge_into_bf16_keeps_what_the_adapter_learned(models, targets):
    model, x = _train_lora(models / "nf4", targets)
    with torch.no_grad():
        adapter = model(input_ids=x, labels=x)
        merged_model = to_float(model, torch.bfloat16)
        merged = merged_model(input_ids=x, labels=x)
    assert not hasattr(merged_model.config, "quantization_config")
    assert all(p.dtype == torch.bfloat16 for p in merged_model.parameters())
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    delta = abs(math.exp(merged.loss) - math.exp(adapter.loss)) / math.exp(adapter.loss)
    assert delta <= 0.001, delta   # the target: <= 0.1% perplexity
    base = to_float(model.get_base_model().__class__.from_pretrained(models / "nf4", device_map={"": "cpu"}), torch.bfloat16)
    with torch.no_grad():
        untrained = base(input_ids=x, labels=x).loss
    assert merged.loss < untrained - 0.05  # the merge carries the training, not just the base


def test_nf4_source_becomes_float_for_full_training(env, models):
    """INPUT_REPO holding an NF4 model, USE_QUANT=false: prep dequantizes it for full training."""
    env.update({"INPUT_REPO": str(models / "nf4"), "INST": "true", "INIT": "0", "USE_QUANT": "false"})
    p = run(py("prep.py"), env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "converted nf4" in p.stdout
    prepared = Path(env["WORK_DIR"]) / "prepared"
    assert verify_checkpoint(prepared / "model")["format"] == "float"
    assert json.loads((prepared / "manifest.json").read_text())["train_format"] == "float"
