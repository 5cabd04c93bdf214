"""Prep throughput: MB of raw text per second turned into training-ready token ids on this machine.

    python bench/prep_throughput.py [--corpus FILE.jsonl] [--mb 40]

Times prep.py's own steps on a corpus of at least --mb MB (the corpus repeated as needed): batched
encoding through the fast tokenizer (both cores), packing into MAX_LENGTH blocks, and writing the
Arrow dataset the trainer reads. The tokenizer is trained on the corpus beforehand (untimed: it
happens once per pipeline). Without --corpus it measures two: the embedded data/pretrain.jsonl and
one it was never tuned on, the docstrings of this Python's standard library (modules, classes,
functions; ~1.4 MB, repeated). Prints one JSON line, `mb_per_s` per corpus.
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


def measure(base: list[str], mb: float, max_length: int) -> dict:
    from prep import pack, to_dataset, tokenize_texts
    from tokenizer import train_tokenizer

    texts, size = [], 0
    while size < mb * 1e6:
        texts.extend(base)
        size += sum(len(t.encode()) for t in base)
    tok = train_tokenizer(base, 8192, max_length)

    t0 = time.perf_counter()
    docs = tokenize_texts(tok, texts)
    t1 = time.perf_counter()
    blocks = pack(docs, tok.eos_token_id, max_length)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        to_dataset(blocks).save_to_disk(str(Path(d) / "train"))
    t3 = time.perf_counter()
    tokens = sum(len(b) for b in blocks)
    return {"unique_mb": round(sum(len(t.encode()) for t in base) / 1e6, 2), "raw_mb": round(size / 1e6, 2),
            "mb_per_s": round(size / 1e6 / (t3 - t0), 2),
            "seconds": {"tokenize": round(t1 - t0, 2), "pack": round(t2 - t1, 2), "write": round(t3 - t2, 2)},
            "tokens": tokens, "tokens_per_s": round(tokens / (t3 - t0))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="a .jsonl with a 'text' column (default: the two corpora above)")
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    corpora = ({Path(args.corpus).name: [json.loads(line)["text"] for line in open(args.corpus) if line.strip()]}
               if args.corpus else
               {"data/pretrain.jsonl": [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()],
                "python-stdlib-docstrings": stdlib_docs()})
    results = {name: measure(texts, args.mb, args.max_length) for name, texts in corpora.items()}
    print(json.dumps({
        "bench": "prep_throughput",
        "mb_per_s": {name: r["mb_per_s"] for name, r in results.items()},
        "corpora": results,
        "threads": os.environ.get("RAYON_NUM_THREADS") or os.cpu_count(),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
