"""Run the real entry point (`python -m jobs.train`) for a bench and read back its run directory."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from orchestrator.monitoring.rundir import read_jsonl, records as step_records

REPO = Path(__file__).resolve().parent.parent


def run_job(run_dir: Path, overrides: list[str], cwd: Path = REPO) -> tuple[dict, list[dict], float]:
    """summary.json, the metrics.jsonl records and the command's wall time; exits loudly on failure. `cwd`: the
    tree whose `orchestrator` the job imports (another revision's worktree: bench/revisions.py)."""
    cmd = [sys.executable, "-m", "jobs.train", f"run.dir={run_dir}", "run.progress=quiet", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = step_records(read_jsonl(run_dir / "metrics.jsonl"))   # event lines left out
    return summary, records, wall
