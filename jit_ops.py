"""DeepSpeed's just-in-time built ops, loaded so that a killed build can never hang a later run.

On a CPU, DeepSpeed builds its shared-memory communication op (``deepspeed_shm_comm``) with torch's
extension loader the first time a process starts a DeepSpeed engine, and every later process runs
the (no-op) build again. torch guards each build with a bare lock file in the extension's build
folder; a process killed while it holds it (kill -9, a container stopped mid-build) leaves the file
behind, and from then on every run waits for it forever, without a word.

`load_comm_op` takes the build under a lock of our own, an flock that the kernel releases when its
holder dies: whoever holds it knows that no build of ours is running. A torch lock file found then
may still be live: any other DeepSpeed program sharing the cache builds without our flock. torch's
builder keeps its lock file open for the whole build, so a lock file no process has open (checked
twice, half a second apart, to step over a release in progress) is stale: it is removed with a log
line. The op's own lock, while a process has it open (or another user owns it), is waited for, up
to a limit. Then the op is loaded in this process (DeepSpeed reuses the loaded op instead of
building again). Builders this process cannot see (another user's processes, another container
sharing the cache) look like killed ones: give each its own TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

OP = "deepspeed_shm_comm"  # the op's build folder under the extensions root
WAIT_S = 600.0  # a first build takes ~20 s on 2 cores; ten minutes means something is wrong


class BuildLockTimeout(RuntimeError):
    pass


def extensions_root() -> Path:
    """Where torch builds JIT extensions for this Python and accelerator (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions/<python>_<accelerator>)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(OP, verbose=False)).parent


def load_comm_op(log=print, wait_s: float = WAIT_S) -> str:
    """Load (building if needed) DeepSpeed's CPU comm op under our build lock; returns what it did.
    A no-op where DeepSpeed does not use the op (GPUs, or an incompatible CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "no JIT comm op on this accelerator"
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".train-llama-build.flock", "a+") as guard:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > wait_s:
                    raise BuildLockTimeout(
                        f"another process has been building DeepSpeed's ops in {root} for over {wait_s:.0f} s. Fix: "
                        "let it finish, or stop it; a killed build releases its lock by itself.") from None
                time.sleep(0.2)
        stale = _stale_locks(root, wait_s, log)
        for p, age in stale:
            log(f"removing a stale build lock left by a killed build ({p}, {age:.0f} s old): no build is running")
            p.unlink(missing_ok=True)
        sweep_comm_buffers(log)
        t = time.perf_counter()
        builder.load(verbose=False)
        fcntl.flock(guard, fcntl.LOCK_UN)
    return f"{builder.NAME} loaded in {time.perf_counter() - t:.1f} s" + (f" ({len(stale)} stale lock(s) removed)" if stale else "")


def _lock_files(root: Path) -> dict[Path, os.stat_result]:
    found = {}
    for p in root.glob("*/lock"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found[p] = st
    return found


def _holders(locks: dict[Path, os.stat_result]) -> dict[Path, list[int]]:
    """The processes that have each lock file open, matched by device and inode (whatever path, link
    or bind mount they opened it by); only processes whose /proc entries this user may read."""
    wanted = {(st.st_dev, st.st_ino): p for p, st in locks.items()}
    held: dict[Path, list[int]] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(fd).endswith("/lock"):
                    continue
                st = os.stat(fd)
            except OSError:  # closed meanwhile, or not ours to read
                continue
            p = wanted.get((st.st_dev, st.st_ino))
            if p is not None:
                held.setdefault(p, []).append(int(fd_dir.parent.name))
    return held


def _busy(locks: dict[Path, os.stat_result]) -> dict[Path, str]:
    """The lock files that are not stale, with who holds them: a process that has them open, or
    another user (whose processes this one may not see)."""
    busy = {p: "pid " + ", ".join(map(str, sorted(pids))) for p, pids in _holders(locks).items()}
    if os.getuid() != 0:
        busy.update({p: f"uid {st.st_uid}" for p, st in locks.items() if st.st_uid != os.getuid() and p not in busy})
    return busy


def _stale_locks(root: Path, wait_s: float, log=print) -> list[tuple[Path, float]]:
    """torch lock files under `root` that are stale (nobody holds them), with their age in seconds.
    The op's own lock, while it is held, is waited for, up to `wait_s`; other ops' held locks are
    left alone."""
    ours, t0, told = root / OP / "lock", time.monotonic(), False
    while True:
        locks = _lock_files(root)
        if not locks:
            return []
        busy = _busy(locks)
        if ours not in busy:
            time.sleep(0.5)  # a builder between creating its lock file and holding it, or releasing it
            busy = _busy(locks)
            if ours not in busy:
                return [(p, time.time() - st.st_mtime) for p, st in sorted(locks.items())
                        if p not in busy and _unchanged(p, st)]
        if not told:
            log(f"waiting for another program's DeepSpeed op build to finish ({ours} held by {busy[ours]})")
            told = True
        waited = time.monotonic() - t0
        if waited > wait_s:
            raise BuildLockTimeout(
                f"{ours} has stayed held by {busy[ours]} for the {waited:.0f} s this run waited: a build of DeepSpeed's "
                "op by another program. Fix: let it finish; if that is not a build (a process left over from a killed "
                "one, or another user's), stop it or remove the lock file; or give this run its own "
                "TORCH_EXTENSIONS_DIR.")
        time.sleep(1.0)


def _unchanged(p: Path, st: os.stat_result) -> bool:
    try:
        now = p.stat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino, now.st_mtime) == (st.st_dev, st.st_ino, st.st_mtime)


SHM = Path("/dev/shm")
STALE_AFTER_S = 60.0  # a rank maps its buffer the moment it creates it, and its peers within seconds


def _buffers() -> list[Path]:
    """This user's DeepSpeed shared-memory all-reduce buffers (~69 MB of RAM each, one per rank)."""
    return sorted(SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if SHM.is_dir() else []


def _mapped() -> set[str]:
    """Every file in SHM some process of this user has mapped (what /proc/*/maps shows)."""
    found: set[str] = set()
    where = f"{SHM}/"
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            found.update(line.split(None, 5)[5].strip() for line in maps.read_text().splitlines() if where in line)
        except (OSError, IndexError):
            continue
    return {f.removesuffix(" (deleted)") for f in found}


def sweep_comm_buffers(log=print) -> int:
    """DeepSpeed's CPU comm op creates a buffer file per rank in /dev/shm and never removes it: every
    run killed before release_comm_buffers (and every run of a pipeline that predates it) leaves
    ~69 MB of RAM behind. Remove the ones no process maps any more; returns how many."""
    in_use = _mapped()
    removed = 0
    for p in _buffers():
        try:
            if str(p) not in in_use and time.time() - p.stat().st_mtime > STALE_AFTER_S:
                p.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log(f"removed {removed} shared-memory buffer(s) of DeepSpeed left in {SHM} by earlier runs "
            f"({removed * 69} MB of RAM freed)")
    return removed


def single_rank_env() -> dict[str, str]:
    """The environment of a one-rank process group on this machine, as the deepspeed launcher sets it
    for one rank, on a port nobody holds (a busy one makes the rendezvous wait)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def release_comm_buffers() -> None:
    """Once every rank has mapped every rank's buffer (after the first barrier following DeepSpeed's
    initialisation), each rank unlinks its own file: the mappings live on, and the kernel frees
    the memory when the last rank exits, however it exits."""
    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK", "0")
    if addr and port:
        (SHM / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


if __name__ == "__main__":  # pragma: no cover - a manual check
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(load_comm_op())
