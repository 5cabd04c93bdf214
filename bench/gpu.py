"""The GPU path checked end to end and measured: one command on a machine with NVIDIA GPUs.

    bench/gpu.sh [--dry-run] [--out DIR] [--only NAME,...]     (installs carried wheels, then runs this)
    python bench/gpu.py [--dry-run] [--out DIR] [--only NAME,...]

Each check runs in its own process with a time limit, is timed, and prints one JSON line (also
appended to DIR/checks.jsonl, with its log in DIR/NAME.log); a table sums them up at the end. A check
that fails does not stop the others; the exit status is 1 when any failed.

- versions: the Python, CUDA, GPUs and library versions this ran on, and where they differ from the pins;
- setup: validate_setup.py --force --json (bitsandbytes NF4, PEFT, a DeepSpeed ZeRO-2 step on the GPU);
- preflight: preflight.py --json for the default pipeline: the memory estimate against the GPU's free memory;
- pipeline_bf16, pipeline_fp16, pipeline_nf4: ./trainer.sh to done on the embedded default data, in
  bf16, in fp16 with loss scaling (a T4 has no bf16), and with USE_QUANT=true (NF4 base + LoRA on CUDA,
  the merge checked by the pipeline itself); these three run at the same time on the one GPU;
- throughput: bench/throughput.py on the 1B preset at sequence 2048: ours vs the seed-like baseline,
  MFU against the bf16 matmul peak measured in the same run, peak memory vs preflight's estimate;
- memory: bench/memory.py on the 1B preset, bf16 full training and NF4+LoRA (gradient checkpointing
  on): measured peaks against the estimate, and the NF4+LoRA peak as a share of full training's;
- stop_resume: bench/stop_timeout.py --resume on the 1B preset: SIGTERM to exit with the full state
  published, and the next run's resume (this sizes `docker stop --stop-timeout`);
- two_ranks: with 2+ GPUs, the default pipeline on 2 ranks (ZeRO-2 over NCCL); skipped with one GPU.

--dry-run runs the same flow on the CPU with small sizes (no CUDA needed): what it checks is the
script itself and the code paths, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from clean_env import gpu_count, pipeline_env, settings_vars  # noqa: E402

LIBRARIES = ("torch", "transformers", "trl", "peft", "deepspeed", "bitsandbytes", "datasets", "accelerate",
             "huggingface_hub", "tokenizers", "safetensors", "pydantic", "pyarrow")


ORDER = ["versions", "setup", "preflight", "throughput", "pipeline_bf16", "pipeline_fp16", "pipeline_nf4", "memory",
         "stop_resume", "two_ranks"]


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


class Runner:
    def __init__(self, out: Path, logs: Path, dry: bool):
        self.out, self.logs, self.dry = out, logs, dry
        logs.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.live: set[subprocess.Popen] = set()  # each check's process group, stopped with this script

    def stop_all(self) -> None:
        for p in list(self.live):
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass

    def command(self, name: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> tuple[int, str]:
        """Run a command, its output to DIR/NAME.log; (exit status, output). A timeout is exit 124."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(args, cwd=ROOT, env=env or os.environ.copy(), stdout=f, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
            self.live.add(p)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                rc = 124
            finally:
                self.live.discard(p)
        return rc, log.read_text(errors="replace")

    def record(self, name: str, started: float, ok: bool | None, **figures) -> dict:
        r = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - started, 1), **figures}
        self.results.append(r)
        line = json.dumps(r, default=str)
        print(line, flush=True)
        with open(self.out / "checks.jsonl", "a") as f:
            f.write(line + "\n")
        return r

    def failed(self, name: str, started: float, rc: int, output: str) -> dict:
        tail = "\n".join(output.strip().splitlines()[-25:])
        return self.record(name, started, False, exit=rc, error="timed out" if rc == 124 else tail[-3000:])

    # --- environments ----------------------------------------------------------------------------
    def pipeline_env(self, tag: str, **settings: str) -> dict[str, str]:
        """A clean environment for one pipeline: its own output, work dir, HF home and port; on the
        GPU the embedded default data and settings, in a dry run tiny data and short shards."""
        return {**pipeline_env(self.tmp / tag, tiny=self.dry, cpu=self.dry), **settings}

    # --- the checks ------------------------------------------------------------------------------
    def versions(self) -> dict:
        t = time.perf_counter()
        import importlib.metadata as md

        import validate_setup

        pins = validate_setup.pins()
        found = {}
        for lib in (*LIBRARIES, *(p for p in pins if p not in LIBRARIES)):
            try:
                found[lib] = md.version(lib)
            except md.PackageNotFoundError:
                found[lib] = None
        differ = {k: f"{found[k]} (pinned {v})" for k, v in pins.items() if (found[k] or "").split("+")[0] != v}
        code = ("import json, torch; print(json.dumps({'cuda': torch.version.cuda, 'available': torch.cuda.is_available(),"
                " 'gpus': [{'name': torch.cuda.get_device_name(i), 'memory_gib': round(torch.cuda.get_device_properties(i)"
                ".total_memory / 2**30, 1), 'capability': '.'.join(map(str, torch.cuda.get_device_capability(i)))}"
                " for i in range(torch.cuda.device_count())], 'bf16': torch.cuda.is_available() and torch.cuda.is_bf16_supported()}))")
        rc, out = self.command("versions", [sys.executable, "-c", code], timeout=120)
        if rc != 0:
            return self.failed("versions", t, rc, out)
        cuda = last_json(out)
        driver = None
        if shutil.which("nvidia-smi"):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip().splitlines()[:1]
        ok = cuda["available"] or self.dry
        return self.record("versions", t, ok, python=sys.version.split()[0], **cuda, driver=driver and driver[0],
                           libraries=found, differ_from_pins=differ)

    def setup(self) -> dict:
        t = time.perf_counter()
        rc, out = self.command("setup", [sys.executable, "validate_setup.py", "--force", "--json"],
                               env=self.pipeline_env("setup"), timeout=300)
        try:
            res = last_json(out)
        except ValueError:
            return self.failed("setup", t, rc, out)
        functional = {c["name"]: c["finding"] for c in res["checks"] if " " in c["name"]}  # packages are one word
        failures = [f"{c['name']}: {c['finding']}" for c in res["checks"] if not c["ok"]]
        return self.record("setup", t, rc == 0 and res["ok"], functional=functional, failures=failures)

    def preflight(self) -> dict:
        t = time.perf_counter()
        rc, out = self.command("preflight", [sys.executable, "preflight.py", "--json"], env=self.pipeline_env("preflight"),
                               timeout=300)
        try:
            res = last_json(out)
        except ValueError:
            return self.failed("preflight", t, rc, out)
        mem = res.get("memory") or {}
        figures = {"preflight_s": res.get("seconds"), "estimated_peak_bytes": mem.get("estimated_peak_bytes"),
                   "available_bytes": mem.get("available_bytes"), "budget_bytes": mem.get("budget_bytes"),
                   "fits": mem.get("fits"), "on_gpu": mem.get("device") == "gpu",
                   "failures": [f"{c['section']}: {c['finding']}" for c in res["checks"] if not c["ok"]]}
        ok = rc == 0 and res["ok"] and (figures["on_gpu"] or self.dry)
        return self.record("preflight", t, ok, **figures)

    def pipeline(self, name: str, **settings: str) -> dict:
        """./trainer.sh to done; the record's figures per run (loss, tokens/s, precision, the merge)."""
        t = time.perf_counter()
        env = self.pipeline_env(name, **settings)
        rc, out = self.command(name, ["./trainer.sh"], env=env, timeout=420)
        if rc != 0:
            return self.failed(name, t, rc, out)
        runs = []
        # The chat model's record carries the whole history (pretraining included).
        for repo in (env["OUTPUT_REPO"] + "-it", env["OUTPUT_REPO"]):
            state = Path(repo) / "training_state.json"
            if state.exists():
                for h in json.loads(state.read_text())["history"]:
                    runs.append({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items() if v is not None and k in (
                        "stage", "shard", "steps", "eval_loss_before", "eval_loss", "tokens_per_s", "precision",
                        "train_format", "merged_eval_loss", "merge_delta_pct")})
                break
        done = "=== done ===" in out
        phases = {m.group(1).split(" (")[0]: int(m.group(2)) for m in
                  re.finditer(r"^--- (.+?): done in (\d+)s$", out, re.M)}
        learned = all(r.get("eval_loss", 1e9) < r.get("eval_loss_before", 0) for r in runs)
        merged = [r for r in runs if "merge_delta_pct" in r]
        ok = done and bool(runs) and learned and ("USE_QUANT" not in settings or bool(merged))
        return self.record(name, t, ok, settings=settings, done=done, runs=runs, last_phase_seconds=phases,
                           **({"learned": learned} if not learned else {}))

    def bench(self, name: str, script: str, args: list[str], timeout: int) -> dict:
        t = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k not in settings_vars()}
        if self.dry:
            env["DS_ACCELERATOR"] = "cpu"
        rc, out = self.command(name, [sys.executable, script, *args], env=env, timeout=timeout)
        try:
            res = last_json(out) if rc == 0 else None
        except ValueError:
            res = None
        if res is None:
            return self.failed(name, t, rc, out)
        return self.record(name, t, True, **self.summarise(name, res))

    @staticmethod
    def summarise(name: str, res: dict) -> dict:
        if name == "throughput":
            mem = res.get("memory") or {}
            ours = mem.get("ours") or {}
            return {k: res[k] for k in ("precision", "real_tokens_per_s", "baseline_real_tokens_per_s", "speedup", "mfu",
                                        "baseline_mfu", "peak_matmul_flops")} | {
                "model": {k: res["model"].get(k) for k in ("preset", "parameters", "seq", "batch")},
                "peak_reserved_bytes": ours.get("peak_reserved_bytes"),
                "estimate_training_bytes": mem.get("estimate_training_bytes"),
                "estimate_rel_error": mem.get("estimate_rel_error"), "machine": res.get("machine")}
        if name == "memory":
            cases = {c["mode"]: c for c in res["cases"]}
            full = next((c for mode, c in cases.items() if mode.endswith(" full")), None)
            nf4 = cases.get("NF4+LoRA")
            ratio = (nf4["measured"]["training_peak_bytes"] / full["measured"]["training_peak_bytes"]) if full and nf4 else None
            return {"table": res["table"], "max_abs_rel_error": res["max_abs_rel_error"],
                    "max_abs_process_rel_error": res["max_abs_process_rel_error"],
                    "nf4_over_full_peak": round(ratio, 3) if ratio else None,
                    "cuda_context_bytes": [c["measured"].get("cuda_context_bytes") for c in res["cases"]],
                    "batch": res["batch"], "seq": res["seq"]}
        return res

    def two_ranks(self, gpus: int) -> dict:
        t = time.perf_counter()
        if gpus < 2 and not self.dry:
            return self.record("two_ranks", t, None, skipped=f"{gpus} GPU on this machine: 2 ranks need 2 GPUs")
        if self.dry:
            return self.record("two_ranks", t, None, skipped="dry run: the 2-rank path is covered by the CPU test suite")
        return self.pipeline("two_ranks", NUM_PROCESSES="2")

    # --- the table -------------------------------------------------------------------------------
    def table(self) -> str:
        rows = []
        for r in sorted(self.results, key=lambda r: ORDER.index(r["check"])):
            mark = {True: "ok", False: "FAIL", None: "skip"}[r["ok"]]
            rows.append(f"{r['check']:<15} {mark:<5} {r['seconds']:>7.1f} s  {self.headline(r)}")
        return "\n".join(rows)

    @staticmethod
    def headline(r: dict) -> str:
        if r["ok"] is False:
            return (r.get("error") or "").strip().splitlines()[-1][:110] if r.get("error") else ""
        c = r["check"]
        if c == "versions":
            g = r.get("gpus") or []
            return (f"{g[0]['name']} x{len(g)}, CUDA {r['cuda']}, " if g else "no GPU, ") + \
                f"torch {r['libraries']['torch']}, transformers {r['libraries']['transformers']}"
        if c == "preflight":
            return f"estimate {(r['estimated_peak_bytes'] or 0) / 2**30:.2f} GiB of {(r['available_bytes'] or 0) / 2**30:.1f} GiB free"
        if c.startswith("pipeline") or c == "two_ranks":
            if "skipped" in r:
                return r["skipped"]
            losses = "; ".join(f"{x['stage']}{x['shard']} {x.get('eval_loss_before', 0):.2f}->{x.get('eval_loss', 0):.2f}"
                               for x in r.get("runs", []))
            merge = [x["merge_delta_pct"] for x in r.get("runs", []) if "merge_delta_pct" in x]
            return losses + (f"; merge {max(merge):.3f}%" if merge else "")
        if c == "throughput":
            err = r["estimate_rel_error"]
            return (f"{r['real_tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%} (baseline {r['baseline_mfu']:.1%}, "
                    f"x{r['speedup']})" + ("" if err is None else
                                           f", peak {r['peak_reserved_bytes'] / 2**30:.1f} GiB, estimate {err:+.1%}"))
        if c == "memory":
            return f"estimate max error {r['max_abs_rel_error']:.1%}; NF4+LoRA peak {r['nf4_over_full_peak']} of full"
        if c == "stop_resume":
            return (f"stop {r.get('sigterm_to_exit_s')} s (save {r.get('step_end_and_save_s')} s, checkpoint "
                    f"{(r.get('checkpoint_bytes') or 0) / 2**30:.1f} GiB); resume to first step {r.get('resume_start_to_first_step_s')} s")
        if c == "setup":
            return "; ".join(v.split(" (")[0] for v in r.get("functional", {}).values())[:110]
        return r.get("skipped", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same flow on the CPU with small sizes (no CUDA)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check", help="folder for checks.jsonl, logs and the table")
    ap.add_argument("--logs", help="folder for each check's log (default: --out)")
    ap.add_argument("--only", help="comma-separated check names (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checks.jsonl").unlink(missing_ok=True)
    dry = args.dry_run
    gpus = 0 if dry else gpu_count()
    if not dry and gpus == 0:
        print("bench/gpu.py: no NVIDIA GPU here (nvidia-smi lists none); --dry-run checks the flow on the CPU", file=sys.stderr)
        return 2
    wanted = set(args.only.split(",")) if args.only else None
    run = Runner(out, Path(args.logs) if args.logs else out, dry)

    def stop(signum, frame):  # a check left running would skew whatever runs on the GPU next
        run.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    want = lambda name: wanted is None or name in wanted  # noqa: E731
    started = time.perf_counter()
    # Sizes: the on a GPU; small ones that finish in minutes on a CPU in a dry run.
    big = ("cpu", "128", "2", "1") if dry else ("1B", "2048", "8", "10")  # preset, seq, batch, steps
    for name in ("versions", "setup", "preflight"):
        if want(name):
            getattr(run, name)()
    pipelines = [(n, kw) for n, kw in (("pipeline_bf16", {"PRECISION": "bf16"}), ("pipeline_fp16", {"PRECISION": "fp16"}),
                                       ("pipeline_nf4", {"USE_QUANT": "true"})) if want(n)]
    jobs = [lambda n=n, kw=kw: run.pipeline(n, **kw) for n, kw in pipelines]
    if want("memory"):
        jobs.append(lambda: run.bench("memory", "bench/memory.py", ["--sizes", big[0], "--seq", big[1], "--batch", big[2],
                                                                     "--steps", "3", "--checkpointing", "on"], timeout=420))
    if want("stop_resume"):
        jobs.append(lambda: run.bench("stop_resume", "bench/stop_timeout.py", ["--size", big[0], "--max-length", big[1],
                                                                               "--resume"], timeout=420))
    # Throughput alone on a quiet GPU first; then the rest at the same time (each process's peak
    # memory is its own): the pipelines are small, and the GPU has room for all of them.
    if want("throughput"):
        run.bench("throughput", "bench/throughput.py", ["--corpus", "data/pretrain.jsonl", "--preset", big[0], "--seq", big[1],
                                                        "--batch", big[2], "--steps", big[3]], timeout=420)
    if dry:  # 2 CPU cores: one at a time
        for job in jobs:
            job()
    else:
        with ThreadPoolExecutor(len(jobs) or 1) as pool:
            list(pool.map(lambda job: job(), jobs))
    if want("two_ranks"):
        run.two_ranks(gpus)
    table = run.table()
    summary = f"{table}\n\n{sum(r['ok'] is True for r in run.results)} ok, {sum(r['ok'] is False for r in run.results)} failed, " \
              f"{sum(r['ok'] is None for r in run.results)} skipped in {time.perf_counter() - started:.0f} s" + \
              (" (dry run on the CPU: the flow, not the figures)" if dry else "")
    print("\n" + summary, flush=True)
    (out / "summary.txt").write_text(summary + "\n")
    shutil.rmtree(run.tmp, ignore_errors=True)
    return 1 if any(r["ok"] is False for r in run.results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
