"""The outside world: the run-state record, planning the next run, and publishing a finished run.

    python3 util.py plan      # say what the next run will do; exit 0 = work to do, 3 = pipeline done
    python3 util.py publish   # publish work/final (model, tokenizer, card, state) and advance the state,
                              # or a stopped shard's checkpoint; in a Space, then update its variables
    python3 util.py pause     # in a Space: pause it (the pipeline is done)

The record of truth is ``training_state.json`` inside the published output (OUTPUT_REPO for
pretraining, OUTPUT_REPO-it for instruction tuning). A run advances the state only by publishing a
new record together with its model, in one atomic step: a run that fails or is killed leaves the
previous output and record untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redact
import status_page
from config import BadInput, Settings, is_local_target, load_settings, local_path, report, failure_exit, quiet_disk_full_in_threads, RunFailure
from run_state import RECORD_FORMAT, STATE_FILE, validate_record

EXIT_DONE = 3
PUBLISHED_BY_RUN = "published-by-this-run.json"  # in WORK_DIR: this run's last periodic checkpoint publish


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


def instruct_target(s: Settings) -> str:
    return f"{s.output_repo}-it"


# --- the record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """What `target` holds now: its record (None when nothing was published there) and, on the Hub,
    the commit it was read at (a publish is made on top of exactly that commit)."""

    record: dict[str, Any] | None
    revision: str | None = None

    @property
    def publish_id(self) -> str:
        """The record's publish id; "" when there is no record (and "-" for a record without one)."""
        return "" if self.record is None else str(self.record.get("publish_id") or "-")


def read_published(target: str, s: Settings | None = None) -> Published:
    """The published training_state.json of `target` (a local directory or a Hub repo), checked
    against its schema. Only a definite answer (no such repo, no such file at the head commit, no
    such local file) means "nothing published"; a Hub that cannot be read raises HubError."""
    if not is_local_target(target):
        h = hub(s)
        sha = h.head(target)
        if sha is None:
            return Published(None)
        text = h.read_text(target, STATE_FILE, revision=sha)
        where = f"{target}/{STATE_FILE} on the Hub"
    else:
        root = local_path(target)
        recover_local(root)
        path = root / STATE_FILE
        text = path.read_text() if path.exists() else None
        where, sha = str(path), None
    return Published(None if text is None else validate_record(text, where), sha)


def read_record(target: str, s: Settings | None = None) -> dict[str, Any] | None:
    return read_published(target, s).record


def has_model(target: str, s: Settings | None = None) -> bool:
    if not is_local_target(target):
        files = hub(s).list_files(target)
        return files is not None and "config.json" in files and any(f.endswith(".safetensors") and "/" not in f for f in files)
    root = local_path(target)
    return (root / "config.json").exists() and any(root.glob("*.safetensors"))


def materialize(target: str, s: Settings) -> Path:
    """A local directory holding the published model of `target`: the directory itself, or a snapshot
    of the Hub repo (model, tokenizer, record; not the checkpoint) under WORK_DIR/hub."""
    if is_local_target(target):
        return local_path(target)
    return hub(s).download(target, Path(s.work_dir) / "hub", ignore=["last-checkpoint/*", "runs/*"])


def fetch(var: str, spec: str, s: Settings, allow: list[str]) -> Path:
    """A local directory holding what setting `var` names (BASE_MODEL, TOKENIZER): the directory itself,
    or the `allow`ed files of the Hub repo's current commit under WORK_DIR/hub."""
    if is_local_target(spec):
        path = local_path(spec)
        if not path.is_dir():
            raise BadInput([f"{var}={spec!r}: no such directory. Fix: the path of a saved model or tokenizer, or a Hub repo id."])
        return path
    return hub(s).download(spec, Path(s.work_dir) / "hub", allow=allow)


