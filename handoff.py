"""What one stage hands the next, typed: prep's manifest (WORK_DIR/prepared/manifest.json, read by
train and publish) and train's metrics (WORK_DIR/final/metrics.json, read by publish): those of a
finished shard, or those of a checkpoint (a shard stopped mid-way, or saved periodically).

Each is written and read here. A missing or unknown field, or a field of the wrong type, is bad
input at the boundary, naming the file and the stage to run again (the stages of one run must come
from one version), rather than a KeyError or a wrong record later. The plan inside the manifest is
run_state.RunPlan (checked by its own from_json), and the published record is run_state.Record.

A field left out when an object was built stays out of its JSON (`to_json`): the record's history
entry of a shard has exactly the keys it had before these objects were typed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer, field_validator

from errors import BadInput
from run_state import RunPlan

MANIFEST_FILE = "manifest.json"  # in WORK_DIR/prepared
METRICS_FILE = "metrics.json"  # in WORK_DIR/final


def _load(path: Path, fix: str, absent: str) -> Any:
    """The JSON in `path`; a file that is absent, or not JSON (cut short, damaged), is bad input
    naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput([f"{path}: {absent}"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput([f"{path}: not valid JSON ({e}). {fix}"]) from None


def _defect(err: dict[str, Any]) -> str:
    """One field's problem as pydantic found it, in words."""
    what = {"missing": "missing", "extra_forbidden": "unknown to this version"}.get(err["type"])
    if what is None:
        what = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    return f"{'.'.join(str(x) for x in err['loc'])}: {what}"


class _Handoff(BaseModel):
    # strict: 1.5 is not an int and "true" is not a bool; forbid: a field this version does not know
    # means another version wrote the file. A field assigned later is checked as it is assigned.
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)
    FIX: ClassVar[str]
    ABSENT: ClassVar[str]  # what an absent file means, and its fix

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)

    @classmethod
    def from_json(cls, data: Any, where: str):
        if not isinstance(data, dict):
            raise BadInput([f"{where}: a JSON {type(data).__name__}, not an object. {cls.FIX}"])
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            defects = "; ".join(_defect(err) for err in e.errors())
            raise BadInput([f"{where}: not what this version's stages hand on ({defects}). {cls.FIX}"]) from None

    def with_fields(self, fields: dict[str, Any]):
        """A copy with `fields` added or changed, checked like the rest (an unknown one is an error
        here, not a key silently left out of the file)."""
        return type(self).model_validate({**self.model_dump(exclude_unset=True, round_trip=True), **fields})

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, path: Path):
        return cls.from_json(_load(path, cls.FIX, cls.ABSENT), str(path))


class Manifest(_Handoff):
    """What prep prepared for this run (WORK_DIR/prepared): the plan it was made for, the shard's
    data and its fingerprint, and the model's architecture and format."""

    FIX: ClassVar[str] = "Fix: run prep.py again (trainer.sh does): the pipeline's stages must come from one version."
    ABSENT: ClassVar[str] = "no prepared shard here. Fix: run prep.py first (trainer.sh runs every stage)."

    run_id: str
    plan: RunPlan
    dataset: str  # the INPUT_DATASET / INSTRUCT_DATASET this shard was read from
    rows: int
    documents: int
    shards_total: int
    tokens: int
    sequences: int
    train_sequences: int
    val_sequences: int
    sources: list[dict[str, Any]] | None = None  # several datasets interleaved: rows, documents, tokens of each
    packed_chats: bool
    train_chats: int | None = None  # with packed chats: how many the train sequences hold
    raw_bytes: int
    tokenize_seconds: float
    architecture: dict[str, Any]
    parameters: int
    train_format: Literal["float", "nf4"]
    source_format: dict[str, Any] | None  # the published model continued from, as found (None: fresh weights)
    prep_seconds: float
    data_fingerprint: str
    origin: dict[str, Any] | None = None  # the first run's BASE_MODEL / TOKENIZER
    resume: dict[str, Any] | None = None  # the checkpoint this run resumes (prepared/checkpoint) and where

    @field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        wrong = RunPlan.fields_problem(v)
        if wrong:
            raise ValueError(f"the run plan is not this version's: {wrong}")
        return RunPlan(**v)

    @field_serializer("plan")
    def _plan_json(self, plan: RunPlan) -> dict[str, Any]:
        return plan.to_json()

    @classmethod
    def outside_prep(cls, *, run_id: str, plan: RunPlan, architecture: dict[str, Any], parameters: int,
                     train_format: Literal["float", "nf4"], train_sequences: int, val_sequences: int,
                     tokens: int) -> "Manifest":
        """The manifest of a prepared directory built without prep (a benchmark's own data): every
        field stated, the data described by its counts."""
        return cls(run_id=run_id, plan=plan, dataset=run_id, rows=train_sequences + val_sequences,
                   documents=train_sequences + val_sequences, shards_total=1, tokens=tokens,
                   sequences=train_sequences + val_sequences, train_sequences=train_sequences,
                   val_sequences=val_sequences, packed_chats=False, raw_bytes=0, tokenize_seconds=0.0,
                   architecture=architecture, parameters=parameters, train_format=train_format, source_format=None,
                   prep_seconds=0.0, data_fingerprint=run_id)

    @property
    def chats_per_sequence(self) -> float:
        return self.train_chats / self.train_sequences if self.packed_chats and self.train_chats else 1.0


