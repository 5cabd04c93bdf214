"""handoff.py: what prep hands train (the manifest) and train hands publish (the metrics) is typed,
round-trips through its file unchanged, and a file another version wrote fails at the boundary."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import a_manifest, shard_metrics
from errors import BadInput
from handoff import CheckpointMetrics, Manifest, ShardMetrics, read_metrics
from run_state import RunPlan


def test_a_manifest_round_trips_through_its_file_with_absent_fields_left_out(tmp_path):
    plan = RunPlan("instruct", 1, "o-it", "o-it", resume={"step": 3}, base="p1")
    m = a_manifest(plan, packed_chats=True, train_chats=40)
    m.write(tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["plan"] == plan.to_json() and data["train_chats"] == 40
    assert "sources" not in data and "origin" not in data and "resume" not in data  # never stated: not written
    back = Manifest.read(tmp_path / "manifest.json")
    assert back == m and back.plan == plan and back.chats_per_sequence == 40 / 9


@pytest.mark.parametrize("change, says", [
    ({"colour": "red"}, "colour: unknown to this version"),
    ({"rows": "10"}, "rows: Input should be a valid integer"),
    ({"train_format": "int8"}, "train_format: Input should be 'float' or 'nf4'"),
    ({"run_id": None}, "run_id: Input should be a valid string"),
])
def test_a_manifest_from_another_version_is_bad_input_naming_the_field(tmp_path, change, says):
    data = {**a_manifest(RunPlan("pretrain", 0, "o", None)).to_json(), **change}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BadInput, match="run prep.py again") as e:
        Manifest.read(tmp_path / "manifest.json")
    assert str(tmp_path / "manifest.json") in str(e.value) and says in str(e.value)


def test_a_missing_field_and_a_plan_of_another_version_fail_at_the_boundary():
    data = a_manifest(RunPlan("pretrain", 0, "o", None)).to_json()
    del data["data_fingerprint"]
    with pytest.raises(BadInput, match="data_fingerprint: missing"):
        Manifest.from_json(data, "m.json")
    data = a_manifest(RunPlan("pretrain", 0, "o", None)).to_json()
    data["plan"]["colour"] = "red"
    with pytest.raises(BadInput, match=r"plan: the run plan is not this version.s: unknown \[.colour.\]"):
        Manifest.from_json(data, "m.json")


def test_the_history_entry_holds_what_the_shard_measured_and_nothing_of_the_run_itself():
    m = shard_metrics(resumed_from_step=4, first_resumed_step_s=2.0, best_step=None)
    entry = m.history_entry()
    assert not ShardMetrics.NOT_IN_HISTORY & set(entry)
    assert entry["resumed_from_step"] == 4 and entry["best_step"] is None  # stated, even as None: kept
    assert "merged_eval_loss" not in entry and "evals" not in entry  # never stated: absent, not null
    m.merged_eval_loss, m.merge_delta_pct = 1.5, 0.01  # the merge's check, added after training
    assert m.history_entry()["merged_eval_loss"] == 1.5
    # The record's key order: the order the fields are declared in.
    assert list(entry)[:4] == ["steps", "tokens", "train_loss", "eval_loss_before"]
    # What the evaluations add is checked as it is added: a field no version knows is an error, not
    # a key that silently never reaches the record.
    assert m.with_fields({"best_step": 2, "evals": [[2, 1.4]]}).history_entry()["evals"] == [[2, 1.4]]
    with pytest.raises(ValidationError, match="best_weights"):
        m.with_fields({"best_weights": "x"})
    with pytest.raises(ValidationError, match="merge_delta_pct"):
        m.merge_delta_pct = "small"


def test_metrics_state_their_losses_for_the_publish_gate():
    m = shard_metrics(eval_loss=float("nan"), merged_eval_loss=1.0)
    losses = m.losses()
    assert set(losses) == {"eval_loss", "train_loss", "eval_loss_before", "merged_eval_loss"}
    assert losses["eval_loss"] != losses["eval_loss"]  # the NaN itself reaches the gate


def test_read_metrics_tells_a_checkpoint_from_a_finished_shard(tmp_path):
    shard_metrics().write(tmp_path / "metrics.json")
    assert isinstance(read_metrics(tmp_path), ShardMetrics)
    ckpt = CheckpointMetrics(run_id="r", partial=True, data_fingerprint="f", stop_reason="a stop signal", step=3,
                             max_steps=9, eval_loss_before=None, samples_seen=24, tokens=300, train_runtime_s=1.0,
                             first_step_s=None, tensorboard_run="1-pretrain-shard000-from-step000000-r")
    ckpt.write(tmp_path / "metrics.json")
    back = read_metrics(tmp_path)
    assert isinstance(back, CheckpointMetrics) and back == ckpt and back.losses() == {}
    (tmp_path / "metrics.json").write_text(json.dumps({**ckpt.to_json(), "step": 3.5}))
    with pytest.raises(BadInput, match=r"step: .*run train.py again"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(BadInput, match=r"metrics.json: no trained shard here. Fix: run train.py first"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('{"run_id": "r", "par')  # cut short
    with pytest.raises(BadInput, match=r"metrics.json: not valid JSON .*run train.py again"):
        read_metrics(tmp_path)
