"""End to end: ./trainer.sh on the tiny default, from an empty output to a published chat model."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_env, record, run, start_trainer, tree_digest, wait_for

pytestmark = pytest.mark.slow
TOKEN = "hf_e2eFakeTokenValue0123456789"


def stored_dtype(run: dict) -> str:
    """The dtype a run publishes its weights in (quant_utils.storage_dtype): bf16 for a bf16 run,
    fp32 otherwise (PRECISION=auto resolves to fp32 on a CPU without bf16 units)."""
    return "bfloat16" if run["precision"] == "bf16" else "float32"


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One full pipeline run to done (2 pretrain shards + 1 instruct shard), shared by the tests below:
    run once per test session; under pytest-xdist the first worker to need it runs it while the others
    wait on a lock, then read what it left."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    tmp, kept = root / "e2e-pipeline", root / "e2e-pipeline.json"
    with open(root / "e2e-pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kept.exists():
            env, rc, out, err = json.loads(kept.read_text())
            return env, subprocess.CompletedProcess(["./trainer.sh"], rc, out, err)
        shutil.rmtree(tmp, ignore_errors=True)  # a failed attempt's
        tmp.mkdir()
        env = make_env(tmp)
        env["HF_TOKEN"] = TOKEN  # set but unused (local output): must still never be written anywhere
        # every tracker: trackio locally, W&B offline (no WANDB_API_KEY), TensorBoard into runs/
        env.update({"REPORT_TO": "tensorboard,trackio,wandb", "TRACKIO_DIR": str(tmp / "trackio")})
        p = run(["./trainer.sh"], env, timeout=900)
        assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-6000:]
        kept.write_text(json.dumps([env, p.returncode, p.stdout, p.stderr]))
        return env, p


def test_runs_to_done_with_state_and_history(done):
    env, p = done
    pre, it = record(env["OUTPUT_REPO"]), record(env["OUTPUT_REPO"] + "-it")
    assert [(h["stage"], h["shard"]) for h in pre["history"]] == [("pretrain", 0), ("pretrain", 1)]
    assert pre["next"] == {"inst": True, "init": 0}
    assert it["done"] and it["next"] is None
    # the full RoPE parameters survive every continued run (Llama-3's base for new models)
    assert pre["architecture"]["rope_parameters"] == it["architecture"]["rope_parameters"] == {
        "rope_type": "default", "rope_theta": 500000.0}
    assert [(h["stage"], h["shard"]) for h in it["history"]] == [("pretrain", 0), ("pretrain", 1), ("instruct", 0)]
    for h in it["history"]:
        assert h["eval_loss"] < h["eval_loss_before"]  # every run learned something on held-out data
        assert h["steps"] == 6 and h["tokens"] > 0
        # SHARD_STEPS=6 is fewer steps than a pass over a shard: what was skipped is on record and in the log
        assert h["shard_steps"] > 6 and h["skipped_steps"] == h["shard_steps"] - 6
        assert f"SHARD_STEPS=6: trained 6 of the {h['shard_steps']} steps" in p.stdout
    assert "=== done ===" in p.stdout and "pipeline is done" in p.stdout


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_runs_holds_the_traces_of_every_run_of_the_pipeline(done):
    env, _ = done
    pre, it = Path(env["OUTPUT_REPO"]) / "runs", Path(env["OUTPUT_REPO"] + "-it") / "runs"
    names = sorted(d.name for d in it.iterdir() if d.is_dir())
    assert [n.split("-from-")[0] for n in names] == ["1-pretrain-shard000", "1-pretrain-shard001", "2-instruct-shard000"]
    assert sorted(d.name for d in pre.iterdir() if d.is_dir()) == names[:2]
    for name in names:
        scalars = _scalars(it / name)
        assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(scalars), (name, sorted(scalars))
        (first_step, before), (last_step, after) = scalars["eval/loss"][0], scalars["eval/loss"][-1]
        assert first_step == 0 and last_step == 6 and after < before
    assert (it / "data_order.json").exists()


def _wandb_records(run_file: Path):
    """The records of an offline W&B run (its .wandb file: a header, then 32 KiB blocks of
    [crc32, length, kind] framed protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_trackers_hold_every_run_of_the_pipeline(done):
    """REPORT_TO=tensorboard,trackio,wandb: trackio (local) and W&B (offline) each hold one run per
    run of the pipeline, named as its runs/ folder, in one project named after the output, with the
    training loss, the validation loss from before the first step to the last, and sample texts."""
    env, p = done
    names = sorted(d.name for d in (Path(env["OUTPUT_REPO"] + "-it") / "runs").iterdir() if d.is_dir())
    # trackio's own reader, in a process of its own: it fixes its directory (TRACKIO_DIR) at import
    read = run([sys.executable, "-c", "import json; from trackio.sqlite_storage import SQLiteStorage as S; print(json.dumps("
                "{r: S.get_logs('llama', r) for p in S.get_projects() for r in S.get_runs(p)}, default=str))"],
               {**os.environ, "TRACKIO_DIR": env["TRACKIO_DIR"]}, check=True)
    trackio_runs = json.loads(read.stdout.strip().splitlines()[-1])
    assert sorted(trackio_runs) == names
    for name, logs in trackio_runs.items():
        evals = [(row["train/global_step"], row["eval/loss"]) for row in logs if "eval/loss" in row]
        assert evals[0][0] == 0 and evals[-1][0] == 6 and evals[-1][1] < evals[0][1], (name, evals)
        assert any("train/loss" in row for row in logs) and any("eval/samples" in row for row in logs)
    wandb_runs = sorted(Path(env["WORK_DIR"], "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 3 and "wandb sync" in p.stdout + p.stderr
    seen = []
    for run_file in wandb_runs:
        records = list(_wandb_records(run_file))
        header = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        seen.append(header.display_name)
        assert header.project == "llama"
        keys = [{"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
        evals = [(json.loads(k["train/global_step"]), json.loads(k["eval/loss"])) for k in keys if "eval/loss" in k]
        assert evals[0][0] == 0 and evals[-1][0] == 6 and evals[-1][1] < evals[0][1], (header.display_name, evals)
        assert any("train/loss" in k for k in keys) and any("eval/samples/_type" in k for k in keys)
    assert sorted(seen) == names


def test_published_models_load_and_chat(done):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    env, _ = done
    for target in (env["OUTPUT_REPO"], env["OUTPUT_REPO"] + "-it"):
        files = {f.name for f in Path(target).iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                "training_state.json", "runs"} <= files
        cfg = json.loads((Path(target) / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["dtype"] == stored_dtype(record(target)["history"][-1])
        model = AutoModelForCausalLM.from_pretrained(target)
        tok = AutoTokenizer.from_pretrained(target)
        assert model.config.vocab_size == len(tok)
        assert list((Path(target) / "runs").rglob("events.out.tfevents*")), "TensorBoard traces missing"
    chat = pipeline("text-generation", model=env["OUTPUT_REPO"] + "-it")
    out = chat([{"role": "user", "content": "What does a baker do?"}], max_new_tokens=12, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    # A few steps of training teach little, so assert that tokens were generated, not what they say.
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    card = (Path(env["OUTPUT_REPO"] + "-it") / "README.md").read_text()
    assert "validation loss" in card.lower() and f'pipeline("text-generation", model="{env["OUTPUT_REPO"]}-it")' in card


def test_token_is_written_nowhere(done):
    env, p = done
    assert TOKEN not in p.stdout and TOKEN not in p.stderr
    for root in (env["OUTPUT_REPO"], env["OUTPUT_REPO"] + "-it", env["WORK_DIR"], env["TRACKIO_DIR"]):
        for f in Path(root).rglob("*"):
            if f.is_file():
                assert TOKEN.encode() not in f.read_bytes(), f


def test_running_again_after_done_changes_nothing(done):
    env, _ = done
    before = [tree_digest(Path(t)) for t in (env["OUTPUT_REPO"], env["OUTPUT_REPO"] + "-it")]
    p = run(["./trainer.sh"], env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pipeline is done" in p.stdout and "=== prep ===" not in p.stdout
    assert [tree_digest(Path(t)) for t in (env["OUTPUT_REPO"], env["OUTPUT_REPO"] + "-it")] == before


def _start(env):
    return start_trainer(env)


_wait_for = wait_for


def _model_digest(out: Path) -> str:
    """The published model (everything but the checkpoint, the record and the per-run trace folders,
    which a stopped run adds to)."""
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        traces = rel.startswith("runs/") and rel.count("/") >= 2
        if p.is_file() and not rel.startswith("last-checkpoint/") and rel != "training_state.json" and not traces:
            h.update(rel.encode() + p.read_bytes())
    return h.hexdigest()


def _interrupt(env: dict[str, str], how: str) -> int:
    proc = _start(env)
    _wait_for(proc, "validation loss before training")
    time.sleep(2)  # well inside the training loop
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)  # preemption: every process at once, no cleanup
    else:
        proc.send_signal(signal.SIGTERM)     # to trainer.sh only: it must pass it on
    try:
        return proc.wait(timeout=120)
    finally:
        proc.stdout.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _first_shard(env: dict[str, str]) -> tuple[Path, str, dict]:
    env["MAX_RUNS"] = "1"
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = Path(env["OUTPUT_REPO"])
    assert record(out)["next"] == {"inst": False, "init": 1}
    return out, tree_digest(out), record(out)


def test_sigkill_mid_training_leaves_the_published_state_intact(env):
    out, before, state_before = _first_shard(env)
    rc = _interrupt({**env, "SHARD_STEPS": "100000"}, "SIGKILL")
    assert rc != 0
    assert tree_digest(out) == before and record(out) == state_before
    assert not Path(env["OUTPUT_REPO"] + "-it").exists()
    # The next run trains the same shard and publishes it.
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert record(out)["next"] == {"inst": True, "init": 0}


def test_sigterm_mid_training_publishes_a_checkpoint_the_next_run_resumes(env):
    out, before, state_before = _first_shard(env)
    model_before = _model_digest(out)
    long = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {"EPOCHS": "4"}
    rc = _interrupt(long, "SIGTERM")
    assert rc == 3
    state = record(out)
    assert state["next"] == state_before["next"] and state["history"] == state_before["history"]
    resume = state["resume"]
    assert resume["stop_reason"] == "a stop signal" and resume["stage"] == "pretrain" and resume["shard"] == 1
    assert 0 < resume["step"] < resume["max_steps"]
    assert (out / "last-checkpoint" / "trainer_state.json").exists()
    assert _model_digest(out) == model_before  # the published model is still the finished shard's
    runs = lambda: sorted(d.name.split("-", 2)[2].rsplit("-", 1)[0] for d in (out / "runs").iterdir() if d.is_dir())  # noqa: E731
    assert runs() == ["shard000-from-step000000", "shard001-from-step000000"]  # the stopped run's traces too
    # The next run resumes that step and finishes the shard; the checkpoint goes with the publish.
    p = run(["./trainer.sh"], long, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resuming at step {resume['step']} of this shard" in p.stdout
    state = record(out)
    assert state["next"] == {"inst": True, "init": 0} and "resume" not in state
    last = state["history"][-1]
    assert last["steps"] == resume["max_steps"] and last["resumed_from_step"] == resume["step"]
    assert not (out / "last-checkpoint").exists()
    assert runs() == ["shard000-from-step000000", "shard001-from-step000000", f"shard001-from-step{resume['step']:06d}"]


def test_max_steps_caps_a_run_and_the_next_run_continues_the_shard(env):
    """MAX_STEPS ends a run, never a shard: the run stops as a budget stop does, and the next run
    trains the rest of the shard; nothing is skipped."""
    env = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {"MAX_STEPS": "3", "MAX_RUNS": "1"}
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = record(env["OUTPUT_REPO"])
    assert state["history"] == [] and state["next"] == {"inst": False, "init": 0}
    resume = state["resume"]
    assert resume["step"] == 3 < resume["max_steps"] and resume["stop_reason"].startswith("MAX_STEPS=3")
    p = run(["./trainer.sh"], {k: v for k, v in env.items() if k != "MAX_STEPS"}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = record(env["OUTPUT_REPO"])
    last = state["history"][-1]
    assert (last["stage"], last["shard"]) == ("pretrain", 0) and "resume" not in state
    assert last["steps"] == resume["max_steps"] and last["resumed_from_step"] == 3 and "skipped_steps" not in last


def test_a_run_killed_without_warning_resumes_from_its_last_periodic_checkpoint(env):
    """SAVE_INTERVAL: checkpoints are published while training goes on; kill -9 after one, and the
    next run resumes from it (not from the start of the shard)."""
    from run_state import validate_checkpoint

    out, _, state_before = _first_shard(env)
    model_before = _model_digest(out)
    long = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {"EPOCHS": "4", "SAVE_INTERVAL": "0.05"}
    proc = _start(long)
    try:
        line = _wait_for(proc, "a run killed from now on resumes there").splitlines()[-1]
        step = int(line.split("periodic checkpoint at step ")[1].split()[0])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.stdout.close()
    state = record(out)
    resume = state["resume"]
    assert resume["step"] >= step and resume["stop_reason"] == "a periodic checkpoint" and resume["interruptions"] == 0
    assert state["history"] == state_before["history"] and _model_digest(out) == model_before
    validate_checkpoint(out / "last-checkpoint", resume["step"], "last-checkpoint")
    p = run(["./trainer.sh"], {**long, "SAVE_INTERVAL": "0"}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resuming at step {resume['step']} of this shard" in p.stdout
    state = record(out)
    last = state["history"][-1]
    assert last["resumed_from_step"] == resume["step"] and last["steps"] == resume["max_steps"] and "resume" not in state


def test_a_shard_that_overfits_stops_early_and_publishes_its_best_evaluation(env):
    """36 documents, many passes, an evaluation every 4 steps: the validation loss turns up, the
    shard ends after EARLY_STOPPING_PATIENCE evaluations without improvement, and the published
    model is the best evaluation's (its validation loss measured again equals the best one)."""
    env = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {
        "SHARD_SIZE": "40", "EPOCHS": "40", "LEARNING_RATE": "3e-3", "WARMUP_RATIO": "0", "EVAL_INTERVAL": "4",
        "EARLY_STOPPING_PATIENCE": "3", "MAX_RUNS": "1"}
    p = run(["./trainer.sh"], env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    h = record(env["OUTPUT_REPO"])["history"][-1]
    losses = [loss for _, loss in h["evals"]]
    assert "early_stopped_at" in h and f"early stopping at step {h['early_stopped_at']}" in p.stdout, h
    assert h["best_eval_loss"] == min(losses) and h["evals"][losses.index(min(losses))][0] == h["best_step"]
    assert all(loss >= h["best_eval_loss"] for loss in losses[-3:])  # the patience ran out
    assert abs(h["eval_loss"] - h["best_eval_loss"]) < 1e-6 < h["last_step_eval_loss"] - h["eval_loss"]
    assert "the published model is the best evaluation's" in p.stdout
    run_dir = next(d for d in (Path(env["OUTPUT_REPO"]) / "runs").iterdir() if d.is_dir())
    assert len(_scalars(run_dir)["eval/loss"]) == len(h["evals"]) + 1  # and the one before training
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion"} <= set(samples[0])


def test_sigkill_while_the_checkpoint_is_saved_loses_nothing(env):
    """SIGTERM, then SIGKILL to every process the moment the trainer says it is saving: whatever
    was published stays loadable and the next run finishes the shard."""
    out, _, state_before = _first_shard(env)
    model_before = _model_digest(out)
    long = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {"EPOCHS": "4"}
    proc = _start(long)
    try:
        _wait_for(proc, "validation loss before training")
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _wait_for(proc, "[train] stopped by")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.stdout.close()
    state = record(out)
    assert _model_digest(out) == model_before and state["history"] == state_before["history"]
    if "resume" in state:  # the checkpoint's publish got through before the kill: then it is whole
        assert (out / "last-checkpoint" / "trainer_state.json").exists()
    p = run(["./trainer.sh"], long, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert record(out)["next"] == {"inst": True, "init": 0} and not (out / "last-checkpoint").exists()


def _comm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def test_two_cpu_ranks_train_and_publish_once(env):
    env.update({"NUM_PROCESSES": "2", "MAX_RUNS": "1"})
    buffers = _comm_buffers()
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert _comm_buffers() <= buffers  # the ranks' shared-memory buffers (~69 MB of RAM each) are not left behind
    assert p.stdout.count("published:") == 1
    rec = record(env["OUTPUT_REPO"])
    assert len(rec["history"]) == 1 and rec["history"][0]["world_size"] == 2
    assert rec["next"] == {"inst": False, "init": 1}
    # Out of time: both ranks stop at the same step; the next run resumes both from the checkpoint.
    p = run(["./trainer.sh"], {**env, "TIME_BUDGET": "1s"}, timeout=600)
    assert p.returncode == 0 and "stopped by the time budget at step 1 of 6" in p.stdout, p.stdout[-4000:] + p.stderr[-3000:]
    rec = record(env["OUTPUT_REPO"])
    assert rec["resume"]["step"] == 1 and rec["next"] == {"inst": False, "init": 1}
    assert len(list((Path(env["OUTPUT_REPO"]) / "last-checkpoint").glob("global_step1/*optim_states.pt"))) == 2
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0 and "resuming at step 1 of this shard" in p.stdout, p.stdout[-4000:] + p.stderr[-3000:]
    last = record(env["OUTPUT_REPO"])["history"][-1]
    assert last["steps"] == 6 and last["world_size"] == 2 and last["interruptions"] == 1


def test_every_conversion_path_between_runs_publishes_plain_floats(env, tmp_path):
    """USE_QUANT switched between consecutive runs: float->NF4, NF4->NF4, NF4->float (float->float is
    the default pipeline above); every published model is plain floats (bf16, or fp32 where the run
    trained in fp32: a CPU without bf16 units) and loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    from conftest import ROOT, head_jsonl

    env["INPUT_DATASET"] = str(head_jsonl(ROOT / "data" / "pretrain.jsonl", tmp_path / "p.jsonl", 160))
    env.update({"SHARD_SIZE": "80", "MAX_RUNS": "1"})
    plan = [("false", "pretrain", 0, "float"), ("true", "pretrain", 1, "nf4"),
            ("true", "instruct", 0, "nf4"), ("false", "instruct", 1, "float")]
    for use_quant, stage, shard, fmt in plan:
        p = run(["./trainer.sh"], {**env, "USE_QUANT": use_quant}, timeout=600)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        target = env["OUTPUT_REPO"] + ("-it" if stage == "instruct" else "")
        last = record(target)["history"][-1]
        assert (last["stage"], last["shard"], last["train_format"]) == (stage, shard, fmt)
        want = stored_dtype(last)
        if fmt == "nf4":
            assert f"converted float ({want}) -> nf4" in p.stdout
            assert last["merge_delta_pct"] <= 0.5 and last["trainable_parameters"] < 1_000_000
        cfg = json.loads((Path(target) / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["dtype"] == want
        assert not list(Path(target).glob("adapter*")) and not (Path(target) / "nf4_scales.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(target)
        assert all(p.dtype == getattr(torch, want) for p in model.parameters())
    assert record(env["OUTPUT_REPO"] + "-it")["done"]


def test_a_packed_instruct_shard_resumed_trains_the_batches_of_one_run(env):
    """Chats packed (PACK_CHATS, the default): an instruct shard cut by MAX_STEPS and resumed trains
    exactly the micro-batches, in the same order, of the same shard trained in one run."""
    from conftest import head_jsonl

    env = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {
        "INPUT_DATASET": str(head_jsonl(Path(env["INPUT_DATASET"]), Path(env["WORK_DIR"]).parent / "pre200.jsonl", 200)),
        "MAX_LENGTH": "128", "MAX_RUNS": "1", "EVAL_INTERVAL": "0"}
    out = Path(env["OUTPUT_REPO"])
    it = out.parent / (out.name + "-it")
    p = run(["./trainer.sh"], env | {"SHARD_STEPS": "2"}, timeout=600)  # the only pretraining shard
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert record(out)["next"] == {"inst": True, "init": 0}

    p = run(["./trainer.sh"], env | {"MAX_STEPS": "3"}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "chats packed:" in p.stdout and record(it)["resume"]["step"] == 3
    manifest = json.loads((Path(env["WORK_DIR"]) / "prepared" / "manifest.json").read_text())
    assert manifest["packed_chats"] and manifest["train_sequences"] < manifest["train_chats"]
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    chain = json.loads((it / "runs" / "data_order.json").read_text())
    last = record(it)["history"][-1]
    assert last["resumed_from_step"] == 3 and "resume" not in record(it)

    it.rename(out.parent / "chain-it")
    p = run(["./trainer.sh"], env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one = json.loads((it / "runs" / "data_order.json").read_text())
    assert len(one) == record(it)["history"][-1]["steps"] > 3
    assert chain == one and last["data_order_sha256"] == record(it)["history"][-1]["data_order_sha256"]
