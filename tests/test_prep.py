"""prep.py: tokenizer, both instruct formats, packing, shards, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import ROOT, call_main, py, run, tree_digest
from errors import BadInput
from prep import pack, split_indices, tokenize_chats
from sources import shard_bounds
from tokenizer import CHAT_TEMPLATE, EOS, to_messages, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").open()][:300]
    return train_tokenizer(texts, vocab_size=800, max_length=128)


def test_tokenizer_is_byte_level_with_specials_and_template(tok):
    assert tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    text = "Zoë ate 12 plums 🍑 — ünïcode!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # bytes never lost
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_instruct_loss_only_on_answers_ending_with_eos(tok):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 equals 4."}, {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome!"}]
    ids, labels, dropped = tokenize_chats(tok, [chat], max_length=128)
    assert dropped == 0
    learned = [t for t in labels[0] if t != -100]
    assert tok.decode(learned) == f"2 plus 2 equals 4.{EOS}You are welcome!{EOS}"


def test_both_instruct_formats_give_the_same_messages():
    msgs = to_messages({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "r")
    seed = to_messages({"text": "<|user|>Hi<|end|><|bot|>Hello<|end|>"}, "r")
    assert msgs == seed == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'wizard'"),
    ({"messages": "not a list"}, "must be a list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "no text 'content'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"text": "no tags here"}, "no <|user|>"),
    ({"other": 1}, "neither"),
])
def test_malformed_instruct_rows(row, needle):
    with pytest.raises(BadInput, match=None) as e:
        to_messages(row, "INSTRUCT_DATASET row 7")
    assert needle in str(e.value) and "row 7" in str(e.value)


def test_packing_loses_and_duplicates_nothing():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 500) for _ in range(rng.randrange(0, 300))] for _ in range(200)]
    blocks = pack(docs, eos_id=0, block=64)
    flat = [int(t) for b in blocks for t in b]
    expected = [t for d in docs for t in (*d, 0)]
    assert flat == expected                       # same tokens, same order, each once
    assert all(len(b) == 64 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 64   # no padding


def test_shards_and_split():
    assert shard_bounds(1000, 0, 300, "X") == (0, 300, 4)
    assert shard_bounds(1000, 3, 300, "X") == (900, 1000, 4)
    with pytest.raises(BadInput, match="INIT=4"):
        shard_bounds(1000, 4, 300, "X")
    train, val = split_indices(100, 0.1, seed=1)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert split_indices(100, 0.1, seed=1) == (train, val)


def _prep(env):
    return run(py("prep.py"), env, timeout=300)


def test_prep_writes_artifacts_and_later_runs_reuse_the_tokenizer(env, tmp_path):
    p = _prep(env)
    assert p.returncode == 0, p.stderr
    prepared = Path(env["WORK_DIR"]) / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["plan"]["stage"] == "pretrain" and manifest["shards_total"] == 2
    assert {"tokenizer", "model", "train", "val"} <= {c.name for c in prepared.iterdir()}
    # Publish the prepared tokenizer as if run 0 had finished; run 1 must load it, not retrain.
    out = Path(env["OUTPUT_REPO"])
    out.mkdir(parents=True)
    for f in (prepared / "tokenizer").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    for f in (prepared / "model").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    env["INIT"] = "1"
    p = _prep(env)
    assert p.returncode == 0, p.stderr
    assert "tokenizer: the published one" in p.stdout
    assert (prepared / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["plan"]["shard"] == 1 and manifest["rows"] == 200


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing dataset": (lambda d: {"INPUT_DATASET": str(d / "nope.jsonl")}, "no such file"),
    "missing hub-style dataset dir": (lambda d: {"INPUT_DATASET": "./does/not/exist"}, "no such file"),
    "no text column": (lambda d: {"INPUT_DATASET": _write(d / "c.jsonl", '{"body": "x"}\n')}, "no column 'text'"),
    "empty file": (lambda d: {"INPUT_DATASET": _write(d / "e.jsonl", "")}, "empty"),
    "unparseable file": (lambda d: {"INPUT_DATASET": _write(d / "u.jsonl", "{not json\n")}, "cannot be read"),
    "unknown role": (lambda d: {"INST": "true", "INIT": "0", "INPUT_REPO": str(d / "pre"),
                                "INSTRUCT_DATASET": _write(d / "r.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")},
                     "role 'robot'"),
    "malformed messages": (lambda d: {"INST": "true", "INIT": "0", "INPUT_REPO": str(d / "pre"),
                                      "INSTRUCT_DATASET": _write(d / "m.jsonl", json.dumps({"messages": 5}) + "\n")},
                           "must be a list"),
    "INIT>0 without a previous model": (lambda d: {"INIT": "1"}, "no published model"),
    "INIT past the last shard": (lambda d: {"INIT": "0", "SHARD_SIZE": "1000000", "MAX_LENGTH": "64"}, None),
    "Hub OUTPUT_REPO without HF_TOKEN": (lambda d: {"OUTPUT_REPO": "someone/llama"}, "HF_TOKEN"),
    "bad variable": (lambda d: {"LEARNING_RATE": "fast"}, "LEARNING_RATE='fast'"),
}


def _fake_published_model(dst: Path) -> None:
    """A minimal published model directory (config + weights) for stages that continue from one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenizer import train_tokenizer as tt

    tok = tt(["hello world"] * 10, 300, 64)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(dst)
    tok.save_pretrained(dst)