def llama_config(var: str, spec: str, src: Path) -> dict[str, Any]:
    """The config.json in `src` (what setting `var` = `spec` names), which must describe a Llama."""
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput([f"{var}={spec!r}: no readable config.json ({type(e).__name__}). "
                        "Fix: a saved Hugging Face Llama (a local directory or a Hub repo id)."]) from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        raise BadInput([f"{var}={spec!r}: model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, "
                        "not 'llama'. Fix: a Llama-architecture model."])
    return cfg


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
    pub_it, pub_pre = read_published(instruct_target(s), s), read_published(s.output_repo, s)
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
    if plan.source is not None and not has_model(plan.source, s):
        what = "INIT" if not inst else ("INPUT_REPO/OUTPUT_REPO" if init == 0 else "INIT")
        raise BadInput([f"{what}: this run ({plan.describe()}) continues from the model in {plan.source}, but no "
                        "published model is there. Fix: run the earlier shards first (unset INIT and INST to follow "
                        "the record), or point OUTPUT_REPO/INPUT_REPO at the published model."])
    return plan


# --- publishing ------------------------------------------------------------------------------------


def recover_local(root: Path) -> None:
    """Finish a publish that was killed between its two renames: the old output is put back."""
    old = root.with_name(root.name + ".old")
    if not root.exists() and old.exists():
        old.rename(root)
    elif root.exists() and old.exists():
        shutil.rmtree(old)
    if root.parent.exists():  # a publish killed while staging leaves its half-written copy
        for stale in root.parent.glob(f"{root.name}.tmp-*"):
            if stale.is_dir() and not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staged: Path, root: Path) -> None:
    """Make `staged` the published `root` with renames only, so a reader sees the old or the new output."""
    old = root.with_name(root.name + ".old")
    if root.exists():
        root.rename(old)
    staged.rename(root)
    if old.exists():
        shutil.rmtree(old)


