"""One writer per output: a second run started on the same output says who holds it and stops.

    python3 output_lock.py paths                    # the lock files of these settings, one per line
    python3 output_lock.py take --owner PID FD...   # lock the files open on FD... (trainer.sh)

The locks are flock(2) locks on small files beside what they guard: WORK_DIR.lock (the run's scratch
space) and, for a local OUTPUT_REPO, OUTPUT_REPO.lock (OUTPUT_REPO and OUTPUT_REPO-it both). The kernel
releases a flock when the last process holding it ends, kill -9 and crashes included, so a lock is
never stale: a lock that is held has a live holder. The file itself only tells who that is (pid,
host, start time, command), for the message a second run prints. A Hub OUTPUT_REPO has one more
guard that needs no lock: every publish is a commit on top of the commit the run started from, so a
concurrent publish from another machine fails instead of overwriting (hub.Hub.publish).

trainer.sh opens the files, has `take` lock them on its open descriptors, and keeps them for the
whole pipeline (its child processes inherit them); it exports TRAIN_LLAMA_LOCKED=1 so the stages
do not lock again. A stage run on its own (`python3 publish.py publish`) takes the locks itself.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from config import Settings, load_settings
from errors import BadInput, RunFailure, failure_exit, report

INHERITED = "TRAIN_LLAMA_LOCKED"  # set by trainer.sh: it holds the locks for this process tree


class OutputBusy(RunFailure):
    """Another live run holds the output."""

    label = "Busy"


def lock_files(s: Settings) -> list[Path]:
    """Beside the directories they guard (taking a lock creates nothing inside them)."""
    from targets import open_target

    output = open_target(s.output_repo).local_dir
    dirs = [Path(s.work_dir).resolve()] + ([output] if output is not None else [])
    return [d.with_name(d.name + ".lock") for d in dirs]


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process (it did not say which)"
    age = time.time() - float(info.get("since", time.time()))
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}), "
            f"running for {age / 60:.0f} min")


# A run killed a moment ago may still be exiting (its processes release their descriptors as they
# end, within milliseconds): a new run waits this long before it calls the output busy.
GRACE_S = 5.0


RUN_FIX = "or give this run its own OUTPUT_REPO and WORK_DIR"


def _lock_fd(fd: int, path: Path, owner: int, grace_s: float = GRACE_S, fix: str = RUN_FIX) -> None:
    end = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < end:
                time.sleep(0.1)
                continue
            raise OutputBusy(f"{path.with_suffix('')} is in use by another run: {_holder(path)}. One run writes an "
                             "output at a time. Fix: wait for that run to finish or stop it (its lock goes with its "
                             "process, kill -9 included); " + fix + ".") from None
    try:
        cmd = Path(f"/proc/{owner}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    info = {"pid": owner, "host": socket.gethostname(), "since": time.time(), "command": cmd[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def acquire(s: Settings) -> list[int]:
    """Lock every output of these settings for this process (released when it ends); a no-op under
    trainer.sh, which holds them already. Raises OutputBusy naming the holder."""
    if os.environ.get(INHERITED) == "1":
        return []
    return _take(lock_files(s))


def _take(paths: list[Path], fix: str = RUN_FIX) -> list[int]:
    """Open (creating them) and lock `paths` for this process; none stays open if one fails."""
    fds: list[int] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
            _lock_fd(fds[-1], path, os.getpid(), fix=fix)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def acquire_dir(d: Path, fix: str = "or write to another directory") -> list[int]:
    """Lock a local directory that something other than a pipeline writes into (convert.py --push):
    the lock a pipeline whose OUTPUT_REPO it is takes, and for a pipeline's chat output
    (OUTPUT_REPO-it) that pipeline's lock too. Raises OutputBusy naming the holder, BadInput where a
    lock file cannot be made; released when this process ends or closes the descriptors."""
    d = d.resolve()
    paths = [d.with_name(d.name + ".lock")]
    if d.name.endswith("-it"):
        paths.append(d.with_name(d.name.removesuffix("-it") + ".lock"))
    if os.environ.get(INHERITED) == "1":  # trainer.sh's own outputs are locked already, by this process tree
        try:
            mine = set(lock_files(load_settings()))
        except BadInput:
            mine = set()
        paths = [p for p in paths if p not in mine]
    try:
        return _take(paths, fix)
    except OSError as e:
        raise BadInput([f"{d}: cannot make its lock file {e.filename} ({e.strerror}). Fix: a directory you can "
                        "write, or its parent created with write access for this user"]) from None


def probe(s: Settings) -> str | None:
    """Who holds the outputs of these settings, or None when a run could take them now (preflight)."""
    if os.environ.get(INHERITED) == "1":
        return None
    for path in lock_files(s):
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        finally:
            os.close(fd)  # closing the descriptor releases the probe's own lock
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="output_lock.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("paths")
    take = sub.add_parser("take")
    take.add_argument("--owner", type=int, required=True, help="the pid of the process that holds the descriptors")
    take.add_argument("fds", type=int, nargs="+")
    args = ap.parse_args(argv)
    try:
        s = load_settings()
    except BadInput as e:
        return report(e)
    paths = lock_files(s)
    if args.command == "paths":
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        print("\n".join(str(p) for p in paths))
        return 0
    if len(args.fds) != len(paths):
        print(f"output_lock.py take: {len(args.fds)} descriptor(s) for {len(paths)} lock file(s)", file=sys.stderr)
        return 1
    try:
        for fd, path in zip(args.fds, paths):
            _lock_fd(fd, path, args.owner)
    except OutputBusy as e:
        return failure_exit(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
