"""Publishing to the Hub and driving a Space, against the loopback Hub (tests/hub_double.py) through
the real huggingface_hub client: the pipeline to done in a Space, permissions checked before any
training, faults retried or reported, a publish killed with SIGKILL losing nothing, the token
nowhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_env, run
from hub_double import HubDouble

WRITE = "hf_writeTokenForTheTests0123456789"
READ = "hf_readOnlyTokenForTheTests012345"


@pytest.fixture
def hub():
    h = HubDouble({WRITE: {"name": "alice", "role": "write", "orgs": ["team"]},
                   READ: {"name": "alice", "role": "read"}}, spaces=["alice/trainer"]).start()
    yield h
    h.stop()


def hub_env(tmp: Path, hub: HubDouble) -> dict[str, str]:
    env = make_env(tmp)
    env.pop("HF_HUB_OFFLINE")
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": WRITE, "OUTPUT_REPO": "alice/llama",
                "HUB_RETRY_WAIT": "0.05", "HUB_TIMEOUT": "5",
                # These tests play the platform: each start must end (a real Space restarts or pauses
                # the container itself), so the page does not stay up after the run.
                "KEEP_SERVING": "false"})
    return env


def _load_and_chat(env: dict[str, str], repo: str) -> dict:
    """from_pretrained through the client, in a process whose HF_ENDPOINT is the double."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({repo!r})
model = AutoModelForCausalLM.from_pretrained({repo!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "What is 2 + 3?"}}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({{"dtype": str(model.dtype), "quantized": hasattr(model.config, "quantization_config"),
                   "new_tokens": int(out.shape[1] - ids.shape[1])}}))
