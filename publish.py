"""Stage 3: publish a finished run, and the command line for the run state.

    python3 publish.py plan      # say what the next run will do; exit 0 = work to do, 3 = pipeline done
    python3 publish.py publish   # publish work/final (model, tokenizer, card, state) and advance the state,
                                 # or a stopped shard's checkpoint; in a Space, then update its variables
    python3 publish.py pause     # in a Space: pause it (the pipeline is done)

A publish makes the plan's target hold the new model and its record in one atomic step (a local
directory swapped in with renames, or one Hub commit on top of the commit the run planned from).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import redact
import status_page
import util
from config import Settings, load_settings
from errors import failure_exit, quiet_disk_full_in_threads
from delivery import publish_checkpoint, refuse_non_finite, unchanged_since
from handoff import METRICS_FILE, CheckpointMetrics, read_manifest, read_metrics
from hub import retries_made
from output_lock import INHERITED
from run_state import STATE_FILE, RunPlan, build_record, plan_run, save_plan
from files import link_or_copy
from targets import open_target, recover_outputs

EXIT_DONE = 3


def publish(s: Settings, work: Path) -> tuple[dict[str, Any], RunPlan]:
    """Publish work/final to the plan's target with its card and record; return the new record and the plan."""
    from model_card import render_card

    manifest = read_manifest(work)
    plan = manifest.plan
    recover_outputs(s)
    final = work / "final"
    metrics = read_metrics(final)
    if metrics.run_id != manifest.run_id:
        raise RuntimeError(f"{final} was not trained from the prepared data of this run "
                           f"(run {metrics.run_id} vs {manifest.run_id}): run train.py again.")
    refuse_non_finite(final, metrics.losses())
    current, previous = unchanged_since(s, work, manifest)
    if isinstance(metrics, CheckpointMetrics):
        return publish_checkpoint(s, plan, work, final / "last-checkpoint", metrics, previous, current.revision), plan
    record = build_record(s, plan, manifest, metrics, previous)
    record["publish_id"] = f"{manifest.run_id}-{uuid.uuid4().hex[:12]}"
    last = record["history"][-1]

    # the TensorBoard traces of every earlier run: the target's own, or for the first instruct
    # publish the pretraining output's (runs/ then holds the traces of the whole pipeline)
    first_instruct = plan.stage == "instruct" and current.record is None
    target = open_target(plan.target, s)
    earlier = (open_target(s.output_repo, s) if first_instruct else target).carried_traces(work, own=not first_instruct)

    def fill(staged: Path) -> None:
        if earlier is not None:  # the traces of every earlier run of the pipeline, linked
            for d in sorted(p for p in earlier.iterdir() if p.is_dir()):
                shutil.copytree(d, staged / "runs" / d.name, copy_function=link_or_copy)
        shutil.copytree(final, staged, ignore=shutil.ignore_patterns(METRICS_FILE), dirs_exist_ok=True)
        (staged / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (staged / "README.md").write_text(render_card(record, plan.target))

    target.deliver(work, fill, f"{last['stage']} shard {last['shard']}: validation loss "
                   f"{last.get('eval_loss', float('nan')):.4f}", record["publish_id"], current.revision)
    return record, plan


def next_run_words(record: dict[str, Any]) -> str:
    r, nxt = record.get("resume"), record.get("next")
    if r:
        return f"resumes {r['stage']} shard {r['shard']} at step {r['step']}"
    if nxt is None:
        return "none: the pipeline is done"
    return f"{'instruct' if nxt['inst'] else 'pretrain'} shard {nxt['init']} (INST={str(nxt['inst']).lower()} INIT={nxt['init']})"


def summary(record: dict[str, Any], target: str) -> str:
    where = open_target(target).where
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
    ap = argparse.ArgumentParser(prog="publish.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["plan", "publish", "pause"])
    ap.add_argument("--hand-on", action="store_true", help="plan: write the plan to WORK_DIR/plan.json for the prep "
                    "that runs next (trainer.sh, under its output locks)")
    args = ap.parse_args(argv)
    redact.install()
    quiet_disk_full_in_threads()
    try:
        s = load_settings()
        if args.command == "plan":
            handing_on = args.hand_on and os.environ.get(INHERITED) == "1"  # trainer.sh's prep takes it next
            if handing_on:
                save_plan(s, None)
            plan = plan_run(s)
            print(f"this run: {plan.describe()}")
            if handing_on and not plan.done:
                save_plan(s, plan)
            return EXIT_DONE if plan.done else 0
        if args.command == "pause":
            if not s.space_id:
                print("not in a Space (SPACE_ID is not set): nothing to pause")
                return 0
            print(util.pause_space(s))
            return 0
        from output_lock import acquire

        acquire(s)
        record, plan = publish(s, Path(s.work_dir))
        print(summary(record, plan.target))
        target = open_target(plan.target, s)
        status_page.emit("publish", where=target.where, url=target.url, summary=summary(record, plan.target).splitlines()[0],
                         history=record.get("history", []), next_run=next_run_words(record))
        if retries_made(s):
            print(f"[hub] retries: {json.dumps(retries_made(s))}")
        if s.space_id:
            print(util.space_after_publish(s, record))
        return 0
    except Exception as e:  # noqa: BLE001 - failure_exit re-raises what is not bad input, a RunFailure or a full disk
        return failure_exit(e)


if __name__ == "__main__":
    raise SystemExit(main())
