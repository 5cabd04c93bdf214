"""Prep throughput: MB of raw text per second turned into training-ready token ids on this machine.

    python bench/prep_throughput.py [--corpus data/pretrain.jsonl] [--mb 40]

Times prep.py's own steps on a corpus of at least --mb MB (the corpus repeated as needed): batched
encoding through the fast tokenizer, packing into MAX_LENGTH blocks, and writing the Arrow dataset
the trainer reads. The tokenizer is trained beforehand (untimed: it happens once per pipeline).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parent.parent / "data" / "pretrain.jsonl"))
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)

    import datasets

    from prep import pack, to_dataset, tokenize_texts, train_tokenizer

    datasets.disable_progress_bars()
    base = [json.loads(line)["text"] for line in open(args.corpus) if line.strip()]
    texts, size = [], 0
    while size < args.mb * 1e6:
        texts.extend(base)
        size += sum(len(t.encode()) for t in base)
    tok = train_tokenizer(base, 8192, args.max_length)

    t0 = time.perf_counter()
    docs = tokenize_texts(tok, texts)
    t1 = time.perf_counter()
    blocks = pack(docs, tok.eos_token_id, args.max_length)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        to_dataset(blocks).save_to_disk(str(Path(d) / "train"))
    t3 = time.perf_counter()
    tokens = sum(len(b) for b in blocks)
    print(json.dumps({
        "bench": "prep_throughput",
        "raw_mb": round(size / 1e6, 2),
        "mb_per_s": round(size / 1e6 / (t3 - t0), 2),
        "seconds": {"tokenize": round(t1 - t0, 2), "pack": round(t2 - t1, 2), "write": round(t3 - t2, 2)},
        "tokens": tokens,
        "tokens_per_s": round(tokens / (t3 - t0)),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