"""
    p = run([sys.executable, "-c", code], env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_space_runs_the_pipeline_to_done_and_pauses(hub, tmp_path):
    """Each container start is one run; the variables progress run by run, never ahead of the
    record; the Space pauses at the end; both repos load; the token is written nowhere."""
    env = hub_env(tmp_path, hub)
    env["SPACE_ID"] = "alice/trainer"
    space, logs, starts = hub.spaces["alice/trainer"], [], 0
    while space.stage != "PAUSED":
        starts += 1
        assert starts <= 5, space.events
        start_env = {**env, **{k: v["value"] for k, v in space.variables.items()}}
        p = run(["./trainer.sh"], start_env, timeout=900)
        logs.append(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert starts == 3
    assert space.events == ["set INIT=1", "set INST=false", "set INIT=0", "set INST=true", "pause"]
    titles = hub.commits("alice/llama")
    assert len(titles) == 2 and titles[0].startswith("pretrain shard 0:") and titles[1].startswith("pretrain shard 1:")
    assert len(hub.commits("alice/llama-it")) == 1
    record = json.loads(hub.repos["alice/llama-it"].files["training_state.json"])
    assert record["done"] and [(h["stage"], h["shard"]) for h in record["history"]] == [
        ("pretrain", 0), ("pretrain", 1), ("instruct", 0)]
    assert hub.repos["alice/llama"].private and hub.repos["alice/llama-it"].private
    files = set(hub.repos["alice/llama-it"].files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training_state.json"} <= files
    assert not any(f.startswith("last-checkpoint/") for f in files)
    # runs/: a folder of TensorBoard traces per run of the pipeline, the pretraining runs carried into the instruct repo
    for repo, expect in (("alice/llama", ["1-pretrain-shard000", "1-pretrain-shard001"]),
                         ("alice/llama-it", ["1-pretrain-shard000", "1-pretrain-shard001", "2-instruct-shard000"])):
        runs = sorted({f.split("/")[1].split("-from-")[0] for f in hub.repos[repo].files if f.count("/") >= 2 and f.startswith("runs/")})
        assert runs == expect, (repo, sorted(hub.repos[repo].files))
    for repo in ("alice/llama", "alice/llama-it"):
        loaded = _load_and_chat({**env, "HF_HOME": str(tmp_path / "reader")}, repo)
        # the run's storage dtype: bf16 where the run trained in bf16, fp32 on a CPU without bf16 units
        dtype = "torch.bfloat16" if record["history"][-1]["precision"] == "bf16" else "torch.float32"
        assert loaded == {"dtype": dtype, "quantized": False, "new_tokens": loaded["new_tokens"]}
    # The token: in no log line, no published file, no file of the work directory.
    assert not any(WRITE in log for log in logs)
    assert not any(WRITE.encode() in b for r in hub.repos.values() for b in r.files.values())
    assert not any(WRITE.encode() in b for b in hub.lfs.values())
    for f in Path(env["WORK_DIR"]).rglob("*"):
        if f.is_file():
            assert WRITE.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_the_record_wins_when_the_space_variables_are_behind(hub, tmp_path):
    """A publish that landed before the variable update (cut by the restart it triggered): the
    next start finds INIT behind the record and follows the record."""
    env = hub_env(tmp_path, hub)
    env.update({"SPACE_ID": "alice/trainer", "MAX_RUNS": "1"})
    assert run(["./trainer.sh"], env, timeout=600).returncode == 0
    assert hub.spaces["alice/trainer"].variables["INIT"]["value"] == "1"
    # The variables as they were before that run: INIT=0 (behind the record, which says shard 1).
    p = run(["python3", "publish.py", "plan"], {**env, "INIT": "0", "INST": "false"}, timeout=120)
    assert p.returncode == 0 and "pretrain shard 1 from alice/llama" in p.stdout, p.stdout + p.stderr
    # Outside a Space an explicit INIT still overrides the record.
    local = {k: v for k, v in env.items() if k != "SPACE_ID"}
    p = run(["python3", "publish.py", "plan"], {**local, "INIT": "0", "INST": "false"}, timeout=120)
    assert "pretrain shard 0 from fresh weights" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("token, owner, expect", [
    (READ, "alice", "read-only token"),
    ("hf_notAToken", "alice", "HF_TOKEN is not valid"),
    (WRITE, "someone-else", "cannot create repos under 'someone-else'"),
])
def test_a_token_that_cannot_publish_stops_the_run_before_training(hub, tmp_path, token, owner, expect):
    env = hub_env(tmp_path, hub)
    env.update({"HF_TOKEN": token, "OUTPUT_REPO": f"{owner}/llama"})
    p = run(["./trainer.sh"], env, timeout=300)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert expect in p.stdout and "[FAIL] output" in p.stdout
    assert "=== prep" not in p.stdout and not Path(env["WORK_DIR"]).exists()
    assert token not in p.stdout + p.stderr


@pytest.mark.slow
def test_sigkill_during_a_hub_publish_leaves_the_published_state_loadable(hub, tmp_path):
    """Shard 0 published; shard 1's publish killed with SIGKILL while its commit is in flight: the
    repo still holds shard 0 (loadable, its record), and the rerun publishes shard 1 once."""
    env = hub_env(tmp_path, hub)
    env["MAX_RUNS"] = "1"
    assert run(["./trainer.sh"], env, timeout=600).returncode == 0
    before = dict(hub.repos["alice/llama"].files)
    for cmd in (["python3", "prep.py"], ["deepspeed", "--log_level", "error", "--num_gpus", "1", "--master_port",
                                          str(29800 + os.getpid() % 100), "train.py"]):
        p = run(cmd, env, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    stall = hub.fail("POST", r"/commit/", kind="delay", seconds=30)
    proc = subprocess.Popen(["python3", "publish.py", "publish"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 120
    while stall.fired == 0 and time.monotonic() < end:
        time.sleep(0.1)
    assert stall.fired == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert hub.repos["alice/llama"].files == before
    assert json.loads(before["training_state.json"])["next"] == {"inst": False, "init": 1}
    _load_and_chat({**env, "HF_HOME": str(tmp_path / "reader")}, "alice/llama")
    hub.clear_faults()
    p = run(["python3", "publish.py", "publish"], env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(hub.commits("alice/llama")) == 2
    assert json.loads(hub.repos["alice/llama"].files["training_state.json"])["next"] == {"inst": True, "init": 0}


@pytest.mark.slow
def test_a_shard_stopped_on_the_hub_resumes_from_its_published_checkpoint(hub, tmp_path):
    """Out of time mid-shard in a Space: the checkpoint is committed beside the published model, the
    Space restarted; the next start resumes it, and the commit that finishes the shard deletes it."""
    env = hub_env(tmp_path, hub)
    env.update({"SPACE_ID": "alice/trainer"})
    assert run(["./trainer.sh"], env, timeout=600).returncode == 0  # shard 0
    space = hub.spaces["alice/trainer"]
    variables = {k: v["value"] for k, v in space.variables.items()}
    model = hub.repos["alice/llama"].files["model.safetensors"]
    p = run(["./trainer.sh"], {**env, **variables, "TIME_BUDGET": "1s"}, timeout=600)
    assert p.returncode == 0 and "stopped by the time budget at step 1 of 6" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    files = hub.repos["alice/llama"].files
    assert "last-checkpoint/trainer_state.json" in files and files["model.safetensors"] == model
    assert json.loads(files["training_state.json"])["resume"]["step"] == 1
    assert space.events[-1] == "restart" and {k: v["value"] for k, v in space.variables.items()} == variables
    p = run(["./trainer.sh"], {**env, **variables}, timeout=600)
    assert p.returncode == 0 and "resuming at step 1 of this shard" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    files = hub.repos["alice/llama"].files
    assert not any(f.startswith("last-checkpoint/") for f in files) and files["model.safetensors"] != model
    record = json.loads(files["training_state.json"])
    assert "resume" not in record and record["history"][-1]["steps"] == 6 and record["history"][-1]["interruptions"] == 1
    assert space.variables["INST"]["value"] == "true"


@pytest.mark.slow
def test_periodic_checkpoints_are_commits_a_failed_one_is_retried_later_and_the_shard_still_publishes(hub, tmp_path):
    """SAVE_INTERVAL on the Hub: each periodic checkpoint is one commit made while training goes on;
    one that fails for good is logged and the next one goes through; the publish that finishes the
    shard builds on the last of them (no conflict with the run's own commits) and removes the checkpoint."""
    env = hub_env(tmp_path, hub)
    env = {k: v for k, v in env.items() if k != "SHARD_STEPS"} | {
        "EPOCHS": "3", "SAVE_INTERVAL": "0.05", "MAX_RUNS": "1", "HUB_RETRIES": "1"}
    hub.fail("POST", r"/commit/", status=503, times=2)  # the first checkpoint's commit and its one retry
    p = run(["./trainer.sh"], env, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "not published (" in p.stdout and "training goes on and the next checkpoint tries again" in p.stdout
    titles = hub.commits("alice/llama")
    periodic = [t for t in titles if ": checkpoint at step" in t]
    assert periodic and titles[-1].startswith("pretrain shard 0: validation loss"), titles
    files = hub.repos["alice/llama"].files
    assert not any(f.startswith("last-checkpoint/") for f in files)
    record = json.loads(files["training_state.json"])
    assert record["next"] == {"inst": False, "init": 1} and "resume" not in record


@pytest.mark.slow
def test_a_read_that_stalls_past_hub_timeout_fails_even_with_no_cached_copy(hub, tmp_path):
    """With no cached copy, the client retries a timed-out metadata request itself with a fixed
    60 s timeout; HUB_TIMEOUT holds there too: a read stalled past it is a Hub that did not answer
    (retried by HUB_RETRIES, then HubError), not a wait of a minute per attempt. (Without the rule
    this read waits out the 3 s stall and succeeds.)"""
    sha = hub.seed("alice/llama", {"training_state.json": b"{}"})
    env = {**hub_env(tmp_path, hub), "HUB_TIMEOUT": "1", "HUB_RETRIES": "0"}
    head = hub.fail("HEAD", r"/resolve/.*training_state", kind="delay", seconds=3, times=10**6)
    hub.fail("GET", r"/resolve/.*training_state", kind="delay", seconds=3, times=10**6)
    code = ("from config import load_settings; from hub import Hub, HubError\n"
            "try:\n"
            f"    Hub(load_settings()).read_text('alice/llama', 'training_state.json', revision={sha!r}); print('read')\n"
            "except HubError:\n"
            "    print('HubError')\n")
    p = run([sys.executable, "-c", code], env, timeout=300)
    assert p.stdout.strip().splitlines()[-1] == "HubError", p.stdout + p.stderr
    assert head.fired >= 1


def test_each_settings_object_has_its_own_client_for_its_whole_life():
    """The client is kept by the settings object: the same object gets the same client (its retry
    counts with it); when the settings are gone, so is their client and the token it holds, and
    settings built later (in memory the earlier ones may have freed) get a client of their own."""
    import gc
    import weakref

    import hub as hub_module
    from config import load_settings

    base = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    first = load_settings({**base, "HF_TOKEN": "hf_firstTokenOfTheTests0123456789ab"})
    client = hub_module.hub(first)
    assert hub_module.hub(first) is client and hub_module.retries_made(first) == {}
    client.retries["model_info"] = 2
    assert hub_module.retries_made(first) == {"model_info": 2}
    gone = weakref.ref(client)
    del first, client
    gc.collect()
    assert gone() is None
    for i in range(20):
        token = f"hf_laterTokenOfTheTests{i:02d}0123456789ab"
        later = load_settings({**base, "HF_TOKEN": token})
        assert hub_module.retries_made(later) == {} and hub_module.hub(later).token == token
        del later
        gc.collect()