def read_manifest(work: Path) -> Manifest:
    return Manifest.read(work / "prepared" / MANIFEST_FILE)


_METRICS_FIX = "Fix: run train.py again (trainer.sh does): the pipeline's stages must come from one version."
_METRICS_ABSENT = "no trained shard here. Fix: run train.py first (trainer.sh runs every stage)."


class ShardMetrics(_Handoff):
    """A shard trained to its end: what its training measured. The record's history entry of the
    shard is these minus NOT_IN_HISTORY, in this order."""

    FIX: ClassVar[str] = _METRICS_FIX
    ABSENT: ClassVar[str] = _METRICS_ABSENT
    NOT_IN_HISTORY: ClassVar[frozenset[str]] = frozenset({"run_id", "gradient_checkpointing", "first_step_s"})

    run_id: str
    steps: int
    tokens: int
    train_loss: float
    eval_loss_before: float
    eval_loss: float
    perplexity: float
    train_runtime_s: float
    tokens_per_s: float
    precision: str
    world_size: int
    train_format: Literal["float", "nf4"]
    trainable_parameters: int
    # NF4 + LoRA: the merged model's validation loss, and its distance from the adapter's (%).
    merged_eval_loss: float | None = None
    merge_delta_pct: float | None = None
    resumed_from_step: int | None = None
    first_resumed_step_s: float | None = None
    data_order_sha256: str | None = None  # the digest of every batch in the order trained
    # SHARD_STEPS: the steps EPOCHS passes would have taken, and those not trained.
    shard_steps: int | None = None
    skipped_steps: int | None = None
    # Evaluations during training: [step, loss] in order, the best, and how the shard ended.
    evals: list[list[int | float]] | None = None
    best_step: int | None = None
    best_eval_loss: float | None = None
    last_step_eval_loss: float | None = None
    early_stopped_at: int | None = None
    gradient_checkpointing: bool
    first_step_s: float | None

    def history_entry(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k not in self.NOT_IN_HISTORY}

    def losses(self) -> dict[str, float]:
        """Every loss these metrics state (the gate before a publish checks each is finite)."""
        return {k: v for k, v in self.to_json().items()
                if k in ("eval_loss", "train_loss", "eval_loss_before", "merged_eval_loss") and v is not None}


class CheckpointMetrics(_Handoff):
    """A checkpoint mid-shard (a stop, or a periodic save): where it is and what the next run
    resumes from."""

    FIX: ClassVar[str] = _METRICS_FIX
    ABSENT: ClassVar[str] = _METRICS_ABSENT

    run_id: str
    partial: Literal[True]
    data_fingerprint: str
    stop_reason: str
    step: int
    max_steps: int
    eval_loss_before: float | None
    samples_seen: int
    tokens: int
    train_runtime_s: float
    first_step_s: float | None
    tensorboard_run: str

    def losses(self) -> dict[str, float]:
        return {"eval_loss_before": self.eval_loss_before} if self.eval_loss_before is not None else {}


def read_metrics(final: Path) -> ShardMetrics | CheckpointMetrics:
    """WORK_DIR/final's metrics: a checkpoint's when marked partial, else a finished shard's."""
    path = final / METRICS_FILE
    data = _load(path, _METRICS_FIX, _METRICS_ABSENT)
    kind = CheckpointMetrics if isinstance(data, dict) and data.get("partial") else ShardMetrics
    return kind.from_json(data, str(path))
