"""The pipeline against a hostile world: Hub faults, damaged files, concurrent runs, signals, kill -9,
a full disk and secrets in odd places, each run through the real entry points on tiny settings.

    python bench/chaos.py              # every case (about 15 minutes on 2 cores)
    python bench/chaos.py --only sig   # the cases whose name contains "sig"

A case holds when the run ends the way the error policy says (exit code, message with its fix, no
traceback) and what was published before is still there, whole: a publish is complete or absent,
the record never advances on a failure, nothing non-finite is published, the token is printed and
written nowhere, and no process outlives the run. Prints one JSON line: cases, held, failed (the
names of the cases that did not hold) and per case its exit code and seconds (for signals, the time
from the signal to the exit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import finish as conftest_finish, make_env, start_trainer, tree_digest  # noqa: E402
from conftest import wait_for as conftest_wait_for  # noqa: E402
from hub_double import HubDouble  # noqa: E402

TOKEN = "hf_chaosWriteToken0123456789abcdefg"
SECRET = "sekret-NotShapedLikeAToken-42"  # a token value with no hf_ prefix: masked because it is HF_TOKEN


class Case:
    def __init__(self, name: str) -> None:
        self.name, self.problems, self.info = name, [], {}

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


start, wait_for, finish = start_trainer, conftest_wait_for, conftest_finish


LOGS: list[Path] = []  # where each run's output is kept (--logs)


def run(env: dict[str, str], cmd: list[str] | None = None, timeout: float = 300) -> tuple[int, str]:
    return logged(*finish(start(env, cmd), timeout))


def logged(code: int, out: str) -> tuple[int, str]:
    """A run's exit code and output, also written to the --logs directory when there is one."""
    if LOGS:
        log = LOGS[0] / f"{len(list(LOGS[0].iterdir())):03d}.log"
        log.write_text(f"exit {code}\n{out}")
    return code, out


