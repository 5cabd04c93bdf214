"""Periodic checkpoints (SAVE_INTERVAL) and the per-run step cap (MAX_STEPS): the decisions alone."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import stopping
import train_control
from config import load_settings


def _periodic(tmp_path, checkpoint_bytes: int, **env: str) -> train_control.PeriodicCheckpoint:
    s = load_settings({"WORK_DIR": str(tmp_path / "work"), **env})
    return train_control.PeriodicCheckpoint(s, tmp_path / "work", str(tmp_path / "out"), checkpoint_bytes,
                                    metrics=lambda state: {}, rank0=False)


@pytest.mark.parametrize("checkpoint_bytes,interval_s", [(50e6, 600.0), (10e9, (1 + 10e9 / 200e6) / 0.05)])
def test_the_automatic_interval_keeps_saving_under_5_percent_and_at_least_10_minutes(tmp_path, checkpoint_bytes,
                                                                                     interval_s):
    p = _periodic(tmp_path, int(checkpoint_bytes))
    assert p.auto and p.interval_s == pytest.approx(interval_s)
    assert p.estimated_save_s / p.interval_s <= 0.05


def test_save_interval_is_minutes_of_training_and_zero_is_off(tmp_path):
    assert _periodic(tmp_path, 10**6, SAVE_INTERVAL="1.5").interval_s == 90
    assert load_settings({"SAVE_INTERVAL": "0"}).save_interval == 0


def test_a_checkpoint_is_due_after_the_interval_and_never_while_one_is_uploading(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(train_control.time, "time", lambda: clock[0])
    p = _periodic(tmp_path, 10**6, SAVE_INTERVAL="1")
    p.begin()
    clock[0] += 59 - p.cost_s  # the save starts early by its estimated cost
    assert not p.due()
    clock[0] += 2
    assert p.due()
    release = threading.Event()
    p.upload = threading.Thread(target=release.wait)
    p.upload.start()
    assert not p.due()  # the previous checkpoint is still being published: this one waits, training does not
    release.set()
    p.upload.join()
    assert p.due()


def test_the_interval_runs_from_the_checkpoints_step_less_what_saving_and_publishing_took(tmp_path, monkeypatch):
    """A kill just before a publish ends loses the interval, not the interval plus the save and
    the publish: the next save is due the interval after the last checkpoint's step, less what the
    last save and publish took."""
    clock = [1000.0]
    monkeypatch.setattr(train_control.time, "time", lambda: clock[0])
    p = _periodic(tmp_path, 10**6, SAVE_INTERVAL="1")
    p.saving(5)
    clock[0] += 3  # the save
    p.saved(tmp_path / "checkpoint-5", SimpleNamespace(global_step=5))
    assert p.mark == 1000.0
    p.cost_s = 3 + 4  # and its publish took 4 s
    clock[0] = 1000.0 + 60 - 7 - 0.5
    assert not p.due()
    clock[0] += 1
    assert p.due()
    p.cost_s = 1000  # a cost above half the interval never makes saving continuous
    clock[0] = 1000.0 + 29
    assert not p.due()


def test_a_slow_save_stretches_the_automatic_interval_not_a_chosen_one(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(train_control.time, "time", lambda: clock[0])
    ckpt = tmp_path / "checkpoint-5"
    for env, expect in (({}, 60 / 0.05), ({"SAVE_INTERVAL": "2"}, 120)):
        p = _periodic(tmp_path, 10**6, **env)
        p.saving(5)
        clock[0] += 60  # the save took a minute
        p.saved(ckpt, SimpleNamespace(global_step=5))
        assert p.interval_s == pytest.approx(expect)


class _Args:
    output_dir = "/nonexistent"


def _step(cb, step: int, max_steps: int = 100):
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    cb.on_step_end(_Args(), SimpleNamespace(global_step=step, max_steps=max_steps), control)
    return control


def test_max_steps_stops_the_run_counting_from_the_step_it_resumed_at(monkeypatch):
    monkeypatch.setitem(stopping.STOP, "signal", None)
    cb = train_control.make_budget_callback(started=0.0, until=1e12, run_steps=3)
    cb.on_train_begin(_Args(), SimpleNamespace(global_step=40), None)
    assert not _step(cb, 42).should_training_stop
    c = _step(cb, 43)
    assert c.should_training_stop and c.should_save and cb.stopped == "MAX_STEPS=3 (steps per run)"


def test_the_last_step_of_a_shard_is_never_a_stop_nor_a_periodic_save(monkeypatch, tmp_path):
    monkeypatch.setitem(stopping.STOP, "signal", None)
    p = _periodic(tmp_path, 10**6, SAVE_INTERVAL="0.0001")
    p.mark = 0
    cb = train_control.make_budget_callback(started=0.0, until=0.0, run_steps=1, periodic=p)  # out of time, too
    cb.on_train_begin(_Args(), SimpleNamespace(global_step=99), None)
    p.mark = 0
    c = _step(cb, 100, max_steps=100)
    assert not c.should_training_stop and not c.should_save and cb.stopped is None


def test_a_due_checkpoint_saves_without_stopping(monkeypatch, tmp_path):
    monkeypatch.setitem(stopping.STOP, "signal", None)
    p = _periodic(tmp_path, 10**6, SAVE_INTERVAL="0.0001")
    cb = train_control.make_budget_callback(started=0.0, until=1e12, periodic=p)
    cb.on_train_begin(_Args(), SimpleNamespace(global_step=0), None)
    p.mark = 0
    c = _step(cb, 7)
    assert c.should_save and not c.should_training_stop and cb.stopped is None
