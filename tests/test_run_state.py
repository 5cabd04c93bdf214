"""Run state: which run comes next, explicit overrides, done, the record, and the atomic local swap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import a_manifest, shard_metrics
from config import load_settings
from errors import BadInput
from run_state import STATE_FILE, build_record, next_after, plan_run
from files import recover, swap_in


def test_next_after_walks_shards_then_instruct_then_done():
    assert next_after("pretrain", 0, 3) == {"inst": False, "init": 1}
    assert next_after("pretrain", 2, 3) == {"inst": True, "init": 0}
    assert next_after("instruct", 0, 2) == {"inst": True, "init": 1}
    assert next_after("instruct", 1, 2) is None


def publish_fake(target: Path, nxt, stage="pretrain", shard=0):
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    (target / STATE_FILE).write_text(json.dumps({"stage": stage, "shard": shard, "next": nxt, "history": []}))


def settings(tmp_path, **env):
    return load_settings({"OUTPUT_REPO": str(tmp_path / "m"), **env})


def test_plan_follows_the_record(tmp_path):
    s = settings(tmp_path)
    p = plan_run(s)
    assert (p.stage, p.shard, p.source, p.done) == ("pretrain", 0, None, False)
    publish_fake(tmp_path / "m", {"inst": False, "init": 1})
    p = plan_run(s)
    assert (p.stage, p.shard, p.source) == ("pretrain", 1, str(tmp_path / "m"))
    publish_fake(tmp_path / "m", {"inst": True, "init": 0}, shard=1)
    p = plan_run(s)
    assert (p.stage, p.shard, p.source, p.target) == ("instruct", 0, str(tmp_path / "m"), str(tmp_path / "m") + "-it")
    publish_fake(tmp_path / "m-it", {"inst": True, "init": 1}, stage="instruct")
    p = plan_run(s)
    assert (p.stage, p.shard, p.source) == ("instruct", 1, str(tmp_path / "m") + "-it")
    publish_fake(tmp_path / "m-it", None, stage="instruct", shard=1)
    assert plan_run(s).done


def test_explicit_variables_override_the_record(tmp_path):
    publish_fake(tmp_path / "m", {"inst": True, "init": 0}, shard=1)
    p = plan_run(settings(tmp_path, INIT="1", INST="false"))
    assert (p.stage, p.shard) == ("pretrain", 1)
    p = plan_run(settings(tmp_path, INPUT_REPO=str(tmp_path / "m"), INST="true", INIT="0"))
    assert (p.stage, p.source) == ("instruct", str(tmp_path / "m"))


def test_continuing_without_a_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no published model"):
        plan_run(settings(tmp_path, INIT="2"))
    with pytest.raises(BadInput, match="no published model"):
        plan_run(settings(tmp_path, INST="true", INIT="0"))


def test_record_accumulates_history(tmp_path):
    s = settings(tmp_path)
    from run_state import RunPlan

    plan = RunPlan("pretrain", 0, "t", None)
    r1 = build_record(s, plan, a_manifest(plan), shard_metrics(steps=3, tokens=100), None)
    assert r1["next"] == {"inst": False, "init": 1} and not r1["done"]
    plan = RunPlan("pretrain", 1, "t", "t")
    r2 = build_record(s, plan, a_manifest(plan), shard_metrics(steps=4, tokens=50), r1)
    assert r2["next"] == {"inst": True, "init": 0} and r2["steps"] == 7 and r2["tokens"] == 150
    assert len(r2["history"]) == 2


def test_swap_is_atomic_and_recoverable(tmp_path):
    root = tmp_path / "out"
    publish_fake(root, {"inst": False, "init": 1})
    staged = tmp_path / "out.tmp"
    publish_fake(staged, {"inst": False, "init": 2})
    swap_in(staged, root)
    assert json.loads((root / STATE_FILE).read_text())["next"]["init"] == 2
    assert not (tmp_path / "out.old").exists() and not staged.exists()
    # A publish killed between its two renames: the old output is put back on the next start.
    root.rename(tmp_path / "out.old")
    recover(root)
    assert json.loads((root / STATE_FILE).read_text())["next"]["init"] == 2


def test_a_shard_of_several_datasets_keeps_its_mix_in_the_record(tmp_path):
    from run_state import Record
    from run_state import RunPlan

    mix = [{"path": "web.jsonl", "weight": 0.7, "rows": 7, "documents": 7, "tokens": 700},
           {"path": "code.jsonl", "weight": 0.3, "rows": 3, "documents": 3, "tokens": 300}]
    plan = RunPlan("pretrain", 0, "t", None)
    r = build_record(settings(tmp_path), plan, a_manifest(plan, sources=mix), shard_metrics(steps=3, tokens=1000), None)
    assert r["history"][0]["sources"] == mix
    assert Record.model_validate(json.loads(json.dumps(r))).history[0].model_extra["sources"] == mix  # the next run reads it


def test_a_plan_handed_on_by_another_version_fails_at_the_boundary():
    from run_state import RunPlan

    plan = RunPlan("instruct", 1, "t", "s", resume={"step": 3}, base="x")
    assert RunPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    with pytest.raises(BadInput, match=r"unknown \['colour'\]"):
        RunPlan.from_json({**plan.to_json(), "colour": "red"})
    with pytest.raises(BadInput, match=r"missing \['target'\]"):
        RunPlan.from_json({k: v for k, v in plan.to_json().items() if k != "target"})


def test_the_plan_is_made_once_per_run_and_taken_once(tmp_path):
    """trainer.sh plans the run (publish.py plan) and its prep takes that plan instead of reading the
    record again; a plan is taken once, and planning anew first drops the plan handed on before."""
    from run_state import PLAN_FILE, RunPlan, save_plan, this_runs_plan

    s = settings(tmp_path, WORK_DIR=str(tmp_path / "work"))
    handed = RunPlan("pretrain", 5, "somewhere", "elsewhere", base="abc")  # not what the record says
    save_plan(s, handed)
    assert this_runs_plan(s, handed_on=False).shard == 0  # prep run alone plans from the record
    assert this_runs_plan(s, handed_on=True) == handed
    assert not (tmp_path / "work" / PLAN_FILE).exists()
    assert this_runs_plan(s, handed_on=True).shard == 0  # nothing handed on: planned now
    save_plan(s, handed)
    save_plan(s, None)
    assert this_runs_plan(s, handed_on=True).shard == 0
