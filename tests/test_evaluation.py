"""Evaluation during training (evaluation.py): when, the best model, early stopping, and the state a
resumed shard carries on from."""

from __future__ import annotations

import pytest

from evaluation import BEST_WEIGHTS, EVAL_STATE, Evaluator, interval_for


def _evaluator(tmp_path, losses, patience=None, keep_best=True):
    saved, loaded = [], []
    feed = iter(losses)

    def save(path):
        saved.append(path)
        path.write_text(f"weights at eval {len(saved)}")

    ev = Evaluator(interval=10, patience=patience, keep_best=keep_best, measure=lambda: next(feed), save_best=save,
                   load_best=lambda path: loaded.append(path.read_text()), work=tmp_path, log=lambda m: None)
    return ev, saved, loaded


@pytest.mark.parametrize("setting,steps,expect", [(None, 100, 25), (None, 6, 2), (None, 1, 1), (0, 100, 0), (7, 100, 7)])
def test_the_interval_is_the_setting_or_four_per_shard(setting, steps, expect):
    assert interval_for(setting, steps) == expect


def test_due_on_multiples_of_the_interval_but_not_the_last_step(tmp_path):
    ev, _, _ = _evaluator(tmp_path, [])
    assert [s for s in range(1, 41) if ev.due(s, 40)] == [10, 20, 30]  # 40: the final evaluation after training


def test_the_best_is_kept_and_put_back_when_the_last_step_is_worse(tmp_path):
    ev, saved, loaded = _evaluator(tmp_path, [3.0, 2.0, 2.5])
    for step in (10, 20, 30):
        ev.evaluate(step)
    assert (ev.best, ev.best_step, ev.since_best) == (2.0, 20, 1) and len(saved) == 2
    assert ev.restore_best(30) and loaded == ["weights at eval 2"]
    assert ev.summary() == {"evals": [[10, 3.0], [20, 2.0], [30, 2.5]], "best_step": 20, "best_eval_loss": 2.0}


def test_nothing_is_put_back_when_the_last_step_is_the_best_or_best_model_is_off(tmp_path):
    ev, _, loaded = _evaluator(tmp_path, [3.0, 2.0])
    ev.evaluate(10), ev.evaluate(20)
    assert not ev.restore_best(20) and loaded == []
    ev, saved, loaded = _evaluator(tmp_path, [2.0, 3.0], keep_best=False)
    ev.evaluate(10), ev.evaluate(20)
    assert not ev.restore_best(20) and saved == [] and ev.best_step == 10


def test_patience_counts_evaluations_without_improvement(tmp_path):
    ev, _, _ = _evaluator(tmp_path, [3.0, 2.0, 2.1, 2.0, 1.9, 2.5, 2.6], patience=2)
    stops = []
    for step in range(10, 80, 10):
        ev.evaluate(step)
        stops.append(ev.should_stop())
    # 2.0 at step 40 equals the best: no improvement; 1.9 is one
    assert stops == [False, False, False, True, False, False, True]
    off, _, _ = _evaluator(tmp_path, [1.0, 2.0, 3.0, 4.0])
    for step in (10, 20, 30, 40):
        off.evaluate(step)
    assert not off.should_stop()


def test_a_stop_request_during_an_evaluation_records_nothing(tmp_path):
    ev, saved, _ = _evaluator(tmp_path, [None])
    assert ev.evaluate(10) is None and ev.evals == [] and saved == []


def test_a_non_finite_loss_is_never_the_best(tmp_path):
    ev, saved, _ = _evaluator(tmp_path, [2.0, float("nan"), float("inf")])
    for step in (10, 20, 30):
        ev.evaluate(step)
    assert ev.best == 2.0 and ev.best_step == 10 and ev.since_best == 2 and len(saved) == 1


def test_the_state_travels_with_the_checkpoint(tmp_path):
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run1.mkdir(), run2.mkdir()
    ckpt = tmp_path / "checkpoint-20"
    ckpt.mkdir()
    ev, _, _ = _evaluator(run1, [3.0, 2.0], patience=3)
    ev.evaluate(10), ev.evaluate(20)
    ev.write_into(ckpt)
    assert (ckpt / EVAL_STATE).exists() and (ckpt / BEST_WEIGHTS).read_text() == "weights at eval 2"
    resumed, _, loaded = _evaluator(run2, [2.2, 2.3, 2.4], patience=3)
    resumed.read_from(ckpt)
    for step in (30, 40, 50):
        resumed.evaluate(step)
    assert resumed.should_stop() and resumed.best_step == 20  # counted across the interruption
    assert resumed.restore_best(50) and loaded == ["weights at eval 2"]


def test_a_checkpoint_without_evaluation_state_starts_afresh(tmp_path):
    ev, _, _ = _evaluator(tmp_path, [])
    ev.read_from(tmp_path / "no-state")
    assert ev.evals == [] and ev.best is None


def test_the_validation_loss_is_the_models_own_without_its_full_logits(monkeypatch):
    """validation_loss (chunked head, labelled rows only, no gradients) equals the mean per-token loss
    the model itself computes, over padded rows with masked prompts and over packed chats with
    positions restarting, in fp32 and under bf16 autocast; and no (tokens x vocabulary) logits are
    ever made."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lm_loss
    from evaluation import validation_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    rows = []
    for i in range(6):
        ids = torch.randint(0, 300, (24,)).tolist()
        labels = [-100] * (4 + i) + ids[4 + i:]  # a prompt without loss
        rows.append({"input_ids": ids, "labels": labels, "position_ids": list(range(10)) + list(range(14))})

    def collate(batch, packed):
        out = {"input_ids": torch.tensor([r["input_ids"] for r in batch]), "labels": torch.tensor([r["labels"] for r in batch])}
        if packed:
            out["position_ids"] = torch.tensor([r["position_ids"] for r in batch])
        return out

    for packed in (False, True):
        total = count = 0
        with torch.no_grad():
            for r in rows:  # the model's own loss, one row at a time, weighted by its label tokens
                b = collate([r], packed)
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(model(**b, use_cache=False).loss) * n  # no cache: packed positions are honoured
                count += n
        made = []
        head = lm_loss._chunk_loss
        monkeypatch.setattr(lm_loss, "_chunk_loss", lambda h, w, t: made.append(h.shape[0]) or head(h, w, t))
        ours = validation_loss(model, rows, lambda b, packed=packed: collate(b, packed), 4, "fp32")
        assert abs(ours - total / count) < 1e-5, (packed, ours, total / count)
        assert sum(made) == count  # the head saw the labelled positions only
        low = validation_loss(model, rows, lambda b, packed=packed: collate(b, packed), 4, "bf16")
        assert abs(low - ours) / ours < 0.01
        monkeypatch.setattr(lm_loss, "_chunk_loss", head)
