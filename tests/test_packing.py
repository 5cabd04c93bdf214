"""Packed chats (prep.pack_chats, train.PackedCollator, the models' packed attention): every chat
once and whole, and no token attending across a chat boundary in either model implementation."""

from __future__ import annotations

import random

import pytest
import torch

from prep import pack_chats
from train import PackedCollator


def _chats(n: int, seed: int = 0, vocab: int = 97, longest: int = 40) -> tuple[list[list[int]], list[list[int]]]:
    rnd = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        k = rnd.randint(3, longest)
        x = [rnd.randrange(4, vocab) for _ in range(k)]
        cut = rnd.randint(1, k - 1)
        ids.append(x)
        labels.append([-100] * cut + x[cut:])
    return ids, labels


def test_every_chat_once_whole_and_in_place():
    ids, labels = _chats(300)
    p_ids, p_labels, p_pos = pack_chats(ids, labels, 64, seed=0)
    assert all(len(p) <= 64 for p in p_ids)
    assert all(len(a) == len(b) == len(c) for a, b, c in zip(p_ids, p_labels, p_pos))
    # cut each pack where its positions restart: the pieces are the chats, each exactly once
    pieces = []
    for x, y, pos in zip(p_ids, p_labels, p_pos):
        starts = [i for i, v in enumerate(pos) if v == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            assert list(pos[a:b]) == list(range(b - a))
            assert y[a] == -100  # never predicted from the chat before it
            pieces.append((tuple(x[a:b]), tuple(y[a + 1:b])))
    expected = sorted((tuple(x), tuple(y[1:])) for x, y in zip(ids, labels))
    assert sorted(pieces) == expected
    # tight: best fit leaves less than one longest chat of room per pack on average
    assert sum(map(len, ids)) / (len(p_ids) * 64) > 0.85
    # deterministic
    again = pack_chats(ids, labels, 64, seed=0)
    assert all((a == b).all() for a, b in zip(p_ids, again[0]))


def test_a_chat_of_exactly_the_block_gets_a_sequence_of_its_own():
    ids = [[5] * 16, [6] * 3, [7] * 13]
    p_ids, _, p_pos = pack_chats(ids, [list(x) for x in ids], 16, seed=0)
    assert sorted(len(x) for x in p_ids) == [16, 16]
    assert [list(x) for x in p_ids if x[0] == 5] == [[5] * 16]


def test_collator_pads_rows_as_sequences_of_their_own():
    c = PackedCollator(pad_token_id=0)
    batch = c([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4], "position_ids": [0, 1, 0, 1]},
               {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4], [-100, 6, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def _packed(impl: str, shape: dict, chats: int, seed: int, longest: int, block: int):
    """A seeded random Llama of `shape` (our class or transformers'), `chats` random chats, their
    packs and the collated batch: (model, ids, labels, packed ids, batch)."""
    from transformers import LlamaConfig

    from architecture import llama_class

    torch.manual_seed(0)
    model = llama_class(impl)(LlamaConfig(vocab_size=97, max_position_embeddings=128, **shape)).eval()
    ids, labels = _chats(chats, seed=seed, longest=longest)
    p_ids, p_labels, p_pos = pack_chats(ids, labels, block, seed=0)
    batch = PackedCollator(0)([{"input_ids": x.tolist(), "labels": y.tolist(), "position_ids": p.tolist()}
                               for x, y, p in zip(p_ids, p_labels, p_pos)])
    return model, ids, labels, p_ids, batch


@pytest.mark.parametrize("impl", ["transformers", "ours"])
def test_no_token_attends_across_a_chat_boundary(impl):
    """Each chat's logits inside a pack equal its logits alone (fp32, 1e-5), with padding rows too.
    No cache, as in training and validation: with one, transformers reads no boundaries from positions."""
    model, ids, labels, p_ids, batch = _packed(impl, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2),
                                               chats=12, seed=1, longest=30, block=64)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst, seen = 0.0, 0
        for r in range(len(p_ids)):
            pos = batch["position_ids"][r].tolist()
            starts = [i for i, v in enumerate(pos[:len(p_ids[r])]) if v == 0] + [len(p_ids[r])]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0]
                worst = max(worst, float((alone - packed[r, a:b]).abs().max()))
                seen += 1
    assert seen == len(ids)
    assert worst < 1e-5, worst
    # and the packing is real: without the position ids the chats would see each other
    with torch.no_grad():
        unpacked = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert float((unpacked - packed).abs().max()) > 1e-3


@pytest.mark.parametrize("impl", ["transformers", "ours"])
def test_packed_loss_equals_the_chats_loss_alone(impl):
    """The loss of a packed batch is the loss of its chats one by one (same label tokens, same mean)."""
    model, ids, labels, _, batch = _packed(impl, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1),
                                           chats=10, seed=2, longest=20, block=48)
    with torch.no_grad():
        packed = float(model(**batch, use_cache=False).loss)
        total = count = 0
        for x, y in zip(ids, labels):
            n = sum(1 for t in y[1:] if t != -100)
            total += float(model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss) * n
            count += n
    assert abs(packed - total / count) < 1e-5


def test_batch_size_counts_chats_when_they_are_packed():
    from conftest import a_manifest
    from config import load_settings
    from run_state import RunPlan
    from train import sequences_per_batch

    s = load_settings({"BATCH_SIZE": "16"})
    plan = RunPlan("instruct", 0, "o-it", "o")

    def manifest(**fields):
        return a_manifest(plan, **fields)

    assert sequences_per_batch(s, manifest(packed_chats=False, train_sequences=100)) == 16
    assert sequences_per_batch(s, manifest(packed_chats=True, train_chats=3800, train_sequences=702)) == 3
    assert sequences_per_batch(s, manifest(packed_chats=True, train_chats=1000, train_sequences=10)) == 1  # never 0
    assert sequences_per_batch(s, manifest(packed_chats=True, train_chats=50, train_sequences=50)) == 16
