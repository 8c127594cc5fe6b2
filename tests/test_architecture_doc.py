"""ARCHITECTURE.md stays true: every module or folder path it names exists, and every package of orchestrator/ has
a line in it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "ARCHITECTURE.md").read_text()
# `orchestrator/driver/loop.py`, orchestrator/checkpoint/, jobs/train.py, tests/..., bench/..., docs/... as written
PATHS = sorted(set(re.findall(r"\b((?:orchestrator|jobs|tests|bench|docs|cluster_configs)/[\w./-]*\w/?)", DOC)))
# `healing/faults.py`, `driver/start.py`: a module named inside orchestrator/ by its package
SHORT = sorted(set(re.findall(r"`((?!orchestrator/|jobs/|tests/|bench/|docs/|cluster_configs/)[a-z_]+/[\w/]*\w\.py)`", DOC)))


def test_every_path_named_in_the_module_map_exists():
    assert PATHS, "ARCHITECTURE.md names no path"
    missing = [p for p in PATHS if not (ROOT / p).exists()]
    missing += [p for p in SHORT if not (ROOT / "orchestrator" / p).exists()]
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_package_is_on_the_map():
    packages = sorted(p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "orchestrator").glob("*/__init__.py"))
    absent = [p for p in packages if p not in DOC]
    assert not absent, f"ARCHITECTURE.md does not mention these packages: {absent}"
