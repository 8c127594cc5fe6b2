"""Driver memory against the step count: the real entry point on the tiny job, its RSS sampled as steps complete.

    python bench/driver_memory.py [--steps 3000] [--baseline-dir /path/to/an/older/checkout] [--out FILE]

Runs `python -m jobs.train --config jobs/configs/tiny.yaml` (one device, validation off, checkpoints every
1,000 steps) and reads the driver process's RSS (psutil) whenever metrics.jsonl passes a multiple of 250
steps. The figure is the growth per 1,000 steps, a least-squares slope over the samples after the first
1,000 steps (warm-up: imports, first allocations). With --baseline-dir, the same run from another checkout
(git worktree add /tmp/base <commit>) side by side, and the ratio of the two slopes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def measure(checkout: Path, steps: int, every: int = 250) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="driver-memory-"))
    cmd = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/tiny.yaml", f"run.dir={run_dir}",
           f"train.steps={steps}", "cluster.num_devices=1", "train.eval_batches=0", "run.progress=quiet",
           "checkpoint.every_steps=1000", "monitor.report=false"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(checkout)}
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    samples: list[tuple[int, int]] = []
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            done = sum(1 for _ in open(metrics)) if metrics.exists() else 0
            if done >= (len(samples) + 1) * every and done < steps:
                samples.append((done, driver.memory_info().rss))
        except (OSError, psutil.Error):
            continue
    if proc.returncode:
        raise SystemExit(f"{checkout}: the run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    late = [(s, r) for s, r in samples if s >= 1000]
    n = len(late)
    mean_s, mean_r = sum(s for s, _ in late) / n, sum(r for _, r in late) / n
    slope = sum((s - mean_s) * (r - mean_r) for s, r in late) / sum((s - mean_s) ** 2 for s, _ in late)
    return {"checkout": str(checkout), "steps": steps, "samples": samples,
            "kib_per_1000_steps": slope * 1000 / 1024, "rss_mib_at_end": samples[-1][1] / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--baseline-dir", type=Path, help="an older checkout to measure side by side")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    results = {"current": measure(REPO, args.steps)}
    if args.baseline_dir:
        results["baseline"] = measure(args.baseline_dir.resolve(), args.steps)
    for name, r in results.items():
        print(f"{name}: driver RSS {r['rss_mib_at_end']:.0f} MiB near step {r['samples'][-1][0]}, "
              f"{r['kib_per_1000_steps']:+.0f} KiB per 1,000 steps after step 1,000 ({r['checkout']})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
