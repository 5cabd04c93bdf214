"""Checkpoints from other trainers and this pipeline's own mid-shard checkpoint as Hugging Face
Llama models, and a Hugging Face Llama as a GGUF file for llama.cpp.

    python3 convert.py meta SRC OUT [--tokenizer DIR] [--dtype bf16|fp16|fp32]
    python3 convert.py dcp  SRC OUT (--params params.json | --preset NAME) [--tokenizer DIR] [--dtype ...]
    python3 convert.py zero SRC OUT [--dtype ...]
    python3 convert.py gguf SRC OUT.gguf [--type bf16|f16|q8_0]
    ... [--push OWNER/NAME | DIR] [--json]

- meta: Meta's original layout: `consolidated.*.pth` (one or several model-parallel shards, merged)
  and `params.json`, with `tokenizer.model` copied along when present.
- dcp: a torch distributed checkpoint (`.metadata` + `__*_*.distcp`, e.g. torchtitan's), with or
  without training state in it: only the model's weights are read; `freqs_cis` and the other
  non-parameter buffers are dropped. Keys may carry a `model.` prefix. torchtitan's Llama uses
  Meta's names and layout; the shape comes from `--params` (Meta's params.json) or a preset.
- zero: our `last-checkpoint/` (DeepSpeed ZeRO-2): the fp32 master weights, in the dtype the run
  trained in, with its config and tokenizer: a standalone model of a shard stopped midway. LoRA
  adapters on an NF4 base are merged onto the model published beside the checkpoint (their base).
- gguf: a Hugging Face Llama (with its tokenizer.json) as one GGUF file, tokenizer and chat template
  inside, through the `gguf` package.

Meta, torchtitan and llama.cpp rotate query/key pairs (2i, 2i+1); Hugging Face's Llama rotates
(i, i + d/2): q and k are permuted on the way. Every conversion checks itself before it reports
success: the converted model's fp32 logits on fixed token sequences against the source's own
forward (for meta/dcp a forward in the source's layout, for zero the checkpoint's model states, for
gguf the weights read back from the file); more than 1e-5 apart fails (q8_0 is lossy: reported; a
LoRA merge is held to the pipeline's 0.5% of loss). A checkpoint that does not match the
architecture exits 2 naming the missing, unexpected or misshapen keys: nothing is filled in. OUT
must not exist (or be empty); it is written beside and renamed into place. --push then publishes
the result the way the pipeline publishes.

Exit codes: 0 converted and checked; 1 the check failed (or the Hub did); 2 bad input.

Examples:
    python3 convert.py meta ~/Llama-3.2-1B/original ./llama-3.2-1b-hf --tokenizer ~/Llama-3.2-1B
    python3 convert.py dcp outputs/checkpoint/step-1000 ./step1000-hf --params params.json
    python3 convert.py zero output/llama/last-checkpoint ./mid-shard
    python3 convert.py gguf output/llama-it ./llama-it-q8_0.gguf --type q8_0 --push alice/llama-it-gguf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from config import SettingsError, load_settings  # first: importing config quiets bitsandbytes' import-time warning
from errors import BadInput as PipelineBadInput  # the pipeline's settings and Hub errors are bad input too
from gguf_export import convert_gguf
from layouts import (DTYPES, MERGE_TOLERANCE, TOLERANCE, BadInput, CheckFailed, check, check_keys, expected_meta_keys,
                     hf_config, hf_logits, hf_model, merge_lora_checkpoint, meta_config, meta_logits, meta_shapes, nf4_source_precision,
                     meta_to_hf, preset_params, probe_ids, read_dcp, read_meta, read_zero, tokenizer_files, write_model)


def convert(args) -> dict[str, Any]:
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty: choose a new directory")
    extras = tokenizer_files(Path(args.tokenizer).expanduser() if args.tokenizer else None)
    if args.kind in ("meta", "dcp"):
        staged, reference, ids, dtype, parameters = _from_meta_layout(args, src, out, extras)
    else:
        extras = extras or tokenizer_files(src)
        converted = _from_zero(args, src, out, extras)
        if isinstance(converted, dict):  # LoRA on NF4: merged and checked the pipeline's way
            return converted
        staged, reference, ids, dtype, parameters = converted
    try:
        diff = check(reference, hf_logits(staged, ids), f"{args.kind} -> hf")
    except CheckFailed:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staged.rename(out)
    return {"kind": args.kind, "source": str(src), "output": str(out), "dtype": dtype, "parameters": parameters,
            "max_abs_logit_diff": diff, "tokenizer": sorted(f.name for f in (extras or []))}


def _from_meta_layout(args, src: Path, out: Path, extras: list[Path]):
    """Meta's consolidated shards or a DCP in Meta's names, written as a HF model beside `out`; with
    the source's own logits (its forward at the output's stored precision) to check it against."""
    import torch

    if args.kind == "meta":
        state, params = read_meta(src)
        if (src / "tokenizer.model").exists() and not any(f.name == "tokenizer.model" for f in extras):
            extras.append(src / "tokenizer.model")
    else:
        state = read_dcp(src)
        if args.params:
            params = json.loads(Path(args.params).read_text())
        elif args.preset:
            params = preset_params(args.preset, state)
        else:
            raise BadInput("dcp needs the model's shape: --params params.json (Meta's format) or --preset NAME")
    arch = meta_config(params, state)
    check_keys(state, expected_meta_keys(arch), meta_shapes(arch), f"{src}")
    dtype = args.dtype or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(state["tok_embeddings.weight"].dtype, "fp32")
    staged = write_model(meta_to_hf(state, arch), hf_config(arch), out, dtype, extras)
    ids = probe_ids(arch["vocab_size"])
    # The source's forward at the stored precision of the output: what the converted model holds.
    stored = {k: v.to(getattr(torch, DTYPES[dtype])) for k, v in state.items()}
    with torch.no_grad():
        reference = meta_logits(stored, arch, ids)
    return staged, reference, ids, dtype, sum(v.numel() for v in state.values())


def _from_zero(args, src: Path, out: Path, extras: list[Path]):
    """Our DeepSpeed ZeRO-2 checkpoint's fp32 masters written as a HF model beside `out`, with the
    model states saved beside them (what the run's model held) as the reference; LoRA adapters on an
    NF4 base are merged, checked and moved into `out` (the result's report is returned instead)."""
    import torch
    from transformers import LlamaConfig

    masters, module, cfg = read_zero(src)
    if masters is None:
        dtype = args.dtype or nf4_source_precision(module)  # the precision the run stored its weights in
        staged, delta, diff, parameters = merge_lora_checkpoint(src, module, out, dtype, extras)
        if out.exists():
            out.rmdir()
        staged.rename(out)
        return {"kind": "zero", "source": str(src), "output": str(out), "dtype": dtype, "lora_merged": True,
                "merge_loss_delta_pct": round(delta * 100, 4), "max_abs_logit_diff": diff,
                "parameters": parameters,
                "tokenizer": sorted(f.name for f in extras)}
    dtype = args.dtype or {"bfloat16": "bf16", "float16": "fp16"}.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "fp32")
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    if config.tie_word_embeddings:  # the shared head comes back under both names
        masters.pop("lm_head.weight", None)
    staged = write_model(masters, config, out, dtype, extras)
    ids = probe_ids(config.vocab_size)
    # The source: the model states saved beside the masters (what the run's model held), in fp32,
    # in the same transformers model (its computed buffers, e.g. RoPE's, built as it loads).
    ref_model = hf_model(staged)
    missing, unexpected = ref_model.load_state_dict({k: v.float() for k, v in module.items()}, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise BadInput(f"{src}: its model states do not match its config.json (missing {missing[:6]}, "
                       f"unexpected {unexpected[:6]})")
    if config.tie_word_embeddings:
        ref_model.tie_weights()
    with torch.no_grad():
        reference = ref_model(ids).logits
    return staged, reference, ids, dtype, sum(v.numel() for v in masters.values())


class Pusher:
    """--push: the pipeline's publish path (targets.Target.deliver). A Hub repo's write access is checked
    before anything is converted; the publish is one commit adding or replacing the converted files
    and leaving the repo's other files; a local directory gets them swapped in the same way."""

    def __init__(self, target: str) -> None:
        from targets import open_target

        try:
            self.s = load_settings({**os.environ, "OUTPUT_REPO": target})
        except SettingsError as e:
            raise BadInput(f"--push {target}: {e}") from e
        self.target = open_target(target, self.s)
        if self.target.needs_token and not self.s.hf_token:
            raise BadInput(f"--push {target}: no HF_TOKEN. Fix: export HF_TOKEN (a token with write access)")
        if self.target.needs_token:  # a local directory's write access shows when it is written
            from targets import access_problems

            problems = access_problems([self.target], self.s)
            if problems:
                raise BadInput("; ".join(problems))
        # A local directory may be a pipeline's output: one writer at a time, as between two runs,
        # taken before any work (a live run there is said now, not after the conversion)
        import output_lock

        self.held = (output_lock.acquire_dir(self.target.local_dir, fix="or push to another directory")
                     if self.target.local_dir is not None else [])

    def push(self, output: Path, kind: str) -> str:
        files = [output] if output.is_file() else sorted(output.iterdir())
        try:
            self._deliver(files, output, kind, self.target.head())
        finally:
            for fd in self.held:
                os.close(fd)
            self.held = []
        return self.target.spec

    def _deliver(self, files: list[Path], output: Path, kind: str, revision: str | None) -> None:
        import tempfile
        import uuid

        def fill(staged: Path) -> None:
            for f in files:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, staged / f.name)

        with tempfile.TemporaryDirectory(prefix="convert-push-") as work:
            self.target.deliver(Path(work), fill, f"convert.py {kind}: {output.name}", uuid.uuid4().hex,
                                revision, only=[f.name + ("/" if f.is_dir() else "") for f in files])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("Examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["meta", "dcp", "zero", "gguf"], help="the source's layout, or gguf: a Hugging Face "
                    "model to a GGUF file")
    ap.add_argument("src", help="the source checkpoint's (or model's) directory")
    ap.add_argument("out", help="the Hugging Face model directory to write (new or empty), or the .gguf file")
    ap.add_argument("--type", choices=["bf16", "f16", "q8_0"], default="bf16", help="gguf: the weights' type (default bf16)")
    ap.add_argument("--params", help="dcp: Meta's params.json with the model's shape")
    ap.add_argument("--preset", help="dcp: the shape of one of our presets (MODEL_SIZE names)")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to save with the model")
    ap.add_argument("--dtype", choices=list(DTYPES), help="the weights' dtype (default: the source's)")
    ap.add_argument("--push", metavar="OWNER/NAME", help="then publish the result there, as the pipeline publishes: a Hub "
                    "repo (private unless PRIVATE=false; HF_TOKEN checked before converting; one commit that adds or "
                    "replaces the converted files) or a local directory")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    import redact

    redact.install()
    import transformers

    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        pusher = Pusher(args.push) if args.push else None  # the token and the repo checked before any work
        result = convert_gguf(args) if args.kind == "gguf" else convert(args)
        if pusher:
            result["pushed"] = pusher.push(Path(result["output"]), args.kind)
    except PipelineBadInput as e:  # ours, and the pipeline's (settings, a token the Hub refuses)
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the pipeline's own failures (an outage, a conflict, a full disk)
        from errors import report_failure

        if report_failure(e) is None:
            raise
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"converted {result['kind']} {result['source']} -> {result['output']}: {result['parameters']:,} parameters "
              f"in {result['dtype']}; checked: "
              + (f"LoRA merged into the NF4 base: loss {result['merge_loss_delta_pct']:.3f}% from the adapter model's (at most "
                 f"{MERGE_TOLERANCE:.1%}), max |logit difference| {result['max_abs_logit_diff']:.2g} (fp32, 3 sequences of "
                 "16 tokens)" if result.get("lora_merged") else
                 f"max |logit difference| {result['max_abs_logit_diff']:.2g} (fp32, 3 sequences of 16 tokens; "
                 + ("q8_0 is lossy: reported)" if result["dtype"] == "q8_0" else f"at most {TOLERANCE:g})"))
              + (f"; tokenizer: {', '.join(result['tokenizer'])}" if result["tokenizer"] else "; no tokenizer (--tokenizer DIR)")
              + (f"\npublished to {result['pushed']}" if result.get("pushed") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
