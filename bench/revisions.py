"""The default job's step loop in this tree against another revision's, run alternately in pairs (a driver change).

    git worktree add /tmp/base <revision>
    python bench/revisions.py --base /tmp/base [--devices 2] [--pairs 6] [--steps 60] [--out FILE] [key=value ...]

Each pair runs `python -m jobs.train` (this tree's interpreter, every default, `train.steps`, `cluster.num_devices`
and the overrides) once from the baseline's tree and once from this one, in an order that alternates from pair to
pair, so a machine whose speed drifts over minutes still gives honest ratios. A job run from a tree imports that
tree's `orchestrator` (the working directory comes first on `sys.path`), so the two differ by exactly the commits
between them. Per run: the loop's wall clock per step from step 6's record to the last (as bench/overhead.py), the
median of the per-step intervals, the devices' mean idle share over the same steps (the records' `idle_share`:
device/steptimes.py) and the final loss, which must be the same in both trees when the change keeps the math.
Reports the medians over the pairs and each pair's ratio this / base. Results: bench/results/revisions-<host>.json
(or --out) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from jobrun import REPO, run_job
from overhead import FROM, loop_s_per_step, median_step_s

sys.path.insert(0, str(REPO))


def one_run(tree: Path, n: int, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _, records, wall = run_job(run_dir, [f"train.steps={steps}", f"cluster.num_devices={n}", *overrides],
                                   cwd=tree)
    times = {r["step"]: r["time"] for r in records}
    return {"s_per_step": loop_s_per_step(times), "median_step_s": median_step_s(times),
            "idle_share": statistics.mean(r["idle_share"] for r in records if r["step"] > FROM),
            "final_loss": records[-1]["loss"], "command_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a worktree of the baseline revision")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    trees = {"base": Path(args.base).resolve(), "this": REPO}
    if not (trees["base"] / "jobs" / "train.py").exists():
        raise SystemExit(f"--base {args.base}: no jobs/train.py there; make it with git worktree add DIR REVISION")
    runs: dict[str, list[dict]] = {"base": [], "this": []}
    for p in range(args.pairs):
        for name in (("base", "this") if p % 2 == 0 else ("this", "base")):
            r = one_run(trees[name], args.devices, args.steps, args.overrides)
            runs[name].append(r)
            print(f"pair {p + 1} {name}: {r['s_per_step'] * 1e3:.1f} ms/step (median {r['median_step_s'] * 1e3:.1f}), "
                  f"idle {r['idle_share']:.2%}, final loss {r['final_loss']!r}", flush=True)
    ratios = [t["s_per_step"] / b["s_per_step"] for t, b in zip(runs["this"], runs["base"])]
    median_ratios = [t["median_step_s"] / b["median_step_s"] for t, b in zip(runs["this"], runs["base"])]
    summary = {name: {"ms_per_step": statistics.median(r["s_per_step"] for r in rs) * 1e3,
                      "idle_share": statistics.median(r["idle_share"] for r in rs),
                      "final_losses": sorted({r["final_loss"] for r in rs})} for name, rs in runs.items()}
    print(f"\n{'tree':5} {'ms/step':>8} {'idle':>6}")
    for name, s in summary.items():
        print(f"{name:5} {s['ms_per_step']:8.1f} {s['idle_share']:6.2%}")
    print(f"this / base per pair: {', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f}; "
          f"of the median intervals {statistics.median(median_ratios):.3f})")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"revisions-{platform.node() or 'host'}.json"
    out.write_text(json.dumps({
        "host": platform.node(), "devices": args.devices, "steps": args.steps, "pairs": args.pairs,
        "overrides": args.overrides, "base": str(trees["base"]), "runs": runs, "summary": summary,
        "ratio_per_pair": ratios, "median_interval_ratio_per_pair": median_ratios,
        "command": " ".join(["python bench/revisions.py", f"--base {args.base}", f"--devices {args.devices}",
                             f"--pairs {args.pairs}", f"--steps {args.steps}", *args.overrides])}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
