"""The chunked LM-head loss equals the model's own cross-entropy, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lm_loss
from lm_loss import causal_lm_loss


@pytest.mark.parametrize("chunk_elements", [1 << 22, 4096])  # one chunk, and many chunks
def test_matches_the_model_loss_and_gradients(monkeypatch, chunk_elements):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt without loss
    labels[2, 30:] = -100  # padding

    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    hidden = model.model(input_ids=ids).last_hidden_state
    ours = causal_lm_loss(hidden, model.lm_head.weight, labels)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_num_items_normalises_over_the_accumulated_batch():
    torch.manual_seed(1)
    h, w = torch.randn(2, 9, 16), torch.randn(50, 16)
    y = torch.randint(0, 50, (2, 9))
    per_batch = causal_lm_loss(h, w, y)
    n = (y[:, 1:] != -100).sum()
    assert torch.allclose(causal_lm_loss(h, w, y, num_items=4 * n), per_batch / 4)


def test_bf16_close_to_fp32():
    torch.manual_seed(2)
    h, w = torch.randn(4, 64, 32), torch.randn(500, 32) * 0.1
    y = torch.randint(0, 500, (4, 64))
    ref = causal_lm_loss(h, w, y)
    low = causal_lm_loss(h.bfloat16(), w.bfloat16(), y)
    assert abs(float(low) - float(ref)) / float(ref) < 0.01


def test_only_positions_with_a_label_go_through_the_head(monkeypatch):
    """A chat's prompt tokens carry no loss: the head's matmuls and softmax run on the labelled
    positions only, and a batch without any label gives a zero loss and zero gradients."""
    seen = []
    apply = lm_loss._FusedLinearCrossEntropy.apply
    monkeypatch.setattr(lm_loss._FusedLinearCrossEntropy, "apply",
                        lambda h, w, y, n: seen.append(h.shape[0]) or apply(h, w, y, n))
    torch.manual_seed(3)
    h, w = torch.randn(2, 10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (2, 10))
    y[0, :6] = -100
    y[1, 7:] = -100
    causal_lm_loss(h, w, y).backward()
    assert seen == [int((y[:, 1:] != -100).sum())] == [10]
    assert h.grad[0, :5].abs().sum() == 0 and h.grad[0, 5:9].abs().sum() > 0  # position t predicts t+1

    none = torch.full((2, 10), -100)
    h.grad = w.grad = None
    loss = causal_lm_loss(h, w, none)
    loss.backward()
    assert float(loss) == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_without_gradients_only_the_loss_is_computed(monkeypatch):
    """Under no_grad (an evaluation) the head's gradient matmuls are not run; the loss is the same."""
    torch.manual_seed(3)
    h, w = torch.randn(2, 33, 16, requires_grad=True), torch.randn(70, 16, requires_grad=True)
    y = torch.randint(0, 70, (2, 33))
    y[0, :5] = -100
    with_grad = causal_lm_loss(h, w, y)
    fused = []
    apply = lm_loss._FusedLinearCrossEntropy.apply
    monkeypatch.setattr(lm_loss._FusedLinearCrossEntropy, "apply", lambda *a: fused.append(1) or apply(*a))
    with torch.no_grad():
        without = causal_lm_loss(h, w, y)
    assert fused == [] and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-6)
    causal_lm_loss(h, w, y).backward()  # with gradients: the fused path, as in training
    assert fused == [1] and h.grad is not None
