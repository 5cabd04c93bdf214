"""The Space and the run timer: what a run tells the Space it runs in (its next INIT/INST, or pause
when the pipeline is done), and when this run started.

`python3 util.py plan|publish|pause` still works: it is `python3 publish.py …`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from config import Settings


def run_started() -> float:
    """When this run started (epoch seconds): RUN_STARTED_AT, set by trainer.sh at the start of the
    run (a stage run on its own starts its own clock)."""
    return float(os.environ.get("RUN_STARTED_AT") or time.time())


def pause_space(s: Settings) -> str:
    from hub import hub

    h = hub(s)
    h.call(f"pause {s.space_id}", h.api.pause_space, s.space_id)
    return f"Space {s.space_id} paused: the pipeline is done"


def space_after_publish(s: Settings, record: dict[str, Any]) -> str:
    """Tell the Space what the record says: pause it when the pipeline is done; else write the
    next INIT then INST (in that order: a restart triggered by the first update leaves the
    variables behind the record, never ahead of it, and the record wins on the next start);
    restart it when neither changes (a shard stopped mid-way resumes on the next start)."""
    from hub import hub

    space, h = s.space_id, hub(s)
    if record.get("next") is None:
        return pause_space(s)
    current = {k: v.value for k, v in h.call(f"variables {space}", h.api.get_space_variables, space).items()}
    want = {"INIT": str(record["next"]["init"]), "INST": str(record["next"]["inst"]).lower()}
    changed = [k for k in ("INIT", "INST") if current.get(k) != want[k]]
    for k in changed:
        h.call(f"set {k} on {space}", h.api.add_space_variable, space, k, want[k])
    if not changed:
        h.call(f"restart {space}", h.api.restart_space, space)
        return f"Space {space} restarted to continue INST={want['INST']} INIT={want['INIT']}"
    return f"Space {space} variables set: INST={want['INST']} INIT={want['INIT']} (the Space restarts with them)"


if __name__ == "__main__":
    from publish import main

    raise SystemExit(main())
