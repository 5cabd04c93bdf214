"""Settings: every variable, its bad values, aliases, file + env precedence, all problems at once."""

from __future__ import annotations

import pytest

from conftest import py, run
from architecture import PRESETS
from architecture import count_parameters
from config import (Settings, SettingsError, architecture, load_settings,
                    parse_count, parse_duration_s)

# variable -> (a good value and the field value it gives, a bad value)
CASES = {
    "INIT": ("3", 3, "-1"),
    "INST": ("true", True, "maybe"),
    "MAX_RUNS": ("2", 2, "two"),
    "INPUT_DATASET": ("some/dataset", "some/dataset", None),
    "INSTRUCT_DATASET": ("x.jsonl", "x.jsonl", None),
    "TEXT_COLUMN": ("body", "body", None),
    "DATASET_SPLIT": ("validation", "validation", None),
    "SHARD_SIZE": ("100", 100, "0"),
    "VAL_FRACTION": ("0.1", 0.1, "0.9"),
    "TOKENIZER_SAMPLE_MB": ("8", 8.0, "-1"),
    "VOCAB_SIZE": ("32000", 32000, "10"),
    "MAX_LENGTH": ("512", 512, "8"),
    "PACK_CHATS": ("false", False, "sometimes"),
    "MODEL_SIZE": ("125M", "125M", "huge"),
    "TARGET_PARAMETERS": ("1.5B", "1.5B", "5T"),
    "FACTOR": ("512", 512, "32"),
    "USE_QUANT": ("true", True, "perhaps"),
    "LORA_R": ("8", 8, "0"),
    "LORA_ALPHA": ("16", 16.0, "-1"),
    "LORA_DROPOUT": ("0.1", 0.1, "1.5"),
    "LORA_TARGETS": ("q_proj,v_proj", "q_proj,v_proj", "q_proj,lm_head"),
    "BATCH_SIZE": ("4", 4, "0"),
    "GRADIENT_ACCUMULATION_STEPS": ("8", 8, "0"),
    "EPOCHS": ("2.5", 2.5, "0"),
    "LEARNING_RATE": ("3e-4", 3e-4, "2"),
    "WEIGHT_DECAY": ("0.01", 0.01, "-0.1"),
    "WARMUP_RATIO": ("0.1", 0.1, "1.5"),
    "MAX_STEPS": ("100", 100, "0"),
    "SHARD_STEPS": ("30", 30, "0"),
    "SAVE_INTERVAL": ("2.5", 2.5, "-1"),
    "EVAL_INTERVAL": ("50", 50, "-1"),
    "EARLY_STOPPING_PATIENCE": ("3", 3, "0"),
    "BEST_MODEL": ("false", False, "maybe"),
    "PRECISION": ("fp16", "fp16", "bf32"),
    "MODEL_IMPL": ("ours", "ours", "mine"),
    "COMPILE": ("false", False, "fast"),
    "BASE_MODEL": ("./base", "./base", "not a repo id"),
    "BASE_MODEL_PARTIAL": ("true", True, "maybe"),
    "TOKENIZER": ("someone/tok", "someone/tok", "a b"),
    "GRADIENT_CHECKPOINTING": ("true", "true", "sometimes"),
    "NUM_PROCESSES": ("2", 2, "-2"),
    "SEED": ("7", 7, "-7"),
    "OUTPUT_REPO": ("./elsewhere", "./elsewhere", "not a/valid/repo"),
    "INPUT_REPO": ("./pretrained", "./pretrained", "bad//id"),
    "WORK_DIR": ("/tmp/w", "/tmp/w", None),
    "STARTUP_DURATION_TIMEOUT": ("5h", "5h", "soon"),
    "TIMEOUT_BUFFER": ("10", 10.0, "-5"),
    "TIME_BUDGET": ("45m", "45m", "forever"),
    "PRIVATE": ("false", False, "secret"),
    "HUB_RETRIES": ("3", 3, "-1"),
    "HUB_RETRY_WAIT": ("0.5", 0.5, "-1"),
    "HUB_TIMEOUT": ("30", 30.0, "0"),
    "REPORT_TO": ("wandb, TensorBoard", "wandb,tensorboard", "mlflow"),
    "PORT": ("8080", 8080, "0"),
    "KEEP_SERVING": ("true", True, "sometimes"),
}


def test_every_variable_is_covered():
    # Each settings variable has a case here (HF_TOKEN, CONFIG_FILE and SPACE_ID have their own tests).
    names = set()
    for name, f in Settings.model_fields.items():
        names.add(str(f.validation_alias.choices[0]))
    assert names - {"HF_TOKEN", "CONFIG_FILE", "SPACE_ID"} == set(CASES)


def test_defaults_are_valid_and_tiny():
    s = load_settings({})
    assert s.init is None and s.inst is None and not s.use_quant
    assert s.output_repo == "./output/llama"
    assert count_parameters(architecture(s)) < 10_000_000  # the CPU default


@pytest.mark.parametrize("var", sorted(CASES))
def test_good_value_is_read(var):
    good, expected, _ = CASES[var]
    s = load_settings({var: good})
    field = next(n for n, f in Settings.model_fields.items() if f.validation_alias.choices[0] == var)
    assert getattr(s, field) == expected


@pytest.mark.parametrize("var", sorted(v for v in CASES if CASES[v][2] is not None))
def test_bad_value_names_the_variable_and_value(var):
    bad = CASES[var][2]
    with pytest.raises(SettingsError) as e:
        load_settings({var: bad})
    text = str(e.value)
    assert var in text and bad in text


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as e:
        load_settings({"BATCH_SIZE": "x", "PRECISION": "fp8", "INIT": "-3", "OUTPUT_REPO": "me/model"})
    text = str(e.value)
    assert len(e.value.problems) == 4
    for needle in ("BATCH_SIZE", "PRECISION", "INIT", "HF_TOKEN is not set"):
        assert needle in text


