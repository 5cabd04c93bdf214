"""The benchmarks run on a short setting and print the JSON keys the README reports."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, head_jsonl, run

pytestmark = pytest.mark.slow


def _json(p) -> dict:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_throughput_bench(env, tmp_path):
    corpus = head_jsonl(ROOT / "data" / "pretrain.jsonl", tmp_path / "c.jsonl", 600)
    # the benchmark's model at a short sequence and batch: the flow and the keys, not the figures
    out = _json(run([sys.executable, "bench/throughput.py", "--corpus", str(corpus), "--steps", "2", "--seq", "128",
                     "--batch", "2"], env, timeout=600))
    assert out["real_tokens_per_s"] > 0 and out["baseline_real_tokens_per_s"] > 0 and 0 < out["mfu"] < 1
    assert 25_000_000 < out["model"]["parameters"] < 30_000_000 and (out["model"]["seq"], out["model"]["batch"]) == (128, 2)


def test_prep_bench(env):
    out = _json(run([sys.executable, "bench/prep_throughput.py", "--mb", "2"], env, timeout=300))
    assert set(out["mb_per_s"]) == {"data/pretrain.jsonl", "python-stdlib-docstrings", "python-stdlib-sources"}
    assert all(r["mb_per_s"] > 0 and r["baseline_mb_per_s"] > 0 and r["raw_mb"] >= 2 and r["unique_mb"] > 0.5
               for r in out["corpora"].values())
    assert all(r["ids_equal_to_tokenizer"] is True for r in out["corpora"].values())


def test_streaming_bench(env):
    out = _json(run([sys.executable, "bench/streaming.py", "--files", "52", "--rows", "200", "--shard-size", "200"],
                    env, timeout=600))
    assert out["rows_known_before_reading"] is True and out["dataset"]["rows"] == 10_400
    assert out["first_batch_s_shard0"] > 0 and out["first_batch_s_shard50"] > 0
    assert 1 <= out["bytes_read_ratio_shard50"] < out["whole_dataset"]["bytes_read_ratio"]


def test_packing_bench(env):
    out = _json(run([sys.executable, "bench/packing.py", "--tiny"], env, timeout=900))
    assert out["instruct_vs_pretrain"] > 0 and out["packed_vs_padded_speed"] > 0
    assert out["instruct_packed"]["tokens"] > 0 and out["instruct_padded"]["tokens"] > 0


def test_quant_bench(env):
    out = _json(run([sys.executable, "bench/quant.py", "--pretrain-steps", "5", "--lora-steps", "5",
                     "--memory-target", "20M"], env, timeout=900))
    assert out["nf4_roundtrip_identical"] is True
    assert out["precision"] in ("bf16", "fp32")  # what a run uses on this CPU
    assert out["merge_float_ppl_delta_pct"] <= 0.1
    for k in ("merge_4bit_ppl_delta_pct", "merge_float_max_abs_logit_diff", "peak_mem_ratio",
              "peak_mem_full_adamw_bytes", "peak_mem_nf4_lora_bytes"):
        assert out[k] >= 0
    assert 18_000_000 <= out["memory_model_parameters"] <= 22_000_000
    # Even this small, the 4-bit run needs less than full training.
    assert out["peak_mem_nf4_lora_bytes"] < out["peak_mem_full_adamw_bytes"]


def test_memory_bench(env):
    """The estimate against measured runs on a short setting: the keys the README reports, and each
    case within 40% (the full benchmark's target is 25% over 3 sizes; tiny models are noisier)."""
    out = _json(run([sys.executable, "bench/memory.py", "--sizes", "10M,20M", "--steps", "2", "--checkpointing", "on"],
                    env, timeout=900))
    assert len(out["cases"]) == 4 and len(out["table"]) == 4
    assert {c["mode"] for c in out["cases"]} == {f"{out['precision']} full", "NF4+LoRA"}
    for c in out["cases"]:
        assert c["measured"]["training_peak_bytes"] > 0 and c["estimate"]["training_bytes"] > 0
        assert abs(c["rel_error"]) <= 0.4, c
    assert out["max_abs_rel_error"] == max(abs(c["rel_error"]) for c in out["cases"])


def test_resume_bench(env):
    """Two budget stops and a SIGTERM, then the rest: the same batches in the same order, the same
    optimizer steps, the final validation loss within 1% of one uninterrupted run. A kill -9 with
    periodic checkpoints loses at most about the interval; early stopping publishes the best model."""
    out = _json(run([sys.executable, "bench/resume.py", "--rows", "200", "--epochs", "4", "--kills", "1",
                     "--save-interval", "0.05"], env, timeout=1500))
    assert [s["by"] for s in out["stops"]] == ["the time budget", "the time budget", "a stop signal"], out
    assert out["sigterm_exit"] == 3 and out["interruptions"] == 3
    assert out["same_batches_in_order"] and out["steps_chain"] == out["steps_one_run"]
    assert out["eval_loss_rel_diff"] <= 0.01
    assert out["first_resumed_step_s"] > 0 and not out["checkpoint_left_after_finish"]
    # lost: at most the interval, plus a save and a publish under way when the kill came (a few steps)
    assert len(out["kills"]) == 1 and 0 <= out["kill9_max_lost_s"] <= out["save_interval_s"] + 20 * out["step_s"] + 5
    assert out["kill9_same_batches_in_order"] and out["kill9_steps"] == out["steps_one_run"]
    assert out["kill9_final_loss_delta_pct"] <= 1 and out["periodic_saves"] >= 1 and 0 < out["save_overhead_pct"] <= 5
    assert out["early_stop_best_equals_published"] is True, out


def test_hub_faults_bench(env):
    """Transient faults are retried and the commit lands once; permanent ones fail at once and a
    rerun publishes; the token is in no output and no published file."""
    out = _json(run([sys.executable, "bench/hub_faults.py"], env, timeout=900))
    assert out["all_as_expected"], out
    cases = {c["case"]: c for c in out["cases"]}
    for name in ("commit 503 x2", "preupload 500 x1", "preupload 429 Retry-After 1s x2", "lfs upload dropped x1",
                 "commit stalls past HUB_TIMEOUT x1", "commit lands, answer lost x1"):
        assert cases[name]["exit"] == 0 and cases[name]["faults_served"] >= 1 and cases[name]["commits"] == 1, cases[name]
    assert cases["commit 503 x2"]["retries_logged"] == 2
    assert cases["commit 403"]["faults_served"] == 1 and cases["commit 403"]["exit"] == 2
    assert cases["commit 503 forever"]["exit"] == 1 and cases["commit 503 forever"]["retries_logged"] == 4


def test_model_bench(env):
    out = _json(run([sys.executable, "bench/model.py", "--steps", "1", "--prompts", "3", "--new-tokens", "16", "--seq", "128", "--batch", "2",
                     "--copy-size", "small"], env, timeout=600))
    assert out["max_abs_logit_diff_fp32"] <= 1e-5 and out["loss_diff"] <= 1e-6 and out["max_grad_diff_rel"] <= 1e-4
    assert out["greedy_identical"] == 1.0
    assert out["train_speedup"] > 0 and out["train_speedup_compiled"] > 0 and out["generate_speedup"] > 0
    # the copy holds the model and the memory-mapped source, and nothing more than one tensor besides
    assert out["copy_complete"] and out["copy_growth_over_source"] <= 1.1


def test_gpu_check_flow_in_a_dry_run(env, tmp_path):
    """bench/gpu.sh's flow on the CPU (--dry-run, small sizes): each check prints its JSON line, the
    table sums them up; a preset and a sequence length other than the throughput default work."""
    out = tmp_path / "gpu"
    env = {**env, "GPU_WHEELS": str(tmp_path / "no-wheels")}
    p = run(["bench/gpu.sh", "--dry-run", "--out", str(out), "--only", "versions,setup,preflight,throughput,two_ranks"],
            env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    checks = {c["check"]: c for c in map(json.loads, (out / "checks.jsonl").read_text().splitlines())}
    assert [checks[n]["ok"] for n in ("versions", "setup", "preflight", "throughput")] == [True] * 4
    assert checks["two_ranks"]["ok"] is None and checks["two_ranks"]["skipped"]
    assert checks["versions"]["libraries"]["torch"] and checks["setup"]["functional"]["deepspeed engine"]
    assert checks["preflight"]["estimated_peak_bytes"] > 0 and checks["preflight"]["fits"]
    tp = checks["throughput"]
    assert tp["model"]["preset"] == "cpu" and tp["model"]["seq"] == 128 and 0 < tp["mfu"] < 1
    summary = (out / "summary.txt").read_text()
    assert "4 ok, 0 failed, 1 skipped" in summary and "throughput" in summary


def test_convert_bench_converts_every_path_back_to_the_same_model(env, tmp_path):
    """bench/convert.py's conversions on a tiny published-like model (llama.cpp itself needs
    `make bench-env`; its keys are null with --skip-llamacpp)."""
    from test_convert import hf_dir_with_tokenizer

    src, _ = hf_dir_with_tokenizer(tmp_path)
    out = _json(run([sys.executable, "bench/convert.py", "--model", str(src), "--skip-llamacpp"], env, timeout=600))
    assert set(out["max_abs_logit_diff"]) == {"meta", "dcp", "zero"}
    assert all(v <= 1e-5 for v in out["max_abs_logit_diff"].values())
    assert out["llamacpp_greedy_identical_bf16"] is None
