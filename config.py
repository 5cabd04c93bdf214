"""The typed settings of train-llama: every knob, its env var, default and validation.

Each field is an environment variable (the interface of a Hugging Face Space), optionally also set in
a YAML or TOML file named by ``CONFIG_FILE``. Precedence: environment > file > default. All problems
are collected and reported together (``SettingsError``); entry points turn that into exit code 2
before any heavy import.

The derived configs (model architecture, DeepSpeed, trainer arguments) are pure functions of the
settings, so every entry point derives the same values.

``python3 config.py`` prints the resolved settings and architecture.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tomllib
from pathlib import Path

import redact
from errors import BadInput, report
from architecture import DEFAULT_PRESET, LORA_TARGETS, PRESETS, RENAMED_PRESETS, config_kwargs, count_parameters, preset_shape, shape, size_for_target
from typing import Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# On CPUs with AVX512-bf16, bitsandbytes looks for an optional kernel package and warns at import
# when it is absent; its built-in kernel is used instead, so the warning is only noise in every log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TRACKERS = ("tensorboard", "trackio", "wandb")  # REPORT_TO: each through transformers' integration


class SettingsError(BadInput):
    """Bad settings: one line per problem, each naming the variable, the value and what is accepted."""


def parse_count(text: str) -> int:
    """'125M' -> 125_000_000; '1.5B' -> 1_500_000_000; '3e6' -> 3_000_000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise ValueError("expected a count such as 125M, 1.5B or 3000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


def parse_duration_s(text: str) -> int:
    """'30m' -> 1800; '5h' -> 18000; '1h30m' -> 5400; '90' (bare number = minutes) -> 5400."""
    t = text.strip().lower()
    if re.fullmatch(r"[0-9]+", t):
        return int(t) * 60
    parts = re.findall(r"([0-9]+)\s*([dhms])", t)
    if not parts or re.sub(r"[0-9]+\s*[dhms]", "", t).strip():
        raise ValueError("expected a duration such as 30m, 5h or 1h30m")
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * unit[u] for n, u in parts)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


class _FileSource(PydanticBaseSettingsSource):
    """Values from the YAML/TOML file named by CONFIG_FILE; an unknown key is an error."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self.path = path
        self.problems: list[str] = []

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        p = Path(self.path)
        try:
            text = p.read_text()
            # Registered before parsing: a file that does not parse may still hold the token.
            for m in re.finditer(r"(?im)^\s*[\"']?hf_token[\"']?\s*[:=]\s*[\"']?([^\"'\s#]+)", text):
                redact.add(m.group(1))
            data = tomllib.loads(text) if p.suffix == ".toml" else _yaml_load(text)
        except FileNotFoundError:
            raise SettingsError([f"CONFIG_FILE={self.path!r}: no such file. Fix: point CONFIG_FILE at a .yaml or .toml file."])
        except Exception as e:  # noqa: BLE001 - any parse error is the same bad input
            raise SettingsError([f"CONFIG_FILE={self.path!r}: cannot parse ({_parse_error(e)}). Fix: valid YAML or TOML."])
        if not isinstance(data, dict):
            raise SettingsError([f"CONFIG_FILE={self.path!r}: expected a mapping of VARIABLE: value."])
        for k, v in data.items():
            if str(k).upper() == "HF_TOKEN" and v is not None:
                redact.add(str(v))
        known = known_names()
        unknown = [k for k in data if str(k).upper() not in known]
        if unknown:
            raise SettingsError([
                f"CONFIG_FILE={self.path!r}: unknown key {k!r}. Accepted keys: the variables in the README "
                f"({', '.join(sorted(known))})." for k in unknown
            ])
        # Values of any type become what the environment would have given (strings), so the same
        # validation applies; a list (the datasets of INPUT_DATASET / INSTRUCT_DATASET) becomes JSON.
        return {str(k).upper(): (str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, (list, dict))
                                 else str(v)) for k, v in data.items()}


def _parse_error(e: Exception) -> str:
    """Where and what, never the offending line itself: it may hold the token."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or type(e).__name__}"
    if isinstance(e, tomllib.TOMLDecodeError):
        return str(e).splitlines()[0]
    return type(e).__name__


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) or {}


