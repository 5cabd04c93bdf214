"""preflight.py: a healthy default passes in seconds; each injected problem flips its own check and
says how to fix it; the memory estimate is in the JSON and suggests what would make a run fit."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from conftest import py, run


def _report(env: dict[str, str], *args: str):
    p = run(py("preflight.py", "--json", *args), env, timeout=60)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    return p.returncode, report, {c["section"]: c for c in report["checks"]}


def test_default_passes_fast_with_a_memory_estimate(env):
    rc, report, checks = _report(env)
    assert rc == 0 and report["ok"], report
    assert report["seconds"] <= 10
    assert list(checks) == ["settings", "run state", "data", "output", "tracking", "hardware", "memory", "disk"]
    mem = report["memory"]
    assert 0 < mem["estimated_peak_bytes"] < mem["available_bytes"] and mem["fits"]
    assert mem["estimated_peak_bytes"] == mem["runtime_bytes"] + mem["training_bytes"]
    assert checks["disk"]["data"]["needed_bytes"] > 0
    assert "cpu_features" in checks["hardware"]["data"]


def test_readable_report_marks_each_section(env):
    p = run(py("preflight.py"), env, timeout=60)
    assert p.returncode == 0
    for section in ("settings", "run state", "data", "output", "tracking", "hardware", "memory", "disk"):
        assert f"[ok] {section}:" in p.stdout
    assert "the run can go" in p.stdout


@pytest.mark.parametrize("var, value, section, fix", [
    ("BATCH_SIZE", "zero", "settings", "BATCH_SIZE"),
    ("INPUT_DATASET", "someone/no-such-dataset", "data", "Fix"),
    ("INPUT_DATASET", "/nonexistent/corpus.jsonl", "data", "check the path"),
    ("TEXT_COLUMN", "body", "data", "TEXT_COLUMN"),
])
def test_an_injected_problem_flips_its_check_with_the_fix(env, var, value, section, fix):
    env[var] = value
    rc, report, checks = _report(env)
    assert rc == 2 and not report["ok"]
    assert not checks[section]["ok"]
    assert any(fix in f for f in checks[section]["fixes"]), checks[section]
    assert all(c["ok"] for name, c in checks.items() if name != section), checks


def _in_process(env: dict[str, str], monkeypatch) -> None:
    for k in list(__import__("os").environ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_too_little_disk_fails_the_disk_check(env, monkeypatch):
    import preflight

    _in_process(env, monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    checks = {c.section: c for c in preflight.run_checks()}
    assert not checks["disk"].ok and "free" in checks["disk"].finding
    assert any("WORK_DIR" in f for f in checks["disk"].fixes)
    assert all(c.ok for name, c in checks.items() if name != "disk")


def test_a_model_too_large_for_memory_fails_with_what_would_fit(env, monkeypatch):
    import mem_estimate
    import preflight

    env.update({"TARGET_PARAMETERS": "3B", "BATCH_SIZE": "32", "MAX_LENGTH": "2048"})
    _in_process(env, monkeypatch)
    monkeypatch.setattr(mem_estimate, "available_memory", lambda: (16 * 2**30, False, 0))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(2**50, 0, 2**50))  # disk is not the point
    checks = {c.section: c for c in preflight.run_checks()}
    mem = checks["memory"]
    assert not mem.ok and "will not fit" in mem.finding
    assert mem.data["estimated_peak_bytes"] > 16 * 2**30
    # The first run creates the model and trains every weight: the fix is a smaller model, not USE_QUANT.
    assert any("smaller TARGET_PARAMETERS" in f for f in mem.fixes)
    assert any("GRADIENT_CHECKPOINTING=true" in f for f in mem.fixes)
    assert all(c.ok for name, c in checks.items() if name != "memory")


def test_a_tracker_that_is_not_installed_fails_the_tracking_check(env, monkeypatch):
    import importlib.util

    import preflight

    env["REPORT_TO"] = "tensorboard,wandb"
    _in_process(env, monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    check = preflight.check_tracking(preflight.load_settings())
    assert not check.ok and "wandb" in check.finding and any("REPORT_TO" in f for f in check.fixes)


def test_the_tracking_check_says_where_the_metrics_go(env, monkeypatch):
    import preflight

    env.update({"REPORT_TO": "trackio,wandb", "TRACKIO_DIR": "/tmp/tracks"})
    _in_process(env, monkeypatch)
    check = preflight.check_tracking(preflight.load_settings())
    assert check.ok and "/tmp/tracks" in check.finding and "wandb: offline" in check.finding and "'llama'" in check.finding


def test_a_base_model_gives_the_shape_the_estimates_use_and_a_wrong_one_fails_its_own_check(env, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from architecture import config_kwargs, count_parameters, shape

    arch = shape(512, 3, 1000)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**config_kwargs(arch, 64))).parameters())
    LlamaConfig(**config_kwargs(arch, 64)).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")   # present (its contents are prep's to check)
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    rc, report, checks = _report({**env, "BASE_MODEL": str(tmp_path / "base")})
    assert rc == 0, checks
    assert list(checks)[-3:] == ["starting point", "memory", "disk"]
    assert f"a Llama of {n:,} parameters (d=512, 3 layers" in checks["starting point"]["finding"]
    assert count_parameters(checks["starting point"]["data"]["architecture"]) == n
    rc_default, _, default = _report(env)
    assert checks["memory"]["data"]["per_rank"]["weights"] > default["memory"]["data"]["per_rank"]["weights"]  # the base's size

    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    rc, _, checks = _report({**env, "BASE_MODEL": str(tmp_path / "base")})
    assert rc == 2 and not checks["starting point"]["ok"] and "not 'llama'" in checks["starting point"]["fixes"][0]
    rc, _, checks = _report({**env, "TOKENIZER": str(tmp_path / "nowhere")})
    assert rc == 2 and "no such directory" in checks["starting point"]["fixes"][0]
