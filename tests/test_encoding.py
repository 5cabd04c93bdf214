"""encoding.py: every id equal to the tokenizer's own, on real corpora and on text built from the
pre-tokenizer pattern's corner cases, in one process and in forked workers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import encoding
from conftest import ROOT
from prep import pack, pack_ids, tokenize_texts
from tokenizer import BOS, EOS, train_tokenizer

# Pieces that exercise each alternative of the pattern and the seams between them: contractions
# (and near misses), a space before each class, whitespace runs of every kind before a word and at
# the end, letters/numbers/other of several scripts and planes, combining marks, emoji.
PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'r", "'l", "'x", "''", "'", "s", "t", "re", "ll",
          " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n", "\n ", "\u00a0", "\u3000", "\u2028", "\u1680",
          "word", "Wörter", "ß", "e\u0301", "中文", "ελληνικά", "𝐀𝐁", "Ⅻ", "½", "١٢٣", "42", "3.14", "_", "__init__",
          ".", ",", "(", ")", "->", "...", "—", "😀", "🍑x", "\x00", "\u200b", "\U0010fffd", "\ue000", "a'b", "don't",
          "x'sy", " 'll", "\t'd", "''s"]


def fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "'", "'s", "\n", "  x", "x  ", "a\n\n b", " \u00a0a", "1 2  3"]
    for _ in range(n):
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))))
    return out


def reference(tok, texts):
    return [e.ids for e in tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def assert_same(tok, texts, **kw):
    ids, offsets = encoding.encode_texts(tok, texts, **kw)
    assert ids.dtype == np.int32 and len(offsets) == len(texts) + 1
    ref = reference(tok, texts)
    bad = [i for i, r in enumerate(ref) if ids[offsets[i]:offsets[i + 1]].tolist() != r]
    assert not bad, f"{len(bad)} texts differ, e.g. {texts[bad[0]]!r}"


@pytest.fixture(scope="module")
def corpus():
    return [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()][:3000]


@pytest.fixture(scope="module")
def fuzz():
    return fuzz_texts(3000, seed=0)


@pytest.fixture(scope="module")
def tok(corpus, fuzz):
    # Trained on both, so merges reach into the unusual characters too.
    return train_tokenizer(corpus[:1000] + fuzz, vocab_size=2000, max_length=128)


def test_the_tokenizer_pipeline_takes_the_fast_path(tok):
    assert encoding.fast_path(tok)


@pytest.mark.parametrize("workers", [1, 2])
def test_ids_equal_the_tokenizers_on_real_and_corner_case_text(tok, corpus, fuzz, workers, monkeypatch):
    monkeypatch.setattr(encoding, "PARALLEL_MIN_CHARS", 1000)   # so workers=2 forks
    assert_same(tok, corpus, workers=workers)
    assert_same(tok, fuzz, workers=workers)


def test_text_holding_special_tokens_or_lone_surrogates_goes_to_the_tokenizer(tok, fuzz, monkeypatch):
    texts = fuzz[:200] + [f"before {EOS} after", f"{BOS}x", "plain"]
    assert_same(tok, texts)   # the tokenizer maps the special tokens' text to their ids; so does this
    ids, offsets = encoding.encode_texts(tok, texts)
    assert tok.convert_tokens_to_ids(EOS) in ids[offsets[-4]:offsets[-3]].tolist()
    # A lone surrogate cannot be encoded by the tokenizer either: the same error as its own.
    with pytest.raises(Exception) as theirs:
        reference(tok, ["ok", "bad \ud800"])
    with pytest.raises(type(theirs.value)):
        encoding.encode_texts(tok, ["ok", "bad \ud800"])


def test_other_pre_tokenizers_are_encoded_by_the_tokenizer_itself(corpus):
    from tokenizers import pre_tokenizers

    tok = train_tokenizer(corpus[:300], vocab_size=600, max_length=64)
    tok._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not encoding.fast_path(tok)
    assert_same(tok, corpus[:300] + ["", " x"])


def test_empty_input_and_empty_texts(tok):
    ids, offsets = encoding.encode_texts(tok, [])
    assert len(ids) == 0 and offsets.tolist() == [0]
    ids, offsets = encoding.encode_texts(tok, ["", "", ""])
    assert len(ids) == 0 and offsets.tolist() == [0, 0, 0, 0]


def test_word_starts_follow_the_pattern():
    # Offsets of each word, against the regex itself on a few hand-checked strings.
    import regex

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for text in ["don't stop", "  x", "x  ", "a \n b", "\n's", " 's", "'sam", "''s", "a1b2", "é\u0301", "\t\tz"]:
        cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        starts_at = np.zeros(len(cp) + 1, bool)
        starts_at[[0, len(cp)]] = True
        got = encoding.word_starts(cp, encoding._class_table(cp)[cp], starts_at).tolist()
        assert got == [m.start() for m in pattern.finditer(text)], text


def test_pack_ids_is_pack(tok, corpus):
    docs = tokenize_texts(tok, corpus[:200])
    ids, offsets = encoding.encode_texts(tok, corpus[:200])
    a, b = pack(docs, tok.eos_token_id, 64), pack_ids(ids, offsets, tok.eos_token_id, 64)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sum(map(len, b)) == len(ids) + 200


def test_documents_are_encoded_whole_even_by_a_tokenizer_that_truncates_or_pads(corpus):
    tok = train_tokenizer(corpus[:300], vocab_size=600, max_length=64)
    tok._tokenizer.enable_truncation(max_length=8)
    tok._tokenizer.enable_padding(length=16)
    assert encoding.fast_path(tok)
    texts = corpus[:50] + ["hello world " * 20, "x"]
    ids, offsets = encoding.encode_texts(tok, texts)
    whole = encoding.backend(tok)
    assert whole.truncation is None and whole.padding is None and tok._tokenizer.truncation is not None
    ref = [e.ids for e in whole.encode_batch_fast(texts, add_special_tokens=False)]
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == ref
    assert max(map(len, ref)) > 16


def test_forking_leaves_the_parallelism_setting_as_it_was(tok, corpus, monkeypatch):
    monkeypatch.setattr(encoding, "PARALLEL_MIN_CHARS", 1000)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    encoding.encode_texts(tok, corpus[:500], workers=2)
    assert "TOKENIZERS_PARALLELISM" not in __import__("os").environ


def test_workers_die_with_a_killed_prep(tmp_path):
    # prep killed mid-encoding (a stop's SIGTERM, the OOM killer): no worker lives on holding
    # prep's descriptors (trainer.sh's output locks).
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "encode.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import encoding
from tokenizer import train_tokenizer
tok = train_tokenizer(["some words here"] * 50, vocab_size=300, max_length=64)
texts = [" ".join(f"w{{i}}x{{j}}" for j in range(20000)) for i in range(200)]
print("ready", flush=True)
encoding.encode_texts(tok, texts, workers=2)
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and len(workers) < 2:
            workers = psutil.Process(p.pid).children()
            time.sleep(0.05)
        assert len(workers) == 2, "the workers never started"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers: {[w.pid for w in alive]}"
    finally:
        p.kill()


def test_usable_cores():
    import os

    assert 1 <= encoding.usable_cores() <= len(os.sched_getaffinity(0))
