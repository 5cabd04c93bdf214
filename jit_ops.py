"""DeepSpeed's just-in-time built ops, loaded so that a killed build can never hang a later run.

On a CPU, DeepSpeed builds its shared-memory communication op (``deepspeed_shm_comm``) with torch's
extension loader the first time a process starts a DeepSpeed engine, and every later process runs
the (no-op) build again. torch guards each build with a bare lock file in the extension's build
folder; a process killed while it holds it (kill -9, a container stopped mid-build) leaves the file
behind, and from then on every run waits for it forever, without a word.

`load_comm_op` takes the build under a lock of our own, an flock that the kernel releases when its
holder dies: whoever holds it knows that no build of ours is running, so a torch lock file found
then is stale. It is removed with a log line, and the op is loaded in this process (DeepSpeed
reuses the loaded op instead of building again). Waiting for another process's build is bounded.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

WAIT_S = 600.0  # a first build takes ~20 s on 2 cores; ten minutes means something is wrong


class BuildLockTimeout(RuntimeError):
    pass


def extensions_root() -> Path:
    """Where torch builds JIT extensions for this Python and accelerator (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions/<python>_<accelerator>)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


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
        stale = sorted(p for p in root.glob("*/lock") if p.is_file())
        for p in stale:
            age = time.time() - p.stat().st_mtime
            log(f"removing a stale build lock left by a killed build ({p}, {age:.0f} s old): no build is running")
            p.unlink(missing_ok=True)
        t = time.perf_counter()
        builder.load(verbose=False)
        fcntl.flock(guard, fcntl.LOCK_UN)
    return f"{builder.NAME} loaded in {time.perf_counter() - t:.1f} s" + (f" ({len(stale)} stale lock(s) removed)" if stale else "")


if __name__ == "__main__":  # pragma: no cover - a manual check
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(load_comm_op())
