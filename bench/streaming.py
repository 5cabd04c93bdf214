"""Shard k of a many-file Parquet dataset on the Hub without the rest: time to the first batch and bytes read.

    python bench/streaming.py [--files 60] [--rows 2000] [--shard-size 2000]

Builds a dataset of --files Parquet files (--rows rows each, row groups of half a file, text from
the embedded corpus), serves it the way the Hub serves it (the loopback Hub stand-in of the tests:
the real huggingface_hub / datasets clients, byte ranges), and times, each in a fresh process:
shard 0 and shard 50 read by sources.Corpus (the pipeline's reader) up to its first packed batch
(read, tokenize, pack one MAX_LENGTH block), and the same shard 50 through `load_dataset` of the
whole dataset (what every run did before). Prints one JSON line: `first_batch_s_shard0`,
`first_batch_s_shard50`, `bytes_read_ratio_shard50` (bytes the server sent over the bytes of the
shard's own row groups), and the whole-dataset path beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from transformers import AutoTokenizer
from prep import pack
from sources import Corpus, Source
k, size, how, tok_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
tok = AutoTokenizer.from_pretrained(tok_dir)
t1 = time.perf_counter()
if how == "corpus":
    c = Corpus([Source("bench/corpus")], "INPUT_DATASET", "text", "train", "hf_bench", seed=0)
    texts, _ = c.texts(k * size, (k + 1) * size)
    n = len(c)
else:
    import datasets
    ds = datasets.load_dataset("bench/corpus", split="train", token="hf_bench")
    texts, n = ds[k * size:(k + 1) * size]["text"], len(ds)
ids = tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
first = pack([e.ids for e in ids], tok.eos_token_id, 256)[0]
t2 = time.perf_counter()
print(json.dumps({"rows": n, "shard_rows": len(texts), "first_batch_s": t2 - t1, "imports_s": t1 - t0,
                  "first_text": texts[0][:40], "block": len(first)}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--rows", type=int, default=2000, help="rows per file")
    ap.add_argument("--shard-size", type=int, default=2000)
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hub_double import HubDouble
    from tokenizer import train_tokenizer

    base = [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()]
    rnd = random.Random(0)
    files, groups = {}, {}
    for f in range(args.files):
        texts = [f"[{f}:{i}] " + " ".join(rnd.sample(base, 3)) for i in range(args.rows)]
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), buf, row_group_size=max(1, args.rows // 2))
        name = f"data/train-{f:05d}-of-{args.files:05d}.parquet"
        files[name] = buf.getvalue()
        groups[name] = pq.ParquetFile(io.BytesIO(files[name])).metadata
    k = 50
    first_row, last_row = k * args.shard_size, (k + 1) * args.shard_size - 1
    if last_row >= args.files * args.rows:
        raise SystemExit(f"shard {k} needs {last_row + 1} rows; the dataset has {args.files * args.rows}")

    # the bytes of shard 50's own row groups: the column chunks holding rows [first_row, last_row]
    own, start = 0, 0
    for name in sorted(files):
        meta = groups[name]
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if start <= last_row and start + rg.num_rows > first_row:
                own += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            start += rg.num_rows

    tmp = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    tok = train_tokenizer(base[:3000], 4096, 256)
    tok.save_pretrained(tmp / "tok")
    hub = HubDouble({"hf_bench": {"name": "bench", "role": "read"}}).start()
    hub.seed("bench/corpus", files, kind="dataset")
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "true"}
    env.pop("HF_HUB_OFFLINE", None)

    def probe(shard: int, how: str) -> dict:
        hub.bytes_served.clear()
        env["HF_HOME"] = str(tmp / f"hf-{how}-{shard}")  # a fresh cache: a Space's disk is wiped at restart
        p = subprocess.run([sys.executable, "-c", PROBE, str(shard), str(args.shard_size), how, str(tmp / "tok")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        out = json.loads(p.stdout.strip().splitlines()[-1])
        out["bytes_read"] = sum(hub.bytes_served.values())
        return out

    try:
        s0 = probe(0, "corpus")
        s50 = probe(k, "corpus")
        whole = probe(k, "load_dataset")
    finally:
        hub.stop()
    total = sum(len(b) for b in files.values())
    assert s50["first_text"] == whole["first_text"], "the two paths read different rows"
    print(json.dumps({
        "bench": "streaming",
        "dataset": {"files": args.files, "rows": args.files * args.rows, "bytes": total, "shard_size": args.shard_size},
        "first_batch_s_shard0": round(s0["first_batch_s"], 2),
        "first_batch_s_shard50": round(s50["first_batch_s"], 2),
        "shard50_vs_shard0": round(s50["first_batch_s"] / s0["first_batch_s"], 2),
        "bytes_read_ratio_shard50": round(s50["bytes_read"] / own, 2),
        "bytes_read_shard50": s50["bytes_read"], "shard50_own_bytes": own,
        "whole_dataset": {"first_batch_s": round(whole["first_batch_s"], 2), "bytes_read": whole["bytes_read"],
                          "bytes_read_ratio": round(whole["bytes_read"] / own, 2)},
        "rows_known_before_reading": s0["rows"] == args.files * args.rows,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
