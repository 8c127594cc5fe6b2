"""Cost of the monitoring: the default job with every sink on (metrics.jsonl, TensorBoard with histograms,
Prometheus through Ray, status.json, the default alert rules; periodic validation off) against the same job
with only metrics.jsonl and status.json and no alert rules, run side by side (alternating, A B A B) on the
same machine.

    python bench/monitoring.py [--steps 300] [--pairs 2] [key=value ...]

Reports, for each setting, the training loop's wall time per step (goodput.json `wall` / steps: the sinks
run in the driver between steps, so this is where they cost) and the devices' step time, their ratios,
and the time the driver spent in the sinks (summary.json `monitoring_s`) per step. Results: bench/results/monitoring-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from jobrun import REPO, run_job

OFF = ["monitor.tensorboard=false", "monitor.prometheus=false", "monitor.alerts=[]"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [f"train.steps={args.steps}", "checkpoint.at_end=false", "train.eval_batches=0", *args.overrides]
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(args.pairs):
        for name, extra in (("on", ["monitor.histogram_every=10"]), ("off", OFF)):
            with tempfile.TemporaryDirectory() as tmp:
                summary, records, _ = run_job(Path(tmp), base + extra)
            timed = records[1:]
            runs[name].append({"loop_s_per_step": summary["goodput"]["wall"] / len(records),
                               "step_time_s": statistics.mean(r["step_time_s"] for r in timed),
                               "monitoring_s_per_step": summary["monitoring_s"] / len(records)})
            print(f"{name}: {runs[name][-1]}")
    on = statistics.mean(r["loop_s_per_step"] for r in runs["on"])
    off = statistics.mean(r["loop_s_per_step"] for r in runs["off"])
    step_on = statistics.mean(r["step_time_s"] for r in runs["on"])
    step_off = statistics.mean(r["step_time_s"] for r in runs["off"])
    result = {"host": platform.node(), "steps": args.steps, "pairs": args.pairs, "runs": runs,
              "loop_s_per_step_on": on, "loop_s_per_step_off": off, "ratio_on_over_off": on / off,
              "step_time_on_s": step_on, "step_time_off_s": step_off, "step_time_ratio": step_on / step_off,
              "sink_ms_per_step_on": 1000 * statistics.mean(r["monitoring_s_per_step"] for r in runs["on"]),
              "sink_ms_per_step_off": 1000 * statistics.mean(r["monitoring_s_per_step"] for r in runs["off"]),
              "command": "python bench/monitoring.py " + " ".join(f"--{k} {v}" for k, v in
                                                                   (("steps", args.steps), ("pairs", args.pairs)))}
    out = REPO / "bench" / "results" / f"monitoring-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"loop time per step, all sinks on {on * 1000:.1f} ms, off {off * 1000:.1f} ms: ratio {on / off:.3f} "
          f"(device step time ratio {step_on / step_off:.3f}); "
          f"in the sinks {result['sink_ms_per_step_on']:.2f} ms/step on, {result['sink_ms_per_step_off']:.2f} off; "
          f"written {out}")


if __name__ == "__main__":
    main()
