"""Stage 1: everything a training run needs, on disk, before the trainer starts.

    python3 prep.py

Takes the plan trainer.sh made (else plans the run from the record: run_state.plan_run), then: the tokenizer (trained on the first run, else
the published one), the current shard read and validated, tokenized and packed (pretraining) or
rendered with the chat template with loss on assistant tokens only and packed whole into sequences
(instruct), a held-out validation split, and the model (fresh weights, or the previous run's output). Everything goes to
WORK_DIR/prepared, written beside and renamed into place, so a killed prep leaves no half state.
Bad input exits 2 before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import redact
import status_page
from architecture import arch_from_config, count_parameters, llama_config
from config import Settings, architecture, load_settings, resolve_precision
from errors import BadInput, failure_exit, quiet_disk_full_in_threads
from handoff import MANIFEST_FILE, Manifest
from quant_utils import convert, non_finite_tensors, verify_checkpoint
from output_lock import INHERITED, acquire
from run_state import RunPlan, this_runs_plan, validate_checkpoint
from sources import Corpus, parse_sources, shard_bounds
from files import link_or_copy, replacing
from tokenizer import CHAT_TEMPLATE, TOKENIZER_FILES, load_tokenizer, to_messages, train_tokenizer
from targets import fetch, open_target, recover_outputs

def log(msg: str) -> None:
    print(f"[prep] {msg}", flush=True)


# --- data ------------------------------------------------------------------------------------------


# --- tokenizer -------------------------------------------------------------------------------------


def given_tokenizer(var: str, spec: str, s: Settings):
    """The tokenizer of `spec` (TOKENIZER, or BASE_MODEL's own), made ready for this pipeline: a pad
    token (its EOS, when it has none: padded positions carry no loss) and a chat template when it has none."""
    tok = load_tokenizer(fetch(var, spec, s, TOKENIZER_FILES), f"{var}={spec}")
    added = []
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        added.append("pad = its EOS")
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
        added.append("the pipeline's chat template")
    tok.model_max_length, tok.padding_side = s.max_length, "right"
    log(f"tokenizer: {spec} ({len(tok)} tokens{'; added ' + ', '.join(added) if added else ''})")
    return tok


def base_model(s: Settings, tok, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """BASE_MODEL's weights copied into our model class of its shape (seeded fresh weights wherever the
    copy leaves any), saved to `out`; returns the architecture and the copy report."""
    import torch
    from transformers import LlamaConfig

    from architecture import llama_class
    from model import copy_weights

    var, spec = "BASE_MODEL", s.base_model
    src = fetch(var, spec, s, ["config.json", "*.safetensors", "model.safetensors.index.json"])
    config = LlamaConfig.from_dict(llama_config(var, spec, src))
    if config.vocab_size != len(tok):
        raise BadInput([f"{var}={spec!r}: its embeddings have {config.vocab_size} rows but the tokenizer has {len(tok)} "
                        "tokens. Fix: the base model's own tokenizer (leave TOKENIZER unset), or a model and tokenizer that match."])
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(s.seed)
    model = llama_class(s.model_impl)(config)
    t = time.perf_counter()
    try:
        report = copy_weights(model, src, spec)
    except FileNotFoundError as e:
        raise BadInput([f"{var}={spec!r}: {e}. Fix: save the model with safetensors (save_pretrained does by default)."]) from None
    for line in report.describe():
        log(line)
    if not report.complete and not s.base_model_partial:
        raise BadInput([f"{var}={spec!r}: the copy would be partial ({report.describe()[0].split(': ', 1)[1]}), so part "
                        "of the model would train from random weights. Fix: a base model of the same shape, or "
                        "BASE_MODEL_PARTIAL=true to accept it."])
    model.save_pretrained(out, safe_serialization=True)
    log(f"model: {spec}'s weights, copied in {time.perf_counter() - t:.1f} s")
    return arch_from_config(config.to_dict()), report.to_json()


# --- tokenize + pack ---------------------------------------------------------------------------------


def pack(token_lists: Iterable[list[int]], eos_id: int, block: int) -> list:
    """Concatenate documents, each followed by EOS, and cut into blocks of `block` tokens (the last may be shorter).

    No padding and no token lost or repeated: sum(len(b)) == sum(len(d) + 1 for d in docs).
    """
    import numpy as np

    docs = [np.asarray(ids, dtype=np.int32) for ids in token_lists]
    sizes = np.fromiter(map(len, docs), np.int64, len(docs))
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    return pack_ids(flat, np.concatenate([[0], np.cumsum(sizes)]), eos_id, block)


def pack_ids(ids, offsets, eos_id: int, block: int) -> list:
    """`pack` for documents given back to back (`ids`, each starting at `offsets[i]`; encoding.encode_texts)."""
    import numpy as np

    flat = np.insert(ids, offsets[1:], np.int32(eos_id))
    return [flat[i:i + block] for i in range(0, len(flat), block)]


def pack_chats(ids: list[list[int]], labels: list[list[int]], block: int, seed: int) -> tuple[list, list, list]:
    """Whole chats packed into sequences of at most `block` tokens: (input_ids, labels, position_ids).

    Best fit in a seeded random order: each chat goes into the fullest sequence it still fits in.
    Random, not longest first: that would fill each sequence with chats of one length, often of one
    kind, and batches of alike chats trained measurably worse (validation loss +10 % on the default
    set). Position ids restart at 0 with each chat (the model's attention and RoPE restart there
    too), and each chat's first label is -100, so no token is predicted from the chat before it. No
    chat is cut: each is at most `block` tokens already (tokenize_chats).
    """
    import bisect
    import random

    import numpy as np

    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []   # (room left, pack index), sorted
    for i in order:
        n = len(ids[i])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, k = free.pop(j)
        else:
            room, k = block, len(packs)
            packs.append([])
        packs[k].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, k))
    out_ids, out_labels, out_pos = [], [], []
    for members in packs:
        out_ids.append(np.concatenate([np.asarray(ids[i], dtype=np.int32) for i in members]))
        lab = [np.asarray(labels[i], dtype=np.int32) for i in members]
        for x in lab:
            x[0] = -100
        out_labels.append(np.concatenate(lab))
        out_pos.append(np.concatenate([np.arange(len(ids[i]), dtype=np.int32) for i in members]))
    return out_ids, out_labels, out_pos


def tokenize_texts(tok, texts: list[str]) -> list:
    """Each text's token ids (an int32 array each), exactly the tokenizer's, on all cores (encoding.py)."""
    import numpy as np

    from encoding import encode_texts

    ids, offsets = encode_texts(tok, texts)
    return np.split(ids, offsets[1:-1]) if texts else []


def tokenize_chats(tok, chats: list[list[dict[str, str]]], max_length: int,
                   kept: list[int] | None = None) -> tuple[list[list[int]], list[list[int]], int]:
    """input_ids and labels (-100 outside assistant answers) per chat; chats with no answer left after
    truncation to `max_length` are dropped and counted (`kept`, given, gets the index of each chat kept)."""
    from tqdm import tqdm

    ids_out, labels_out, dropped = [], [], 0
    for n, msgs in enumerate(tqdm(chats, desc="[prep] render chats", unit="chat", disable=len(chats) < 500, mininterval=2)):
        try:
            enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        except Exception as e:  # noqa: BLE001 - jinja raises many types; a template that fails is bad input
            raise BadInput([f"the tokenizer's chat template cannot render the chats ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Fix: restore chat_template.jinja (and "
                            "tokenizer_config.json) of the model this run continues from; they are published with it."]) from None
        ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        if all(l == -100 for l in labels):
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        if kept is not None:
            kept.append(n)
    return ids_out, labels_out, dropped


def source_stats(corpus, start: int, end: int, which: list[int], doc_tokens: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per source of an interleaved shard: its weight, rows, documents kept and tokens (the record's mix)."""
    rows = corpus.rows_per_source(start, end)
    docs, tokens = [0] * len(rows), [0] * len(rows)
    for w in which:
        docs[w] += 1
    for w, n in doc_tokens:
        tokens[w] += n
    return [{"path": src.path, "weight": src.weight, "rows": r, "documents": d, "tokens": t}
            for src, r, d, t in zip(corpus.sources, rows, docs, tokens)]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded held-out split: at least one validation and one training row."""
    import random

    if n < 2:
        raise BadInput([f"SHARD_SIZE: the shard yields only {n} training sequence(s); a validation split needs at least 2. "
                        "Fix: a larger SHARD_SIZE or a smaller MAX_LENGTH."])
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def to_dataset(rows: list, labels: list | None = None, position_ids: list | None = None):
    """A datasets.Dataset built straight from arrays (no Python-object round trip per token)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    def column(seqs):
        lengths = np.fromiter((len(r) for r in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in seqs]) if seqs else np.zeros(0, np.int32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))

    cols = {"input_ids": column(rows)}
    if labels is not None:
        cols["labels"] = column(labels)
    if position_ids is not None:
        cols["position_ids"] = column(position_ids)
    return Dataset(InMemoryTable(pa.table(cols)))