def test_aliases():
    s = load_settings({"INPUT_DS": "a.jsonl", "INST_DS": "b.jsonl"})
    assert s.input_dataset == "a.jsonl" and s.instruct_dataset == "b.jsonl"


def test_empty_variable_means_unset():
    # A Space passes variables that exist but are empty.
    assert load_settings({"INIT": "", "BATCH_SIZE": ""}).batch_size == 16


def test_conflicting_sizes():
    with pytest.raises(SettingsError, match="set only one"):
        load_settings({"MODEL_SIZE": "cpu", "TARGET_PARAMETERS": "10M"})


def test_hub_output_needs_token_and_token_is_masked():
    with pytest.raises(SettingsError, match="HF_TOKEN"):
        load_settings({"OUTPUT_REPO": "someone/model"})
    s = load_settings({"HF_TOKEN": "hf_secretvalue123"})
    assert "hf_secretvalue123" not in repr(s) and "hf_secretvalue123" not in str(s.redacted())


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_file_then_env_precedence(tmp_path, fmt):
    f = tmp_path / f"c.{fmt}"
    if fmt == "yaml":
        f.write_text("BATCH_SIZE: 3\nlearning_rate: 0.01\nUSE_QUANT: false\n")
    else:
        f.write_text("BATCH_SIZE = 3\nlearning_rate = 0.01\nUSE_QUANT = false\n")
    s = load_settings({"CONFIG_FILE": str(f), "LEARNING_RATE": "0.02"})
    assert s.batch_size == 3          # file over default
    assert s.learning_rate == 0.02    # env over file
    assert s.weight_decay == 0.1      # default


def test_unknown_file_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("BATCH_SIZE: 3\nBATCH_SIZ: 4\n")
    with pytest.raises(SettingsError, match="BATCH_SIZ"):
        load_settings({"CONFIG_FILE": str(f)})


def test_bad_value_in_file_is_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("BATCH_SIZE: zero\n")
    with pytest.raises(SettingsError, match="BATCH_SIZE"):
        load_settings({"CONFIG_FILE": str(f)})


def test_parsers():
    assert parse_count("125M") == 125_000_000 and parse_count("1.5B") == 1_500_000_000 and parse_count("3e6") == 3_000_000
    assert parse_duration_s("30m") == 1800 and parse_duration_s("5h") == 18000 and parse_duration_s("1h30m") == 5400
    assert load_settings({"STARTUP_DURATION_TIMEOUT": "1h", "TIMEOUT_BUFFER": "10"}).time_budget_s() == 3000
    assert load_settings({"TIME_BUDGET": "20m"}).time_budget_s() == 1200


def test_config_cli_exits_2_listing_every_problem(env):
    env.update({"BATCH_SIZE": "lots", "MODEL_SIZE": "giant"})
    p = run(py("config.py"), env)
    assert p.returncode == 2
    assert "BATCH_SIZE='lots'" in p.stderr and "MODEL_SIZE='giant'" in p.stderr


def test_presets_resolve():
    for name in PRESETS:
        arch = architecture(load_settings({"MODEL_SIZE": name, "VOCAB_SIZE": "32000"}))
        assert arch["hidden_size"] % arch["num_attention_heads"] == 0


def test_readme_documents_every_variable_with_its_default():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for name, f in Settings.model_fields.items():
        var = str(f.validation_alias.choices[0])
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{var}`")), None)
        assert row is not None, f"README has no row for {var}"
        default = "—" if f.default is None else str(f.default).lower()
        assert f"| `{default}` |" in row.lower() or (default == "—" and "| — |" in row), (var, row)


def test_a_space_needs_the_token():
    with pytest.raises(SettingsError) as e:
        load_settings({"SPACE_ID": "alice/trainer"})
    assert any("SPACE_ID" in p and "HF_TOKEN" in p for p in e.value.problems)
    s = load_settings({"SPACE_ID": "alice/trainer", "HF_TOKEN": "hf_x", "OUTPUT_REPO": "alice/llama"})
    assert s.space_id == "alice/trainer" and "hf_x" not in str(s.redacted())


@pytest.mark.parametrize("value,trackers", [("tensorboard", ["tensorboard"]), ("none", []), ("NONE", []),
                                            ("trackio,wandb,trackio", ["trackio", "wandb"])])
def test_report_to_lists_the_trackers(value, trackers):
    assert load_settings({"REPORT_TO": value}).trackers == trackers


@pytest.mark.parametrize("value", ["none,wandb", ",", "tensorboard;wandb"])
def test_report_to_refuses_what_it_cannot_mean(value):
    with pytest.raises(SettingsError) as e:
        load_settings({"REPORT_TO": value})
    assert "REPORT_TO" in str(e.value.problems)


def test_the_trackers_project_is_the_outputs_name():
    assert load_settings({"OUTPUT_REPO": "someone/tiny-llama", "HF_TOKEN": "hf_" + "x" * 30}).tracker_project() == "tiny-llama"
    assert load_settings({"OUTPUT_REPO": "./output/llama/"}).tracker_project() == "llama"


def test_tracker_keys_are_masked_like_the_token():
    import redact

    load_settings({"WANDB_API_KEY": "wandb-key-0123456789abcdef"})
    assert "wandb-key-0123456789abcdef" not in redact.mask("key: wandb-key-0123456789abcdef")
