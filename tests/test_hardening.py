"""Nothing published is lost or overwritten by mistake: a Hub that cannot be read is not an empty
Hub; damaged records, checkpoints and models are bad input found before any work; nothing
non-finite is published; one writer per output; a stop signal is honoured quickly and only once;
DeepSpeed's op build cannot hang a run; the token is masked wherever it turns up."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, a_manifest, finish, make_env, py, run, shard_metrics, start_trainer, wait_for
from hub_double import HubDouble

from config import SettingsError, load_settings
from errors import BadInput

TOKEN = "hf_hardeningWriteToken0123456789abc"


# --- the record's schema ----------------------------------------------------------------------------

GOOD = {"format": 1, "stage": "pretrain", "shard": 0, "shards_total": 2, "next": {"inst": False, "init": 1},
        "done": False, "steps": 6, "tokens": 3000, "history": [{"stage": "pretrain", "shard": 0, "shards_total": 2,
                                                                   "steps": 6, "tokens": 3000}], "publish_id": "x-1"}


def _with(**changes):
    rec = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        node = rec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    return json.dumps(rec)


DAMAGED_RECORDS = {
    "next.inst and next.init strings": _with(next={"inst": "no", "init": "one"}),
    "next a string": _with(next="shard1"),
    "next.init negative": _with(next={"inst": False, "init": -1}),
    "next with an unknown key": _with(next={"inst": False, "init": 1, "shard": 2}),
    "a list instead of an object": json.dumps([GOOD]),
    "done a string": _with(done="false"),
    "done true while next is set": _with(done=True),
    "history an object": _with(history={"0": {}}),
    "history entry shard a string": _with(history__0__shard="0"),
    "history entry unknown stage": _with(history__0__stage="finetune"),
    "steps a float": _with(steps=6.5),
    "format a string": _with(format="1"),
    "resume.step a string": _with(resume={"stage": "pretrain", "shard": 1, "step": "5", "max_steps": 10,
                                          "samples_seen": 40, "tokens": 100, "stop_reason": "x",
                                          "eval_loss_before": 1.0, "data_fingerprint": None, "interruptions": 1}),
    "resume without step": _with(resume={"stage": "pretrain", "shard": 1}),
    "not JSON": '{"format": 1, "next": ',
    "empty file": "",
}


@pytest.mark.parametrize("text", DAMAGED_RECORDS.values(), ids=DAMAGED_RECORDS.keys())
def test_a_damaged_record_is_bad_input_naming_the_file_and_the_fix(text):
    from run_state import validate_record

    with pytest.raises(BadInput) as e:
        validate_record(text, "out/llama/training_state.json")
    msg = str(e.value)
    assert msg.startswith("out/llama/training_state.json: ") and "Fix: restore training_state.json" in msg


def test_a_record_of_a_newer_format_is_refused_not_rewritten():
    from run_state import validate_record

    with pytest.raises(BadInput, match=r"newer train-llama \(record format 2; this version reads up to 1\)"):
        validate_record(_with(format=2), "r.json")


def test_records_the_pipeline_writes_pass_the_schema(tmp_path):
    from run_state import validate_record
    from run_state import RunPlan, build_record

    s = load_settings({"OUTPUT_REPO": str(tmp_path / "o")})
    metrics = shard_metrics(steps=3, tokens=99, eval_loss=1.5, train_loss=2.0)
    plan = RunPlan("pretrain", 0, "o", None)
    first = build_record(s, plan, a_manifest(plan, parameters=1), metrics, None)
    plan = RunPlan("instruct", 1, "o-it", "o")
    last = build_record(s, plan, a_manifest(plan, parameters=1), metrics, first)
    for rec in (first, last):
        assert validate_record(json.dumps(rec), "r") == rec
    assert last["next"] is None and last["done"]


def test_preflight_and_plan_report_a_damaged_local_record_with_exit_2(env, tmp_path):
    out = Path(env["OUTPUT_REPO"])
    out.mkdir(parents=True)
    (out / "training_state.json").write_text(_with(next={"inst": "no", "init": "one"}))
    for cmd in (py("preflight.py"), py("publish.py", "plan")):
        p = run(cmd, env, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        text = p.stdout + p.stderr
        assert "training_state.json" in text and "next.inst" in text and "Traceback" not in text


# --- the checkpoint's schema --------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int = 4) -> Path:
    """A last-checkpoint/ with every part the trainer writes, each a real file of its format."""
    import torch
    from safetensors.torch import save_file

    ck = root / "last-checkpoint"
    (ck / f"global_step{step}").mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 10}))
    (ck / "latest").write_text(f"global_step{step}")
    (ck / "data_order.json").write_text(json.dumps(["ab"] * step))
    (ck / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    for name in ("scheduler.pt", "rng_state.pth", f"global_step{step}/mp_rank_00_model_states.pt",
                 f"global_step{step}/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": torch.arange(1000.0)}, ck / name)
    save_file({"w": torch.ones(4, 4)}, str(ck / "model.safetensors"))
    return ck


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGES = {
    "global_step folder missing": (lambda ck: __import__("shutil").rmtree(ck / "global_step4"), "global_step4/, which is missing"),
    "latest garbled": (lambda ck: (ck / "latest").write_bytes(b"\x00\xffgl0bal"), "latest"),
    "latest names another step": (lambda ck: ((ck / "global_step3").mkdir(), (ck / "latest").write_text("global_step3")),
                                  "the record says step 4"),
    "latest missing": (lambda ck: (ck / "latest").unlink(), "latest (DeepSpeed's tag file) is missing"),
    "trainer_state at another step": (lambda ck: (ck / "trainer_state.json").write_text('{"global_step": 7}'),
                                      "trainer_state.json is at step 7"),
    "trainer_state not JSON": (lambda ck: (ck / "trainer_state.json").write_text("{"), "trainer_state.json is not valid JSON"),
    "optimizer states truncated": (lambda ck: _truncate(next((ck / "global_step4").glob("*optim_states.pt"))), "optim_states.pt is unreadable"),
    "optimizer states missing": (lambda ck: next((ck / "global_step4").glob("*optim_states.pt")).unlink(), "no optimizer states"),
    "model states bytes flipped": (lambda ck: _flip_middle(ck / "global_step4" / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt is"),
    "scheduler missing": (lambda ck: (ck / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "rng state truncated": (lambda ck: _truncate(ck / "rng_state.pth"), "rng_state.pth is unreadable"),
    "weights truncated": (lambda ck: _truncate(ck / "model.safetensors"), "truncated safetensors"),
    "weights missing": (lambda ck: (ck / "model.safetensors").unlink(), "no model.safetensors"),
    "data order a dict": (lambda ck: (ck / "data_order.json").write_text("{}"), "data_order.json holds a JSON dict"),
    "tokenizer garbled": (lambda ck: (ck / "tokenizer.json").write_text("{{"), "tokenizer.json is not valid JSON"),
}


def test_a_complete_checkpoint_passes(tmp_path):
    from run_state import validate_checkpoint

    validate_checkpoint(fake_checkpoint(tmp_path), 4, "out/last-checkpoint")


@pytest.mark.parametrize("damage,expect", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_checkpoint_is_bad_input_naming_the_part_and_the_fix(tmp_path, damage, expect):
    from run_state import validate_checkpoint

    ck = fake_checkpoint(tmp_path)
    damage(ck)
    with pytest.raises(BadInput) as e:
        validate_checkpoint(ck, 4, "out/last-checkpoint")
    msg = str(e.value)
    assert msg.startswith("out/last-checkpoint: the checkpoint to resume from is damaged") and expect in msg, msg
    assert "delete last-checkpoint/" in msg


def test_a_missing_checkpoint_is_bad_input(tmp_path):
    from run_state import validate_checkpoint

    with pytest.raises(BadInput, match="no checkpoint"):
        validate_checkpoint(tmp_path / "last-checkpoint", 4, "out/last-checkpoint")


# --- the published model ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=96, tie_word_embeddings=True)
    d = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _poison(model_dir: Path, value: float, name_part: str = "mlp.up_proj") -> str:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    tensors = load_file(str(f))
    name = next(n for n in tensors if name_part in n)
    tensors[name][0, 0] = value
    save_file(tensors, str(f), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_published_model_with_non_finite_weights_is_bad_input(tiny_model, value):
    from prep import check_source_model

    name = _poison(tiny_model, value)
    with pytest.raises(BadInput) as e:
        check_source_model("alice/llama", tiny_model)
    assert str(e.value).startswith("alice/llama: 1 weight tensor(s) hold NaN or infinity") and name in str(e.value)


def test_garbage_bytes_under_an_intact_header_are_found(tiny_model):
    from prep import check_source_model
    from quant_utils import read_safetensors_header

    f = tiny_model / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)  # every float becomes NaN; the header still matches the size
    f.write_bytes(bytes(data))
    read_safetensors_header(f)  # the header checks pass ...
    with pytest.raises(BadInput, match="hold NaN or infinity"):  # ... the values do not
        check_source_model("./out/llama", tiny_model)


CONFIG_DAMAGES = {
    "no model_type": (lambda c: c.pop("model_type"), "model_type is null"),
    "model_type gpt2": (lambda c: c.update(model_type="gpt2"), 'model_type is "gpt2"'),
    "hidden_size a string": (lambda c: c.update(hidden_size="64"), 'hidden_size is "64"'),
    "vocab_size missing": (lambda c: c.pop("vocab_size"), "vocab_size is null"),
    "num_hidden_layers zero": (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers is 0"),
}


@pytest.mark.parametrize("damage,expect", CONFIG_DAMAGES.values(), ids=CONFIG_DAMAGES.keys())
def test_a_damaged_model_config_is_bad_input(tiny_model, damage, expect):
    from quant_utils import verify_checkpoint

    cfg = json.loads((tiny_model / "config.json").read_text())
    damage(cfg)
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput) as e:
        verify_checkpoint(tiny_model)
    assert "config.json" in str(e.value) and expect in str(e.value) and "Fix:" in str(e.value)


def test_a_config_that_is_not_json_is_bad_input(tiny_model):
    from quant_utils import verify_checkpoint

    (tiny_model / "config.json").write_text("{'model_type': 'llama'")
    with pytest.raises(BadInput, match="config.json: not valid JSON"):
        verify_checkpoint(tiny_model)


def test_a_damaged_tokenizer_is_bad_input(tmp_path):
    from tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"model": ')
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(BadInput, match=r"alice/llama: the tokenizer does not load"):
        load_tokenizer(tmp_path, "alice/llama")


# --- nothing non-finite is published ------------------------------------------------------------------


def _final(tmp_path: Path, tiny_model: Path) -> Path:
    import shutil

    final = tmp_path / "final"
    shutil.copytree(tiny_model, final)
    return final


def test_the_publish_gate_refuses_non_finite_weights_and_losses(tmp_path, tiny_model):
    from delivery import NonFinite, refuse_non_finite

    final = _final(tmp_path, tiny_model)
    refuse_non_finite(final, {"eval_loss": 1.2, "train_loss": 2.0})  # healthy: passes
    for metrics in ({"eval_loss": float("nan")}, {"train_loss": float("inf")}, {"merged_eval_loss": float("nan")}):
        with pytest.raises(NonFinite, match="not published, it holds non-finite values"):
            refuse_non_finite(final, metrics)
    _poison(final, float("nan"))
    with pytest.raises(NonFinite, match="model.safetensors"):
        refuse_non_finite(final, {"eval_loss": 1.2})


def test_the_publish_gate_refuses_a_non_finite_checkpoint(tmp_path, tiny_model):
    import shutil

    from delivery import NonFinite, refuse_non_finite

    final = tmp_path / "final"
    shutil.copytree(tiny_model, final / "last-checkpoint")
    refuse_non_finite(final, {})  # a checkpoint states no loss: its weights are checked
    _poison(final / "last-checkpoint", float("inf"), "embed_tokens")
    with pytest.raises(NonFinite):
        refuse_non_finite(final, {})  # a checkpoint states no loss: its weights are checked


def test_train_refuses_to_save_a_diverged_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from train import refuse_non_finite

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    refuse_non_finite(model, 1.0)
    with pytest.raises(RuntimeError, match="validation loss after training is nan"):
        refuse_non_finite(model, float("nan"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="q_proj"):
        refuse_non_finite(model, 1.0)


# --- a stop request is honoured within seconds ------------------------------------------------------------


def test_evaluation_stops_at_the_next_batch_when_a_stop_is_requested(tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import evaluation
    import stopping

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"input_ids": list(range(1, 17)), "labels": list(range(1, 17))} for _ in range(64)]
    seen = []

    def collate(batch):
        seen.append(len(batch))
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids}

    assert evaluation.validation_loss(model, rows, collate, 8, "fp32") > 0 and len(seen) == 8
    monkeypatch.setitem(stopping.STOP, "signal", "SIGTERM")
    seen.clear()
    with pytest.raises(stopping.StopRequested):
        evaluation.validation_loss(model, rows, collate, 8, "fp32")
    assert seen == []  # not one more batch


# --- Hub reads: absent only on a definite answer --------------------------------------------------------


def _errors():
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError)

    def resp(code):
        return httpx2.Response(code, request=httpx2.Request("GET", "http://hub.test/x"))

    def local_from(cause):
        e = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        e.__cause__ = cause
        return e

    return {
        "404 entry": (RemoteEntryNotFoundError("no", response=resp(404)), True, False),
        "404 repo": (RepositoryNotFoundError("no", response=resp(404)), True, False),
        "401 repo (token)": (RepositoryNotFoundError("no", response=resp(401)), False, False),
        "gated": (GatedRepoError("gated", response=resp(403)), False, False),
        "no answer, 503 behind it": (local_from(HfHubHTTPError("503", response=resp(503))), False, True),
        "no answer, connection dropped": (local_from(httpx2.ConnectError("refused")), False, True),
        "no answer, timeout": (local_from(httpx2.ReadTimeout("slow")), False, True),
        "no answer at all": (local_from(None), False, True),
        "503": (HfHubHTTPError("503", response=resp(503)), False, True),
        "malformed header (token with a newline)": (httpx2.LocalProtocolError("Illegal header value"), False, False),
    }


@pytest.mark.parametrize("name", list(_errors()))
def test_only_a_404_means_absent_and_only_outages_are_retried(name):
    from hub import Hub

    e, absent, transient = _errors()[name]
    assert Hub.absent(e) is absent
    assert Hub.transient(e)[0] is transient


def _record_repo(hub: HubDouble) -> None:
    rec = dict(GOOD, next={"inst": True, "init": 0}, history=GOOD["history"] + [
        {"stage": "pretrain", "shard": 1, "shards_total": 2, "steps": 6, "tokens": 3000}])
    hub.seed("alice/llama", {"training_state.json": json.dumps(rec).encode(), "config.json": b"{}",
                             "model.safetensors": b"x"})


READ_FAULTS = {
    "record 503": [{"method": "HEAD", "pattern": r"/resolve/.*training_state", "times": 10**6},
                   {"method": "GET", "pattern": r"/resolve/.*training_state", "times": 10**6}],
    "record connection dropped": [{"method": "HEAD", "pattern": r"/resolve/.*training_state", "kind": "drop", "times": 10**6},
                                  {"method": "GET", "pattern": r"/resolve/.*training_state", "kind": "drop", "times": 10**6}],
    "repo info 502": [{"method": "GET", "pattern": r"^/api/models/alice/llama(-it)?(/revision/[^/]+)?$", "status": 502,
                       "times": 10**6}],
    "file listing 500": [{"method": "GET", "pattern": r"/tree/", "status": 500, "times": 10**6}],
}


@pytest.mark.parametrize("faults", READ_FAULTS.values(), ids=READ_FAULTS.keys())
def test_a_hub_that_cannot_be_read_plans_nothing(tmp_path, faults):
    """With a finished pretraining published, a read that keeps failing must fail the plan (exit 1),
    never read as "nothing published" (which would retrain shard 0 over it)."""
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        _record_repo(hub)
        for f in faults:
            hub.fail(f.pop("method"), f.pop("pattern"), **f)
        env = make_env(tmp_path)
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "OUTPUT_REPO": "alice/llama",
                    "HUB_RETRY_WAIT": "0.01", "HUB_RETRIES": "0", "HUB_TIMEOUT": "1"})
        # HUB_RETRIES=0: huggingface_hub's own backoff on a failed file read (~23 s) is retry enough here.
        p = run(py("publish.py", "plan"), env, timeout=120)
        text = p.stdout + p.stderr
        assert p.returncode == 1, text
        assert "fresh weights" not in text and "Hub:" in text and "Traceback" not in text
        assert hub.commits("alice/llama") == ["seed"]
    finally:
        hub.stop()


def test_with_the_hub_up_the_same_repo_plans_the_next_stage(tmp_path):
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        _record_repo(hub)
        env = make_env(tmp_path)
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "OUTPUT_REPO": "alice/llama"})
        p = run(py("publish.py", "plan"), env, timeout=120)
        assert p.returncode == 0 and "instruct shard 0 from alice/llama -> alice/llama-it" in p.stdout, p.stdout + p.stderr
    finally:
        hub.stop()


# --- one writer per output -----------------------------------------------------------------------------------


def _holder(env: dict[str, str]) -> subprocess.Popen:
    code = ("import sys, time; sys.path.insert(0, '.'); from config import load_settings; import output_lock; "
            "output_lock.acquire(load_settings()); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_push_under_trainer_sh_skips_only_the_locks_its_pipeline_holds(env, monkeypatch, tmp_path):
    """Under trainer.sh (TRAIN_LLAMA_LOCKED=1) the pipeline's own output lock is held by the process
    tree already: taking it again would call the run busy with itself. Any other directory is
    locked as usual."""
    import fcntl

    import output_lock

    for k in ("OUTPUT_REPO", "WORK_DIR"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv(output_lock.INHERITED, "1")
    out = Path(env["OUTPUT_REPO"])
    mine = out.with_name(out.name + ".lock")
    mine.parent.mkdir(parents=True, exist_ok=True)
    tree = os.open(mine, os.O_RDWR | os.O_CREAT)  # what trainer.sh holds
    fcntl.flock(tree, fcntl.LOCK_EX)
    held = []
    try:
        assert output_lock.acquire_dir(out) == []
        held = output_lock.acquire_dir(out.with_name(out.name + "-it"))  # its own lock only, not the pipeline's
        assert len(held) == 1
        held += output_lock.acquire_dir(tmp_path / "elsewhere")
        assert len(held) == 2
        probe = os.open(tmp_path / "elsewhere.lock", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        for fd in [tree, *held]:
            os.close(fd)


def test_a_lock_file_that_cannot_be_made_is_one_line_of_bad_input(tmp_path, monkeypatch, capsys):
    """A push target whose lock file cannot be created (here a directory stands in its place) is bad
    input stated in one line that names the lock file and the fix, on the report every entry point
    prints."""
    import output_lock
    from errors import report

    monkeypatch.delenv(output_lock.INHERITED, raising=False)
    (tmp_path / "m.lock").mkdir()
    with pytest.raises(BadInput) as e:
        output_lock.acquire_dir(tmp_path / "m")
    assert len(e.value.problems) == 1 and str(tmp_path / "m.lock") in e.value.problems[0]
    assert report(e.value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Fix: a directory you can write" in err  # "Bad input:" and the problem


def test_a_second_writer_is_told_who_holds_the_output_and_a_killed_holder_frees_it(env, monkeypatch):
    import output_lock

    for k in ("OUTPUT_REPO", "WORK_DIR"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv(output_lock.INHERITED, raising=False)
    s = load_settings({**os.environ, "OUTPUT_REPO": env["OUTPUT_REPO"], "WORK_DIR": env["WORK_DIR"]})
    holder = _holder(env)
    try:
        assert f"pid {holder.pid}" in (output_lock.probe(s) or "")
        with pytest.raises(output_lock.OutputBusy, match=rf"in use by another run: pid {holder.pid} on "):
            output_lock.acquire(s)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel releases the lock
        holder.wait()
    assert output_lock.probe(s) is None
    fds = output_lock.acquire(s)
    assert len(fds) == 2
    for fd in fds:
        os.close(fd)


def test_prep_and_publish_refuse_to_run_beside_a_live_run(env):
    holder = _holder(env)
    try:
        for cmd in (py("prep.py"), py("publish.py", "publish")):
            p = run(cmd, env, timeout=120)
            assert p.returncode == 1 and f"in use by another run: pid {holder.pid}" in p.stderr, p.stdout + p.stderr
        p = run(py("preflight.py"), env, timeout=120)
        assert p.returncode == 2 and "[FAIL] output: in use by another run" in p.stdout
        assert not Path(env["WORK_DIR"]).exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()


# --- DeepSpeed's op build cannot hang a run ----------------------------------------------------------------


def test_a_stale_build_lock_is_removed_and_a_live_build_is_waited_for_with_a_limit(tmp_path):
    """A lock file left by a killed build would make torch wait forever; ours is detected stale
    (no build holds our flock) and removed. A live build (our flock held) is waited for, within a
    limit."""
    import shutil

    from jit_ops import extensions_root

    ext = tmp_path / "ext"
    built = extensions_root() / "deepspeed_shm_comm"
    if built.is_dir():  # reuse this machine's build: only the lock handling is under test
        shutil.copytree(built, ext / built.parent.name / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext / built.parent.name), "DS_ACCELERATOR": "cpu"}
    lock = ext / built.parent.name / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")  # what a build killed with SIGKILL leaves
    code = "import sys; sys.path.insert(0, '.'); from jit_ops import load_comm_op; print(load_comm_op())"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "removing a stale build lock" in p.stdout and "1 stale lock(s) removed" in p.stdout and not lock.exists()

    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock.parent.parent / ".train-llama-build.flock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = ("import sys; sys.path.insert(0, '.'); from jit_ops import load_comm_op, BuildLockTimeout\n"
                "try:\n    load_comm_op(wait_s=1)\nexcept BuildLockTimeout as e:\n    print('timeout:', e); sys.exit(7)")
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 7 and "building DeepSpeed's ops" in p.stdout, p.stdout + p.stderr
        assert time.monotonic() - t < 60
    finally:
        holder.kill()
        holder.wait()


def test_a_build_lock_another_program_holds_open_is_waited_for_not_removed(tmp_path):
    """A DeepSpeed program that is not ours builds in the same cache without our flock: torch keeps
    its lock file open for the whole build. That lock is live: it is waited for (within the limit,
    the holder named), never removed under the builder's feet, and the load goes on once it is
    released. A held lock of another op, reached through a link, is left alone without holding the
    load up; an unheld one is stale."""
    ext = tmp_path / "ext" / "py_cpu"
    lock, other, dead = (ext / "deepspeed_shm_comm" / "lock", ext / "other_op" / "lock", ext / "killed_op" / "lock")
    for d in (lock, other, dead):
        d.parent.mkdir(parents=True)
    dead.write_text("")
    (tmp_path / "link").symlink_to(other.parent)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu"}
    hold = ("import os, sys, time; fds = [os.open(a, os.O_CREAT | os.O_EXCL) for a in sys.argv[1:]]; "
            "print('held', flush=True); sys.stdin.readline(); os.close(fds[0]); os.remove(sys.argv[1]); "
            "print('released', flush=True); sys.stdin.readline()")
    builder = subprocess.Popen([sys.executable, "-c", hold, str(lock), str(tmp_path / "link" / "lock")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        code = ("import sys; sys.path.insert(0, '.'); from jit_ops import load_comm_op, BuildLockTimeout\n"
                "try:\n    load_comm_op(wait_s=1)\nexcept BuildLockTimeout as e:\n    print('timeout:', e); sys.exit(7)")
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 7 and f"pid {builder.pid}" in p.stdout and str(lock) in p.stdout, p.stdout + p.stderr
        assert lock.exists() and other.exists() and dead.exists()
        code = ("import sys; sys.path.insert(0, '.'); from jit_ops import _stale_locks\n"
                "from pathlib import Path; print('stale:', [str(p) for p, _ in _stale_locks(Path(sys.argv[1]), 60.0)])")
        waiter = subprocess.Popen([sys.executable, "-c", code, str(ext)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiter.poll() is None, waiter.communicate()  # still waiting for the live build
        builder.stdin.write("\n")
        builder.stdin.flush()
        assert builder.stdout.readline().strip() == "released"  # its own release found its lock
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0 and f"stale: [{str(dead)!r}]" in out, out + err  # the other op still held
    finally:
        builder.kill()
        builder.wait()


def test_comm_buffers_no_process_maps_are_swept_and_live_or_fresh_ones_kept(monkeypatch, tmp_path):
    import mmap

    import jit_ops

    monkeypatch.setattr(jit_ops, "SHM", tmp_path)
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1234_"
    stale, live, fresh, other = (tmp_path / f"{name}0", tmp_path / f"{name}1", tmp_path / f"{name}2",
                                 tmp_path / "deepspeed_allreduce_buffer_99999_127.0.0.1_1234_0")
    for p in (stale, live, fresh, other):
        p.write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    for p in (stale, live, other):
        os.utime(p, (old, old))
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096) as held:  # a run still using it
        assert jit_ops.sweep_comm_buffers(lambda m: None) == 1
        held[0] = 1
    assert not stale.exists() and live.exists() and fresh.exists() and other.exists()


def test_a_rank_releases_its_comm_buffer_name(monkeypatch, tmp_path):
    import jit_ops

    monkeypatch.setattr(jit_ops, "SHM", tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("RANK", "1")
    mine, peer = (tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29555_{r}" for r in (1, 0))
    mine.write_bytes(b"x"), peer.write_bytes(b"x")
    jit_ops.release_comm_buffers()
    assert not mine.exists() and peer.exists()


def _caused(outer: Exception, inner: Exception) -> Exception:
    outer.__cause__ = inner
    return outer


DISK_FULL = {
    "ENOSPC": (OSError(28, "No space left on device", "/w/f"), "writing /w/f"),
    "EDQUOT": (OSError(122, "Disk quota exceeded", "/w/q"), "writing /w/q"),
    "a copy's shutil.Error": (__import__("shutil").Error(
        [("/w/a", "/o/a.tmp/b", "[Errno 28] No space left on device: '/w/a' -> '/o/a.tmp/b'")]), "writing /o/a.tmp/b"),
    "a library error caused by it": (_caused(RuntimeError("could not save"), OSError(28, "No space left on device", "/w/c")),
                                     "writing /w/c"),
    "safetensors' message": (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })'), "writing a file"),
}


@pytest.mark.parametrize("error,where", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_is_recognised_however_it_is_raised(error, where, capsys):
    from errors import disk_full, failure_exit

    assert where in disk_full(error)
    assert failure_exit(error) == 1
    err = capsys.readouterr().err
    assert err.startswith("Disk full:") and "Fix: free space" in err and "Traceback" not in err


def test_a_full_disk_in_a_background_thread_is_one_line_not_a_traceback(monkeypatch, capsys):
    import threading

    from errors import quiet_disk_full_in_threads

    passed_on = []
    monkeypatch.setattr(threading, "excepthook", passed_on.append)  # the hook before ours; restored after the test

    def fail(error):
        raise error

    quiet_disk_full_in_threads()
    for error in (OSError(28, "No space left on device", "/w/runs/events"), ValueError("a bug")):
        t = threading.Thread(target=fail, args=(error,), name="writer")
        t.start()
        t.join()
    err = capsys.readouterr().err
    assert "Disk full in the background (writer): No space left on device writing /w/runs/events" in err
    assert "Traceback" not in err
    assert [str(a.exc_value) for a in passed_on] == ["a bug"]  # any other failure keeps its usual report


def test_other_errors_are_not_a_full_disk():
    from errors import disk_full

    assert disk_full(OSError(13, "Permission denied", "/x")) is None and disk_full(ValueError("28 files")) is None


# --- secrets ------------------------------------------------------------------------------------------------


def test_the_mask_hides_registered_secrets_and_anything_shaped_like_a_token(monkeypatch):
    import redact

    monkeypatch.setattr(redact, "_SECRETS", set())
    redact.add("my-own-secret-123 \n")
    out = io.StringIO()
    stream = redact.MaskedStream(out)
    stream.write("a my-own-secret-123 \n b my-own-secret-123 c hf_abcdefghijklmnopqrstuvwxyz0123 d hf_short\n")
    text = out.getvalue()
    assert "my-own-secret" not in text and "hf_abcdefghij" not in text
    assert text.count("***") == 3 and "hf_short" in text  # too short to be a token: left alone


@pytest.mark.parametrize("raw", [TOKEN + "\n", " " + TOKEN + " ", TOKEN + "\r\n", "\t" + TOKEN])
def test_a_token_with_surrounding_whitespace_is_the_token(raw):
    s = load_settings({"HF_TOKEN": raw, "OUTPUT_REPO": "alice/llama"})
    assert s.hf_token.get_secret_value() == TOKEN


@pytest.mark.parametrize("raw", [TOKEN[:10] + " " + TOKEN[10:], TOKEN[:10] + "\n" + TOKEN[10:], TOKEN[:10] + "\x07" + TOKEN[10:]])
def test_a_token_with_whitespace_inside_is_refused_without_showing_it(raw):
    with pytest.raises(SettingsError) as e:
        load_settings({"HF_TOKEN": raw, "OUTPUT_REPO": "alice/llama"})
    assert "HF_TOKEN=***" in str(e.value) and TOKEN[:10] not in str(e.value)


CONFIG_FILES = {
    "yaml syntax error on the token line": ("c.yaml", "OUTPUT_REPO: alice/llama\nHF_TOKEN: {secret}: oops\n  bad: [\n"),
    "yaml tab before the token": ("c.yaml", "OUTPUT_REPO: alice/llama\n\tHF_TOKEN: {secret}\n"),
    "toml error on the token line": ("c.toml", 'OUTPUT_REPO = "alice/llama"\nHF_TOKEN = {secret}\n'),
    "yaml unknown key holding the token": ("c.yaml", "HF_TOKN: {secret}\n"),
}


@pytest.mark.parametrize("name,content", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_a_broken_config_file_never_shows_the_token(tmp_path, name, content):
    secret = "sekret-NotShapedLikeAToken-42"  # no hf_ prefix: masked because it is the HF_TOKEN value
    f = tmp_path / name
    f.write_text(content.format(secret=secret))
    env = {**make_env(tmp_path), "CONFIG_FILE": str(f)}
    for cmd in (py("config.py"), py("preflight.py"), py("publish.py", "plan")):
        p = run(cmd, env, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert secret not in p.stdout + p.stderr and "CONFIG_FILE" in p.stdout + p.stderr


def test_a_token_in_the_wrong_variable_is_masked_in_every_entry_point(tmp_path):
    env = make_env(tmp_path)
    env.update({"INPUT_DATASET": TOKEN, "OUTPUT_REPO": f"./{TOKEN}/x", "INIT": TOKEN})
    for cmd in (py("config.py"), py("preflight.py"), py("publish.py", "plan"), py("prep.py")):
        p = run(cmd, env, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert TOKEN not in p.stdout + p.stderr and "***" in p.stdout + p.stderr


def test_a_token_with_a_newline_reaches_the_hub_stripped_and_is_never_printed(tmp_path):
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        env = make_env(tmp_path)
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN + "\n",
                    "OUTPUT_REPO": "alice/llama", "HUB_RETRY_WAIT": "0.01"})
        p = run(py("preflight.py"), env, timeout=120)
        text = p.stdout + p.stderr
        assert p.returncode == 0, text
        assert "[ok] output: writable: Hub repos alice/llama" in text and TOKEN not in text and "Illegal header" not in text
    finally:
        hub.stop()


# --- end to end: signals, a second run, a damaged model ------------------------------------------------------


_start, _wait_for, _finish = start_trainer, wait_for, finish


@pytest.mark.slow
def test_a_second_sigterm_does_not_cut_the_checkpoint_and_a_damaged_one_is_caught_before_work(env):
    """SIGTERM, then SIGTERM again 0.3 s later (docker stop and an impatient user): the second is
    absorbed, the checkpoint is published, exit 3. Then the published checkpoint is damaged: the
    next run stops in seconds with exit 2, naming the part and the fix."""
    long = {**env, "SHARD_STEPS": "100000", "EPOCHS": "50"}
    proc = _start(long)
    _wait_for(proc, "validation loss before training")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 3, out[-4000:]
    assert "TERM again: a stop is already under way" in out and "published checkpoint: pretrain shard 0" in out
    target = Path(env["OUTPUT_REPO"])
    state = json.loads((target / "training_state.json").read_text())
    step = state["resume"]["step"]
    assert step > 0 and (target / "last-checkpoint" / f"global_step{step}").is_dir()

    (target / "last-checkpoint" / "latest").write_text("global_st")
    before = (target / "training_state.json").read_bytes()
    p = run(["./trainer.sh"], long, timeout=300)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "last-checkpoint: the checkpoint to resume from is damaged: latest names 'global_st'" in p.stdout
    assert "=== prep" not in p.stdout and (target / "training_state.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["=== prep", "=== train"])
def test_a_stop_before_the_first_step_publishes_nothing(env, phase):
    proc = _start({**env, "SHARD_STEPS": "100000"})
    _wait_for(proc, phase)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 3, out[-4000:]
    assert "nothing of this run was published" in out or "before the first training step" in out
    assert not Path(env["OUTPUT_REPO"]).exists() and "=== publish" not in out


def _alive_in(work: str) -> list[str]:
    """Processes whose environment names this run's WORK_DIR (they would hold its lock)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and work.encode() in (p / "environ").read_bytes():
                found.append((p / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace"))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_a_run_killed_with_sigkill_during_training_leaves_no_process(env):
    """kill -9 of trainer.sh's group: the deepspeed launcher's per-node child is not in it and does
    not die with the runner; the ranks see their launcher orphaned and end it and themselves."""
    proc = _start({**env, "SHARD_STEPS": "100000"})
    _wait_for(proc, "training every weight")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while _alive_in(env["WORK_DIR"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive_in(env["WORK_DIR"])


@pytest.mark.slow
def test_a_second_run_on_the_same_output_stops_and_a_nan_model_is_never_trained_on(env):
    """Two trainer.sh a second apart: the second says who holds the output and exits 1; the first
    publishes shard 0 once. Then the published weights are overwritten with garbage under an intact
    header: the next run is bad input (exit 2) and changes nothing."""
    env = {**env, "MAX_RUNS": "1"}
    first = _start(env)
    _wait_for(first, "=== preflight")
    time.sleep(1)
    second = run(["./trainer.sh"], env, timeout=120)
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"in use by another run: pid {first.pid} on " in second.stderr and "=== preflight" not in second.stdout
    rc, out = _finish(first)
    assert rc == 0, out[-4000:]
    target = Path(env["OUTPUT_REPO"])
    state = json.loads((target / "training_state.json").read_text())
    assert [(h["stage"], h["shard"]) for h in state["history"]] == [("pretrain", 0)]

    f = target / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)
    f.write_bytes(bytes(data))
    before = (target / "training_state.json").read_bytes()
    p = run(["./trainer.sh"], env, timeout=300)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "hold NaN or infinity" in p.stderr and "=== train" not in p.stdout
    assert (target / "training_state.json").read_bytes() == before


@pytest.mark.slow
def test_a_publish_over_an_output_that_changed_since_the_run_started_is_refused(env, tmp_path):
    """Two runs that planned from the same published state (the lock bypassed, as two machines on
    one Hub repo would): the first publishes, the second is refused (exit 1) and the output keeps
    the first's publish."""
    import shutil

    for cmd in (py("prep.py"), ["deepspeed", "--log_level", "error", "--num_gpus", "1", "--master_port",
                                str(29600 + os.getpid() % 300), "train.py"]):
        run(cmd, env, timeout=600, check=True)
    twin = tmp_path / "work-twin"
    shutil.copytree(env["WORK_DIR"], twin)
    first = run(py("publish.py", "publish"), env, timeout=120, check=True)
    assert "published: pretrain shard 0" in first.stdout
    target = Path(env["OUTPUT_REPO"])
    published = (target / "training_state.json").read_bytes()
    second = run(py("publish.py", "publish"), {**env, "WORK_DIR": str(twin)}, timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "publish refused" in second.stderr and "another run published there" in second.stderr
    assert (target / "training_state.json").read_bytes() == published


def test_preflight_calls_a_hub_that_does_not_answer_an_outage_not_bad_input(tmp_path):
    hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
    try:
        _record_repo(hub)
        hub.fail("GET", r"^/api/models/alice/llama(-it)?(/revision/[^/]+)?$", kind="drop", times=10**6)
        env = make_env(tmp_path)
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "OUTPUT_REPO": "alice/llama",
                    "HUB_RETRY_WAIT": "0.01", "HUB_RETRIES": "1", "HUB_TIMEOUT": "2"})
        p = run(py("preflight.py"), env, timeout=180)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "[FAIL] run state: the Hub did not answer" in p.stdout and "fresh weights" not in p.stdout
    finally:
        hub.stop()


def test_a_chat_template_that_fails_is_bad_input():
    from transformers import PreTrainedTokenizerFast

    from prep import tokenize_chats
    from tokenizer import train_tokenizer

    tok = train_tokenizer(["hello there, how are you"] * 50, 300, 64)
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"
    with pytest.raises(BadInput, match="chat template cannot render the chats"):
        tokenize_chats(tok, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]], 64)
