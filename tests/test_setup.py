"""The image and the entry scripts: Dockerfile lint-clean, trainer.sh sound, the environment pinned and complete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, py, run


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    p = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_runs_trainer_as_uid_1000_with_a_cuda_base():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert re.search(r"^USER 1000$", text, re.M)
    assert 'CMD ["./trainer.sh"]' in text and "tini" in text
    # The same pins as the local set-up: from constraints.txt and requirements.txt, none written here.
    assert "COPY --chown=user:user requirements.txt constraints.txt" in text and "-r requirements.txt" in text
    assert "pip install -c constraints.txt torch" in text and "-c constraints.txt deepspeed" in text
    assert not re.search(r"\b(torch|deepspeed|pip|wheel|setuptools)==", text)


def test_every_version_is_pinned_in_one_place():
    """torch and deepspeed (installed outside requirements.txt) are pinned in constraints.txt, and
    every install of the set-up reads it; validate_setup checks the same versions."""
    from validate_setup import pins

    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", constraints, re.M) and re.search(r"^deepspeed==\S+$", constraints, re.M)
    make = (ROOT / "Makefile").read_text()
    assert not re.search(r"\b(torch|deepspeed|pip|wheel|setuptools)==", make)
    assert make.count("-c constraints.txt") >= 4
    torch_pin = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    assert pins()["torch"] == torch_pin and pins()["transformers"]


def test_trainer_sh_is_strict_bash():
    text = (ROOT / "trainer.sh").read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "trainer.sh")]).returncode == 0


def test_validate_setup_flags_a_wrong_pin(tmp_path, monkeypatch):
    import validate_setup

    monkeypatch.setattr(validate_setup, "EXTRA_PINS", {"torch": "0.0.1"})
    bad = validate_setup.check_package("torch", "0.0.1")
    assert not bad["ok"] and "pinned 0.0.1" in bad["finding"] and bad["fix"]
    missing = validate_setup.check_package("surely-not-installed-pkg", "1.0")
    assert not missing["ok"] and missing["finding"] == "not installed"


def test_strict_versions_false_accepts_other_versions_but_still_lists_them(monkeypatch):
    """A GPU machine's own torch/transformers (bench/gpu.sh): another version is listed, not failed;
    a package that is missing still fails, except the trackers only REPORT_TO uses."""
    import validate_setup

    monkeypatch.setenv("STRICT_VERSIONS", "false")
    other = validate_setup.check_package("torch", "0.0.1")
    assert other["ok"] and "pinned 0.0.1; accepted: STRICT_VERSIONS=false" in other["finding"]
    assert not validate_setup.check_package("surely-not-installed-pkg", "1.0")["ok"]
    monkeypatch.setattr(validate_setup, "OPTIONAL", {"surely-not-installed-pkg": "REPORT_TO=x"})
    optional = validate_setup.check_package("surely-not-installed-pkg", "1.0")
    assert optional["ok"] and "only REPORT_TO=x needs it" in optional["finding"]
    monkeypatch.setenv("STRICT_VERSIONS", "true")
    assert not validate_setup.check_package("torch", "0.0.1")["ok"]


def test_validate_setup_passes_here_and_the_pass_is_remembered_for_this_environment_only(env, tmp_path):
    """Every check passes here; the pass is remembered for this environment (versions and import
    path) and for it only: a package that no longer imports is another environment, checked again,
    and fails its version check and its functional check, each with its fix. (One test: each run of
    validate_setup takes ~15 s of imports and a DeepSpeed step.)"""
    import validate_setup

    n = len(validate_setup.pins()) + len(validate_setup.FUNCTIONAL) + 1  # every pin, the functional checks, the launcher
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    first = run(py("validate_setup.py", "--json"), env, timeout=120)
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert first.returncode == 0 and report["ok"] and not report.get("cached"), report
    names = {c["name"] for c in report["checks"]}
    assert {"torch", "transformers", "trl", "deepspeed", "bitsandbytes", "peft", "deepspeed launcher",
            "bitsandbytes 4-bit", "peft LoRA", "deepspeed engine", "tokenizers BPE"} <= names
    again = run(py("validate_setup.py"), env, timeout=120)
    assert again.returncode == 0 and f"passed all {n} checks at" in again.stdout and "has not changed since" in again.stdout
    report = json.loads(run(py("validate_setup.py", "--json"), env, timeout=120).stdout.strip().splitlines()[-1])
    assert report["cached"] and report["ok"] and {c["name"] for c in report["checks"]} >= {"deepspeed engine", "peft LoRA"}
    forced = run(py("validate_setup.py", "--force"), env, timeout=120)
    assert forced.returncode == 0 and f"{n}/{n} checks passed" in forced.stdout
    # another import path (a package shadowed) is another environment: checked again, and it fails
    fake = tmp_path / "shadow" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('peft is broken here')\n")
    shadowed = {**env, "PYTHONPATH": str(tmp_path / "shadow")}
    broken = run(py("validate_setup.py"), shadowed, timeout=120)
    assert broken.returncode == 1 and "[FAIL] peft" in broken.stdout
    assert len(list((tmp_path / "cache" / "train-llama" / "validated").glob("*.json"))) == 1   # failures are not kept
    p = run(py("validate_setup.py", "--json"), shadowed, timeout=120)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 1 and not report["ok"]
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["peft"]["ok"] and "import fails" in checks["peft"]["finding"] and checks["peft"]["fix"]
    assert not checks["peft LoRA"]["ok"] and checks["peft LoRA"]["fix"]
    assert checks["tokenizers BPE"]["ok"] and checks["deepspeed engine"]["ok"]
