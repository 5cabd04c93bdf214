"""sources.py: datasets given as one source or several with weights, interleaved deterministically,
and shard k read from the mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, py, run
from config import SettingsError, load_settings
from errors import BadInput
from sources import Corpus, Source, parse_sources


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_one_source_or_several_with_weights():
    assert parse_sources("data/pretrain.jsonl", "INPUT_DATASET") == [Source("data/pretrain.jsonl")]
    assert parse_sources("org/web:0.7, org/code:0.3", "INPUT_DATASET") == [Source("org/web", 0.7), Source("org/code", 0.3)]
    assert parse_sources("org/web:2,org/code", "X") == [Source("org/web", 2.0), Source("org/code", 1.0)]
    listed = json.dumps([{"path": "a.jsonl", "weight": 3, "text_column": "body", "split": "train"}, "b.jsonl"])
    assert parse_sources(listed, "X") == [Source("a.jsonl", 3.0, "body", "train"), Source("b.jsonl")]


@pytest.mark.parametrize("value, needle", [
    ("a.jsonl:0,b.jsonl:1", "must be > 0"),
    ("a.jsonl:-1", "must be > 0"),
    ("a.jsonl:0.5,,b.jsonl", "empty entry"),
    ('[{"path": "a", "weight": "lots"}]', "not a number"),
    ('[{"path": "a", "colour": "red"}]', "unknown key(s) colour"),
    ('[{"weight": 1}]', "has no 'path'"),
    ("[not json", "does not parse"),
])
def test_bad_lists_are_bad_input_naming_the_variable(value, needle):
    with pytest.raises(BadInput) as e:
        parse_sources(value, "INPUT_DATASET")
    assert "INPUT_DATASET" in e.value.problems[0] and needle in e.value.problems[0]
    with pytest.raises(SettingsError) as e:  # and caught with the other settings, before anything runs
        load_settings({"INPUT_DATASET": value})
    assert any(needle in p for p in e.value.problems)


def test_a_list_in_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("INPUT_DATASET:\n  - {path: web.jsonl, weight: 0.7}\n  - {path: code.jsonl, weight: 0.3, text_column: content}\n")
    s = load_settings({"CONFIG_FILE": str(cfg)})
    assert parse_sources(s.input_dataset, "INPUT_DATASET") == [Source("web.jsonl", 0.7), Source("code.jsonl", 0.3, "content")]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    web = _jsonl(d / "web.jsonl", [{"text": f"web {i}"} for i in range(20_000)])
    code = _jsonl(d / "code.jsonl", [{"content": f"code {i}", "lang": "py"} for i in range(20_000)])
    return web, code


def _corpus(two, seed=0, weights=(0.7, 0.3)):
    web, code = two
    return Corpus([Source(web, weights[0]), Source(code, weights[1], "content")], "INPUT_DATASET", "text", "train", None, seed)


def test_the_mix_follows_the_weights_and_each_sources_own_column(two):
    c = _corpus(two)
    texts, which = c.texts(0, 10_000)
    share = sum(1 for w in which if w == 0) / len(which)
    assert abs(share - 0.7) <= 0.02, share
    assert all(t.startswith("web ") if w == 0 else t.startswith("code ") for t, w in zip(texts, which))
    # each source in its own order, nothing repeated: the mix stops when a source runs out
    for w, name in ((0, "web"), (1, "code")):
        ns = [int(t.split()[1]) for t, x in zip(*c.texts(0, len(c))) if x == w]
        assert ns == list(range(len(ns)))
    assert c.rows_per_source(0, len(c))[0] == 20_000 or c.rows_per_source(0, len(c))[1] == 20_000


def test_shard_k_is_the_same_rows_in_every_build_and_read_alone(two):
    a, b = _corpus(two), _corpus(two)
    k0, k1 = 3 * 1000, 4 * 1000
    assert a.texts(k0, k1) == b.texts(k0, k1)
    assert a.texts(0, len(a))[0][k0:k1] == b.texts(k0, k1)[0]  # reading the shard alone = slicing the whole
    assert _corpus(two, seed=1).texts(k0, k1) != a.texts(k0, k1)  # SEED chooses the mix's draw


def test_one_source_reads_in_its_own_order(two):
    web, _ = two
    c = Corpus([Source(web)], "INPUT_DATASET", "text", "train", None, seed=5)
    assert c.texts(100, 105) == ([f"web {i}" for i in range(100, 105)], [0] * 5)
    assert c.describe().endswith(": 20000 rows")


def test_chats_from_sources_with_different_columns(tmp_path):
    from tokenizer import to_messages

    a = _jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                                       for i in range(50)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": f"<|user|>u{i}<|end|><|bot|>b<|end|>", "id": i} for i in range(50)])
    c = Corpus([Source(a), Source(b)], "INSTRUCT_DATASET", "text", "train", None, seed=0)
    rows, which = c.records(0, len(c))
    chats = [to_messages(r, c.where(i, w)) for i, (r, w) in enumerate(zip(rows, which))]
    assert {w for w in which} == {0, 1} and len(chats) == len(c)
    assert all(m[0]["content"].startswith("q" if w == 0 else "u") for m, w in zip(chats, which))


def test_a_shard_of_several_datasets_records_its_mix(env, tmp_path):
    web = _jsonl(tmp_path / "web.jsonl", [json.loads(line) for line in open(env["INPUT_DATASET"])][:300])
    code = _jsonl(tmp_path / "code.jsonl", [{"content": f"def f{i}(x):\n    return x * {i}\n"} for i in range(300)])
    env["INPUT_DATASET"] = json.dumps([{"path": web, "weight": 0.6}, {"path": code, "weight": 0.4, "text_column": "content"}])
    p = run(py("prep.py"), env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 datasets interleaved" in p.stdout and "mix of this shard:" in p.stdout
    manifest = json.loads((Path(env["WORK_DIR"]) / "prepared" / "manifest.json").read_text())
    mix = manifest["sources"]
    assert [m["path"] for m in mix] == [web, code] and sum(m["rows"] for m in mix) == manifest["rows"] == 200
    assert sum(m["tokens"] for m in mix) == manifest["tokens"]  # each document's tokens and its EOS
    assert all(m["rows"] > 40 for m in mix)


def _parquet_files(n_files: int, rows_per_file: int, row_group: int, width: int = 60) -> dict[str, bytes]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    import random

    rnd, words = random.Random(0), ["lorem", "ipsum", "dolor", "sit", "amet", "tempor", "magna", "aliqua", "enim", "minim"]
    files = {}
    for f in range(n_files):
        texts = [f"file {f} row {i} " + " ".join(rnd.choice(words) + str(rnd.randrange(1000)) for _ in range(width // 9))
                 for i in range(rows_per_file)]
        table = pa.table({"text": texts, "n": list(range(rows_per_file))})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group)
        files[f"data/train-{f:05d}-of-{n_files:05d}.parquet"] = buf.getvalue()
    return files


def test_a_parquet_directory_is_read_where_its_rows_are_and_gives_the_same_rows(tmp_path, monkeypatch):
    import datasets

    from sources import ParquetRows

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "corpus"
    for name, data in _parquet_files(5, 700, 200).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    c = Corpus([Source(str(root))], "INPUT_DATASET", "text", "train", None, seed=0)
    assert isinstance(c.datasets[0], ParquetRows) and len(c) == 3500  # from the footers alone
    whole = datasets.load_dataset(str(root), split="train")["text"]
    for k in (0, 3, 6):  # shards of 500 rows, across row groups and files
        assert c.texts(k * 500, min(len(c), (k + 1) * 500))[0] == whole[k * 500:(k + 1) * 500]


def test_a_hub_dataset_shard_reads_only_its_own_row_groups(tmp_path):
    """Served the way the Hub serves it (the loopback double, byte ranges): shard k's rows equal
    load_dataset's, the row count comes from metadata, and the bytes read stay near the shard's."""
    import io

    import pyarrow.parquet as pq

    from hub_double import HubDouble

    files = _parquet_files(8, 1000, 250, width=400)
    hub = HubDouble({"hf_reader": {"name": "alice", "role": "read"}}).start()
    try:
        hub.seed("alice/corpus", files, kind="dataset", private=True)
        code = (
            "import json, sys\n"
            "import datasets\n"
            "from sources import Corpus, Source\n"
            "c = Corpus([Source('alice/corpus')], 'INPUT_DATASET', 'text', 'train', 'hf_reader', seed=0)\n"
            "k = int(sys.argv[1])\n"
            "texts, _ = c.texts(k * 250, (k + 1) * 250)\n"
            "whole = None if sys.argv[2] == 'alone' else datasets.load_dataset('alice/corpus', split='train', token='hf_reader')['text']\n"
            "print(json.dumps({'n': len(c), 'reader': type(c.datasets[0]).__name__, 'texts': texts,\n"
            "                  'same': whole is None or whole[k * 250:(k + 1) * 250] == texts}))\n")
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
               "PYTHONPATH": str(ROOT)}
        env.pop("HF_HUB_OFFLINE", None)
        p = subprocess.run([sys.executable, "-c", code, "21", "alone"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["reader"] == "ParquetRows" and out["n"] == 8000
        assert out["texts"][0].startswith("file 5 row 250 ") and len(out["texts"]) == 250
        meta = pq.ParquetFile(io.BytesIO(files["data/train-00005-of-00008.parquet"])).metadata.row_group(1)
        own = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
        read = sum(hub.bytes_served.values())
        assert read <= 2 * own, (read, own, hub.bytes_served, [l for l in hub.log if "parquet" in l[1]])  # the shard's row group, and the footers of the files before it
        p = subprocess.run([sys.executable, "-c", code, "21", "compare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["same"] is True
    finally:
        hub.stop()


def test_prep_on_parquet_files_read_by_row_group_trains_the_same_data(env, tmp_path):
    """The same corpus as one .jsonl file (loaded whole) and as a directory of Parquet files (read
    by row group): the same shard, the same data fingerprint, so a resume check holds across both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(env["INPUT_DATASET"])]
    root = tmp_path / "parquet"
    root.mkdir()
    for i in range(3):
        part = rows[i * 134:(i + 1) * 134]
        pq.write_table(pa.table({"text": [r["text"] for r in part]}), root / f"train-{i:05d}-of-00003.parquet", row_group_size=50)
    prints = []
    for spec in (env["INPUT_DATASET"], str(root)):
        e = env | {"INPUT_DATASET": spec, "INIT": "0", "WORK_DIR": str(tmp_path / f"work{len(prints)}")}
        p = run(py("prep.py"), e, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        prints.append(json.loads((Path(e["WORK_DIR"]) / "prepared" / "manifest.json").read_text())["data_fingerprint"])
    assert prints[0] == prints[1]


def test_lists_from_config_file_take_weights_like_the_variable_and_a_path_is_one_source(tmp_path):
    assert parse_sources(json.dumps(["org/web:0.7", "org/code:0.3"]), "X") == [Source("org/web", 0.7), Source("org/code", 0.3)]
    assert parse_sources(json.dumps({"path": "org/web", "weight": 2}), "X") == [Source("org/web", 2.0)]  # one mapping
    odd = tmp_path / "a,b:2.jsonl"
    odd.write_text('{"text": "x"}\n')
    assert parse_sources(str(odd), "X") == [Source(str(odd))]
    assert parse_sources(json.dumps([{"path": "p" * 300}] * 2), "X") == [Source("p" * 300)] * 2


def test_a_shard_across_parquet_files_of_slightly_different_types(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "mixed"
    root.mkdir()
    pq.write_table(pa.table({"text": pa.array(["a", "b", "c"], pa.string()), "note": pa.array([None] * 3, pa.null())}),
                   root / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": pa.array(["d", "e"], pa.large_string()), "note": pa.array(["x", "y"], pa.string())}),
                   root / "train-00001-of-00002.parquet")
    from sources import ParquetRows

    c = Corpus([Source(str(root))], "INPUT_DATASET", "text", "train", None, seed=0)
    assert isinstance(c.datasets[0], ParquetRows)
    assert c.texts(1, 5) == (["b", "c", "d", "e"], [0, 0, 0, 0])
    rows, _ = c.records(2, 4)
    assert rows == [{"text": "c", "note": None}, {"text": "d", "note": "x"}]
