"""train.py and its trainer (lm_trainer.py) piece by piece, without the launcher: the loss the
trainer optimises is the model's own next-token loss, every micro-batch is recorded in training
order (and carried in a checkpoint), and the trainer's arguments follow the settings."""

from __future__ import annotations

import hashlib
import json

import pytest

from config import load_settings


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from prep import pack, tokenize_texts
    from tokenizer import train_tokenizer

    texts = [f"the baker bakes {i} loaves of bread every morning before the shop opens" for i in range(40)]
    tok = train_tokenizer(texts, 300, 32)
    seqs = pack(tokenize_texts(tok, texts), tok.eos_token_id, 32)
    ds = Dataset.from_dict({"input_ids": seqs, "labels": seqs})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return tok, ds, model, tmp_path_factory.mktemp("trainer")


def _trainer(parts, digests, **args):
    from trl import SFTConfig

    from lm_trainer import Trainer

    tok, ds, model, out = parts
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                       use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                       dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, seed=0, **args)
    return Trainer(model=model, args=config, train_dataset=ds, processing_class=tok, batch_digests=digests)


def test_the_loss_the_trainer_optimises_is_the_models_next_token_loss(parts):
    import torch

    tok, ds, model, _ = parts
    trainer = _trainer(parts, [])
    batch = {"input_ids": torch.tensor(ds[:3]["input_ids"]), "labels": torch.tensor(ds[:3]["labels"])}
    batch["labels"][0, :5] = -100  # prompt tokens carry no loss
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        theirs = model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_every_micro_batch_is_recorded_in_order_after_the_resumed_ones_and_a_checkpoint_carries_them(parts):
    from lm_trainer import DATA_ORDER

    trainer = _trainer(parts, ["from-an-earlier-run"])
    seen = []
    step = trainer.training_step

    def recording(model, inputs, num_items_in_batch=None):
        seen.append(hashlib.sha1(inputs["input_ids"].detach().cpu().numpy().tobytes()).hexdigest()[:16])
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = recording
    trainer.train()
    assert len(seen) == 4  # 2 steps x 2 micro-batches
    assert trainer.batch_digests == ["from-an-earlier-run"] + seen
    trainer._save_checkpoint(trainer.model, trial=None)
    saved = sorted(parts[3].glob(f"checkpoint-*/{DATA_ORDER}"))
    assert saved and json.loads(saved[-1].read_text()) == trainer.batch_digests


def test_gradient_checkpointing_follows_the_setting_and_auto_follows_the_memory_estimate(monkeypatch):
    import mem_estimate
    from config import architecture
    from train import use_gradient_checkpointing

    for value, want in (("true", True), ("false", False)):
        s = load_settings({"GRADIENT_CHECKPOINTING": value})
        assert use_gradient_checkpointing(s, architecture(s), "bf16", nf4=False) is want
    s = load_settings({"GRADIENT_CHECKPOINTING": "auto", "TARGET_PARAMETERS": "1B", "BATCH_SIZE": "16", "MAX_LENGTH": "1024"})
    monkeypatch.setattr(mem_estimate, "available_memory", lambda: (2**40, False, 0))
    assert use_gradient_checkpointing(s, architecture(s), "bf16", nf4=False) is False  # fits without it
    monkeypatch.setattr(mem_estimate, "available_memory", lambda: (24 * 2**30, False, 0))
    assert use_gradient_checkpointing(s, architecture(s), "bf16", nf4=False) is True


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_adapters_on_nf4_keep_the_dtype_of_the_runs_precision(parts, tmp_path, precision):
    """TRL casts a quantized model's trainable weights to bf16 whatever the run's precision; the
    trainer keeps the dtype add_lora gave them (fp32 in an fp32 run: a CPU without bf16 units)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quant_utils import add_lora, convert, storage_dtype

    tok, ds, model, _ = parts
    model.save_pretrained(tmp_path / "float")
    convert(tmp_path / "float", tmp_path / "nf4", "nf4", precision)
    peft = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map={"": "cpu"}),
                    load_settings({"USE_QUANT": "true"}), False, precision)
    trainer = _trainer((tok, ds, peft, tmp_path / "out"), [])
    adapters = {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters == {storage_dtype(precision)}
