"""Stopping a training rank: SIGTERM/SIGINT recorded (the trainer stops at the end of the current
step on every rank, saves the full state and publishes it; before the first step the run stops at
once), and no rank left training once the run it belongs to is gone.

Light on purpose (no torch, no transformers): train.py installs it before its heavy imports, so a
stop during start-up is a clean stop too.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


# Set by SIGTERM/SIGINT: the trainer stops at the end of the current step, saves the full state and
# publishes it, as when the time budget runs out; before the first step, the run stops at once.
STOP: dict[str, str | None] = {"signal": None}


class StopRequested(Exception):
    """A stop signal arrived where the run has nothing worth saving yet (or is evaluating)."""


def _on_signal(signum, frame) -> None:
    # No printing here: a handler that prints while the main thread prints raises a reentrant-call
    # error. The stop is logged where it takes effect.
    STOP["signal"] = signal.Signals(signum).name


def check_stop() -> None:
    if STOP["signal"]:
        raise StopRequested(STOP["signal"])


def die_with_parent() -> None:
    """A rank is killed when its launcher dies, and when its launcher is orphaned: trainer.sh's
    phase dies with trainer.sh (pdeathsig), but the deepspeed runner's child, the per-node launcher
    that starts the ranks, does not die with the runner. No rank trains on, holding the output's
    lock, after the run it belongs to is gone."""
    import ctypes
    import threading

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: trainer.sh's own cleanup is all there is
    launcher = os.getppid()
    if launcher == 1:  # the launcher died before the line above
        os._exit(1)
    above = _parent_of(launcher)
    if above is None or above <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if _parent_of(launcher) != above:  # the launcher's own parent is gone: so is the run
                if b"deepspeed.launcher" in _cmdline(launcher):
                    os.kill(launcher, signal.SIGKILL)  # and this rank with it (pdeathsig)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-run", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state; comm may hold spaces


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


_INSTALLED: list[bool] = []


def install() -> None:
    """SIGTERM/SIGINT set STOP instead of killing this process, and this rank dies with its run (once
    per process)."""
    if _INSTALLED:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    die_with_parent()
    _INSTALLED.append(True)