# --- model ------------------------------------------------------------------------------------------


def build_model(s: Settings, tok, out: Path) -> dict[str, Any]:
    """Fresh Llama weights (seeded) saved to `out`; returns the architecture."""
    import torch
    from transformers import LlamaConfig

    from architecture import llama_class

    arch = architecture(s)
    if arch["vocab_size"] != len(tok):
        arch["vocab_size"] = len(tok)  # a small corpus can stop BPE short of VOCAB_SIZE
    cfg = LlamaConfig(**arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(s.seed)
    model = llama_class(s.model_impl)(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return arch


def data_fingerprint(seqs: list[list[int]]) -> str:
    """sha256 of the training sequences in order: a resumed shard must see exactly the same data."""
    import numpy as np

    h = hashlib.sha256()
    for seq in seqs:
        h.update(np.asarray(seq, dtype=np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()


def fetch_checkpoint(s: Settings, plan: RunPlan) -> Path:
    """The published last-checkpoint/ of the plan's target, local (the directory itself, or
    downloaded from the Hub), checked complete and readable (run_state.validate_checkpoint)."""
    src = open_target(plan.target, s).materialize(Path(s.work_dir), allow=["last-checkpoint/*"]) / "last-checkpoint"
    validate_checkpoint(src, int(plan.resume["step"]), f"{plan.target}/last-checkpoint")
    return src


def check_source_model(source: str, model_dir: Path) -> dict[str, Any]:
    """The published model a run continues from: every tensor the architecture needs with its shape
    (headers), and every weight finite (values). Returns its format."""
    fmt = verify_checkpoint(model_dir)
    bad = non_finite_tensors(model_dir)
    if bad:
        raise BadInput([f"{source}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]}): the published "
                        "model is damaged and would train to NaN. Fix: restore it from an earlier version (on the Hub: "
                        "the repo's commit history), or republish it."])
    return fmt


def take_model(src: Path, out: Path, want: str, compute: str, fmt: dict[str, Any]) -> dict[str, Any]:
    """The published model in `src` (a local directory) in `out`, in the format this run trains
    (`want`: 'nf4' | 'float'): linked when it already is, converted otherwise. Returns its architecture."""
    if fmt["format"] == want:
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and (f.suffix in {".safetensors", ".json"} and f.name != "training_state.json"):
                link_or_copy(str(f), str(out / f.name))
        log(f"checkpoint: {fmt['format']} ({fmt['dtype']}), {fmt['tensors']} tensors, used as is")
    else:
        t = time.perf_counter()
        convert(src, out, want, compute)
        log(f"checkpoint: converted {fmt['format']} ({fmt['dtype']}) -> {want} "
            f"{'(bitsandbytes NF4, double quantization)' if want == 'nf4' else f'({compute}, dequantized by bitsandbytes)'} "
            f"in {time.perf_counter() - t:.1f} s")
    return arch_from_config(json.loads((out / "config.json").read_text()))


# --- the stage ---------------------------------------------------------------------------------------


def prepare(s: Settings, plan: RunPlan) -> Manifest:
    """Write WORK_DIR/prepared for `plan`; returns the manifest."""
    work = Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # The model this run continues from is checked first (headers and values), and the checkpoint it
    # resumes: a broken one stops the run before any data is read.
    source_dir = (open_target(plan.source, s).materialize(work, ignore=["last-checkpoint/*", "runs/*"])
                  if plan.source is not None else None)
    source_format = check_source_model(plan.source, source_dir) if source_dir is not None else None
    checkpoint_src = fetch_checkpoint(s, plan) if plan.resume else None
    if s.use_quant and plan.source is None:
        log("USE_QUANT=true on the first pretraining run: it builds the model, so it trains every weight in full "
            "precision (fresh weights frozen in 4-bit would teach nothing); later runs train NF4 + LoRA")
    precision = resolve_precision(s)
    shard = read_shard(s, plan)
    with replacing(work / "prepared") as staged:
        if checkpoint_src is not None:
            shutil.copytree(checkpoint_src, staged / "checkpoint", copy_function=link_or_copy)
            why = plan.resume.get("stop_reason", "an interruption")
            log(f"checkpoint: resuming {plan.stage} shard {plan.shard} at step {plan.resume['step']} "
                + ("(the last periodic checkpoint of a run that did not finish)" if why == "a periodic checkpoint"
                   else f"(stopped by {why})"))
        tok = choose_tokenizer(s, plan, shard, staged / "checkpoint" if checkpoint_src is not None else None, source_dir)
        tok.save_pretrained(staged / "tokenizer")
        data = encode_shard(s, plan, shard, tok, staged)
        origin, arch = prepare_model(s, plan, tok, staged / "model", source_dir, source_format, precision)
        manifest = Manifest(
            run_id=uuid.uuid4().hex, plan=plan, dataset=shard.spec, rows=shard.end - shard.start,
            documents=data["documents"], shards_total=shard.total, tokens=data["tokens"],
            sequences=data["train_sequences"] + data["val_sequences"],
            train_sequences=data["train_sequences"], val_sequences=data["val_sequences"],
            **({"sources": data["sources"]} if data["sources"] else {}),
            packed_chats=data["packed"], **({"train_chats": data["train_chats"]} if data["packed"] else {}),
            raw_bytes=data["raw_bytes"], tokenize_seconds=data["tokenize_seconds"],
            architecture=arch, parameters=count_parameters(arch),
            train_format=plan.train_format(s.use_quant), source_format=source_format,
            prep_seconds=time.perf_counter() - t0, data_fingerprint=data["fingerprint"],
            **({"origin": {**origin, "tokenizer": s.tokenizer or s.base_model}}
               if plan.source is None and (s.tokenizer or s.base_model) else {}),
            **({"resume": {"checkpoint": "checkpoint", **plan.resume}} if checkpoint_src is not None else {}),
        )
        manifest.write(staged / MANIFEST_FILE)
    return manifest


@dataclass
class Shard:
    """This run's rows of the stage's dataset, read and validated whole before anything is tokenized."""

    var: str
    spec: str
    corpus: Corpus
    start: int
    end: int
    total: int
    which: list[int]  # the source of each row
    chats: list[list[dict[str, str]]] | None = None  # instruct
    texts: list[str] | None = None  # pretraining


def read_shard(s: Settings, plan: RunPlan) -> Shard:
    var, spec = ("INSTRUCT_DATASET", s.instruct_dataset) if plan.inst else ("INPUT_DATASET", s.input_dataset)
    token = s.hf_token.get_secret_value() if s.hf_token else None
    corpus = Corpus(parse_sources(spec, var), var, s.text_column, s.dataset_split, token, s.seed)
    start, end, total = shard_bounds(len(corpus), plan.shard, s.shard_size, var)
    log(f"{var}={corpus.describe()}; shard {plan.shard} = rows {start}..{end - 1} ({total} shard(s))")
    status_page.emit("plan", stage=plan.stage, shard=plan.shard, shards_total=total, describe=plan.describe())
    if plan.inst:
        rows, which = corpus.records(start, end)
        chats = [to_messages(row, corpus.where(start + i, w)) for i, (row, w) in enumerate(zip(rows, which))]
        return Shard(var, spec, corpus, start, end, total, which, chats=chats)
    texts, which = corpus.texts(start, end)
    if not texts:
        raise BadInput([f"{var}: shard {plan.shard} has no non-empty {s.text_column!r} values. Fix: check the data."])
    return Shard(var, spec, corpus, start, end, total, which, texts=texts)


def choose_tokenizer(s: Settings, plan: RunPlan, shard: Shard, checkpoint: Path | None, source_dir: Path | None):
    """The tokenizer of this run: the published one it continues from; on the first run the resumed
    checkpoint's, TOKENIZER's (or BASE_MODEL's), or one trained now on a sample of the data."""
    if plan.source is None and checkpoint is not None:
        tok = load_tokenizer(checkpoint, f"{plan.target}/last-checkpoint")
        log(f"tokenizer: the one of the checkpoint being resumed ({len(tok)} tokens)")
        return tok
    if plan.source is None and (s.tokenizer or s.base_model):
        return given_tokenizer("TOKENIZER" if s.tokenizer else "BASE_MODEL", s.tokenizer or s.base_model, s)
    if plan.source is None:
        log(f"training a byte-level BPE tokenizer (vocab {s.vocab_size}) on up to {s.tokenizer_sample_mb:g} MB of {shard.var}")
        return train_tokenizer(shard.corpus.sample_texts(int(s.tokenizer_sample_mb * 1e6)), s.vocab_size, s.max_length)
    if not (source_dir / "tokenizer.json").exists():
        raise BadInput([f"{plan.source}: no tokenizer.json beside the model. Fix: publish the model with its tokenizer."])
    tok = load_tokenizer(source_dir, plan.source)
    if plan.inst and not tok.chat_template:
        raise BadInput([f"{plan.source}: its tokenizer has no chat template, so chats cannot be rendered. "
                        "Fix: start from a model this pipeline pretrained (its tokenizer carries the template)."])
    log(f"tokenizer: the published one from {plan.source} ({len(tok)} tokens)")
    return tok


def encode_shard(s: Settings, plan: RunPlan, shard: Shard, tok, staged: Path) -> dict[str, Any]:
    """The shard tokenized (documents packed into sequences, or chats rendered with loss on the
    answers), split into train/val, chats packed, saved under `staged`; returns what the manifest
    says of it. A resumed shard must be the very data its checkpoint trained on."""
    import numpy as np

    from encoding import encode_texts

    t1 = time.perf_counter()
    which = shard.which
    if plan.inst:
        kept: list[int] = []
        seqs, seq_labels, dropped = tokenize_chats(tok, shard.chats, s.max_length, kept)
        if dropped:
            log(f"dropped {dropped} chat(s) whose answer starts beyond MAX_LENGTH={s.max_length}")
        n_docs = len(shard.chats)
        raw_bytes = sum(len(m["content"].encode()) for c in shard.chats for m in c)
        doc_tokens = [(which[i], len(x)) for i, x in zip(kept, seqs)]
        which = [which[i] for i in kept]  # the chats trained (those cut to nothing by MAX_LENGTH are not)
    else:
        ids, offsets = encode_texts(tok, shard.texts)
        seqs, seq_labels = pack_ids(ids, offsets, tok.eos_token_id, s.max_length), None
        n_docs = len(shard.texts)
        raw_bytes = sum(len(t.encode()) for t in shard.texts)
        doc_tokens = list(zip(which, (np.diff(offsets) + 1).tolist()))
    dt = time.perf_counter() - t1
    mix = source_stats(shard.corpus, shard.start, shard.end, which, doc_tokens) if len(shard.corpus.sources) > 1 else None
    if mix:
        log("mix of this shard: " + "; ".join(f"{m['path']} {m['rows']} rows, {m['tokens']:,} tokens "
                                             f"({m['tokens'] / max(1, sum(x['tokens'] for x in mix)):.0%})" for m in mix))
    tokens = sum(len(x) for x in seqs)
    # The held-out split is drawn over documents' sequences (pretraining) or chats (instruct)
    # before chats are packed, so the same chats are held out whether packed or not.
    train_idx, val_idx = split_indices(len(seqs), s.val_fraction, s.seed + plan.shard)
    splits = {name: ([seqs[i] for i in idx], [seq_labels[i] for i in idx] if seq_labels else None, None)
              for name, idx in (("train", train_idx), ("val", val_idx))}
    fingerprint = data_fingerprint(splits["train"][0])
    packed = plan.inst and s.pack_chats
    if packed and plan.resume and plan.resume.get("data_fingerprint") == fingerprint:
        # A checkpoint of this shard trained one chat per sequence: it resumes on that data.
        packed = False
        log("PACK_CHATS=true, but the checkpoint being resumed trained this shard one chat per sequence: "
            "the shard finishes that way")
    if packed:
        splits = {name: pack_chats(x, y, s.max_length, s.seed + plan.shard) for name, (x, y, _) in splits.items()}
        fingerprint = data_fingerprint(splits["train"][0])
        log(f"packed {len(train_idx)} training chats into {len(splits['train'][0])} sequences of up to "
            f"{s.max_length} tokens ({sum(len(x) for x in splits['train'][0]) / (len(splits['train'][0]) * s.max_length):.0%} full)")
    for name, (x, y, pos) in splits.items():
        to_dataset(x, y, pos).save_to_disk(staged / name)
    if plan.resume and plan.resume.get("data_fingerprint") not in (None, fingerprint):
        raise BadInput([f"{shard.var}: shard {plan.shard} is not the data the checkpoint in {plan.target}/last-checkpoint was "
                        f"trained on (its training sequences changed since step {plan.resume['step']}), so resuming "
                        "would skip or repeat data. Fix: restore the dataset and settings of that run (SHARD_SIZE, "
                        "MAX_LENGTH, VAL_FRACTION, SEED, PACK_CHATS), or delete last-checkpoint/ there to train the shard anew."])
    n_train, n_val = len(splits["train"][0]), len(splits["val"][0])
    log(f"{n_docs} {'chats' if plan.inst else 'documents'} -> {tokens:,} tokens in {n_train + n_val} sequences "
        f"({n_train} train / {n_val} val), {raw_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s")
    return {"documents": n_docs, "tokens": tokens, "train_sequences": n_train, "val_sequences": n_val, "sources": mix,
            "packed": packed, "train_chats": len(train_idx), "raw_bytes": raw_bytes, "tokenize_seconds": dt,
            "fingerprint": fingerprint}


def prepare_model(s: Settings, plan: RunPlan, tok, out: Path, source_dir: Path | None,
                  source_format: dict[str, Any] | None, precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model this run trains, in `out`: BASE_MODEL's weights, fresh weights, or the published
    model it continues from in the format it trains. Returns (origin, architecture)."""
    origin: dict[str, Any] = {}
    if plan.source is None and s.base_model:
        arch, origin["base_model"] = base_model(s, tok, out)
    elif plan.source is None:
        arch = build_model(s, tok, out)
        log(f"model: fresh Llama, {count_parameters(arch):,} parameters "
            f"(d={arch['hidden_size']}, layers={arch['num_hidden_layers']}, heads={arch['num_attention_heads']}/{arch['num_key_value_heads']} kv, "
            f"mlp={arch['intermediate_size']}, vocab={arch['vocab_size']})")
    else:
        arch = take_model(source_dir, out, plan.train_format(s.use_quant), precision, source_format)
        if arch["vocab_size"] != len(tok):
            raise BadInput([f"{plan.source}: the model's vocabulary ({arch['vocab_size']}) differs from its tokenizer's "
                            f"({len(tok)}). Fix: publish the model and tokenizer together."])
        log(f"model: continuing from {plan.source} ({count_parameters(arch):,} parameters)")
    return origin, arch


def main(argv: list[str] | None = None) -> int:
    redact.install()
    quiet_disk_full_in_threads()
    import datasets
    import transformers

    # Our own progress bars stay; the libraries' per-file ones only add noise to the run log.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        s = load_settings()
        acquire(s)
        recover_outputs(s)
        plan = this_runs_plan(s, handed_on=os.environ.get(INHERITED) == "1")
        if plan.done:
            log(plan.describe())
            return 0
        log(f"this run: {plan.describe()}")
        published = open_target(plan.target, s).read_record() or (open_target(s.output_repo, s).read_record() if plan.inst else None)
        status_page.emit("history", history=(published or {}).get("history", []))
        prepare(s, plan)
        return 0
    except Exception as e:  # noqa: BLE001 - failure_exit re-raises what is not bad input, a RunFailure or a full disk
        return failure_exit(e)


if __name__ == "__main__":
    raise SystemExit(main())
