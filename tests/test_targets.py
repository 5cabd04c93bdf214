"""Targets and atomic directories: what a reader sees while a local publish is cut between its
renames, that reading changes nothing, and that a failed write leaves the old directory whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import load_settings
from files import old, replacing
from run_state import STATE_FILE, plan_run
from targets import HubTarget, LocalTarget, open_target, spec_problem


def _output(root: Path, init: int) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"x")
    (root / STATE_FILE).write_text(json.dumps({"next": {"inst": False, "init": init}, "history": []}))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_publish_cut_between_its_renames_is_read_as_the_old_output_and_reading_changes_nothing(tmp_path):
    root = tmp_path / "m"
    _output(root, 1)
    root.rename(old(root))  # killed after setting the old output aside, before the new one went in
    (tmp_path / "m.tmp-999999").mkdir()  # a dead publisher's half-written copy
    before = _tree(tmp_path)
    t = open_target(str(root))
    assert t.read_record()["next"]["init"] == 1 and t.has_model()
    s = load_settings({"OUTPUT_REPO": str(root)})
    assert plan_run(s).shard == 1  # the plan follows the old record, not a fresh start
    assert _tree(tmp_path) == before and not root.exists()  # preflight and `plan` leave it as it is
    t.recover()  # the run (under the output lock) finishes it
    assert json.loads((root / STATE_FILE).read_text())["next"]["init"] == 1
    assert not old(root).exists() and not (tmp_path / "m.tmp-999999").exists()


def test_replacing_swaps_in_on_success_and_leaves_the_old_directory_whole_on_failure(tmp_path):
    root = tmp_path / "prepared"
    with replacing(root) as staged:
        (staged / "a").write_text("1")
    assert _tree(root) == {"a": b"1"}
    with pytest.raises(OSError):
        with replacing(root) as staged:
            (staged / "a").write_text("2")
            raise OSError(28, "No space left on device")
    assert _tree(root) == {"a": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no staging copy, no set-aside copy


def test_a_partial_delivery_keeps_the_rest_of_the_output(tmp_path):
    root = tmp_path / "m"
    _output(root, 1)
    (root / "last-checkpoint").mkdir()
    (root / "last-checkpoint" / "old.pt").write_text("old")

    def fill(staged: Path) -> None:
        (staged / "last-checkpoint").mkdir()
        (staged / "last-checkpoint" / "new.pt").write_text("new")

    open_target(str(root)).deliver(tmp_path, fill, "checkpoint", "id", None, only=["last-checkpoint/"])
    assert _tree(root)["model.safetensors"] == b"x" and _tree(root)["last-checkpoint/new.pt"] == b"new"
    assert "last-checkpoint/old.pt" not in _tree(root)


@pytest.mark.parametrize("spec,kind", [("./out", LocalTarget), ("/abs/out", LocalTarget), ("~/out", LocalTarget),
                                       ("file:out", LocalTarget), ("you/model", HubTarget)])
def test_a_setting_names_one_kind_of_place(spec, kind):
    t = open_target(spec)
    assert isinstance(t, kind) and spec_problem("OUTPUT_REPO", spec) is None
    assert t.needs_token == (kind is HubTarget) and t.survives_restart == (kind is HubTarget)
    assert (t.local_dir is None) == (kind is HubTarget) and (t.url is None) == (kind is LocalTarget)


def test_a_spec_that_names_no_place_says_so():
    assert "neither a local path" in spec_problem("OUTPUT_REPO", "not a repo id/with/slashes")
