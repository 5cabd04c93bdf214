"""publish.py: a finished run published locally, as the pipeline does it, from what prep and train
leave in WORK_DIR."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import a_manifest, shard_metrics
from config import architecture, load_settings
from files import old
from run_state import STATE_FILE, RunPlan


def _published(root: Path, arch: dict) -> None:
    (root / "runs" / "1-pretrain-shard000-from-step000000-aaaa").mkdir(parents=True)
    (root / "runs" / "1-pretrain-shard000-from-step000000-aaaa" / "events.out").write_text("shard 0's traces")
    (root / "config.json").write_text("{}")
    (root / STATE_FILE).write_text(json.dumps({
        "format": 1, "stage": "pretrain", "shard": 0, "shards_total": 2, "next": {"inst": False, "init": 1},
        "done": False, "publish_id": "first", "architecture": arch, "parameters": 5, "settings": {},
        "history": [{"stage": "pretrain", "shard": 0, "shards_total": 2, "steps": 3, "tokens": 100,
                     "eval_loss_before": 7.0, "eval_loss": 2.0, "perplexity": 7.4}]}))


def _trained(work: Path, plan: RunPlan, arch: dict) -> None:
    (work / "prepared").mkdir(parents=True)
    a_manifest(plan, run_id="run2", architecture=arch).write(work / "prepared" / "manifest.json")
    (work / "final" / "runs" / "1-pretrain-shard001-from-step000000-bbbb").mkdir(parents=True)
    (work / "final" / "runs" / "1-pretrain-shard001-from-step000000-bbbb" / "events.out").write_text("shard 1's traces")
    (work / "final" / "config.json").write_text('{"trained": true}')
    shard_metrics(run_id="run2", steps=4, tokens=120, eval_loss_before=2.0, eval_loss=1.5,
                  perplexity=4.5).write(work / "final" / "metrics.json")


def test_a_publish_after_one_cut_between_its_renames_keeps_the_earlier_runs_traces(tmp_path):
    """The previous publish was killed after setting the old output aside: the next publish puts it
    back first and carries its traces, so runs/ still holds every run of the pipeline."""
    from publish import publish

    root, work = tmp_path / "m", tmp_path / "work"
    s = load_settings({"OUTPUT_REPO": str(root), "WORK_DIR": str(work)})
    arch = architecture(s)
    _published(root, arch)
    root.rename(old(root))
    _trained(work, RunPlan("pretrain", 1, str(root), str(root), base="first"), arch)
    record, plan = publish(s, work)
    assert plan.shard == 1 and [h["shard"] for h in record["history"]] == [0, 1] and record["next"] == {"inst": True, "init": 0}
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["1-pretrain-shard000-from-step000000-aaaa",
                                                                 "1-pretrain-shard001-from-step000000-bbbb"]
    assert json.loads((root / "config.json").read_text()) == {"trained": True}
    assert json.loads((root / STATE_FILE).read_text())["publish_id"] == record["publish_id"]
    assert not old(root).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m", "work"]


def test_publish_with_nothing_trained_says_which_stage_to_run(tmp_path, monkeypatch, capsys):
    """`publish.py publish` by hand in a WORK_DIR without a prepared or trained shard: bad input
    naming the missing file and the stage that writes it, not a traceback. (Each call in its own
    environment: the output locks a main() takes are this process's until it ends.)"""
    import publish
    from conftest import call_main, make_env

    for what, says in (("nothing", "prepared/manifest.json: no prepared shard here. Fix: run prep.py first"),
                        ("prepared", "final/metrics.json: no trained shard here. Fix: run train.py first")):
        (tmp_path / what).mkdir()
        env = make_env(tmp_path / what)
        if what == "prepared":
            (Path(env["WORK_DIR"]) / "prepared").mkdir(parents=True)
            a_manifest(RunPlan("pretrain", 0, env["OUTPUT_REPO"], None)).write(Path(env["WORK_DIR"]) / "prepared" / "manifest.json")
        rc, _, err = call_main(publish.main, ["publish"], env, monkeypatch, capsys)
        assert rc == 2 and says in err and "Traceback" not in err, err
        assert not Path(env["OUTPUT_REPO"]).exists()
