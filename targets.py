"""Where a model lives: a local directory or a Hub repo, behind one interface.

Every setting that names a model place (OUTPUT_REPO, OUTPUT_REPO-it, INPUT_REPO, BASE_MODEL,
TOKENIZER, convert.py --push) is opened here with `open_target`; the stages ask the target what they
need (its record, whether it holds a model, a local copy of it, an atomic publish, write access, a
name to show) and never which kind it is. A new kind of place is one class in this file.

Reading has no side effects. A local publish killed between its two renames leaves the previous
output as `<dir>.old`; readers see that output, and `recover()` (called by the publish and run
entry points, under the output lock) puts it back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from config import Settings
from errors import BadInput
from files import link_or_copy, old, recover, replacing
from run_state import STATE_FILE, instruct_target, validate_record

HUB_ID_HINT = "neither a local path (./dir, /dir, ~/dir) nor a Hub repo id (owner/name)"


def is_local_spec(spec: str) -> bool:
    """A local directory (absolute, ./, ../, ~ or file:) rather than a Hub repo id 'owner/name'."""
    return spec.startswith(("/", "./", "../", "~", "file:")) or spec in {".", ".."}


def local_path(spec: str) -> Path:
    return Path(spec.removeprefix("file:")).expanduser().resolve()


@dataclass(frozen=True)
class Published:
    """What a target holds now: its record (None when nothing was published there) and, on the Hub,
    the commit it was read at (a publish is made on top of exactly that commit)."""

    record: dict[str, Any] | None
    revision: str | None = None

    @property
    def publish_id(self) -> str:
        """The record's publish id; "" when there is no record (and "-" for a record without one)."""
        return "" if self.record is None else str(self.record.get("publish_id") or "-")


class Target:
    """A place a model is read from and published to."""

    spec: str  # the setting's value, as given
    local_dir: Path | None  # the directory this target writes on this machine (None: nothing local)
    needs_token = False  # publishing there needs HF_TOKEN
    survives_restart = True  # still there after a Space restart wipes the container's disk
    url: str | None = None  # where a person sees it in a browser

    @property
    def where(self) -> str:
        """The name a person reads in a log line."""
        raise NotImplementedError

    @property
    def load_id(self) -> str:
        """What `from_pretrained` takes to load the published model."""
        raise NotImplementedError

    def read_published(self) -> Published:
        """The published training_state.json, checked against its schema. Only a definite answer
        means "nothing published"; a place that cannot be read raises."""
        raise NotImplementedError

    def read_record(self) -> dict[str, Any] | None:
        return self.read_published().record

    def head(self) -> str | None:
        """The version a publish is made on top of (a Hub commit; None where a publish replaces all)."""
        return None

    def has_model(self) -> bool:
        raise NotImplementedError

    def materialize(self, work: Path, allow: list[str] | None = None, ignore: list[str] | None = None) -> Path:
        """A local directory holding the target's files (all, `allow`ed or not `ignore`d)."""
        raise NotImplementedError

    def recover(self) -> None:
        """Finish what a killed publish left half done (nothing to do where a publish is atomic)."""

    def deliver(self, work: Path, fill: Callable[[Path], None], message: str, publish_id: str, revision: str | None,
                only: list[str] | None = None) -> None:
        """Make the target hold what `fill(staged)` writes into a staging directory: the whole output,
        or, with `only` (files, and folders ending in /), just those paths, the rest kept as it is.
        A reader sees the old output or the new one, never a mix."""
        raise NotImplementedError

    def carried_traces(self, work: Path, own: bool) -> Path | None:
        """The runs/ folder of TensorBoard traces a full publish must copy to keep every earlier
        run's traces: from this target (`own`: the publish goes here) or from the pretraining output
        (the first instruct publish). None when there is nothing to copy."""
        raise NotImplementedError


class LocalTarget(Target):
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.local_dir = local_path(spec)
        self.survives_restart = False

    @property
    def where(self) -> str:
        return str(self.local_dir)

    @property
    def load_id(self) -> str:
        return str(self.local_dir)

    def _readable_root(self) -> Path:
        """The published directory; during a killed publish's window, the previous output it set aside."""
        aside = old(self.local_dir)
        return aside if not self.local_dir.exists() and aside.exists() else self.local_dir

    def read_published(self) -> Published:
        path = self._readable_root() / STATE_FILE
        text = path.read_text() if path.exists() else None
        return Published(None if text is None else validate_record(text, str(self.local_dir / STATE_FILE)))

    def has_model(self) -> bool:
        root = self._readable_root()
        return (root / "config.json").exists() and any(root.glob("*.safetensors"))

    def materialize(self, work: Path, allow: list[str] | None = None, ignore: list[str] | None = None) -> Path:
        return self._readable_root()

    def recover(self) -> None:
        recover(self.local_dir)

    def deliver(self, work, fill, message, publish_id, revision, only=None) -> None:
        root = self.local_dir
        with replacing(root, fsync=True) as staged:
            if only is not None and root.exists():  # the rest of the output, linked, not copied
                shutil.copytree(root, staged, ignore=shutil.ignore_patterns(*(p.rstrip("/") for p in only)),
                                copy_function=link_or_copy, dirs_exist_ok=True)
            fill(staged)

    def carried_traces(self, work: Path, own: bool) -> Path | None:
        runs = self._readable_root() / "runs"
        return runs if runs.is_dir() else None


