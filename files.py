"""Directories written so that a reader never sees half of one: staged beside the real one and
swapped in with renames, a staging copy removed whatever happens, a swap killed between its two
renames finished by `recover`.

Used for everything a later step reads: WORK_DIR/prepared (prep), WORK_DIR/final (train), a local
published output (targets).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(root: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `root` (`<root>.tmp-<pid>`); when the block ends
    without an error, the staged directory becomes `root` (with `fsync`, its files flushed first, so
    even a power cut leaves complete files). On an error `root` is untouched; either way no staging
    copy is left behind."""
    staged = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    root.parent.mkdir(parents=True, exist_ok=True)
    recover(root)
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    try:
        yield staged
        if fsync:
            fsync_tree(staged)
        swap_in(staged, root)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def old(root: Path) -> Path:
    """Where a swap sets the previous `root` aside until the new one is in place."""
    return root.with_name(root.name + ".old")


def swap_in(staged: Path, root: Path) -> None:
    """Make `staged` the `root` with renames only, so a reader sees the old or the new directory."""
    if root.exists():
        root.rename(old(root))
    staged.rename(root)
    if old(root).exists():
        shutil.rmtree(old(root))


def recover(root: Path) -> None:
    """Finish a swap that was killed between its two renames (the old directory is put back), and
    remove what a killed writer left: a set-aside copy, staging copies of processes that are gone."""
    if not root.exists() and old(root).exists():
        old(root).rename(root)
    elif root.exists() and old(root).exists():
        shutil.rmtree(old(root))
    if root.parent.exists():
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


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows it (no copy of large weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fsync_tree(root: Path) -> None:
    """Flush every file so a rename publishes complete files even after a power cut."""
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
