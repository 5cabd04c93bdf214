"""The Space as a user meets it: the README is a valid Space config, the status page answers from
the first second with what the run is doing (and why it failed), a Space never publishes to its own
disk, and a root-owned mounted output is a clear exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, finish, free_port, make_env, py, run, start_trainer, wait_for
from hub_double import HubDouble

from config import Settings, parse_duration_s

ARTIFACTS = ROOT / "tests" / "artifacts"
STATUS_KEYS = {"state", "phase", "run", "stage", "shard", "shards_total", "step", "max_steps", "tokens", "tokens_per_s",
               "loss", "learning_rate", "elapsed_s", "shard_elapsed_s", "shard_eta_s", "pipeline_eta_s", "train_curve",
               "val_curve", "history", "last_publish", "next_run", "failure", "events"}


# --- the Space config ------------------------------------------------------------------------------------


def test_the_readme_is_a_valid_docker_space_config():
    from huggingface_hub import RepoCard

    card = RepoCard.load(ROOT / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "docker" and data["app_port"] == 7860 == Settings.model_fields["port"].default
    assert data["title"] and data["emoji"] and 0 < len(data["short_description"]) <= 60
    assert isinstance(data["tags"], list) and "llama" in data["tags"]
    # The platform's start-up limit and the run's own clock agree by default.
    assert parse_duration_s(data["startup_duration_timeout"]) == parse_duration_s(
        Settings.model_fields["startup_duration_timeout"].default)
    assert card.text.lstrip().startswith("# train-llama")


def test_a_space_refuses_a_local_output(tmp_path):
    """A Space's disk is wiped at every restart: a local OUTPUT_REPO is bad input there."""
    token = "hf_spaceTestToken0123456789abcdef"
    hub = HubDouble({token: {"name": "alice", "role": "write"}}, spaces=["alice/trainer"]).start()
    try:
        env = make_env(tmp_path)
        env.pop("HF_HUB_OFFLINE")
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token, "SPACE_ID": "alice/trainer"})
        p = run(py("preflight.py"), env, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "OUTPUT_REPO=" in p.stdout and "whose disk is wiped at every restart" in p.stdout
        assert "Fix: set the variable OUTPUT_REPO to a Hub model repo id" in p.stdout
        assert not hub.repos and not hub.spaces["alice/trainer"].events
    finally:
        hub.stop()


# --- the status page: the feed folded ------------------------------------------------------------------------


def test_the_status_folds_the_events_of_a_run():
    from status_page import fold

    t = 1000.0
    events = [
        {"t": t, "kind": "start"},
        {"t": t + 1, "kind": "phase", "name": "preflight"},
        {"t": t + 3, "kind": "phase_end", "name": "preflight", "rc": 0},
        {"t": t + 4, "kind": "run", "run": 1},
        {"t": t + 5, "kind": "history", "history": [{"stage": "pretrain", "shard": 0, "steps": 6}]},
        {"t": t + 6, "kind": "plan", "stage": "pretrain", "shard": 1, "shards_total": 4},
        {"t": t + 8, "kind": "phase", "name": "train"},
        {"t": t + 9, "kind": "eval", "tokens": 0, "loss": 7.0},
        {"t": t + 10, "kind": "train_begin", "step": 0, "max_steps": 100},
        {"t": t + 20, "kind": "log", "step": 10, "max_steps": 100, "tokens": 5000, "loss": 6.0, "tokens_per_s": 500},
        {"t": t + 30, "kind": "log", "step": 20, "max_steps": 100, "tokens": 10000, "loss": 5.0, "tokens_per_s": 500},
    ]
    st = fold(events, now=t + 30)
    assert set(st) >= STATUS_KEYS
    assert (st["state"], st["phase"], st["run"], st["stage"], st["shard"], st["shards_total"]) == (
        "running", "train", 1, "pretrain", 1, 4)
    assert st["train_curve"] == [[5000, 6.0], [10000, 5.0]] and st["val_curve"] == [[0, 7.0]]
    assert st["elapsed_s"] == 30 and st["shard_elapsed_s"] == 20
    assert st["shard_eta_s"] == 80  # 20 s for 20 steps: 80 steps left at 1 s each
    assert st["pipeline_eta_s"] == 80 + 2 * 100  # two more shards of this stage at the same pace
    assert st["history"][0]["shard"] == 0 and st["failure"] is None


def test_a_failure_shows_its_message_and_wins_over_a_later_phase_end():
    from status_page import fold

    msg = "Bad input:\n  INIT=9: only 2 shard(s). Fix: a smaller INIT"
    st = fold([{"t": 1, "kind": "start"}, {"t": 2, "kind": "phase", "name": "preflight"},
               {"t": 3, "kind": "failure", "phase": "preflight", "message": msg},
               {"t": 4, "kind": "phase_end", "name": "preflight", "rc": 2}, {"t": 5, "kind": "end", "state": "failed"}])
    assert st["state"] == "failed" and st["failure"] == {"phase": "preflight", "message": msg}
    # A phase that died without a message (a traceback) still shows as the failure.
    st = fold([{"t": 1, "kind": "phase", "name": "train"}, {"t": 2, "kind": "phase_end", "name": "train", "rc": 1}])
    assert st["state"] == "failed" and "train failed with exit code 1" in st["failure"]["message"]
    # A stop by a signal is not a failure.
    st = fold([{"t": 1, "kind": "phase", "name": "prep"}, {"t": 2, "kind": "phase_end", "name": "prep", "rc": 143,
                                                           "stopped": True}, {"t": 3, "kind": "end", "state": "stopped"}])
    assert st["state"] == "stopped" and st["failure"] is None


def test_events_are_masked_before_they_are_written(tmp_path, monkeypatch):
    import redact
    import status_page

    monkeypatch.setattr(redact, "_SECRETS", {"my-secret-value-1234"})
    status_page.emit("failure", str(tmp_path), message="HF_TOKEN my-secret-value-1234 or hf_abcdefghijklmnopqrstuvwx1")
    text = (tmp_path / "events.jsonl").read_text()
    assert "my-secret" not in text and "hf_abcdefghij" not in text and text.count("***") == 2


# --- the status page: served -------------------------------------------------------------------------------


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_up(url: str, timeout: float = 30) -> float:
    t0, end = time.perf_counter(), time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _get(url)
            return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise AssertionError(f"{url} never answered")


def test_the_page_is_self_contained_read_only_and_serves_the_schema(tmp_path):
    port = free_port()
    proc = subprocess.Popen(py("status_page.py", "serve", "--port", str(port), "--dir", str(tmp_path)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(base + "/status.json")
        code, html = _get(base + "/")
        assert code == 200 and b"<svg" in html and b"status.json" in html
        assert b"http://" not in html.replace(b"http://www.w3.org/2000/svg", b"") and b"https://" not in html  # no CDN
        code, body = _get(base + "/status.json")
        st = json.loads(body)
        assert code == 200 and set(st) >= STATUS_KEYS and st["state"] == "starting"
        for method in ("POST", "PUT", "DELETE"):
            assert _get(base + "/status.json", method)[0] == 405
        assert _get(base + "/anything-else")[0] == 404
    finally:
        proc.kill()
        proc.wait()


def test_a_preflight_failure_is_on_the_page_with_its_fix_and_the_page_stays_up(tmp_path):
    env = make_env(tmp_path)
    env.update({"INIT": "9", "KEEP_SERVING": "true"})
    url = f"http://127.0.0.1:{env['PORT']}/status.json"
    proc = start_trainer(env)
    try:
        first = _wait_up(url)
        out = wait_for(proc, "status page stays up")
        st = json.loads(_get(url)[1])
        assert st["state"] == "failed" and st["failure"]["phase"] == "preflight"
        msg = st["failure"]["message"]
        assert "INIT" in msg and "Fix:" in msg
        for line in msg.splitlines():  # exactly as the log says it
            assert line.strip().lstrip("- ") in out, line
        assert proc.poll() is None  # still serving after the failure
        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(timeout=30) == 2
    finally:
        finish(proc, 10)
    print(f"first answer {first:.2f} s after the start")


# --- the page in a browser, during a real run and after it -----------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: `make setup` installs it (apt-get install chromium)"
    return path


def _browse(url: str, screenshot: Path | None = None) -> str:
    """The DOM after the page's script ran (and a screenshot), from headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                "--virtual-time-budget=4000", "--window-size=1100,1300"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
        p = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
def test_the_page_in_a_browser_during_training_and_after_the_run(tmp_path):
    env = make_env(tmp_path)
    env.update({"SHARD_STEPS": "60", "EPOCHS": "3", "MAX_RUNS": "1", "KEEP_SERVING": "true"})
    url = f"http://127.0.0.1:{env['PORT']}/"
    proc = start_trainer(env)
    try:
        wait_for(proc, "validation loss before training")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until a few losses are logged
            st = json.loads(_get(url + "status.json")[1])
            if len(st["train_curve"]) >= 8:
                break
            time.sleep(0.5)
        dom = _browse(url, ARTIFACTS / "status-page-training.png")
        assert "running" in dom and "pretrain shard 1 of 2" in dom and "step " in dom
        assert 'id="train-loss"' in dom and 'id="val-loss"' in dom  # the plot, drawn by the page itself
        wait_for(proc, "status page stays up")
        dom = _browse(url, ARTIFACTS / "status-page-after.png")
        assert "stopped" in dom and "Finished runs" in dom
        assert "<td>pretrain</td><td>0</td>" in dom.replace("\n", "")  # the history table
        assert "Last publish:" in dom and env["OUTPUT_REPO"] in dom and "pretrain shard 0 (1 of 2)" in dom
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        finish(proc, 10)
    assert (ARTIFACTS / "status-page-training.png").stat().st_size > 10_000


# --- docker run: a mounted output the container cannot write -------------------------------------------------


def test_a_root_owned_output_is_a_clear_exit_2_for_the_container_user(tmp_path):
    """`docker run -v $PWD/output:...` with no such host folder: Docker creates it owned by root and
    the container's user (uid 1000) cannot write it."""
    base = Path(tempfile.mkdtemp(prefix="uid1000-"))
    try:
        os.chmod(base, 0o755)
        env = make_env(base)
        out = base / "output"
        out.mkdir(mode=0o755)  # root's, as Docker makes it
        for d in (base / "hf", base / "work", base / "data"):
            d.mkdir(exist_ok=True)
            shutil.chown(d, 1000, 1000)
        for f in (base / "data").iterdir():
            shutil.chown(f, 1000, 1000)
        env.update({"OUTPUT_REPO": str(out / "llama"), "HOME": str(base / "hf")})
        p = run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", *py("preflight.py")], env, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"{out}" in p.stdout and "not writable by uid 1000" in p.stdout and "chown" in p.stdout
        assert "--user" in p.stdout and "Traceback" not in p.stdout + p.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
