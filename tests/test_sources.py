"""sources.py: datasets given as one source or several with weights, interleaved deterministically,
and shard k read from the mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import py, run
from config import BadInput, SettingsError, load_settings
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
    from prep import to_messages

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
