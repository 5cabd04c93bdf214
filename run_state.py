"""The run state: the published record (training_state.json), the full-state checkpoint
(last-checkpoint/) it points to, and the plan of the next run decided from them.

The record of truth is ``training_state.json`` inside the published output (OUTPUT_REPO for
pretraining, OUTPUT_REPO-it for instruction tuning). A run advances the state only by publishing a
new record together with its model, in one atomic step: a run that fails or is killed leaves the
previous output and record untouched. Reading the state changes nothing.

The record and checkpoint are checked before any work.

Every defect is bad input (exit 2) that names the file, what is wrong and how to fix it: a field of
the wrong type, a record written by a newer train-llama (refused, never rewritten), a checkpoint
with a missing or unreadable part. A damaged run state found here costs seconds; found by the
trainer it cost minutes, and the same minutes again on every rerun.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import Settings
from errors import BadInput

if TYPE_CHECKING:
    from handoff import Manifest, ShardMetrics

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


def _deepspeed_problems(ckpt: Path, step: int) -> list[str]:
    """What is wrong with DeepSpeed's part of the checkpoint: `latest` naming global_step<step>/,
    which holds readable model and optimizer states."""
    problems: list[str] = []
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
    return problems


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
    problems += _deepspeed_problems(ckpt, step)
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


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What one run does: train `shard` of `stage`, starting from `source` (None = fresh weights)."""

    stage: str  # "pretrain" | "instruct"
    shard: int
    target: str  # where this run publishes
    source: str | None  # published model this run continues from
    done: bool = False
    resume: dict[str, Any] | None = None  # the target's last-checkpoint/ to resume this shard from
    # The publish_id of the target's record this plan was made from ("" when there was none): a
    # publish is refused when the target no longer holds that record (another run published since).
    base: str = ""

    @property
    def inst(self) -> bool:
        return self.stage == "instruct"

    def train_format(self, use_quant: bool) -> str:
        """'nf4' (LoRA on a frozen NF4 base) or 'float'. USE_QUANT applies from the second run: the
        run that creates the model has random weights, which frozen in 4-bit would teach nothing."""
        return "nf4" if use_quant and self.source is not None else "float"

    def describe(self) -> str:
        if self.done:
            return (f"the pipeline is done: every pretraining and instruct shard is trained and published; "
                    f"the chat model is in {self.target}")
        start = "fresh weights and a new tokenizer" if self.source is None else self.source
        if self.resume:
            return (f"{self.stage} shard {self.shard}, resuming at step {self.resume['step']} of {self.resume['max_steps']} "
                    f"from {self.target}/last-checkpoint -> {self.target}")
        return f"{self.stage} shard {self.shard} from {start} -> {self.target}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunPlan":
        """The plan a stage handed on (prep's manifest); a missing or unknown field is an error here,
        not a wrong run later."""
        wrong = cls.fields_problem(data)
        if wrong:
            raise BadInput([f"the run plan handed on is not this version's: {wrong}. "
                            "Fix: run prep.py again (the pipeline's stages must come from one version)."])
        return cls(**data)

    @classmethod
    def fields_problem(cls, data: dict[str, Any]) -> str | None:
        """What keeps `data` from being a plan of this version (unknown or missing fields), or None."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        return f"unknown {unknown}, missing {missing}" if unknown or missing else None


def instruct_target(s: Settings) -> str:
    return f"{s.output_repo}-it"


def next_after(stage: str, shard: int, shards_total: int) -> dict[str, Any] | None:
    """The state after finishing `shard` of `stage`: next shard, the instruct stage, or None (done)."""
    if shard + 1 < shards_total:
        return {"inst": stage == "instruct", "init": shard + 1}
    if stage == "pretrain":
        return {"inst": True, "init": 0}
    return None


def _position(inst: bool, init: int) -> tuple[int, int]:
    return (1 if inst else 0, init)


def plan_run(s: Settings) -> RunPlan:
    """Decide this run from the published record; an explicit INIT/INST in the settings overrides it,
    except in a Space when the record is ahead of the variables (a publish that landed before the
    variable update failed or was cut by the restart it triggered): then the record wins."""
    from targets import open_target

    pub_it, pub_pre = open_target(instruct_target(s), s).read_published(), open_target(s.output_repo, s).read_published()
    rec_it, rec_pre = pub_it.record, pub_pre.record
    record = rec_it or rec_pre
    explicit = s.init is not None or s.inst is not None
    if explicit and s.space_id and record is not None:
        nxt = record.get("next")
        var_pos = _position(bool(s.inst), s.init or 0)
        if nxt is None or _position(bool(nxt["inst"]), int(nxt["init"])) > var_pos:
            explicit = False  # the record is ahead: follow it
    if explicit:
        inst = bool(s.inst) if s.inst is not None else bool(record and record.get("next") and record["next"]["inst"])
        init = s.init if s.init is not None else 0
    elif record is None:
        inst, init = False, 0
    elif record.get("next") is None:
        return RunPlan(stage="instruct", shard=record.get("shard", 0), target=instruct_target(s), source=None, done=True)
    else:
        inst, init = bool(record["next"]["inst"]), int(record["next"]["init"])

    if not inst:
        source = None if init == 0 else s.output_repo
        plan = RunPlan(stage="pretrain", shard=init, target=s.output_repo, source=source)
    else:
        source = (s.input_repo or s.output_repo) if init == 0 else instruct_target(s)
        plan = RunPlan(stage="instruct", shard=init, target=instruct_target(s), source=source)
    own = pub_it if plan.inst else pub_pre  # what this run's target holds
    resume = (own.record or {}).get("resume")
    if not (resume and resume.get("stage") == plan.stage and resume.get("shard") == plan.shard):
        resume = None
    plan = RunPlan(plan.stage, plan.shard, plan.target, plan.source, resume=resume, base=own.publish_id)
    if plan.source is not None and not open_target(plan.source, s).has_model():
        what = "INIT" if not inst else ("INPUT_REPO/OUTPUT_REPO" if init == 0 else "INIT")
        raise BadInput([f"{what}: this run ({plan.describe()}) continues from the model in {plan.source}, but no "
                        "published model is there. Fix: run the earlier shards first (unset INIT and INST to follow "
                        "the record), or point OUTPUT_REPO/INPUT_REPO at the published model."])
    return plan


PLAN_FILE = "plan.json"  # in WORK_DIR: the plan trainer.sh made for the run it is starting


def save_plan(s: Settings, plan: RunPlan | None) -> None:
    """Hand `plan` to this run's prep (trainer.sh runs `publish.py plan`, under the output locks,
    right before it), so the record is read and the plan made once per run. None: hand on nothing
    (planning is about to start, and a plan that fails must not leave an older one to be taken)."""
    path = Path(s.work_dir) / PLAN_FILE
    if plan is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(PLAN_FILE + ".tmp")
    staged.write_text(json.dumps(plan.to_json()))
    staged.replace(path)


def this_runs_plan(s: Settings, handed_on: bool) -> RunPlan:
    """The plan handed on by `save_plan` when there is one (`handed_on`: run by trainer.sh, which
    made it), taken so that no later run reuses it; else the plan made now from the record."""
    path = Path(s.work_dir) / PLAN_FILE
    if handed_on and path.exists():
        plan = RunPlan.from_json(json.loads(path.read_text()))
        path.unlink()
        return plan
    return plan_run(s)


def build_record(s: Settings, plan: RunPlan, manifest: Manifest, metrics: ShardMetrics,
                 previous: dict[str, Any] | None) -> dict[str, Any]:
    """The new training_state.json: this run appended to the history, and what the next run does."""
    history = list((previous or {}).get("history", []))
    entry = {"stage": plan.stage, "shard": plan.shard, "shards_total": manifest.shards_total,
             "rows": manifest.rows, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **metrics.history_entry()}
    if manifest.origin is not None:  # where the first run's weights and tokenizer came from (BASE_MODEL, TOKENIZER)
        entry["origin"] = manifest.origin
    if manifest.sources is not None:  # several datasets interleaved: rows, documents and tokens of each in this shard
        entry["sources"] = manifest.sources
    resumed = (previous or {}).get("resume") or {}
    if resumed.get("stage") == plan.stage and resumed.get("shard") == plan.shard:
        entry["interruptions"] = resumed.get("interruptions", 0)
    history.append(entry)
    nxt = next_after(plan.stage, plan.shard, manifest.shards_total)
    return {
        "format": RECORD_FORMAT,
        "stage": plan.stage,
        "shard": plan.shard,
        "shards_total": manifest.shards_total,
        "next": nxt,
        "done": nxt is None,
        "steps": sum(h.get("steps", 0) for h in history),
        "tokens": sum(h.get("tokens", 0) for h in history),
        "architecture": manifest.architecture,
        "parameters": manifest.parameters,
        "history": history,
        "settings": s.redacted(),
    }
