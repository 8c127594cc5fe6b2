"""Healing cost on the default job: kill -> next completed step (with and without a warm standby),
steps recomputed, snapshot overhead, goodput.

    python bench/healing.py [--steps 300] [--every 50] [key=value ...]

Runs the real entry point four times on the same config and seed, side by side:
  clean    no faults, in-memory snapshots off (faults.snapshot_every=0): the baseline step time
  snap     no faults, snapshots every step: the price of being able to heal
  faulty   a device SIGKILLed every --every steps (alternating devices), snapshots every step
  standby  the same faults with one warm standby actor (faults.standby=1)
and checks that the faulty runs have the clean run's loss at every step. Reports, per fault, the time
from the kill to the next completed step (replayed steps included), the recovery time, completed steps
recomputed (0: only the step in flight was lost), the overhead of snapshots every step, and goodput
(productive step time / training-loop wall time, from goodput.json). Results: bench/results/healing-<host>.json.
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
    summary, records, _ = run_job(run_dir, ["train.eval_batches=0", "checkpoint.at_end=false", *overrides])
    return summary, records


def kill_figures(summary: dict, records: list[dict], clean: list[dict]) -> dict:
    assert [r["step"] for r in records] == [r["step"] for r in clean], "a step is missing or recorded twice"
    incidents = summary["incidents"]
    # The kill lands as its step starts: detection time minus how long detection took. The next completed
    # step is the first record written after the detection (a replayed step counts: it is progress again).
    kill_to_next = []
    for i in incidents:
        t_kill = i["time"] - i["detect_s"]
        kill_to_next.append(min(r["time"] for r in records if r["time"] > i["time"]) - t_kill)
    g = summary["goodput"]
    return {
        "faults": len(summary["faults_injected"]), "healed": summary["recoveries"],
        "identical_losses": [r["loss"] for r in records] == [r["loss"] for r in clean],
        "kill_to_next_step_s": {"median": statistics.median(kill_to_next), "max": max(kill_to_next),
                                "all": [round(x, 3) for x in kill_to_next]},
        "detect_s_median": statistics.median(i["detect_s"] for i in incidents),
        "recover_s_median": statistics.median(i["recover_s"] for i in incidents),
        "steps_recomputed_per_fault": [i["step"] - 1 - i["rewound_to"] for i in incidents],
        "goodput": g["goodput"],
        "goodput_breakdown_s": {k: round(v, 3) for k, v in g.items() if k not in ("goodput", "steps_done")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    faults = [(s, (s // args.every) % 2) for s in range(args.every, args.steps + 1, args.every)]
    plan = "[" + ", ".join(f"{{step: {s}, kind: kill, rank: {r}}}" for s, r in faults) + "]"
    base = [f"train.steps={args.steps}", *args.overrides]
    faulty_args = base + ["faults.snapshot_every=1", f"faults.plan={plan}", f"faults.max_recoveries={len(faults)}"]
    with tempfile.TemporaryDirectory() as tmp:
        _, clean = run(Path(tmp) / "clean", base + ["faults.snapshot_every=0"])
        _, snap = run(Path(tmp) / "snap", base + ["faults.snapshot_every=1"])
        faulty = run(Path(tmp) / "faulty", faulty_args)
        standby = run(Path(tmp) / "standby", faulty_args + ["faults.standby=1"])
    out = {
        "steps": args.steps, "kill_every": args.every,
        "ordinary_step_s": statistics.median(r["step_time_s"] for r in clean[1:]),
        "snapshot_every_step_overhead": statistics.mean(r["step_time_s"] for r in snap[1:])
        / statistics.mean(r["step_time_s"] for r in clean[1:]),
        "no_standby": kill_figures(*faulty, clean),
        "standby": kill_figures(*standby, clean),
    }
    print(json.dumps(out, indent=1))
    path = REPO / "bench" / "results" / f"healing-{platform.node() or 'host'}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
