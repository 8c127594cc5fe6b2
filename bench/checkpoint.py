"""Checkpoint cost on the default job: size, write time, the training stall of a save, restore time.

    python bench/checkpoint.py [--steps 200] [--every 20] [key=value ...]

Runs the real entry point three times on the same config and seed, side by side:
  none   no checkpoints at all (the baseline step time)
  async  a checkpoint every --every steps, written in the background (the default)
  sync   the same, written before training goes on
and a fourth run that resumes from the async run's last checkpoint (restore time).
"Stall" compares, within one run, the mean time of the step right after each save with the mean
of all other steps (the save's snapshot runs between the two steps); the ratios against the
no-checkpoint run are reported too. Results: bench/results/checkpoint-<host>.json and a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from jobrun import REPO, run_job


def run(run_dir: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    summary, records, _ = run_job(run_dir, ["train.eval_batches=0", *overrides])
    return summary, records


def stall(records: list[dict]) -> dict:
    saved_after = {r["step"] for r in records if r.get("checkpoint_started")}
    after = [r["step_time_s"] for r in records[1:] if r["step"] - 1 in saved_after]
    other = [r["step_time_s"] for r in records[1:] if r["step"] - 1 not in saved_after]
    mean_all = statistics.mean(r["step_time_s"] for r in records[1:])
    return {"step_after_save_s": statistics.mean(after) if after else None, "other_steps_s": statistics.mean(other),
            "stall_ratio": (statistics.mean(after) / statistics.mean(other)) if after else None,
            "mean_step_s": mean_all}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [f"train.steps={args.steps}", *args.overrides]
    out: dict = {"steps": args.steps, "every": args.every, "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _, none_records = run(t / "none", base + ["checkpoint.at_end=false", "checkpoint.every_steps=0"])
        out["none"] = stall(none_records)
        for mode in ("async", "sync"):
            summary, records = run(t / mode, base + [f"checkpoint.every_steps={args.every}",
                                                     f"checkpoint.async_save={mode == 'async'}"])
            s = stall(records)
            s["vs_no_checkpoint"] = s["mean_step_s"] / out["none"]["mean_step_s"]
            s["checkpoint_mb"] = statistics.mean(summary["checkpoint_bytes"].values()) / 1e6
            s["write_s"] = statistics.mean(summary["checkpoint_write_s"].values())
            s["snapshot_to_commit_s"] = statistics.mean(summary["checkpoint_commit_s"].values())
            s["checkpoints"] = len(summary["checkpoints_committed"])
            out[mode] = s
        summary, _ = run(t / "resume", base[:1] + [f"train.steps={args.steps + 1}", *args.overrides,
                                                   f"train.resume={t / 'async' / 'checkpoints'}"])
        out["restore_s"] = summary["restore_s"]
    print(f"checkpoint size {out['async']['checkpoint_mb']:.2f} MB, restore {out['restore_s']:.3f}s")
    print(f"{'mode':>6} {'write s':>8} {'to commit s':>12} {'step after save':>16} {'other steps':>12} "
          f"{'stall ratio':>12} {'mean vs none':>13}")
    for mode in ("async", "sync"):
        s = out[mode]
        print(f"{mode:>6} {s['write_s']:8.3f} {s['snapshot_to_commit_s']:12.3f} {s['step_after_save_s']:16.4f} "
              f"{s['other_steps_s']:12.4f} {s['stall_ratio']:12.2f} {s['vs_no_checkpoint']:13.3f}")
    print(f"{'none':>6} {'':8} {'':12} {'':16} {out['none']['other_steps_s']:12.4f}")
    path = REPO / "bench" / "results" / f"checkpoint-{platform.node() or 'host'}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
