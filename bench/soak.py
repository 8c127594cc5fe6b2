"""Soak: the default job for 1,500 steps with a fault every ~50 steps of mixed kinds, then its fault-free twin.

    python bench/soak.py [--config FILE] [--steps 1500] [--every 50] [--kinds kill,crash,hang,slow,nan,node,checkpoint]
                         [key=value ...]

`--config` soaks another job, e.g. the post-training job under ZeRO-3:
    python bench/soak.py --config jobs/configs/sft_tiny.yaml --steps 400 --every 40 \
        --kinds kill,crash,hang,nan,checkpoint memory.zero_stage=3

A thin wrapper over the chaos job (`python -m jobs.chaos`), which does the work: random faults from a
fixed seed, the twin run, the bit-for-bit comparison, the goodput table. Reports faults injected, faults
healed, job interruptions (target 0) and whether the final state is identical; the chaos report is
copied to bench/results/soak-<host>.json (soak-<config>-<host>.json for another --config).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=float, default=50)
    ap.add_argument("--kinds", default="kill,crash,hang,slow,nan,node,checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="the job's YAML config (default: the default job's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "jobs.chaos", "--every", str(args.every), "--kinds", args.kinds,
               "--seed", str(args.seed), f"train.steps={args.steps}", f"run.dir={tmp}/soak",
               "run.progress=lines", "faults.max_recoveries=1000", *args.overrides]
        if args.config:
            cmd[3:3] = ["--config", args.config]
        print(" ".join(cmd), file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO)
        wall = time.perf_counter() - t0
        report = json.loads((Path(tmp) / "soak" / "chaos_report.json").read_text())
    report.update(command=" ".join(cmd[1:]), exit_code=proc.returncode, wall_s=wall)
    job = f"{Path(args.config).stem}-" if args.config else ""
    path = REPO / "bench" / "results" / f"soak-{job}{platform.node() or 'host'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
