"""The schema of the run state: the published record (training_state.json) and the full-state
checkpoint (last-checkpoint/) it points to, checked before any work.

Every defect is bad input (exit 2) that names the file, what is wrong and how to fix it: a field of
the wrong type, a record written by a newer train-llama (refused, never rewritten), a checkpoint
with a missing or unreadable part. A damaged run state found here costs seconds; found by the
trainer it cost minutes, and the same minutes again on every rerun.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import BadInput

STATE_FILE = "training_state.json"
RECORD_FORMAT = 1  # the newest record format this version reads and writes

RECORD_FIX = ("Fix: restore training_state.json from an earlier version (on the Hub: the repo's commit history; "
              "locally: a backup), or move the published output aside to start the pipeline over.")
CHECKPOINT_FIX = ("Fix: delete last-checkpoint/ and the \"resume\" entry of training_state.json there to retrain the "
                  "shard from its start (the published model is not touched).")


class _Strict(BaseModel):
    # strict: "no" is not a bool and "1" is not an int; unknown fields are kept (history entries and
    # the record grow new fields within a format version).
    model_config = ConfigDict(strict=True, extra="allow")


class Next(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    inst: bool
    init: int = Field(ge=0)


class Resume(_Strict):
    stage: Literal["pretrain", "instruct"]
    shard: int = Field(ge=0)
    step: int = Field(ge=0)
    max_steps: int = Field(ge=1)
    samples_seen: int = Field(ge=0)
    tokens: int = Field(ge=0)
    stop_reason: str
    eval_loss_before: float | None
    data_fingerprint: str | None
    interruptions: int = Field(ge=0)


class HistoryEntry(_Strict):
    stage: Literal["pretrain", "instruct"]
    shard: int = Field(ge=0)
    shards_total: int = Field(ge=1)
    steps: int = Field(default=0, ge=0)
    tokens: int = Field(default=0, ge=0)


class Record(_Strict):
    # `next` drives the plan and must be there; the rest is checked when present (the pipeline
    # always writes them; a record written by hand may leave them out).
    next: Next | None
    format: int = Field(default=RECORD_FORMAT, ge=1)
    done: bool | None = None
    steps: int = Field(default=0, ge=0)
    tokens: int = Field(default=0, ge=0)
    history: list[HistoryEntry] = []
    stage: Literal["pretrain", "instruct"] | None = None
    shard: int | None = Field(default=None, ge=0)
    shards_total: int | None = Field(default=None, ge=1)
    resume: Resume | None = None
    publish_id: str | None = None


def _where(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(the record)"


def validate_record(text: str, where: str) -> dict[str, Any]:
    """The record parsed from `text` (the content of `where`), checked against its schema; returns
    the plain dict. Raises BadInput naming every defect."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput([f"{where}: the run-state record is not valid JSON ({e}). {RECORD_FIX}"]) from None
    if not isinstance(data, dict):
        raise BadInput([f"{where}: the run-state record is a JSON {type(data).__name__}, not an object. {RECORD_FIX}"])
    fmt = data.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > RECORD_FORMAT:
        raise BadInput([f"{where}: written by a newer train-llama (record format {fmt}; this version reads up to "
                        f"{RECORD_FORMAT}), so this version cannot continue it and leaves it as it is. Fix: update "
                        "train-llama (a newer checkout or image)."])
    try:
        rec = Record.model_validate(data)
    except ValidationError as e:
        defects = [f"{_where(err['loc'])}: " + ("missing" if err["type"] == "missing" else
                                                 f"{err['msg']} (found {json.dumps(err.get('input'))[:60]})")
                   for err in e.errors()]
        raise BadInput([f"{where}: the run-state record is damaged: {'; '.join(defects)}. {RECORD_FIX}"]) from None
    if rec.done is not None and rec.done != (rec.next is None):
        raise BadInput([f"{where}: the run-state record is damaged: \"done\" is {str(rec.done).lower()} but \"next\" is "
                        f"{json.dumps(data.get('next'))}. {RECORD_FIX}"])
    return data


def _torch_archive_problem(path: Path) -> str | None:
    """Why the torch.save file at `path` cannot be loaded (a zip archive whose every member's CRC
    holds), or None."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"unreadable ({e})"
    return f"damaged (member {bad} fails its checksum)" if bad else None


def validate_checkpoint(ckpt: Path, step: int, where: str) -> None:
    """The full-state checkpoint the record says to resume at `step` is complete and readable: the
    trainer state at that step, DeepSpeed's `latest` tag naming an existing global_step folder with
    the model and optimizer states, the scheduler and RNG states, the model or adapter weights, the
    tokenizer and the data order. Reads every byte of the torch archives (checksums), loads no
    tensor. Raises BadInput listing every defect."""
    from quant_utils import read_safetensors_header

    problems: list[str] = []

    def json_of(name: str, kind: type) -> Any:
        p = ckpt / name
        try:
            value = json.loads(p.read_text())
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            problems.append(f"{name} is not valid JSON ({e})")
            return None
        if not isinstance(value, kind):
            problems.append(f"{name} holds a JSON {type(value).__name__}, not a {kind.__name__}")
            return None
        return value

    if not ckpt.is_dir():
        raise BadInput([f"{where}: the record says to resume at step {step}, but there is no checkpoint. {CHECKPOINT_FIX}"])
    state = json_of("trainer_state.json", dict)
    if state is not None:
        got = state.get("global_step")
        if not isinstance(got, int) or isinstance(got, bool):
            problems.append(f"trainer_state.json has no whole-number global_step (found {json.dumps(got)})")
        elif got != step:
            problems.append(f"trainer_state.json is at step {got}, the record says {step}")
    json_of("data_order.json", list)
    json_of("tokenizer.json", dict)
    try:
        tag = (ckpt / "latest").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError) as e:
        problems.append(f"latest (DeepSpeed's tag file) is {'missing' if isinstance(e, FileNotFoundError) else 'not text'}")
        tag = None
    if tag is not None:
        if not re.fullmatch(r"global_step\d+", tag):
            problems.append(f"latest names {tag[:40]!r}, not a global_step<N> folder")
        elif not (ckpt / tag).is_dir():
            problems.append(f"latest names {tag}/, which is missing")
        else:
            if tag != f"global_step{step}":
                problems.append(f"latest names {tag}/, the record says step {step}")
            parts = [ckpt / tag / "mp_rank_00_model_states.pt", *sorted((ckpt / tag).glob("*_optim_states.pt"))]
            if len(parts) == 1:
                problems.append(f"{tag}/ has no optimizer states (*_optim_states.pt)")
            for part in parts:
                why = _torch_archive_problem(part)
                if why:
                    problems.append(f"{part.relative_to(ckpt)} is {why}")
    rng = [p.name for p in sorted(ckpt.glob("rng_state*.pth"))] or ["rng_state.pth"]
    for name in ("scheduler.pt", *rng):
        why = _torch_archive_problem(ckpt / name)
        if why:
            problems.append(f"{name} is {why}")
    weights = [p for p in (ckpt / "model.safetensors", ckpt / "adapter_model.safetensors") if p.exists()]
    if not weights:
        problems.append("no model.safetensors or adapter_model.safetensors")
    for w in weights:
        try:
            read_safetensors_header(w)
        except BadInput as e:
            problems.append(e.problems[0].split(": ", 1)[-1].split(". Fix")[0])
    if problems:
        raise BadInput([f"{where}: the checkpoint to resume from is damaged: {'; '.join(problems)}. {CHECKPOINT_FIX}"])