def _bad_input_env(env: dict[str, str], tmp_path: Path, case: str) -> tuple[dict[str, str], str]:
    make, needle = BAD_INPUTS[case]
    if case == "INIT past the last shard":
        env["INIT"] = "5"
        env["SHARD_SIZE"] = "200"
        _fake_published_model(Path(env["OUTPUT_REPO"]))
        needle = "INIT=5"
    else:
        env.update(make(tmp_path))
    if "INPUT_REPO" in env:
        _fake_published_model(Path(env["INPUT_REPO"]))
    return env, needle


def _wrote_nothing(env: dict[str, str], out_before: str) -> None:
    assert not (Path(env["WORK_DIR"]) / "prepared").exists()
    assert tree_digest(Path(env["OUTPUT_REPO"])) == out_before
    assert not Path(env["OUTPUT_REPO"] + "-it").exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_it_and_writes_nothing(env, tmp_path, case, monkeypatch, capsys):
    """Each bad input, through preflight's and prep's main() in this process (the command line's
    own exit code: the test below)."""
    import preflight
    import prep

    env, needle = _bad_input_env(env, tmp_path, case)
    out_before = tree_digest(Path(env["OUTPUT_REPO"]))
    for entry in (preflight.main, prep.main):
        rc, out, err = call_main(entry, [], env, monkeypatch, capsys)
        assert rc == 2, (entry.__module__, out, err)
        assert needle in out + err, (entry.__module__, out, err)
        assert "Fix" in out + err or "fix" in (out + err).lower() or "accepted" in err.lower()
    _wrote_nothing(env, out_before)


@pytest.mark.parametrize("case", ["bad variable", "no text column"])
def test_bad_input_exits_2_from_the_command_line(env, tmp_path, case):
    """The entry points as a user runs them: a bad setting and a bad dataset exit 2, named, with
    nothing written."""
    env, needle = _bad_input_env(env, tmp_path, case)
    out_before = tree_digest(Path(env["OUTPUT_REPO"]))
    for entry in ("preflight.py", "prep.py"):
        p = run(py(entry), env, timeout=300)
        assert p.returncode == 2 and needle in p.stdout + p.stderr, (entry, p.stdout, p.stderr)
    _wrote_nothing(env, out_before)