def build_record(s: Settings, plan: RunPlan, manifest: dict[str, Any], metrics: dict[str, Any],
                 previous: dict[str, Any] | None) -> dict[str, Any]:
    """The new training_state.json: this run appended to the history, and what the next run does."""
    history = list((previous or {}).get("history", []))
    entry = {"stage": plan.stage, "shard": plan.shard, "shards_total": manifest["shards_total"],
             "rows": manifest["rows"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **{k: metrics[k] for k in ("steps", "tokens", "train_loss", "eval_loss_before", "eval_loss",
                                        "perplexity", "train_runtime_s", "tokens_per_s", "precision",
                                        "world_size", "train_format", "trainable_parameters", "merged_eval_loss",
                                        "merge_delta_pct", "resumed_from_step", "first_resumed_step_s", "data_order_sha256",
                                        "shard_steps", "skipped_steps", "evals", "best_step", "best_eval_loss",
                                        "last_step_eval_loss", "early_stopped_at")
                if k in metrics}}
    if "origin" in manifest:  # where the first run's weights and tokenizer came from (BASE_MODEL, TOKENIZER)
        entry["origin"] = manifest["origin"]
    if "sources" in manifest:  # several datasets interleaved: rows, documents and tokens of each in this shard
        entry["sources"] = manifest["sources"]
    resumed = (previous or {}).get("resume") or {}
    if resumed.get("stage") == plan.stage and resumed.get("shard") == plan.shard:
        entry["interruptions"] = resumed.get("interruptions", 0)
    history.append(entry)
    nxt = next_after(plan.stage, plan.shard, manifest["shards_total"])
    return {
        "format": RECORD_FORMAT,
        "stage": plan.stage,
        "shard": plan.shard,
        "shards_total": manifest["shards_total"],
        "next": nxt,
        "done": nxt is None,
        "steps": sum(h.get("steps", 0) for h in history),
        "tokens": sum(h.get("tokens", 0) for h in history),
        "architecture": manifest["architecture"],
        "parameters": manifest["parameters"],
        "history": history,
        "settings": s.redacted(),
    }


def publish(s: Settings, work: Path) -> tuple[dict[str, Any], RunPlan]:
    """Publish work/final to the plan's target with its card and record; return the new record and the plan."""
    from model_card import render_card

    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    plan = RunPlan(**manifest["plan"])
    final = work / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    if metrics.get("run_id") != manifest["run_id"]:
        raise RuntimeError(f"{final} was not trained from the prepared data of this run "
                           f"(run {metrics.get('run_id')} vs {manifest['run_id']}): run train.py again.")
    refuse_non_finite(final, metrics)
    current, previous = _unchanged_since(s, work, plan)
    if metrics.get("partial"):
        return publish_checkpoint(s, plan, work, final / "last-checkpoint", metrics, previous, current.revision), plan
    record = build_record(s, plan, manifest, metrics, previous)
    record["publish_id"] = f"{manifest['run_id']}-{uuid.uuid4().hex[:12]}"
    last = record["history"][-1]

    earlier = _earlier_runs(s, plan, work, current)

    def fill(staged: Path) -> None:
        if earlier is not None:  # the traces of every earlier run of the pipeline, linked
            for d in sorted(p for p in earlier.iterdir() if p.is_dir()):
                shutil.copytree(d, staged / "runs" / d.name, copy_function=link_or_copy)
        shutil.copytree(final, staged, ignore=shutil.ignore_patterns("metrics.json"), dirs_exist_ok=True)
        (staged / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (staged / "README.md").write_text(render_card(record, plan.target))

    _deliver(s, plan.target, work, fill, f"{last['stage']} shard {last['shard']}: validation loss "
             f"{last.get('eval_loss', float('nan')):.4f}", record["publish_id"], current.revision)
    return record, plan


def _earlier_runs(s: Settings, plan: RunPlan, work: Path, current: Published) -> Path | None:
    """The runs/ folder whose per-run trace folders a full publish carries over, so that `runs/`
    holds the TensorBoard traces of the whole pipeline: the target's own (locally; the Hub keeps
    them by not deleting them), and for the first instruct publish the pretraining output's."""
    first_instruct = plan.stage == "instruct" and current.record is None
    source = s.output_repo if first_instruct else plan.target
    if is_local_target(source):
        runs = local_path(source) / "runs"
        return runs if runs.is_dir() else None
    if not first_instruct:
        return None
    files = hub(s).list_files(source) or []
    if not any(f.startswith("runs/") and f.count("/") >= 2 for f in files):
        return None
    return hub(s).download(source, work / "earlier-runs", allow=["runs/*/*"]) / "runs"


def _unchanged_since(s: Settings, work: Path, plan: RunPlan) -> tuple[Published, dict[str, Any] | None]:
    """What is published at the plan's target, checked to be what this run last saw there (the
    plan's base, or this run's own last periodic checkpoint); and the record to continue."""
    base = plan.base
    mine = work / PUBLISHED_BY_RUN
    if mine.exists():
        own = json.loads(mine.read_text())
        if own.get("run_id") == json.loads((work / "prepared" / "manifest.json").read_text())["run_id"]:
            base = own["publish_id"]
    current = read_published(plan.target, s)
    if current.publish_id != base:
        raise PublishConflict(f"{plan.target} changed while this run trained: it held "
                              f"{'no record' if not base else 'publish ' + base} when this run last looked and holds "
                              f"{'no record' if not current.publish_id else 'publish ' + current.publish_id} now (another run "
                              "published there). Nothing was published and the state is not advanced. Fix: run again: "
                              "the next run continues from what is published now.")
    previous = current.record
    if plan.stage == "instruct" and previous is None:
        previous = read_record(s.output_repo, s)  # the instruct record continues the pretraining history
    return current, previous


def publish_periodic(s: Settings, work: Path, checkpoint: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A periodic checkpoint (SAVE_INTERVAL) published as last-checkpoint/ while the run trains on:
    the same checks and layout as a stopped run's, and the run remembers what it published so that
    its next publish builds on it."""
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    plan = RunPlan(**manifest["plan"])
    current, previous = _unchanged_since(s, work, plan)
    record = publish_checkpoint(s, plan, work, checkpoint, metrics, previous, current.revision, interrupted=False)
    staged = work / f"{PUBLISHED_BY_RUN}.tmp"
    staged.write_text(json.dumps({"run_id": manifest["run_id"], "publish_id": record["publish_id"], "step": metrics["step"]}))
    staged.replace(work / PUBLISHED_BY_RUN)
    return record


def refuse_non_finite(final: Path, metrics: dict[str, Any]) -> None:
    """The last gate before anything is published: every loss in the metrics and every weight of
    what is about to be published is finite (a NaN model must never replace a good one, whichever
    path produced it)."""
    import math

    from quant_utils import non_finite_tensors

    losses = {k: metrics[k] for k in ("eval_loss", "train_loss", "eval_loss_before", "merged_eval_loss")
              if isinstance(metrics.get(k), (int, float))}
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    for d in (final, final / "last-checkpoint"):
        if d.is_dir() and any(d.glob("*.safetensors")):
            bad += non_finite_tensors(d)
    if bad:
        raise NonFinite(f"{final}: not published, it holds non-finite values ({', '.join(bad[:3])}"
                        f"{', …' if len(bad) > 3 else ''}): the training diverged. The published output and the state "
                        "are unchanged. Fix: a lower LEARNING_RATE, more WARMUP_RATIO, or PRECISION=bf16/fp32.")


def publish_checkpoint(s: Settings, plan: RunPlan, work: Path, checkpoint: Path, metrics: dict[str, Any],
                       previous: dict[str, Any] | None, revision: str | None, interrupted: bool = True) -> dict[str, Any]:
    """A shard stopped mid-way (or saved periodically, not `interrupted`): publish its full-state
    checkpoint as last-checkpoint/ with a record that says where to resume, and nothing else. The
    published model stays the last finished one and the state does not advance."""
    record = dict(previous or {"format": RECORD_FORMAT, "history": [], "steps": 0, "tokens": 0,
                              "next": {"inst": plan.inst, "init": plan.shard}, "done": False})
    if record.get("next") is None or (record["next"]["inst"], record["next"]["init"]) != (plan.inst, plan.shard):
        record["next"] = {"inst": plan.inst, "init": plan.shard}
        record["done"] = False
    earlier = record.get("resume") or {}
    same = earlier.get("stage") == plan.stage and earlier.get("shard") == plan.shard
    record["resume"] = {
        "stage": plan.stage, "shard": plan.shard, "step": metrics["step"], "max_steps": metrics["max_steps"],
        "samples_seen": metrics["samples_seen"], "tokens": metrics["tokens"], "stop_reason": metrics["stop_reason"],
        "eval_loss_before": earlier.get("eval_loss_before") if same else metrics["eval_loss_before"],
        "data_fingerprint": metrics["data_fingerprint"],
        "interruptions": (earlier.get("interruptions", 0) if same else 0) + int(interrupted),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record["publish_id"] = f"{metrics['run_id']}-{uuid.uuid4().hex[:12]}"
    record["settings"] = s.redacted()

    traces = checkpoint.parent / "runs" / str(metrics.get("tensorboard_run", ""))
    traces = traces if metrics.get("tensorboard_run") and traces.is_dir() else None

    def fill(staged: Path) -> None:
        shutil.copytree(checkpoint, staged / "last-checkpoint", copy_function=link_or_copy)
        (staged / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if traces is not None:  # a stopped run's TensorBoard traces, beside those of the runs before it
            shutil.rmtree(staged / "runs" / traces.name, ignore_errors=True)  # links to an earlier copy, if any
            shutil.copytree(traces, staged / "runs" / traces.name)

    _deliver(s, plan.target, work, fill, f"{plan.stage} shard {plan.shard}: checkpoint at step {metrics['step']}",
             record["publish_id"], revision,
             only=["last-checkpoint/", STATE_FILE] + ([f"runs/{traces.name}/"] if traces is not None else []))
    return record


def _deliver(s: Settings, target: str, work: Path, fill, message: str, publish_id: str, revision: str | None,
             only: list[str] | None = None) -> None:
    """Make `target` hold what `fill(staged)` writes into a staging directory: the whole output, or,
    with `only` (files, and folders ending in /), just those paths, the rest of the published output
    kept as it is. Locally the staged copy is swapped in with renames; on the Hub it is one commit."""
    local = is_local_target(target)
    if local:
        root = local_path(target)
        root.parent.mkdir(parents=True, exist_ok=True)
        staged = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    else:
        staged = work / "publish"
    if staged.exists():
        shutil.rmtree(staged)
    if local and only is not None and root.exists():  # the rest of the output, linked, not copied
        shutil.copytree(root, staged, ignore=shutil.ignore_patterns(*(p.rstrip("/") for p in only)),
                        copy_function=link_or_copy)
    else:
        staged.mkdir()
    try:
        fill(staged)
        if local:
            _fsync_tree(staged)
            _swap_in(staged, root)
        else:
            hub(s).publish(target, staged, message, publish_id, revision, replace=only)
    finally:  # a failed publish (a full disk, the Hub down) leaves no half-written copy behind
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows it (no copy of large weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename publishes complete files even after a power cut."""
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


# --- the Hub ---------------------------------------------------------------------------------------

_HUBS: dict[int, "Hub"] = {}


def hub(s: Settings | None) -> "Hub":
    """The Hub client of these settings (one per process and settings)."""
    if s is None:
        s = load_settings()
    if id(s) not in _HUBS:
        _HUBS[id(s)] = Hub(s)
    return _HUBS[id(s)]


class HubError(RunFailure):
    """A Hub call that kept failing on transient errors, or a publish that met a concurrent change."""

    label = "Hub"


class NonFinite(RunFailure):
    """What was trained holds NaN or infinity: it is never published."""

    label = "publish refused"


class PublishConflict(HubError):
    """The output changed under this run (another run published there): nothing is published."""

    label = "publish refused"


class HubRefused(BadInput):
    """A Hub call that cannot succeed (401, 403, 404, a rejected request): bad input, exit 2."""


HUB_ERRORS = (HubError, HubRefused)


class Hub:
    """huggingface_hub's HfApi with this project's rules: a timeout on every request, retries with
    exponential backoff and jitter on transient errors only (5xx, 429 honouring Retry-After,
    timeouts, dropped connections), immediate failure with the reason on anything else. The token
    is passed to the client only; it is never formatted into a message."""

    def __init__(self, s: Settings) -> None:
        import httpx2
        import huggingface_hub
        from huggingface_hub.utils._http import hf_request_event_hook

        huggingface_hub.utils.disable_progress_bars()  # one line per publish, not one bar per file

        timeout = s.hub_timeout
        # A download with no cached copy whose metadata request timed out is retried by the client
        # itself with a fixed 60 s timeout: HUB_TIMEOUT would not hold there, and a stalled Hub would
        # hold each read for a minute per attempt. Our retries (HUB_RETRIES) cover that case.
        from huggingface_hub import file_download

        if hasattr(file_download, "_ETAG_RETRY_TIMEOUT"):
            file_download._ETAG_RETRY_TIMEOUT = timeout
        huggingface_hub.set_client_factory(lambda: httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0))))
        self.s = s
        self.token = s.hf_token.get_secret_value() if s.hf_token else None
        self.api = huggingface_hub.HfApi(token=self.token or False)
        self.retries: dict[str, int] = {}

    # --- retries -----------------------------------------------------------------------------
    @staticmethod
    def transient(e: BaseException) -> tuple[bool, float | None]:
        """(retry?, the server's Retry-After in seconds if it gave one)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        if isinstance(e, LocalEntryNotFoundError):  # the client got no answer and has no cached copy: why?
            cause = e.__cause__
            return Hub.transient(cause) if cause is not None else (True, None)
        if isinstance(e, httpx2.LocalProtocolError):  # the request itself is malformed: no retry can help
            return False, None
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            code = e.response.status_code
            if code == 429 or code >= 500:
                after = e.response.headers.get("Retry-After")
                try:
                    return True, float(after) if after is not None else None
                except ValueError:
                    return True, None
            return False, None
        if isinstance(e, OfflineModeIsEnabled):  # HF_HUB_OFFLINE: no retry will reach the Hub
            return False, None
        return isinstance(e, (httpx2.TransportError, TimeoutError, ConnectionError)), None

    def call(self, what: str, fn, *args, **kwargs):
        import random

        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - classified below; what cannot succeed is raised at once
                retry, after = self.transient(e)
                if not retry or attempt >= self.s.hub_retries:
                    raise self.explain(what, e, attempt) from e
                wait = after if after is not None else min(60.0, self.s.hub_retry_wait * 2 ** attempt) * random.uniform(0.5, 1.5)
                attempt += 1
                self.retries[what] = self.retries.get(what, 0) + 1
                print(f"[hub] {what}: {self.describe(e)}; retry {attempt} of {self.s.hub_retries} in {wait:.1f} s",
                      flush=True)
                time.sleep(wait)

    @staticmethod
    def describe(e: BaseException) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return f"HTTP {e.response.status_code}"
        return type(e).__name__

    def explain(self, what: str, e: BaseException, attempts: int) -> HubError | HubRefused:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        code = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
        fix = {401: "HF_TOKEN is not valid: create a new token with write access and set the secret HF_TOKEN.",
               403: "HF_TOKEN cannot write there: use a token with write access to that namespace (a fine-grained token "
                    "needs write on the repo), or choose an OUTPUT_REPO under your own name.",
               404: "the repo does not exist or the token cannot see it: check OUTPUT_REPO / INPUT_REPO and HF_TOKEN."}.get(code)
        detail = (str(e).splitlines()[0][:300] if str(e) else type(e).__name__).rstrip(".")
        if isinstance(e, OfflineModeIsEnabled):
            fix = "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to read from or publish to the Hub."
        if self.transient(e)[0]:
            return HubError(f"{what}: {detail}. The Hub kept failing after {attempts} retries: run again later "
                            "(nothing was lost).")
        return HubRefused([f"{what}: {detail}" + (f". Fix: {fix}" if fix else "")])

    # --- reading ----------------------------------------------------------------------------------
    def read_text(self, repo: str, path: str, revision: str | None = None) -> str | None:
        """A file of the repo at `revision` (a commit: what is read is exactly that commit's file,
        from the cache or the Hub; default the main branch), or None when the Hub answers that the
        repo, the revision or the file does not exist."""
        from huggingface_hub import hf_hub_download

        local = self.unless_missing(f"read {repo}/{path}", hf_hub_download, repo, path, revision=revision,
                                    token=self.token or False, cache_dir=self.cache(), etag_timeout=self.s.hub_timeout)
        return None if local is None else Path(local).read_text()

    def list_files(self, repo: str, revision: str | None = None) -> list[str] | None:
        return self.unless_missing(f"list {repo}", self.api.list_repo_files, repo, revision=revision)

    def head(self, repo: str) -> str | None:
        info = self.unless_missing(f"info {repo}", self.api.repo_info, repo)
        return None if info is None else info.sha

    @staticmethod
    def absent(e: BaseException | None) -> bool:
        """The one rule for "not there": the Hub itself answered 404 for this repo, revision or file.
        A Hub that could not be reached (huggingface_hub's LocalEntryNotFoundError: no answer and no
        cached copy), a 5xx, a timeout or a gated repo is not an answer about the file."""
        from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        return (isinstance(e, (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))
                and not isinstance(e, GatedRepoError) and e.response is not None and e.response.status_code == 404)

    def unless_missing(self, what: str, fn, *args, **kwargs):
        """`call`, with None where the Hub answers that the repo, revision or file is not there."""
        try:
            return self.call(what, fn, *args, **kwargs)
        except HUB_ERRORS as e:
            if self.absent(e.__cause__):
                return None
            raise

    def download(self, repo: str, into: Path, ignore: list[str] | None = None, allow: list[str] | None = None) -> Path:
        """A snapshot of the repo at its current commit, in `into`/<owner>--<name>/<commit>."""
        from huggingface_hub import snapshot_download

        sha = self.head(repo)
        if sha is None:
            raise HubError(f"{repo}: no such repo on the Hub (or HF_TOKEN cannot see it)")
        dst = into / repo.replace("/", "--") / sha
        done = dst / f".complete-{'allow' if allow else 'ignore'}-{'-'.join(allow or ignore or []).replace('/', '_')}"
        if not done.exists():  # each selection of files (the model, the checkpoint) is fetched once
            self.call(f"download {repo}", snapshot_download, repo, revision=sha, local_dir=dst, token=self.token or False,
                      ignore_patterns=ignore, allow_patterns=allow, cache_dir=self.cache())
            done.write_text(sha)
        for old in dst.parent.iterdir():  # earlier snapshots of this repo are no longer needed
            if old != dst and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return dst

    def cache(self) -> str:
        return str(Path(self.s.work_dir).resolve() / "hub" / ".cache")

    # --- access -------------------------------------------------------------------------------
    def check_access(self, repos: list[str]) -> list[str]:
        """Problems that would stop publishing to `repos` (each with its fix); [] when the token can
        write to every one of them (existing or creatable) and, in a Space, to the Space."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            me = self.call("whoami", self.api.whoami)
        except HubRefused as e:  # a Hub that does not answer is an outage (raised), not a token problem
            return [f"HF_TOKEN: {e}"]
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            return ["HF_TOKEN is a read-only token: publishing needs write access. Fix: create a token with the "
                    "'write' role (or a fine-grained token with write access to the repo) and set the secret HF_TOKEN."]
        spaces = [self.s.space_id] if self.s.space_id else []
        namespaces = {me.get("name"), *(o.get("name") for o in me.get("orgs") or [])}
        problems = []
        for repo in repos + spaces:
            kind = "space" if repo in spaces else "model"
            try:
                self.call(f"check {repo}", self.api.auth_check, repo, repo_type=kind, write=True)
            except HubRefused as e:
                cause = e.__cause__
                status = cause.response.status_code if isinstance(cause, HfHubHTTPError) and cause.response is not None else None
                if status == 404 and kind == "model":
                    if repo.split("/")[0] not in namespaces:
                        problems.append(f"{repo}: the token ({me.get('name')}) cannot create repos under "
                                        f"{repo.split('/')[0]!r}. Fix: an OUTPUT_REPO under {me.get('name')!r} or one of "
                                        "its organisations, or a token of that namespace.")
                    continue  # created on the first publish
                problems.append(str(e))
        return problems

    # --- writing ------------------------------------------------------------------------------
    def publish(self, repo: str, folder: Path, message: str, publish_id: str, parent: str | None,
                replace: list[str] | None = None) -> str:
        """One commit making `repo` hold exactly `folder` (or, with `replace`, making those paths hold
        what `folder` has and leaving the rest): every file added, every file of an earlier publish
        that is not in `folder` deleted, on top of the head read before (parentCommit), so
        that a concurrent change fails the commit instead of being overwritten. A commit whose answer
        was lost and that is retried finds the head moved: it counts as landed when the head's record
        carries this `publish_id`. Returns the commit id."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        if parent is None:  # a new repo: created now, and still without a record
            self.call(f"create {repo}", self.api.create_repo, repo, private=self.s.private, exist_ok=True)
            parent = self.head(repo)
            if parent is None or self.read_text(repo, STATE_FILE, revision=parent) is not None:
                raise PublishConflict(f"publish {repo}: another run created and published this repo while this run "
                                      "trained. Nothing was published. Fix: run again; the next run reads what is there now.")
        existing = set(self.list_files(repo, revision=parent) or [])
        if replace is not None:  # only these paths (a file, or a folder ending in /) are this publish's
            existing = {f for f in existing if any(f == r or (r.endswith("/") and f.startswith(r)) for r in replace)}
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        # runs/<run>/ are the TensorBoard traces of earlier runs: every publish adds its own, none removes them
        stale = sorted(f for f in existing - set(files) - {".gitattributes"} if not (f.startswith("runs/") and f.count("/") >= 2))

        def commit():
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
            return self.api.create_commit(repo, ops, commit_message=message, parent_commit=parent)

        try:
            return self.call(f"publish {repo}", commit).oid
        except HUB_ERRORS as e:
            cause = e.__cause__
            if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code == 412:
                head = self.head(repo)
                landed = self.read_text(repo, STATE_FILE, revision=head) if head else None
                try:
                    if landed and json.loads(landed).get("publish_id") == publish_id:
                        return head or ""
                except json.JSONDecodeError:
                    pass
                raise PublishConflict(f"publish {repo}: another run published to this repo while this run was training or "
                                      "publishing, so nothing was published and the state is not advanced. Fix: run again; "
                                      "the next run reads what is there now.") from cause
            raise

    # --- the Space ----------------------------------------------------------------------------------
    def pause(self) -> str:
        self.call(f"pause {self.s.space_id}", self.api.pause_space, self.s.space_id)
        return f"Space {self.s.space_id} paused: the pipeline is done"

    def space_after_publish(self, record: dict[str, Any]) -> str:
        """Tell the Space what the record says: pause it when the pipeline is done; else write the
        next INIT then INST (in that order: a restart triggered by the first update leaves the
        variables behind the record, never ahead of it, and the record wins on the next start);
        restart it when neither changes (a shard stopped mid-way resumes on the next start)."""
        space = self.s.space_id
        if record.get("next") is None:
            return self.pause()
        current = {k: v.value for k, v in self.call(f"variables {space}", self.api.get_space_variables, space).items()}
        want = {"INIT": str(record["next"]["init"]), "INST": str(record["next"]["inst"]).lower()}
        changed = [k for k in ("INIT", "INST") if current.get(k) != want[k]]
        for k in changed:
            self.call(f"set {k} on {space}", self.api.add_space_variable, space, k, want[k])
        if not changed:
            self.call(f"restart {space}", self.api.restart_space, space)
            return f"Space {space} restarted to continue INST={want['INST']} INIT={want['INIT']}"
        return f"Space {space} variables set: INST={want['INST']} INIT={want['INIT']} (the Space restarts with them)"


def where_published(target: str) -> str:
    return str(local_path(target)) if is_local_target(target) else f"{target} on the Hub"


def next_run_words(record: dict[str, Any]) -> str:
    r, nxt = record.get("resume"), record.get("next")
    if r:
        return f"resumes {r['stage']} shard {r['shard']} at step {r['step']}"
    if nxt is None:
        return "none: the pipeline is done"
    return f"{'instruct' if nxt['inst'] else 'pretrain'} shard {nxt['init']} (INST={str(nxt['inst']).lower()} INIT={nxt['init']})"


def summary(record: dict[str, Any], target: str) -> str:
    where = local_path(target) if is_local_target(target) else f"{target} on the Hub"
    r = record.get("resume")
    if r:
        return (f"published checkpoint: {r['stage']} shard {r['shard']} stopped by {r['stop_reason']} at step {r['step']} of "
                f"{r['max_steps']} -> {where}/last-checkpoint\n"
                f"next run: resumes {r['stage']} shard {r['shard']} at step {r['step']} (the state does not advance)")
    last = record["history"][-1]
    lines = [f"published: {last['stage']} shard {last['shard']} ({last['shard'] + 1} of {last['shards_total']}) -> {where}",
             f"validation loss: {last.get('eval_loss_before', float('nan')):.3f} -> {last.get('eval_loss', float('nan')):.3f}"
             f" (perplexity {last.get('perplexity', float('nan')):.1f}); {last.get('steps', 0)} steps, {last.get('tokens', 0):,} tokens"]
    nxt = record["next"]
    if nxt is None:
        lines.append("next run: none, the pipeline is done")
    else:
        lines.append(f"next run: {'instruct' if nxt['inst'] else 'pretrain'} shard {nxt['init']} (INST={str(nxt['inst']).lower()} INIT={nxt['init']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="util.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["plan", "publish", "pause"])
    args = ap.parse_args(argv)
    redact.install()
    quiet_disk_full_in_threads()
    try:
        s = load_settings()
        if args.command == "plan":
            plan = plan_run(s)
            print(f"this run: {plan.describe()}")
            return EXIT_DONE if plan.done else 0
        if args.command == "pause":
            if not s.space_id:
                print("not in a Space (SPACE_ID is not set): nothing to pause")
                return 0
            print(hub(s).pause())
            return 0
        from output_lock import acquire

        acquire(s)
        record, plan = publish(s, Path(s.work_dir))
        print(summary(record, plan.target))
        status_page.emit("publish", where=where_published(plan.target), url=None if is_local_target(plan.target) else
                         f"https://huggingface.co/{plan.target}", summary=summary(record, plan.target).splitlines()[0],
                         history=record.get("history", []), next_run=next_run_words(record))
        h = _HUBS.get(id(s))
        if h is not None and h.retries:
            print(f"[hub] retries: {json.dumps(h.retries)}")
        if s.space_id:
            print(hub(s).space_after_publish(record))
        return 0
    except Exception as e:  # noqa: BLE001 - failure_exit re-raises what is not bad input, a RunFailure or a full disk
        return failure_exit(e)


if __name__ == "__main__":
    raise SystemExit(main())
