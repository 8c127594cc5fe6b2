"""Throughput of the default job at several device counts, against the single-process reference.

    python bench/throughput.py [--devices 1,2,4] [--steps 300] [key=value ...]

Each device count runs the real entry point (`python -m jobs.train`, its own local Ray) with the
same config and seed; the baseline is the in-process reference (one DeviceShard, no Ray) run side by
side on the same machine. Steps/s and tokens/s exclude the first (warm-up) step. Results go to
bench/results/throughput-<host>.json and a table on stdout; compare ratios, not absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from jobrun import REPO, run_job

sys.path.insert(0, str(REPO))


def reference_throughput(overrides: list[str], steps: int) -> dict:
    import torch

    from orchestrator.config import load_config
    from orchestrator.data import load_corpus
    from orchestrator.device.actor import DeviceShard

    cfg = load_config(REPO / "jobs/configs/default.yaml", overrides + [f"train.steps={steps}"])
    # As many threads as one device actor gets, so the ratio is the speed-up over one such device.
    torch.set_num_threads(cfg.cluster.torch_threads or max(1, int(cfg.cluster.cpus_per_device)))
    corpus = load_corpus(cfg.data)
    shard = DeviceShard(cfg, 0, 1, corpus.train, corpus.val)
    times, loss = [], None
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss = shard.train_step(step).loss
        times.append(time.perf_counter() - t0)
    step_time = sum(times[1:]) / max(1, len(times) - 1)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return {"devices": "reference", "steps_per_s": 1 / step_time, "tokens_per_s": tokens / step_time,
            "final_loss": loss, "val_loss": shard.evaluate(cfg.train.eval_batches)}


def job_throughput(devices: int, overrides: list[str], steps: int) -> dict:
    args = [f"cluster.num_devices={devices}", f"train.steps={steps}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        s, _, wall = run_job(Path(tmp), args)
    # the devices' rate, as summary.json's tokens_per_s is (its steps_per_s is the loop's wall-clock rate)
    return {"devices": devices, "steps_per_s": s["device_steps_per_s"], "tokens_per_s": s["tokens_per_s"],
            "final_loss": s["final_loss"], "val_loss": s["val_loss"], "command_wall_s": wall,
            "command": "python -m jobs.train " + " ".join(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = [reference_throughput(args.overrides, args.steps)]
    for n in (int(x) for x in args.devices.split(",")):
        rows.append(job_throughput(n, args.overrides, args.steps))
    base = rows[0]["tokens_per_s"]
    print(f"{'devices':>10} {'steps/s':>8} {'tokens/s':>10} {'vs ref':>7} {'loss':>7} {'val':>7}")
    for r in rows:
        r["ratio_vs_reference"] = r["tokens_per_s"] / base
        print(f"{r['devices']:>10} {r['steps_per_s']:8.2f} {r['tokens_per_s']:10,.0f} {r['ratio_vs_reference']:7.2f} "
              f"{r['final_loss']:7.4f} {r['val_loss']:7.4f}")
    out = REPO / "bench" / "results" / f"throughput-{platform.node() or 'host'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "steps": args.steps, "overrides": args.overrides,
                               "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