@pytest.mark.parametrize("form", ["jsonl", "parquet", "txt", "directory"])
def test_datasets_load_the_same_way_from_files_and_directories(tmp_path, monkeypatch, form):
    import datasets

    from sources import Corpus, Source

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    texts = ["The cat says meow.", "A baker bakes bread.", "After one comes two."]
    if form == "jsonl":
        spec = tmp_path / "c.jsonl"
        spec.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif form == "parquet":
        spec = tmp_path / "c.parquet"
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(spec))
    elif form == "txt":
        spec = tmp_path / "c.txt"
        spec.write_text("\n\n".join(texts) + "\n")  # one document per paragraph
    else:
        spec = tmp_path / "corpus"
        spec.mkdir()
        (spec / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    corpus = Corpus([Source(str(spec))], "INPUT_DATASET", "text", "train", None, seed=0)
    assert [t.strip() for t in corpus.texts(0, len(corpus))[0]] == texts


def _plain_tokenizer(path: Path) -> None:
    """A Llama-2-like tokenizer built here: its own special tokens, no pad token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "pretrain.jsonl").read_text().splitlines()[:300]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=["<s>", "</s>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


@pytest.mark.slow
def test_tokenizer_and_base_model_start_a_pipeline_from_what_exists(tmp_path):
    """TOKENIZER: a tokenizer without pad or chat template trains a model to a chat model. BASE_MODEL:
    that published model's weights start a new pipeline, whose first loss is the first one's last."""
    from transformers import AutoTokenizer, pipeline

    from conftest import make_env, record

    _plain_tokenizer(tmp_path / "tok")
    env = {**make_env(tmp_path), "TOKENIZER": str(tmp_path / "tok"), "SHARD_SIZE": "400", "MAX_RUNS": "2"}
    p = run(["./trainer.sh"], env, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert f"tokenizer: {tmp_path / 'tok'} (" in p.stdout and "added pad = its EOS, the pipeline's chat template" in p.stdout
    chat_model = env["OUTPUT_REPO"] + "-it"
    tok = AutoTokenizer.from_pretrained(chat_model)
    assert len(tok) == len(AutoTokenizer.from_pretrained(tmp_path / "tok")) and tok.pad_token == "</s>"
    assert record(chat_model)["done"] and record(env["OUTPUT_REPO"])["history"][0]["origin"] == {"tokenizer": str(tmp_path / "tok")}
    reply = pipeline("text-generation", model=chat_model)([{"role": "user", "content": "Hi"}], max_new_tokens=4,
                                                          do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    first = record(env["OUTPUT_REPO"])["history"][0]

    base = env["OUTPUT_REPO"]
    (tmp_path / "second").mkdir(), (tmp_path / "third").mkdir()
    env2 = {**make_env(tmp_path / "second"), "BASE_MODEL": base, "SHARD_SIZE": "400", "MAX_RUNS": "1"}
    p = run(["./trainer.sh"], env2, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "tensors copied, 0 left fresh, 0 source tensors unused, 0 shape mismatches" in p.stdout
    second = record(env2["OUTPUT_REPO"])["history"][0]
    assert second["origin"]["base_model"]["complete"] and second["origin"]["tokenizer"] == base
    # the same held-out rows, the base's weights: where the first pipeline ended, not where it began
    assert abs(second["eval_loss_before"] - first["eval_loss"]) <= 0.02 * first["eval_loss"]
    assert first["eval_loss_before"] - second["eval_loss_before"] > 0.5 * (first["eval_loss_before"] - first["eval_loss"])

    # a checkpoint whose tensors do not fill its own config: exit 2 naming the fix, nothing published
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (damaged / f).write_bytes((Path(base) / f).read_bytes())
    cfg = json.loads((Path(base) / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    env3 = {**make_env(tmp_path / "third"), "BASE_MODEL": str(damaged), "SHARD_SIZE": "400", "MAX_RUNS": "1"}
    p = run(["./trainer.sh"], env3, timeout=900)
    assert p.returncode == 2 and "BASE_MODEL_PARTIAL=true" in p.stdout + p.stderr
    assert f"left fresh: model.layers.{cfg['num_hidden_layers']}." in p.stdout
    assert not Path(env3["OUTPUT_REPO"]).exists()
