"""Texts to token ids fast, and exactly as the tokenizer itself would encode them.

A byte-level BPE tokenizer (ours: `tokenizer.train_tokenizer`) first cuts text into words with the
GPT-2 pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+) and then
runs BPE on each word. Natural text and code repeat their words (a 30 MB corpus has ~1/10 as many
distinct words as words), so here the cutting is done for a whole chunk of documents at once with
array operations on its code points, each distinct word is encoded once by the tokenizer itself,
and the ids are gathered back. The chunks run in parallel processes, one per core.

Exact by construction, not by approximation: each character's class (letter, number, whitespace,
other) is asked of the tokenizers library's byte-level pre-tokenizer (the tokenizer's own, built
alike) for the characters present, so Unicode versions cannot differ; BPE and the vocabulary are the tokenizer's own; documents holding an added token's
text (which the tokenizer would map to that token) or characters it cannot take go through the
tokenizer unchanged. tests/test_encoding.py compares every id with the tokenizer's on real corpora
and on random text built from the pattern's corner cases. Tokenizers with another pre-tokenizer (or
a normalizer) are encoded by the tokenizer directly, in batches over both cores.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

L, N, O, W = 0, 1, 2, 3          # the pattern's character classes: letter, number, other, whitespace
UNKNOWN = 255
SPACE, APOSTROPHE = 0x20, 0x27
PARALLEL_MIN_CHARS = 4_000_000   # below, one process is faster (measured: 1.2 MB 1.3x faster, 4.7 MB 0.6x)
_CLASSES: dict[int, int] = {}    # code point -> class, asked of the pre-tokenizer once per process


def backend(tok):
    """The tokenizer's Rust tokenizer with truncation and padding off (a copy where either is on):
    a shard's documents are encoded whole (packing cuts them into blocks, nothing is dropped), and
    words are encoded here in groups that neither may cut or fill."""
    b = tok._tokenizer
    if b.truncation is None and b.padding is None:
        return b
    from tokenizers import Tokenizer

    b = Tokenizer.from_str(b.to_str())
    b.no_truncation()
    b.no_padding()
    return b


def fast_path(tok) -> bool:
    """Whether `tok` cuts words exactly as this module does: no normalizer, the byte-level
    pre-tokenizer with the GPT-2 pattern and no prefix space, deterministic BPE."""
    return _cuts_like_this(tok._tokenizer)


def _cuts_like_this(rust) -> bool:
    spec = json.loads(rust.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("add_prefix_space") is False and pre.get("use_regex", True) is True
            and not (spec.get("model") or {}).get("dropout"))   # BPE dropout: a word has no one encoding


def _class_of(pre_tokenize, c: int) -> int:
    ch = chr(c)
    if c == SPACE:
        return W
    if len(pre_tokenize("a" + ch)) == 1:     # joins a letter run
        return L
    if len(pre_tokenize("1" + ch)) == 1:     # joins a number run
        return N
    if len(pre_tokenize(ch + "!")) == 1:     # joins a run of other characters
        return O
    return W


def _class_table(cps: np.ndarray) -> np.ndarray:
    """Class of every code point (index) present in `cps`; UNKNOWN elsewhere."""
    from tokenizers import pre_tokenizers

    seen = np.zeros(0x110000, bool)
    seen[cps] = True
    present = np.flatnonzero(seen)
    missing = [c for c in present.tolist() if c not in _CLASSES]
    if missing:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
        _CLASSES.update((c, _class_of(pre, c)) for c in missing)
    table = np.full(0x110000, UNKNOWN, np.uint8)
    table[present] = np.fromiter((_CLASSES[c] for c in present.tolist()), np.uint8, len(present))
    return table


def word_starts(cp: np.ndarray, cls: np.ndarray, doc_start: np.ndarray) -> np.ndarray:
    """Offsets where the pattern starts a word, in code points `cp` of concatenated documents
    (`doc_start`: bool, one longer than cp, True at each document's first character and at the end).

    The pattern's words are runs of one class, with three corrections: a whitespace run followed by
    a character of its document gives its last character away (a space joins the next word, any
    other whitespace character stands alone); and an apostrophe starting a word takes the letters
    of a contraction ('s 't 'm 'd 're 've 'll) that follow it."""
    n = len(cp)
    start = np.empty(n, bool)
    start[:1] = True
    start[1:] = cls[1:] != cls[:-1]
    start |= doc_start[:n]
    runs = np.flatnonzero(start)
    ends = np.append(runs[1:], n)
    gives = (cls[runs] == W) & ~doc_start[ends]
    last = ends[gives] - 1
    start[last] = True
    start[ends[gives][cp[last] == SPACE]] = False
    ap = np.flatnonzero(start & (cp == APOSTROPHE))
    ap = ap[ap + 1 < n]
    ap = ap[(cls[ap + 1] == L) & ~doc_start[ap + 1]]
    c1 = cp[ap + 1]
    c2 = np.where(ap + 2 < n, cp[np.minimum(ap + 2, n - 1)], 0)
    two_ok = (ap + 2 < n) & ~doc_start[np.minimum(ap + 2, n)]
    one = np.isin(c1, [ord("s"), ord("t"), ord("m"), ord("d")])
    two = two_ok & (((c1 == ord("r")) | (c1 == ord("v"))) & (c2 == ord("e")) | (c1 == ord("l")) & (c2 == ord("l")))
    size = np.where(one, 2, np.where(two, 3, 0))
    hit = size > 0
    start[ap[hit] + 1] = False
    after = ap[hit] + size[hit]
    start[after[after < n]] = True
    return np.flatnonzero(start)


def _encode_chunk(rust, texts: list[str], specials: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One chunk of documents: the ids of all of them back to back, the number of ids of each, and
    the documents left to the tokenizer itself (`aside`, counted 0 here)."""
    joined = "".join(texts)
    # Added tokens share their first characters ("<|"): one scan of the chunk per distinct prefix,
    # then texts are looked at one by one only where one of them is in it.
    present = {p for p in {sp[:2] for sp in specials} if p in joined}
    maybe = [sp for sp in specials if sp[:2] in present and sp in joined]
    aside = [i for i, t in enumerate(texts) if any(sp in t for sp in maybe)] if maybe else []
    try:
        whole = joined.encode("utf-32-le")
    except UnicodeEncodeError:   # lone surrogates: find the documents holding them
        whole = None
        aside = sorted(set(aside) | {i for i, t in enumerate(texts) if not _encodable(t)})
    if aside:
        skip = set(aside)
        texts = [("" if i in skip else t) for i, t in enumerate(texts)]
        whole = "".join(texts).encode("utf-32-le")
    cp = np.frombuffer(whole, np.uint32)
    bounds = np.concatenate([[0], np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)))])
    if len(cp) == 0:
        return np.zeros(0, np.int32), np.zeros(len(texts), np.int64), aside
    doc_start = np.zeros(len(cp) + 1, bool)
    doc_start[bounds] = True
    table = _class_table(cp)
    starts = word_starts(cp, table[cp], doc_start)
    index, distinct = _word_index(cp, starts, table)
    # Each distinct word encoded once, by the tokenizer itself; its ids gathered for every use.
    flat, sizes = _word_ids(rust, distinct)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_ids = sizes[index]
    out_first = np.concatenate([[0], np.cumsum(n_ids)[:-1]])
    ids = flat[np.repeat(first[index] - out_first, n_ids) + np.arange(int(n_ids.sum()))]
    per_doc = np.diff(np.concatenate([[0], np.cumsum(n_ids)])[np.searchsorted(starts, bounds)])
    return ids, per_doc, aside


def _word_index(cp: np.ndarray, starts: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The chunk's distinct words, and for each word of the chunk its index among them.

    Words of one character (a third of those of code) are looked up by code point. The longer ones
    are made strings by C code: a code point absent from the chunk is put before each and the text
    split on it (slicing word by word costs ~4x more)."""
    import pandas as pd

    size = np.diff(np.append(starts, len(cp)))
    single = size == 1
    chars = cp[starts[single]]
    seen = np.zeros(0x110000, bool)
    seen[chars] = True
    distinct_chars = np.flatnonzero(seen)
    slot = np.zeros(0x110000, np.int64)
    slot[distinct_chars] = np.arange(len(distinct_chars))
    long_size = size[~single]
    long_cp = cp[np.repeat(~single, size)]
    sep = _absent(table)
    at = (np.cumsum(long_size) - long_size)[1:] + np.arange(len(long_size) - 1) if len(long_size) else np.zeros(0, np.int64)
    marked = np.full(len(long_cp) + len(at), sep, np.uint32)
    keep = np.ones(len(marked), bool)
    keep[at] = False
    marked[keep] = long_cp
    words = marked.tobytes().decode("utf-32-le").split(chr(sep)) if len(long_cp) else []
    # Distinct words and each word's index among them in one pass of C code.
    codes, distinct = pd.factorize(np.array(words, dtype=object))
    index = np.empty(len(starts), np.int64)
    index[single] = slot[chars]
    index[~single] = codes + len(distinct_chars)
    return index, list(map(chr, distinct_chars.tolist())) + distinct.tolist()


def _absent(table: np.ndarray) -> int:
    """A code point absent from the chunk (a private-use one where one is), never a surrogate."""
    free = np.flatnonzero(table == UNKNOWN)
    free = free[(free < 0xD800) | (free > 0xDFFF)]
    private = free[free >= 0xE000]
    return int(private[0] if len(private) else free[0])


def _word_ids(rust, words: list[str], batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ids of each word back to back, and how many each has. The words go to the tokenizer as
    pre-cut sequences of `batch` words (one encoding per word costs twice as much); each is a whole
    word of the pattern already, so the pre-tokenizer leaves it as it is."""
    groups = [words[i:i + batch] for i in range(0, len(words), batch)]
    encs = rust.encode_batch(groups, is_pretokenized=True, add_special_tokens=False)
    ids = np.concatenate([np.asarray(e.ids, np.int32) for e in encs] + [np.zeros(0, np.int32)])
    which = np.concatenate([np.asarray(e.word_ids, np.int64) + k * batch for k, e in enumerate(encs)]
                           + [np.zeros(0, np.int64)])
    return ids, np.bincount(which, minlength=len(words))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-32-le")
        return True
    except UnicodeEncodeError:
        return False


_FORKED: dict[str, Any] = {}     # what a forked worker reads: inherited from the parent, not pickled


def _worker_start(parent: int) -> None:
    """A worker dies with prep (a stop's SIGTERM, the OOM killer): it holds copies of prep's file
    descriptors (trainer.sh's output locks among them) and, orphaned, would keep the locks held.
    The tokenizer's thread pool does not survive a fork: a worker encodes on its one thread."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:   # prep died before the line above
        os._exit(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_forked(k: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return _encode_chunk(_FORKED["rust"], _FORKED["chunks"][k], _FORKED["specials"])


def _chunks(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into about `n` contiguous chunks of about equal size."""
    cum = np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)))
    cuts = sorted(set(np.searchsorted(cum, cum[-1] / n * np.arange(1, n)).tolist()) | {0, len(texts)})
    return [texts[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _encode_all(rust, texts: list[str], specials: list[str], workers: int) -> list[tuple]:
    import multiprocessing as mp

    if (workers <= 1 or sum(map(len, texts)) < PARALLEL_MIN_CHARS or len(texts) < 2
            or "fork" not in mp.get_all_start_methods()):
        return [_encode_chunk(rust, texts, specials)]
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from errors import RunFailure

    # A few chunks per worker, so one long document cannot leave a core idle for long.
    _FORKED.update(rust=rust, chunks=_chunks(texts, workers * 4), specials=specials)
    # Made explicit while forking, else the tokenizer warns in each worker that its parallelism is
    # off there (the workers set it off themselves); as it was afterwards.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_start,
                             initargs=(os.getpid(),))
    try:
        return list(tqdm(ex.map(_encode_forked, range(len(_FORKED["chunks"]))), total=len(_FORKED["chunks"]),
                         desc="[prep] tokenize", unit="chunk", mininterval=2))
    except BrokenProcessPool:
        raise RunFailure(f"a tokenizing worker process died (killed: out of memory?) while encoding "
                         f"{len(texts)} documents in {workers} processes. Fix: give the run more memory, "
                         "or make SHARD_SIZE smaller.") from None
    finally:
        ex.shutdown(wait=True, cancel_futures=True)   # after an error, the chunks not started are dropped
        _FORKED.clear()
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _tokenizer_ids(rust, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=False)]


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (docker --cpus)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]   # cgroup v2
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def encode_texts(tok, texts: list[str], workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all `texts` back to back (int32) and the offsets where each text's ids start
    (one more than there are texts): the ids `tok` gives each whole text, no special tokens added."""
    if not texts:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    rust = backend(tok)
    if not _cuts_like_this(rust):
        from tqdm import tqdm

        batches = range(0, len(texts), 2000)
        return _flat([np.asarray(x, np.int32) for i in tqdm(batches, desc="[prep] tokenize", unit="batch",
                                                            disable=len(batches) < 2)
                      for x in _tokenizer_ids(rust, texts[i:i + 2000])])
    import pandas  # noqa: F401 - imported once here, not in each worker

    specials = sorted({t.content for t in rust.get_added_tokens_decoder().values() if t.content})
    parts = _encode_all(rust, texts, specials, workers or usable_cores())
    ids = np.concatenate([p[0] for p in parts]).astype(np.int32, copy=False)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([p[1] for p in parts]))])
    base = np.cumsum([0] + [len(p[1]) for p in parts]).tolist()
    aside = [b + i for b, p in zip(base, parts) for i in p[2]]
    if not aside:
        return ids, offsets
    # Documents the tokenizer encodes itself are spliced in at their places.
    per_text = np.split(ids, offsets[1:-1])
    for i, x in zip(aside, _tokenizer_ids(rust, [texts[i] for i in aside])):
        per_text[i] = np.asarray(x, np.int32)
    return _flat(per_text)


def _flat(per_text: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.fromiter(map(len, per_text), np.int64, len(per_text))
    return np.concatenate(per_text).astype(np.int32), np.concatenate([[0], np.cumsum(sizes)])
