"""Prep throughput: MB of raw text per second turned into training-ready token ids on this machine.

    python bench/prep_throughput.py [--corpus FILE.jsonl] [--mb 40]

Times prep.py's own steps on a corpus of at least --mb MB (the corpus repeated as needed): encoding
(encoding.encode_texts: words cut for whole chunks at once, each distinct word encoded once by the
tokenizer, one worker process per core), packing into MAX_LENGTH blocks, and writing the Arrow
dataset the trainer reads. The baseline, in the same run: the tokenizer's own batched encoding
(its Rust thread pool on all cores), then the same packing and writing; the ids of both are
compared. The tokenizer is trained on (up to 8 MB of) the corpus beforehand, untimed: that happens
once per pipeline. Without --corpus it measures three: the embedded data/pretrain.jsonl, and two it
was never tuned on: the docstrings of this Python's standard library (modules, classes, functions;
~1.4 MB, repeated to --mb) and the standard library's source files (one document per file, up to
--mb MB of the ~31 MB there, not repeated). Prints one JSON line, `mb_per_s` per corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import platform
import sysconfig
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stdlib_docs() -> list[str]:
    """Docstrings of the standard library's public modules, classes, methods and functions."""
    warnings.filterwarnings("ignore")
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
            "venv", "pydoc_data"}
    out = []
    for m in sorted(sys.stdlib_module_names):
        if m in skip or m.startswith("_"):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(m)
        except Exception:  # noqa: BLE001 - a module this platform lacks
            continue
        docs = [inspect.getdoc(mod) or ""]
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            docs.append(f"{m}.{name}\n{inspect.getdoc(obj) or ''}")
            if inspect.isclass(obj):
                docs += [f"{m}.{name}.{k}\n{inspect.getdoc(v)}" for k, v in sorted(vars(obj).items())
                         if not k.startswith("_") and callable(v) and inspect.getdoc(v)]
        out += [d for d in docs if d.strip()]
    return out


def stdlib_sources(mb: float) -> list[str]:
    """This Python's standard library sources, one document per .py file, up to `mb` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.relative_to(root).parts or size >= mb * 1e6:
            continue
        out.append(f.read_text(errors="replace"))
        size += len(out[-1].encode())
    return out


def measure(base: list[str], mb: float, max_length: int, repeat: bool = True) -> dict:
    import numpy as np

    from encoding import encode_texts
    from prep import pack, pack_ids, to_dataset
    from tokenizer import train_tokenizer

    texts, size = list(base), sum(len(t.encode()) for t in base)
    if not size:
        raise SystemExit("the corpus holds no text")
    while repeat and size < mb * 1e6:
        texts.extend(base)
        size += sum(len(t.encode()) for t in base)
    sample, seen = [], 0
    for t in base:
        if seen > 8e6:
            break
        sample.append(t)
        seen += len(t)
    tok = train_tokenizer(sample, 8192, max_length)

    def write(blocks):
        with tempfile.TemporaryDirectory() as d:
            to_dataset(blocks).save_to_disk(str(Path(d) / "train"))

    t0 = time.perf_counter()
    ids, offsets = encode_texts(tok, texts)
    t1 = time.perf_counter()
    blocks = pack_ids(ids, offsets, tok.eos_token_id, max_length)
    t2 = time.perf_counter()
    write(blocks)
    t3 = time.perf_counter()
    base_ids = [e.ids for e in tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    t4 = time.perf_counter()
    base_blocks = pack(base_ids, tok.eos_token_id, max_length)
    write(base_blocks)
    t5 = time.perf_counter()
    same = (len(base_ids) == len(offsets) - 1 and int(offsets[-1]) == sum(map(len, base_ids))
            and np.array_equal(ids, np.concatenate([np.asarray(x, np.int32) for x in base_ids])))
    tokens = sum(len(b) for b in blocks)
    return {"unique_mb": round(sum(len(t.encode()) for t in base) / 1e6, 2), "raw_mb": round(size / 1e6, 2),
            "documents": len(texts), "mb_per_s": round(size / 1e6 / (t3 - t0), 2),
            "seconds": {"tokenize": round(t1 - t0, 2), "pack": round(t2 - t1, 2), "write": round(t3 - t2, 2)},
            "tokens": tokens, "tokens_per_s": round(tokens / (t3 - t0)),
            "baseline_mb_per_s": round(size / 1e6 / (t5 - t3), 2),
            "baseline_seconds": {"tokenize": round(t4 - t3, 2), "pack_and_write": round(t5 - t4, 2)},
            "speedup": round((t5 - t3) / (t3 - t0), 2), "ids_equal_to_tokenizer": bool(same)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="a .jsonl with a 'text' column (default: the three corpora above)")
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)

    import datasets
    import pandas  # noqa: F401 - loaded in prep (by datasets) before it encodes; not timed here either

    datasets.disable_progress_bars()
    corpora = ({Path(args.corpus).name: [json.loads(line)["text"] for line in open(args.corpus) if line.strip()]}
               if args.corpus else
               {"data/pretrain.jsonl": [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()],
                "python-stdlib-docstrings": stdlib_docs(), "python-stdlib-sources": stdlib_sources(args.mb)})
    results = {name: measure(texts, args.mb, args.max_length, repeat=name != "python-stdlib-sources")
               for name, texts in corpora.items()}
    print(json.dumps({
        "bench": "prep_throughput",
        "mb_per_s": {name: r["mb_per_s"] for name, r in results.items()},
        "baseline_mb_per_s": {name: r["baseline_mb_per_s"] for name, r in results.items()},
        "corpora": results,
        "cores_used": len(os.sched_getaffinity(0)),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