def known_names() -> set[str]:
    """Every environment name a setting answers to (for a clean environment: drop these)."""
    names = set()
    for name, f in Settings.model_fields.items():
        names.add(name.upper())
        if isinstance(f.validation_alias, AliasChoices):
            names.update(str(a) for a in f.validation_alias.choices)
    return names


def _aliases(name: str) -> set[str]:
    """Every env name of the field that `name` (any of its names) belongs to."""
    for fname, f in Settings.model_fields.items():
        choices = {str(c) for c in f.validation_alias.choices} if isinstance(f.validation_alias, AliasChoices) else set()
        if name in choices or name.lower() == fname:
            return choices | {fname.upper()}
    return {name}


def _env(name: str, *aliases: str, **kw) -> Any:
    return Field(validation_alias=AliasChoices(name, *aliases), **kw)


class Settings(BaseSettings):
    """Every knob of a run. Field docs are the README's variable table."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore",
                                      populate_by_name=True, validate_default=True)
    # The Hub client of these settings (hub.hub builds it on first use): it lives and dies with them.
    _hub_client: Any = PrivateAttr(default=None)

    # --- run state -------------------------------------------------------------------------------
    init: int | None = _env("INIT", default=None, ge=0,
                            description="Shard index to train (overrides the published record; default: from the record).")
    inst: bool | None = _env("INST", default=None,
                             description="true: instruction tuning stage; false: pretraining (default: from the record).")
    max_runs: int = _env("MAX_RUNS", default=0, ge=0, description="Local loop: stop after this many runs (0 = until done).")

    # --- data ------------------------------------------------------------------------------------
    input_dataset: str = _env("INPUT_DATASET", "INPUT_DS", default="data/pretrain.jsonl",
                              description="Pretraining corpus: Hub dataset id, local directory, or .jsonl/.json/.parquet/.txt file; or several mixed by weight, a:0.7,b:0.3.")
    instruct_dataset: str = _env("INSTRUCT_DATASET", "INST_DS", default="data/instruct.jsonl",
                                 description="Instruction (chat) dataset, same forms as INPUT_DATASET.")
    text_column: str = _env("TEXT_COLUMN", default="text", description="Pretraining text column.")
    dataset_split: str = _env("DATASET_SPLIT", default="train", description="Split read from both datasets.")
    shard_size: int = _env("SHARD_SIZE", default=5000, ge=1, description="Rows per shard; run k trains rows [k*SHARD_SIZE, (k+1)*SHARD_SIZE).")
    val_fraction: float = _env("VAL_FRACTION", default=0.05, gt=0, lt=0.5, description="Share of each shard held out for validation.")
    tokenizer_sample_mb: float = _env("TOKENIZER_SAMPLE_MB", default=64.0, gt=0,
                                      description="Cap on the text (MB) the tokenizer is trained on (first run only).")
    vocab_size: int = _env("VOCAB_SIZE", default=4096, ge=300, le=262144, description="Tokenizer vocabulary size.")
    max_length: int = _env("MAX_LENGTH", default=256, ge=16, le=131072, description="Tokens per training sequence.")
    pack_chats: bool = _env("PACK_CHATS", default=True,
                            description="Instruct stage: pack several whole chats into each MAX_LENGTH sequence (attention and "
                                        "positions restart at each chat, loss on answers only); false: one chat per sequence, padded.")

    # --- model -----------------------------------------------------------------------------------
    model_size: str | None = _env("MODEL_SIZE", default=None,
                                  description=f"Named size: {', '.join(PRESETS)} (default {DEFAULT_PRESET} when no other size is set; shapes in the README's Presets table).")
    target_parameters: str | None = _env("TARGET_PARAMETERS", default=None,
                                         description="Model size as a parameter count, e.g. 125M, 1.5B (1M-3B).")
    factor: int | None = _env("FACTOR", default=None, ge=64,
                              description="Deprecated: hidden size (multiple of 64); use TARGET_PARAMETERS.")
    base_model: str | None = _env(
        "BASE_MODEL", default=None,
        description="Start pretraining from this Llama's weights (Hub id or local directory) instead of fresh ones: its config.json gives the shape, its tokenizer is used unless TOKENIZER is set, and the weight copy's report is printed and kept in the record.")
    base_model_partial: bool = _env(
        "BASE_MODEL_PARTIAL", default=False,
        description="Accept a BASE_MODEL that fills only part of the model (the rest keeps fresh weights); otherwise any tensor missing, unused or of another shape stops the run.")
    tokenizer: str | None = _env(
        "TOKENIZER", default=None,
        description="Use this tokenizer (Hub id or local directory) instead of training one; the chat template is added when it has none. VOCAB_SIZE and TOKENIZER_SAMPLE_MB then do not apply.")

    # --- training --------------------------------------------------------------------------------
    use_quant: bool = _env("USE_QUANT", default=False,
                           description="Train LoRA adapters on 4-bit NF4 base weights (QLoRA); the published model is always merged plain bf16.")
    lora_r: int = _env("LORA_R", default=16, ge=1, le=1024, description="LoRA rank (USE_QUANT=true).")
    lora_alpha: float = _env("LORA_ALPHA", default=32.0, gt=0, description="LoRA scaling numerator: updates are scaled by LORA_ALPHA / LORA_R.")
    lora_dropout: float = _env("LORA_DROPOUT", default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: str = _env("LORA_TARGETS", default=",".join(LORA_TARGETS),
                             description="Comma-separated projections that get adapters (default: every linear projection of attention and MLP).")
    batch_size: int = _env("BATCH_SIZE", default=16, ge=1, description="Sequences per device per step (chats, when the instruct stage packs them: PACK_CHATS).")
    gradient_accumulation_steps: int = _env("GRADIENT_ACCUMULATION_STEPS", default=1, ge=1,
                                            description="Micro-batches per optimizer step.")
    epochs: float = _env("EPOCHS", default=1.0, gt=0, le=1000, description="Passes over each shard.")
    learning_rate: float = _env("LEARNING_RATE", default=2e-3, gt=0, lt=1, description="Peak learning rate (cosine schedule).")
    weight_decay: float = _env("WEIGHT_DECAY", default=0.1, ge=0, lt=1, description="AdamW weight decay.")
    warmup_ratio: float = _env("WARMUP_RATIO", default=0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    max_steps: int | None = _env(
        "MAX_STEPS", default=None, ge=1,
        description="Cap on optimizer steps per run. A run that reaches it before the end of its shard stops as a time-budget stop does: its full training state is published as last-checkpoint/ and the next run continues the shard. No data is skipped.")
    save_interval: float | None = _env(
        "SAVE_INTERVAL", default=None, ge=0, le=10080,
        description="Minutes of training between periodic checkpoints: the full training state is saved and published as last-checkpoint/ (in the background) while training goes on, so a run killed without warning (kill -9, out of memory, a restart) loses at most this much. Unset: chosen from the checkpoint's size so saving takes at most 5 % of training time, and at least 10 min. 0 = off.")
    eval_interval: int | None = _env(
        "EVAL_INTERVAL", default=None, ge=0,
        description="Steps between evaluations of the validation loss during training (TensorBoard eval/loss, the status page, the history, sample generations from fixed prompts). Unset: 4 per shard, the last at its end. 0 = only before and after the shard.")
    early_stopping_patience: int | None = _env(
        "EARLY_STOPPING_PATIENCE", default=None, ge=1,
        description="End a shard when this many evaluations in a row have not improved on the best validation loss (the shard counts as finished; the history records early_stopped_at). Unset: off.")
    best_model: bool = _env(
        "BEST_MODEL", default=True,
        description="When evaluating during training, publish the weights of the best evaluation rather than the last step's (the history records best_step and both losses).")
    report_to: str = _env(
        "REPORT_TO", default="tensorboard",
        description="Where training metrics go, comma-separated: tensorboard (runs/ in the output, the Hub's metrics tab), trackio (local, or a Space with TRACKIO_SPACE_ID), wandb (offline in WORK_DIR/wandb unless WANDB_API_KEY is set), none. Project: OUTPUT_REPO's name; run: stage, shard, first step, run id.")
    shard_steps: int | None = _env(
        "SHARD_STEPS", default=None, ge=1,
        description="Optimizer steps per shard instead of EPOCHS passes over it (a quick try, a fixed budget): fewer steps than the shard holds skip the rest of its data, more repeat it. The history records both counts.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _env(
        "PRECISION", default="auto",
        description="auto = bf16 where the hardware has it (Ampere+ GPU, CPU with AMX/AVX512-bf16), else fp16 on GPU, fp32 on CPU.")
    model_impl: Literal["transformers", "ours"] = _env(
        "MODEL_IMPL", default="transformers",
        description="The Llama class that trains: transformers' LlamaForCausalLM, or ours (model.py: same weights and files, its own attention and generation). The published model is the same transformers Llama either way.")
    compile: bool = _env(
        "COMPILE", default=False,
        description="MODEL_IMPL=ours: compile each decoder block with torch.compile for faster steps after a one-time compile (~30 s on 2 CPU cores, cached for later runs); applies to full-precision training without gradient checkpointing.")
    gradient_checkpointing: Literal["auto", "true", "false"] = _env(
        "GRADIENT_CHECKPOINTING", default="auto", description="auto = on when the activations would not fit in memory.")
    num_processes: int = _env("NUM_PROCESSES", default=0, ge=0,
                              description="Training ranks (0 = one per GPU, or 1 on CPU).")
    seed: int = _env("SEED", default=42, ge=0, description="Seed for weights, data order and splits.")

    # --- output ----------------------------------------------------------------------------------
    output_repo: str = _env("OUTPUT_REPO", default="./output/llama",
                            description="Where runs are published: a local directory (./, /, ~) or a Hub repo id owner/name. Instruct runs go to OUTPUT_REPO-it.")
    input_repo: str | None = _env("INPUT_REPO", default=None,
                                  description="Model the first instruct run starts from (default: OUTPUT_REPO).")
    hf_token: SecretStr | None = _env("HF_TOKEN", default=None, description="Hugging Face token (write access), needed for a Hub OUTPUT_REPO.")
    private: bool = _env("PRIVATE", default=True, description="Create Hub repos private (false: public). Existing repos keep their visibility.")
    hub_retries: int = _env("HUB_RETRIES", default=8, ge=0, le=50,
                            description="Retries of a Hub call on transient errors (5xx, 429, timeouts, dropped connections).")
    hub_retry_wait: float = _env("HUB_RETRY_WAIT", default=2.0, ge=0, le=600,
                                 description="Seconds before the first retry; doubled each time (with jitter, at most 60 s); a 429's Retry-After wins.")
    hub_timeout: float = _env("HUB_TIMEOUT", default=120.0, gt=0, description="Seconds a Hub request may stall before it counts as a timeout.")
    space_id: str | None = _env("SPACE_ID", default=None,
                                description="Set by Hugging Face Spaces: the Space this runs in. Then INIT/INST are written back to its variables after each publish, and it is paused when the pipeline is done.")
    port: int = _env("PORT", default=7860, ge=1, le=65535,
                     description="Port of the status page (read from the environment when the container starts; a Space's app_port is 7860).")
    keep_serving: bool | None = _env("KEEP_SERVING", default=None,
                                     description="Keep the status page up after the pipeline ends or fails, until the container stops (default: true in a Space, false elsewhere; read from the environment).")
    work_dir: str = _env("WORK_DIR", default="./work", description="Scratch directory: prepared data and the trained model before it is published.")

    # --- time --------------------------------------------------------------------------------------
    startup_duration_timeout: str = _env("STARTUP_DURATION_TIMEOUT", default="30m",
                                         description="Run time limit (30m, 5h, 1h30m; a bare number is minutes), as the Space's startup_duration_timeout.")
    timeout_buffer: float = _env("TIMEOUT_BUFFER", default=5.0, ge=0, description="Minutes kept free before the limit to save and publish.")
    time_budget: str | None = _env("TIME_BUDGET", default=None, description="Training time budget (e.g. 45m); overrides STARTUP_DURATION_TIMEOUT - TIMEOUT_BUFFER.")

    config_file: str | None = _env("CONFIG_FILE", default=None, description="YAML or TOML file with any of these variables.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("CONFIG_FILE") or None
        return init_settings, env_settings, _FileSource(settings_cls, path)

    @field_validator("hf_token", mode="before")
    @classmethod
    def _token(cls, v: Any) -> Any:
        # A token pasted with a trailing newline or space is the token; whitespace inside it is not
        # (an HTTP header cannot carry it, and the message would be about the header).
        if isinstance(v, str):
            v = v.strip()
            if any(c.isspace() or not c.isprintable() for c in v):
                raise ValueError("the token has spaces, line breaks or control characters inside it. Fix: copy the "
                                 "token again from https://huggingface.co/settings/tokens")
        return v

    @field_validator("target_parameters")
    @classmethod
    def _count(cls, v: str | None) -> str | None:
        if v is not None:
            n = parse_count(v)
            if not 1_000_000 <= n <= 3_000_000_000:
                raise ValueError("expected a count from 1M to 3B")
        return v

    @field_validator("model_size")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v in RENAMED_PRESETS:
            raise ValueError(f"renamed: use {RENAMED_PRESETS[v]}")
        if v is not None and v not in PRESETS:
            raise ValueError(f"expected one of {', '.join(PRESETS)}")
        return v

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: str) -> str:
        names = [n.strip().lower() for n in v.split(",") if n.strip()]
        unknown = [n for n in names if n not in TRACKERS + ("none",)]
        if unknown or not names:
            raise ValueError(f"expected a comma-separated list of {', '.join(TRACKERS)}, or none")
        if "none" in names and len(names) > 1:
            raise ValueError("none cannot be combined with a tracker")
        return ",".join(dict.fromkeys(names))

    @property
    def trackers(self) -> list[str]:
        """The trackers REPORT_TO names, in its order ([] for none)."""
        return [n for n in self.report_to.split(",") if n != "none"]

    def tracker_project(self) -> str:
        """The trackers' project: the output's name (both stages of a pipeline log to one project)."""
        return self.output_repo.rstrip("/").rsplit("/", 1)[-1] or "train-llama"

    @field_validator("startup_duration_timeout", "time_budget")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration_s(v)
        return v

    # --- derived values ----------------------------------------------------------------------------
    def time_budget_s(self) -> int:
        if self.time_budget:
            return parse_duration_s(self.time_budget)
        return max(60, parse_duration_s(self.startup_duration_timeout) - int(self.timeout_buffer * 60))

    def redacted(self) -> dict[str, Any]:
        """The settings as a JSON-able dict, the token masked (safe for logs, cards and records)."""
        out = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, SecretStr):
                v = "***" if v.get_secret_value() else None
            out[name.upper()] = v
        return out


def _cross_checks(s: Settings) -> list[str]:
    problems = []
    sizes = [n for n, v in (("MODEL_SIZE", s.model_size), ("TARGET_PARAMETERS", s.target_parameters), ("FACTOR", s.factor)) if v is not None]
    if len(sizes) > 1:
        problems.append(f"{' and '.join(sizes)} are both set: they choose the same thing (the model size). Fix: set only one.")
    if s.base_model is not None and sizes:
        problems.append(f"BASE_MODEL={s.base_model!r} and {' and '.join(sizes)} are both set: the base model's config.json "
                        f"gives the shape. Fix: unset {' and '.join(sizes)}.")
    from targets import open_target, spec_problem

    for var, spec in (("BASE_MODEL", s.base_model), ("TOKENIZER", s.tokenizer), ("INPUT_REPO", s.input_repo)):
        if spec is not None and spec_problem(var, spec):
            problems.append(spec_problem(var, spec))
    from sources import parse_sources

    for var, spec in (("INPUT_DATASET", s.input_dataset), ("INSTRUCT_DATASET", s.instruct_dataset)):
        try:
            parse_sources(spec, var)
        except BadInput as e:
            problems.extend(e.problems)
    if s.compile and s.model_impl != "ours":
        problems.append("COMPILE=true compiles our model's blocks, but MODEL_IMPL is 'transformers'. Fix: MODEL_IMPL=ours, or COMPILE=false.")
    if s.factor is not None and s.factor % 64:
        problems.append(f"FACTOR={s.factor!r}: the hidden size must be a multiple of 64. Fix: e.g. FACTOR={max(64, s.factor // 64 * 64)}.")
    output = open_target(s.output_repo)
    if spec_problem("OUTPUT_REPO", s.output_repo):
        problems.append(f"{spec_problem('OUTPUT_REPO', s.output_repo)} Fix: e.g. OUTPUT_REPO=./output/llama or OUTPUT_REPO=you/my-llama.")
    elif output.needs_token:
        if s.hf_token is None or not s.hf_token.get_secret_value():
            problems.append(f"OUTPUT_REPO={s.output_repo!r} is a Hub repo but HF_TOKEN is not set. "
                            "Fix: set the secret HF_TOKEN to a token with write access, or use a local OUTPUT_REPO.")
    if s.space_id and not output.survives_restart:
        problems.append(f"OUTPUT_REPO={s.output_repo!r} is a local directory, but this runs in a Space (SPACE_ID="
                        f"{s.space_id!r}), whose disk is wiped at every restart: the next run would find nothing. Fix: set "
                        "the variable OUTPUT_REPO to a Hub model repo id, e.g. OUTPUT_REPO=your-name/my-llama (created "
                        "private on the first publish; instruct runs go to OUTPUT_REPO-it).")
    if s.space_id and (s.hf_token is None or not s.hf_token.get_secret_value()):
        problems.append(f"SPACE_ID={s.space_id!r}: running in a Space, which needs HF_TOKEN to write INIT/INST back to its "
                        "variables and to pause it when done. Fix: add the secret HF_TOKEN (write access) in the Space settings.")
    unknown = [t for t in s.lora_targets.split(",") if t.strip() not in LORA_TARGETS]
    if unknown or not s.lora_targets.strip():
        problems.append(f"LORA_TARGETS={s.lora_targets!r}: unknown projection(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
                        f"Accepted: a comma-separated subset of {','.join(LORA_TARGETS)}.")
    return problems


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build the settings from the environment (and CONFIG_FILE); raise SettingsError listing every problem."""
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    for secret in ("HF_TOKEN", "WANDB_API_KEY", "TRACKIO_WRITE_TOKEN"):
        redact.add(os.environ.get(secret))
    try:
        try:
            s = Settings()
        except ValidationError as e:
            problems = [_describe(err) for err in e.errors()]
            # Report the cross-variable problems too: re-validate with the bad variables unset.
            bad = {str(err["loc"][0]) for err in e.errors() if err.get("loc")}
            for name in bad | {a for n in bad for a in _aliases(n)}:
                os.environ.pop(name, None)
            try:
                problems += _cross_checks(Settings())
            except (ValidationError, SettingsError):
                pass  # the bad values came from CONFIG_FILE; they are reported above
            raise SettingsError(problems) from None
        problems = _cross_checks(s)
        if problems:
            raise SettingsError(problems)
        return s
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _describe(err: dict[str, Any]) -> str:
    name = str(err["loc"][0]) if err.get("loc") else "?"
    field = Settings.model_fields.get(name.lower())
    if field is None:
        for fname, f in Settings.model_fields.items():
            if isinstance(f.validation_alias, AliasChoices) and name in f.validation_alias.choices:
                field = f
                name = str(f.validation_alias.choices[0])
                break
    value = err.get("input")
    shown = "***" if name == "HF_TOKEN" else repr(value)
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    doc = f" Accepted: {field.description}" if field is not None and field.description else ""
    return f"{name}={shown}: {msg}.{doc}"