class HubTarget(Target):
    needs_token = True

    def __init__(self, spec: str, s: Settings | None) -> None:
        self.spec = spec
        self.local_dir = None
        self.url = f"https://huggingface.co/{spec}"
        self._s = s

    @property
    def hub(self):
        from hub import hub

        if self._s is None:
            raise RuntimeError(f"{self.spec}: a Hub target opened without settings cannot reach the Hub")
        return hub(self._s)

    @property
    def where(self) -> str:
        return f"{self.spec} on the Hub"

    @property
    def load_id(self) -> str:
        return self.spec

    def head(self) -> str | None:
        return self.hub.head(self.spec)

    def read_published(self) -> Published:
        sha = self.head()
        if sha is None:
            return Published(None)
        text = self.hub.read_text(self.spec, STATE_FILE, revision=sha)
        return Published(None if text is None else validate_record(text, f"{self.spec}/{STATE_FILE} on the Hub"), sha)

    def has_model(self) -> bool:
        files = self.hub.list_files(self.spec)
        return files is not None and "config.json" in files and any(f.endswith(".safetensors") and "/" not in f for f in files)

    def materialize(self, work: Path, allow: list[str] | None = None, ignore: list[str] | None = None) -> Path:
        return self.hub.download(self.spec, work / "hub", ignore=ignore, allow=allow)

    def deliver(self, work, fill, message, publish_id, revision, only=None) -> None:
        staged = work / "publish"
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir()
        try:
            fill(staged)
            self.hub.publish(self.spec, staged, message, publish_id, revision, replace=only)
        finally:  # a failed publish (the Hub down) leaves no half-written copy behind
            shutil.rmtree(staged, ignore_errors=True)

    def carried_traces(self, work: Path, own: bool) -> Path | None:
        if own:  # the Hub keeps earlier runs' traces: a publish never deletes runs/<run>/
            return None
        files = self.hub.list_files(self.spec) or []
        if not any(f.startswith("runs/") and f.count("/") >= 2 for f in files):
            return None
        return self.hub.download(self.spec, work / "earlier-runs", allow=["runs/*/*"]) / "runs"


def open_target(spec: str, s: Settings | None = None) -> Target:
    """The target a setting names; `s` (the settings, for the Hub client) is needed to reach the Hub."""
    return LocalTarget(spec) if is_local_spec(spec) else HubTarget(spec, s)


def outputs(s: Settings) -> tuple[Target, Target]:
    """The pipeline's two outputs: OUTPUT_REPO (pretraining) and OUTPUT_REPO-it (instruct)."""
    return open_target(s.output_repo, s), open_target(instruct_target(s), s)


def recover_outputs(s: Settings) -> None:
    """Finish a publish to either output that was killed between its renames (the run or publish
    about to start holds the output lock)."""
    for output in outputs(s):
        output.recover()


def spec_problem(var: str, spec: str) -> str | None:
    """Why `spec` names no place (None when it does)."""
    from config import HUB_ID

    if is_local_spec(spec) or HUB_ID.fullmatch(spec):
        return None
    return f"{var}={spec!r}: {HUB_ID_HINT}."


def fetch(var: str, spec: str, s: Settings, allow: list[str]) -> Path:
    """A local directory holding what setting `var` names (BASE_MODEL, TOKENIZER): the directory itself,
    or the `allow`ed files of the Hub repo's current commit under WORK_DIR/hub."""
    t = open_target(spec, s)
    path = t.materialize(Path(s.work_dir), allow=allow)
    if not path.is_dir():
        raise BadInput([f"{var}={spec!r}: no such directory. Fix: the path of a saved model or tokenizer, or a Hub repo id."])
    return path


def access_problems(targets: list[Target], s: Settings) -> list[str]:
    """What would stop this run writing `targets` (each with its fix): local directories writable by
    this user; Hub repos writable with HF_TOKEN (existing or creatable) and, in a Space, the Space."""
    problems = []
    for d in [t.local_dir for t in targets if t.local_dir is not None]:
        problems += writable_problems(d)
    repos = [t.spec for t in targets if isinstance(t, HubTarget)]
    if repos or s.space_id:
        from hub import hub

        problems += hub(s).check_access(repos)
    return problems


def writable_problems(p: Path) -> list[str]:
    """[] when this user can create or write `p`; else the problem and its fix."""
    parent = next(q for q in [p, *p.parents] if q.exists())
    if os.access(parent, os.W_OK):
        return []
    owner = parent.stat().st_uid
    return [f"{p}: not writable by uid {os.getuid()} (the nearest existing directory, {parent}, belongs to "
            f"uid {owner}). Fix: make it writable for this user (on a Docker host: sudo chown -R "
            f"{os.getuid()}:{os.getgid()} on the host folder mounted there, or create that folder before "
            "`docker run` so Docker does not create it as root), or run the container as the folder's owner "
            "(docker run --user $(id -u):$(id -g)), or choose a writable OUTPUT_REPO / WORK_DIR."]