def orphans(work: str) -> list[str]:
    """Processes of this case still alive (they would hold its output's lock)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if work.encode() in (p / "environ").read_bytes():
                    found.append(p.name)
            except OSError:
                pass
    return found


def record(target: Path) -> dict | None:
    p = target / "training_state.json"
    return json.loads(p.read_text()) if p.exists() else None


def whole(target: Path) -> bool:
    """The published output is a complete publish: a record, and the model it names."""
    rec = record(target)
    if rec is None:
        return not target.exists() or not any(target.iterdir())
    has_model = (target / "config.json").exists() and (target / "model.safetensors").exists()
    return has_model if rec.get("history") else True


class Chaos:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0
        self.results: list[Case] = []
        self.seed_dir: Path | None = None

    def env(self) -> dict[str, str]:
        self.n += 1
        d = self.tmp / f"c{self.n}"
        d.mkdir()
        return make_env(d)

    def seeded(self) -> dict[str, str]:
        """An environment whose output holds one published pretraining shard (made once, copied)."""
        if self.seed_dir is None:  # made in an environment of its own, never handed to a case
            seed = self.env()
            code, out = run({**seed, "MAX_RUNS": "1"})
            if code != 0:
                raise RuntimeError(f"seeding failed: {out[-2000:]}")
            self.seed_dir = Path(seed["OUTPUT_REPO"])
        env = self.env()
        shutil.copytree(self.seed_dir, env["OUTPUT_REPO"])
        return env

    def stopped(self) -> dict[str, str]:
        """An environment whose output holds a mid-shard checkpoint (shard 1 stopped by SIGTERM)."""
        env = {**self.seeded(), "SHARD_STEPS": "100000", "EPOCHS": "50"}
        proc = start(env)
        wait_for(proc, "validation loss before training")
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        code, out = logged(*finish(proc))
        if code != 3:
            raise RuntimeError(f"could not make a checkpoint: {out[-2000:]}")
        return env

    def case(self, name: str, fn: Callable[[Case], None], only: str | None) -> None:
        if only and only not in name:
            return
        c = Case(name)
        t = time.perf_counter()
        try:
            fn(c)
        except Exception as e:  # noqa: BLE001 - a case that breaks the harness did not hold
            c.problems.append(f"{type(e).__name__}: {str(e)[-1500:]}")
        c.info["seconds"] = round(time.perf_counter() - t, 1)
        self.results.append(c)
        print(f"[chaos] {'held' if not c.problems else 'FAILED'}: {name} {c.info} {'; '.join(c.problems)}",
              file=sys.stderr, flush=True)


# --- the cases ---------------------------------------------------------------------------------------


def bad_input(c: Case, code: int, out: str, target: Path, before: str, needle: str) -> None:
    c.info["exit"] = code
    c.check(code == 2, f"exit {code}, expected 2")
    c.check("Traceback" not in out, "a traceback")
    c.check(needle in out, f"no {needle!r} in the output: {out[-600:]}")
    c.check(tree_digest(target) == before, "the published output changed")


def published_or_refused(c: Case, code: int, out: str, target: Path, before: str, rec_before: dict) -> None:
    """A damaged file the pipeline does not read: either refused as bad input with nothing changed,
    or the run goes on and republishes a whole output that advanced by exactly one shard."""
    c.info["exit"] = code
    c.check("Traceback" not in out, "a traceback")
    if code == 2:
        c.check(tree_digest(target) == before, "refused, but the output changed")
    else:
        rec = record(target)
        c.check(code == 0 and rec is not None and whole(target), f"exit {code}: {out[-600:]}")
        if rec:
            c.check(len(rec["history"]) == len(rec_before["history"]) + 1, "the history did not advance by one")


def hub_cases(ch: Chaos, only: str | None) -> None:
    reads = {
        "record 503": [("HEAD", r"/resolve/.*training_state", {}), ("GET", r"/resolve/.*training_state", {})],
        "record dropped": [("HEAD", r"/resolve/.*training_state", {"kind": "drop"}),
                           ("GET", r"/resolve/.*training_state", {"kind": "drop"})],
        "repo info 502": [("GET", r"^/api/models/alice/llama(-it)?(/revision/[^/]+)?$", {"status": 502})],
        "model download 503": [("GET", r"/resolve/[0-9a-f]{40}/(model\.safetensors|config\.json)", {}),
                               ("HEAD", r"/resolve/[0-9a-f]{40}/(model\.safetensors|config\.json)", {})],
        # in a fresh WORK_DIR (a restarted container): with the head commit's record in the download
        # cache, the client reads it from there, which is exactly that commit's file, and goes on
        "record read stalls past HUB_TIMEOUT, no cache": [("HEAD", r"/resolve/.*training_state", {"kind": "delay", "seconds": 5}),
                                                ("GET", r"/resolve/.*training_state", {"kind": "delay", "seconds": 5})],
        "checkpoint download 503": [("GET", r"/resolve/[0-9a-f]{40}/last-checkpoint/", {}),
                                    ("HEAD", r"/resolve/[0-9a-f]{40}/last-checkpoint/", {})],
        "commit 503 forever": [("POST", r"/commit/", {})],
        "preupload 500 forever": [("POST", r"/preupload/", {"status": 500})],
    }
    for name, faults in reads.items():
        def fn(c: Case, faults=faults) -> None:
            hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
            try:
                env = hub_env(ch.env(), hub)
                code, out = run({**env, "MAX_RUNS": "1"})  # shard 0 published to the Hub
                if code != 0:
                    raise RuntimeError(out[-1500:])
                if "checkpoint" in c.name:  # shard 1 stopped after a step: its checkpoint is on the Hub
                    code, out = run({**env, "MAX_RUNS": "1", "TIME_BUDGET": "1s"})
                    if code != 0 or "resume" not in json.loads(hub.repos["alice/llama"].files["training_state.json"]):
                        raise RuntimeError(out[-1500:])
                commits = hub.commits("alice/llama")
                if "no cache" in c.name:
                    env["WORK_DIR"] = str(Path(env["WORK_DIR"]).with_name("work-restarted"))
                for method, pattern, kw in faults:
                    hub.fail(method, pattern, times=10**6, **kw)
                code, out = run({**env, "MAX_RUNS": "1"})
                c.info["exit"] = code
                c.check(code in (1, 2), f"exit {code}: {out[-600:]}")
                c.check("from fresh weights" not in out, "planned from fresh weights over a published repo")
                c.check(hub.commits("alice/llama") == commits and not hub.commits("alice/llama-it"), "something was published")
                c.check("Traceback" not in out, "a traceback")
                c.check(TOKEN not in out, "the token was printed")
            finally:
                hub.stop()
        ch.case(f"hub: {name}", fn, only)


def hub_env(env: dict[str, str], hub: HubDouble) -> dict[str, str]:
    env.pop("HF_HUB_OFFLINE", None)
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "OUTPUT_REPO": "alice/llama",
                "HUB_RETRY_WAIT": "0.05", "HUB_RETRIES": "2", "HUB_TIMEOUT": "2"})
    return env


def damaged_file_cases(ch: Chaos, only: str | None) -> None:
    def garbage_weights(p: Path) -> None:
        data = bytearray(p.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        data[start:] = b"\xff" * (len(data) - start)
        p.write_bytes(bytes(data))

    damages: dict[str, tuple[str, Callable[[Path], None], str | None]] = {
        # name: (file, damage, message when refused; None = not read by the pipeline: may go on)
        "model.safetensors NaN bytes": ("model.safetensors", garbage_weights, "hold NaN or infinity"),
        "model.safetensors truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated"),
        "model.safetensors header garbage": ("model.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{garbage}}}}}"), "safetensors"),
        "model.safetensors empty": ("model.safetensors", lambda p: p.write_bytes(b""), "truncated"),
        "config.json no model_type": ("config.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "model_type"})), "model_type"),
        "config.json garbage": ("config.json", lambda p: p.write_text("{garbage"), "config.json"),
        "config.json a list": ("config.json", lambda p: p.write_text("[1, 2]"), "config.json"),
        "tokenizer.json garbage": ("tokenizer.json", lambda p: p.write_text('{"model": '), "tokenizer does not load"),
        "tokenizer.json missing": ("tokenizer.json", lambda p: p.unlink(), "tokenizer.json"),
        "training_state.json wrong types": ("training_state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "next": {"inst": "no", "init": "one"}})), "next.inst"),
        "training_state.json a list": ("training_state.json", lambda p: p.write_text("[]"), "not an object"),
        "training_state.json truncated": ("training_state.json", lambda p: p.write_text(p.read_text()[:50]), "not valid JSON"),
        "training_state.json newer format": ("training_state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": 9})), "newer train-llama"),
        "training_state.json next a string": ("training_state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "next": "shard1"})), "next"),
        "generation_config.json garbage": ("generation_config.json", lambda p: p.write_text("{"), None),
        "README.md garbage": ("README.md", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), None),
        "runs/ removed": ("runs", lambda p: shutil.rmtree(p), None),
    }
    for name, (rel, damage, needle) in damages.items():
        def fn(c: Case, rel=rel, damage=damage, needle=needle) -> None:
            env = ch.seeded()
            target = Path(env["OUTPUT_REPO"])
            rec_before = record(target)
            damage(target / rel)
            before = tree_digest(target)
            code, out = run({**env, "MAX_RUNS": "1"})
            if needle is None:
                published_or_refused(c, code, out, target, before, rec_before)
            else:
                bad_input(c, code, out, target, before, needle)
        ch.case(f"damaged: {name}", fn, only)


def checkpoint_cases(ch: Chaos, only: str | None) -> None:
    def step_dir(ck: Path) -> Path:
        return ck / (ck / "latest").read_text().strip()

    damages: dict[str, tuple[Callable[[Path], None], str]] = {
        "global_step folder missing": (lambda ck: shutil.rmtree(step_dir(ck)), "which is missing"),
        "latest garbled": (lambda ck: (ck / "latest").write_text("glob"), "latest names 'glob'"),
        "latest missing": (lambda ck: (ck / "latest").unlink(), "latest"),
        "optimizer states truncated": (lambda ck: [p.write_bytes(p.read_bytes()[:100]) for p in step_dir(ck).glob("*optim*")], "optim_states.pt is unreadable"),
        "model states missing": (lambda ck: (step_dir(ck) / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt is missing"),
        "scheduler missing": (lambda ck: (ck / "scheduler.pt").unlink(), "scheduler.pt"),
        "rng state garbage": (lambda ck: (ck / "rng_state.pth").write_bytes(b"garbage"), "rng_state.pth"),
        "trainer_state wrong step": (lambda ck: (ck / "trainer_state.json").write_text(json.dumps({**json.loads((ck / "trainer_state.json").read_text()), "global_step": 99999})), "trainer_state.json is at step 99999"),
        "weights truncated": (lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:500]), "truncated"),
        "checkpoint folder removed": (lambda ck: shutil.rmtree(ck), "no checkpoint"),
    }
    for name, (damage, needle) in damages.items():
        def fn(c: Case, damage=damage, needle=needle) -> None:
            env = ch.stopped()
            target = Path(env["OUTPUT_REPO"])
            damage(target / "last-checkpoint")
            before = tree_digest(target)
            t = time.perf_counter()
            code, out = run(env)
            c.info["time_to_refuse_s"] = round(time.perf_counter() - t, 1)
            bad_input(c, code, out, target, before, needle)
            c.check("=== train" not in out, "training started on a damaged checkpoint")
        ch.case(f"checkpoint: {name}", fn, only)


def concurrency_cases(ch: Chaos, only: str | None) -> None:
    def two_runs(c: Case) -> None:
        env = {**ch.env(), "MAX_RUNS": "1"}
        first = start(env)
        wait_for(first, "=== preflight")
        time.sleep(1)
        code2, out2 = run(env)
        code1, out1 = finish(first)
        c.info["exit"] = [code1, code2]
        c.check(code1 == 0 and code2 == 1, f"exits {code1}, {code2}")
        c.check("in use by another run: pid" in out2, "the second run did not say who holds the output")
        rec = record(Path(env["OUTPUT_REPO"]))
        c.check(rec is not None and [h["shard"] for h in rec["history"]] == [0], "the history is not one shard 0")

    def two_hub_publishes(c: Case) -> None:
        hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
        try:
            env = {**hub_env(ch.env(), hub), "MAX_RUNS": "1"}
            other = {**env, "WORK_DIR": env["WORK_DIR"] + "-other"}  # two machines: no shared lock
            a, b = start(env), start(other)
            (ca, oa), (cb, ob) = finish(a), finish(b)
            c.info["exit"] = [ca, cb]
            c.check(sorted([ca, cb]) == [0, 1], f"exits {ca}, {cb}")
            c.check("another run published" in oa + ob, "the loser did not say why")
            rec = json.loads(hub.repos["alice/llama"].files["training_state.json"])
            c.check([h["shard"] for h in rec["history"]] == [0] and len(hub.commits("alice/llama")) == 1,
                    f"commits {hub.commits('alice/llama')}")
        finally:
            hub.stop()

    ch.case("concurrent: two runs on one local output", two_runs, only)
    ch.case("concurrent: two machines on one Hub repo", two_hub_publishes, only)


PHASES = ["=== preflight", "=== validate setup", "=== prep", "validation loss before training", "=== publish"]


def signal_cases(ch: Chaos, only: str | None) -> None:
    for sigs in (["TERM", "TERM"], ["TERM", "TERM", "TERM"], ["INT", "TERM"], ["TERM", "INT"]):
        def fn(c: Case, sigs=sigs) -> None:
            env = {**ch.seeded(), "SHARD_STEPS": "100000", "EPOCHS": "50"}
            target = Path(env["OUTPUT_REPO"])
            proc = start(env)
            wait_for(proc, "validation loss before training")
            time.sleep(2)
            for sig in sigs:
                proc.send_signal(getattr(signal, f"SIG{sig}"))
                time.sleep(0.3)
            code, out = logged(*finish(proc))
            c.info["exit"] = code
            c.check(code == 3, f"exit {code}: {out[-800:]}")
            rec = record(target)
            c.check(rec is not None and (rec.get("resume") or {}).get("step", 0) > 0, "no checkpoint published")
            c.check(whole(target) and not orphans(env["WORK_DIR"]), "output not whole or processes left")
        ch.case(f"signals: {'+'.join(sigs)} during training", fn, only)

    for phase in PHASES:
        def fn(c: Case, phase=phase) -> None:
            env = {**ch.seeded(), "SHARD_STEPS": "100000"} if phase != "=== publish" else ch.seeded()
            target = Path(env["OUTPUT_REPO"])
            rec_before = record(target)
            proc = start(env)
            wait_for(proc, phase)
            t = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code, out = logged(*finish(proc))
            c.info.update({"exit": code, "signal_to_exit_s": round(time.perf_counter() - t, 2)})
            c.check(code == 3, f"exit {code}: {out[-800:]}")
            rec = record(target)
            if phase == "=== publish":  # the publish under way is finished, then the run stops
                c.check(rec is not None and len(rec["history"]) == len(rec_before["history"]) + 1, "the publish was lost")
            else:
                c.check(rec["history"] == rec_before["history"] and "resume" not in rec,
                        "a run stopped before its first step published something")
            c.check(whole(target) and not orphans(env["WORK_DIR"]), "output not whole or processes left")
            c.check(time.perf_counter() - t < 30, "the stop took more than 30 s")
        ch.case(f"signals: SIGTERM at '{phase.strip('= ')}'", fn, only)


def kill_cases(ch: Chaos, only: str | None) -> None:
    for phase in PHASES[:3] + ["[train] training every weight", "=== publish"]:
        def fn(c: Case, phase=phase) -> None:
            env = {**ch.seeded(), "MAX_RUNS": "1"}
            target = Path(env["OUTPUT_REPO"])
            rec_before = record(target)
            proc = start(env)
            wait_for(proc, phase)
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)  # trainer.sh's group; its phases must die with it
            proc.wait()
            time.sleep(1)
            left = orphans(env["WORK_DIR"])
            c.check(not left, f"{len(left)} process(es) outlived the killed run")
            rec = record(target)
            c.check(whole(target) and rec is not None and len(rec["history"]) in (len(rec_before["history"]),
                                                                                  len(rec_before["history"]) + 1),
                    "the output is torn")
            code, out = run(env)  # the next run works
            c.info["rerun_exit"] = code
            c.check(code == 0 and len(record(target)["history"]) >= len(rec_before["history"]) + 1,
                    f"the next run failed: {out[-800:]}")
        ch.case(f"kill -9: at '{phase.strip('= ')}'", fn, only)


def disk_cases(ch: Chaos, only: str | None) -> None:
    def full(c: Case, which: str, when: str) -> None:
        env = {**ch.seeded(), "MAX_RUNS": "1"}
        target = Path(env["OUTPUT_REPO"])
        mnt = Path(env[which]) if which == "WORK_DIR" else target.parent
        if which == "OUTPUT_REPO":  # the output's file system: the published output moved onto a tmpfs
            keep = ch.tmp / f"keep{ch.n}"
            shutil.move(str(mnt), keep)
        mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
        try:
            if which == "OUTPUT_REPO":
                for p in keep.iterdir():
                    shutil.copytree(p, mnt / p.name) if p.is_dir() else shutil.copy2(p, mnt / p.name)
            before, rec_before = tree_digest(target), record(target)
            proc = start(env)
            wait_for(proc, when)
            filler = mnt / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=1000"], capture_output=True)
            code, out = logged(*finish(proc))
            c.info["exit"] = code
            c.check(code not in (0, 2) and "Disk full" in out, f"exit {code}: {out[-800:]}")
            c.check("Traceback" not in out, "a traceback")
            c.check(tree_digest(target) == before and record(target) == rec_before, "the published output changed")
            filler.unlink()
            code, out = run(env)
            c.info["rerun_exit"] = code
            c.check(code == 0, f"the run after freeing space failed: {out[-800:]}")
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

    ch.case("disk full: WORK_DIR fills during training", lambda c: full(c, "WORK_DIR", "validation loss before training"), only)
    ch.case("disk full: OUTPUT_REPO fills before the publish", lambda c: full(c, "OUTPUT_REPO", "validation loss after training"), only)


def secret_cases(ch: Chaos, only: str | None) -> None:
    def scan(c: Case, out: str, env: dict[str, str], secret: str) -> None:
        c.check(secret not in out, "the secret was printed")
        for d in (env["WORK_DIR"], env["OUTPUT_REPO"]):
            for p in Path(d).rglob("*") if Path(d).exists() else []:
                if p.is_file() and secret.encode() in p.read_bytes():
                    c.check(False, f"the secret is written in {p}")

    def hub_token_newline(c: Case) -> None:
        hub = HubDouble({TOKEN: {"name": "alice", "role": "write"}}).start()
        try:
            env = {**hub_env(ch.env(), hub), "HF_TOKEN": TOKEN + "\n", "MAX_RUNS": "1"}
            code, out = run(env)
            c.info["exit"] = code
            c.check(code == 0 and "Illegal header" not in out, f"exit {code}: {out[-600:]}")
            scan(c, out, env, TOKEN)
            for repo in hub.repos.values():
                for name, data in repo.files.items():
                    c.check(TOKEN.encode() not in data, f"the token is in the published {name}")
        finally:
            hub.stop()

    def config_file(c: Case, name: str, text: str) -> None:
        env = ch.env()
        f = Path(env["WORK_DIR"]).parent / name
        f.write_text(text.format(secret=SECRET))
        env["CONFIG_FILE"] = str(f)
        code, out = run(env)
        c.info["exit"] = code
        c.check(code == 2, f"exit {code}")
        scan(c, out, env, SECRET)

    def wrong_variable(c: Case) -> None:
        env = {**ch.env(), "HF_TOKEN": TOKEN, "INPUT_DATASET": TOKEN, "LORA_TARGETS": TOKEN}
        code, out = run(env)
        c.info["exit"] = code
        c.check(code == 2, f"exit {code}")
        scan(c, out, env, TOKEN)

    def inner_whitespace(c: Case) -> None:
        env = {**ch.env(), "HF_TOKEN": TOKEN[:12] + " " + TOKEN[12:]}
        code, out = run(env)
        c.info["exit"] = code
        c.check(code == 2 and "HF_TOKEN=***" in out, f"exit {code}")
        scan(c, out, env, TOKEN[12:])

    ch.case("secrets: HF_TOKEN with a trailing newline, Hub output", hub_token_newline, only)
    ch.case("secrets: YAML syntax error on the HF_TOKEN line",
            lambda c: config_file(c, "c.yaml", "MAX_STEPS: 2\nHF_TOKEN: {secret}: x\n  y: [\n"), only)
    ch.case("secrets: TOML error on the HF_TOKEN line", lambda c: config_file(c, "c.toml", "HF_TOKEN = {secret}\n"), only)
    ch.case("secrets: a token pasted into other variables", wrong_variable, only)
    ch.case("secrets: HF_TOKEN with a space inside", inner_whitespace, only)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run the cases whose name contains this text")
    ap.add_argument("--logs", help="keep the output of every run in this directory")
    args = ap.parse_args(argv)
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        LOGS.append(Path(args.logs))
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        ch = Chaos(Path(tmp))
        for group in (hub_cases, damaged_file_cases, checkpoint_cases, concurrency_cases, signal_cases, kill_cases,
                      disk_cases, secret_cases):
            group(ch, args.only)
    failed = [c.name for c in ch.results if c.problems]
    print(json.dumps({"cases": len(ch.results), "held": len(ch.results) - len(failed), "failed": failed,
                      "machine": f"{os.cpu_count()} cores",
                      "results": {c.name: {**c.info, **({"problems": c.problems} if c.problems else {})}
                                  for c in ch.results}}))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
