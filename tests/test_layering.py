"""The layering of DESIGN.md, kept: `lint-imports` checks the import-linter contracts in pyproject.toml (layers,
config without torch or Ray, no cycles among orchestrator's packages)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip(f"{lint} is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"lint-imports failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"


def test_config_imports_no_torch_ray_or_model():
    """At run time too: importing the config (and validating one) loads neither torch nor Ray."""
    code = ("import sys, orchestrator.config as c; c.load_config(c.DEFAULT_CONFIG); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'orchestrator.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
