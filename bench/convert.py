"""Every conversion of convert.py on the default run's chat model, and its GGUF run by llama.cpp itself.

    python bench/convert.py [--model DIR] [--llama-python .venv-bench/bin/python] [--prompts 20] [--new-tokens 32]

The model: --model (a published Hugging Face Llama with its tokenizer), else the default pipeline
is run to done here (./trainer.sh on the embedded data, ~4 minutes on 2 cores) and its chat model
taken. From it the benchmark writes the other trainers' layouts itself — Meta's (two model-parallel
shards), a torch distributed checkpoint with an optimizer state beside the model, a DeepSpeed
ZeRO-2 checkpoint — converts each back with convert.py and compares the logits with the model's
(fp32, 3 sequences of 16 tokens). It exports bf16 and q8_0 GGUF files, loads them in llama.cpp
(llama-cpp-python, built from PyPI in the benchmark's own environment: `make bench-env`, then
--llama-python), and compares greedy continuations of chat prompts (the last N of data/instruct.jsonl,
through the chat template) with transformers' (fp32 compute on the published bf16 weights).

Prints one JSON line: `max_abs_logit_diff` per path (`dcp`, `meta`, `zero`, `gguf_bf16`: llama.cpp's
logits against transformers'), `llamacpp_greedy_identical_bf16` and `_q8_0` (shares of prompts whose
continuations are identical token for token), `llamacpp_tokens_per_s` (bf16 and q8_0 decoding) and
transformers' decoding speed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model(tmp: Path) -> Path:
    """The default pipeline to done; its chat model."""
    from config import known_names

    env = {k: v for k, v in os.environ.items() if k not in known_names() | {"MAX_RUNS", "CONFIG_FILE"}}
    import socket

    with socket.socket() as sock:  # the status page's port: one nobody holds
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update({"OUTPUT_REPO": str(tmp / "out" / "llama"), "WORK_DIR": str(tmp / "work"), "HF_HOME": str(tmp / "hf"),
                "KEEP_SERVING": "false", "PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"})
    p = subprocess.run(["./trainer.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the default pipeline failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
    return tmp / "out" / "llama-it"


def meta_layout(state: dict, cfg: dict) -> dict:
    """The model's weights in Meta's names and interleaved rotary layout (convert.py's inverse)."""
    import gguf_export
    import layouts

    inverse = {hf: meta for meta, (hf, _) in layouts.META_TO_HF.items()}
    out = {}
    for k, v in state.items():
        pattern = re.sub(r"^model\.layers\.\d+\.", "model.layers.{i}.", k)
        i = re.match(r"^model\.layers\.(\d+)\.", k)
        name = inverse[pattern].format(i=i.group(1)) if i else inverse[pattern]
        if k.endswith("q_proj.weight"):
            v = gguf_export.unpermute_rope(v, cfg["num_attention_heads"])
        elif k.endswith("k_proj.weight"):
            v = gguf_export.unpermute_rope(v, cfg["num_key_value_heads"])
        out[name] = v.clone()
    return out


def params_json(cfg: dict) -> dict:
    return {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
            "n_kv_heads": cfg["num_key_value_heads"], "norm_eps": cfg["rms_norm_eps"],
            "rope_theta": cfg["rope_parameters"]["rope_theta"], "vocab_size": cfg["vocab_size"],
            "max_seq_len": cfg["max_position_embeddings"]}


ZERO_SAVE = r"""
import sys, torch, deepspeed
from transformers import AutoModelForCausalLM
src, out = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    "zero_optimization": {"stage": 2}, "steps_per_print": 10**9})
engine.save_checkpoint(out, tag="global_step1")
"""


def logit_diff(model_dir: Path, reference, ids) -> float:
    import layouts

    import torch

    with torch.no_grad():
        return float((layouts.hf_model(model_dir)(ids).logits - reference).abs().max())


def run_convert(*args: str) -> dict:
    p = subprocess.run([sys.executable, "convert.py", *args, "--json"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if p.returncode != 0:
        raise SystemExit(f"convert.py {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Hugging Face Llama directory with its tokenizer (default: build the default run's)")
    ap.add_argument("--llama-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                    help="a Python with llama-cpp-python (make bench-env builds .venv-bench)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="the conversions only (no llama.cpp): its keys are null")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import torch
    import torch.distributed.checkpoint as dcp
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import layouts

    transformers.utils.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    model_dir = Path(args.model) if args.model else default_model(tmp)
    cfg = json.loads((model_dir / "config.json").read_text())
    state = load_file(model_dir / "model.safetensors")
    ids = layouts.probe_ids(cfg["vocab_size"])
    source = layouts.hf_model(model_dir)
    with torch.no_grad():
        reference = source(ids).logits
    diffs = {}

    # Meta: two model-parallel shards, cut as Meta cuts them.
    meta = tmp / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(params_json(cfg)))
    layout = meta_layout(state, cfg)
    for r in range(2):
        part = {}
        for k, v in layout.items():
            dim = layouts.META_TO_HF[re.sub(r"^layers\.\d+\.", "layers.{i}.", k)][1]
            part[k] = v if dim is None else v.chunk(2, dim=dim)[r].clone()
        torch.save(part, meta / f"consolidated.{r:02d}.pth")
    run_convert("meta", str(meta), str(tmp / "from-meta"))
    diffs["meta"] = logit_diff(tmp / "from-meta", reference, ids)

    # DCP with an optimizer state and a train state beside the model (torchtitan's shape).
    dcp.save({**layout, "freqs_cis": torch.zeros(8, 4), "optimizer": {"state": {"exp_avg": torch.zeros(4)}},
              "train_state": {"step": torch.tensor(10)}}, checkpoint_id=str(tmp / "dcp"))
    run_convert("dcp", str(tmp / "dcp"), str(tmp / "from-dcp"), "--params", str(meta / "params.json"))
    diffs["dcp"] = logit_diff(tmp / "from-dcp", reference, ids)

    # A real DeepSpeed ZeRO-2 save of the model, with its config and tokenizer as our checkpoints hold.
    zero = tmp / "zero"
    from jit_ops import single_rank_env

    env = {**os.environ, "DS_ACCELERATOR": "cpu", **single_rank_env()}
    p = subprocess.run([sys.executable, "-c", ZERO_SAVE, str(model_dir), str(zero)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the ZeRO save failed:\n{p.stderr[-3000:]}")
    for f in model_dir.iterdir():
        if f.name.startswith(("config", "tokenizer", "chat_template", "generation_config")):
            (zero / f.name).write_bytes(f.read_bytes())
    run_convert("zero", str(zero), str(tmp / "from-zero"))
    diffs["zero"] = logit_diff(tmp / "from-zero", reference, ids)

    # GGUF, run by llama.cpp: logits and greedy chats against transformers.
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (ROOT / "data" / "instruct.jsonl").open() if line.strip()][-args.prompts:]
    prompts = [tok.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"][:1], add_generation_prompt=True,
                                       tokenize=True) for r in rows]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    stop = sorted({tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in ("<|end|>",) if t in tok.get_vocab())})
    t0, expected = time.perf_counter(), []
    with torch.no_grad():
        for p in [] if args.skip_llamacpp else prompts:
            out = source.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=stop,
                                  pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            expected.append(out[: next((i + 1 for i, t in enumerate(out) if t in stop), len(out))])
    hf_tps = sum(map(len, expected)) / (time.perf_counter() - t0) if expected else None
    probe = ids[0].tolist()
    result: dict = {q: {"identical": None, "tokens_per_s": None, "bytes": None, "llama_cpp": None} for q in ("bf16", "q8_0")}
    for qtype in () if args.skip_llamacpp else ("bf16", "q8_0"):
        gg = tmp / f"model-{qtype}.gguf"
        run_convert("gguf", str(model_dir), str(gg), "--type", qtype)
        request = {"model": str(gg), "prompts": prompts, "max_new_tokens": args.new_tokens, "stop": stop,
                   "logits_prompt": probe, "threads": os.cpu_count()}
        p = subprocess.run([args.llama_python, str(ROOT / "bench" / "llamacpp_run.py")], input=json.dumps(request),
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama.cpp failed on {gg.name} ({args.llama_python}; make bench-env builds it):\n{p.stderr[-3000:]}")
        answer = json.loads(p.stdout)
        same = sum(a == b for a, b in zip(answer["generations"], expected))
        result[qtype] = {"identical": same / len(prompts), "tokens_per_s": round(answer["tokens_per_s"], 1),
                         "logits": answer["logits"], "bytes": gg.stat().st_size, "llama_cpp": answer["llama_cpp"]}
    if not args.skip_llamacpp:
        llama_logits = torch.tensor(result["bf16"]["logits"])
        diffs["gguf_bf16"] = float((llama_logits - reference[0, : llama_logits.shape[0]]).abs().max())
    print(json.dumps({
        "bench": "convert",
        "model": {"source": str(model_dir), "parameters": sum(v.numel() for v in state.values()), "dtype": str(next(iter(state.values())).dtype)},
        "max_abs_logit_diff": {k: round(v, 7) for k, v in diffs.items()},
        "llamacpp_greedy_identical_bf16": result["bf16"]["identical"],
        "llamacpp_greedy_identical_q8_0": result["q8_0"]["identical"],
        "llamacpp_tokens_per_s": {"bf16": result["bf16"]["tokens_per_s"], "q8_0": result["q8_0"]["tokens_per_s"]},
        "transformers_tokens_per_s": hf_tps and round(hf_tps, 1),
        "gguf_bytes": {"bf16": result["bf16"]["bytes"], "q8_0": result["q8_0"]["bytes"]},
        "prompts": len(prompts), "new_tokens": args.new_tokens, "llama_cpp": result["bf16"]["llama_cpp"],
        "threads": os.cpu_count(),
    }))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
