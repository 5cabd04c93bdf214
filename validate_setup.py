"""Are the dependencies installed, at the pinned versions, and is the launcher there?

    python3 validate_setup.py [--json]

Each package of requirements.txt (plus torch and deepspeed) is imported and its version compared
with the pin; the `deepspeed` launcher must be on PATH. Exit 1 on any failure, with the fix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"huggingface_hub": "huggingface_hub", "pydantic-settings": "pydantic_settings", "pyyaml": "yaml"}
EXTRA_PINS = {"torch": "2.13.0", "deepspeed": "0.19.8"}


def pins() -> dict[str, str]:
    out = dict(EXTRA_PINS)
    for line in (HERE / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def check_package(dist: str, pinned: str) -> dict:
    fix = f"make setup (or: pip install {dist}=={pinned})"
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        return {"name": dist, "ok": False, "finding": "not installed", "fix": fix}
    try:
        importlib.import_module(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    except Exception as e:  # noqa: BLE001 - any import failure makes the package unusable
        return {"name": dist, "ok": False, "finding": f"installed {version} but import fails: {type(e).__name__}: {e}", "fix": fix}
    # A local build label (+cpu, +cu128) is the same release.
    ok = version.split("+")[0] == pinned
    return {"name": dist, "ok": ok, "finding": f"{version}" + ("" if ok else f" (pinned {pinned})"), "fix": None if ok else fix}


def run_checks() -> list[dict]:
    results = [check_package(d, v) for d, v in pins().items()]
    launcher = shutil.which("deepspeed")
    results.append({"name": "deepspeed launcher", "ok": launcher is not None, "finding": launcher or "not on PATH",
                    "fix": None if launcher else "activate the environment (. .venv/bin/activate) or make setup"})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="validate_setup.py", description="Check the installed dependencies.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = run_checks()
    ok = all(r["ok"] for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "checks": results}))
    else:
        bad = [r for r in results if not r["ok"]]
        for r in bad:
            print(f"[FAIL] {r['name']}: {r['finding']}\n       - fix: {r['fix']}")
        print(f"validate_setup: {len(results) - len(bad)}/{len(results)} checks passed"
              + ("" if ok else "; fix the failures above"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