# --- derived configs -------------------------------------------------------------------------------


def architecture(s: Settings) -> dict[str, Any]:
    """LlamaConfig keyword arguments resolved from MODEL_SIZE / TARGET_PARAMETERS / FACTOR."""
    try:
        if s.target_parameters is not None:
            arch = size_for_target(parse_count(s.target_parameters), s.vocab_size)
        elif s.factor is not None:
            arch = shape(s.factor, max(1, s.factor // 64), s.vocab_size)
        else:
            arch = preset_shape(s.model_size or DEFAULT_PRESET, s.vocab_size)
    except ValueError:  # a parameter target (TARGET_PARAMETERS, or a preset that is one) no shape reaches
        named = f"TARGET_PARAMETERS={s.target_parameters}" if s.target_parameters is not None else f"MODEL_SIZE={s.model_size}"
        raise SettingsError([f"{named}: no Llama shape fits with VOCAB_SIZE={s.vocab_size}. "
                             "Fix: a larger target or a smaller vocabulary."]) from None
    return config_kwargs(arch, s.max_length)


def cpu_has_bf16() -> bool:
    """AMX or AVX512-bf16 in /proc/cpuinfo: bf16 matmuls are fast on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_precision(s: Settings) -> str:
    """bf16 | fp16 | fp32 for this hardware (imports torch)."""
    import torch

    if s.precision != "auto":
        return s.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def deepspeed_config(s: Settings, precision: str) -> dict[str, Any]:
    """ZeRO-2 config; the 'auto' values are filled by the trainer from its own arguments."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def bnb_config(compute: str) -> dict[str, Any]:
    """BitsAndBytesConfig kwargs: NF4 with double quantization, computing in `compute` (bf16|fp16|fp32)."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(compute, "float32")}


def lora_config(s: Settings) -> dict[str, Any]:
    """peft.LoraConfig kwargs from the settings."""
    return {"r": s.lora_r, "lora_alpha": s.lora_alpha, "lora_dropout": s.lora_dropout, "bias": "none",
            "target_modules": [t.strip() for t in s.lora_targets.split(",")], "task_type": "CAUSAL_LM"}


def main(argv: list[str] | None = None) -> int:
    """Print the resolved settings and architecture as JSON, or with `get NAME...` the named values
    one per line (for trainer.sh); exit 2 on bad settings."""
    argv = sys.argv[1:] if argv is None else argv
    redact.install()
    try:
        s = load_settings()
    except SettingsError as e:
        return report(e)
    if argv[:1] == ["get"]:
        values = s.redacted()
        print("\n".join(str(values[name.upper()]) for name in argv[1:]))
        return 0
    arch = architecture(s)
    print(json.dumps({"settings": s.redacted(), "architecture": arch, "parameters": count_parameters(arch)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
