"""The memory puzzle, measured: how large a model each ZeRO stage and checkpointing mode trains in a fixed
per-device budget, and what each costs in step time.

    python bench/memory.py [--budget-mb 48] [--devices 4] [--ep 2] [--confirm] [--times] [--json OUT]

1. Largest model per mode. For every memory.zero_stage x memory.activation_checkpointing, on `--devices`
   devices with expert-parallel degree `--ep` (the rest data parallelism, over which expert states shard),
   the planner (orchestrator/memory/plan.py) finds the widest model of one family (the default model's shape,
   width `dim` in steps of 16 with expert_dim = dim and dense_dim = 2 dim, 4 heads) whose plan fits
   `--budget-mb` per device. `--confirm` trains it for a few steps (a real run through
   the driver and Ray) and reads the measured bytes per device (metrics.jsonl `device_memory`): the row
   says whether the measured params + grads + optimizer + activation peak stayed within the budget.
   Goal (issue 14): stage 3 + full checkpointing trains >= 3x the parameters stage 0 can.
2. `--times`: the step time of every mode against stage 0 on the default job (default model, `--devices`,
   same layout), every mode run in turn in one process, `--rounds` times, median of the step times after
   the first `--skip` steps of each run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.model.transformer import count_parameters  # noqa: E402
from orchestrator.memory.plan import plan_memory  # noqa: E402
from orchestrator.monitoring.rundir import read_jsonl, records  # noqa: E402

MODES = list(itertools.product((0, 1, 2, 3), ("none", "selective", "full")))
CATEGORIES = ("params", "grads", "optimizer", "activations_peak")


def config(dim: int, stage: int, ac: str, devices: int, ep: int, extra: list[str]):
    over = [f"model.dim={dim}", f"model.expert_dim={dim}", f"model.dense_dim={2 * dim}", "model.n_heads=4",
            f"cluster.num_devices={devices}", f"parallel.expert_parallel={ep}", f"memory.zero_stage={stage}",
            f"memory.activation_checkpointing={ac}", "run.progress=quiet", "monitor.report=false",
            "monitor.tensorboard=false", "monitor.prometheus=false", "checkpoint.at_end=false",
            "checkpoint.every_steps=0", "train.eval_batches=0", f"cluster.cpus_per_device={2 / devices}", *extra]
    return load_config(REPO / "jobs/configs/default.yaml", over)


def largest(stage: int, ac: str, budget: int, devices: int, ep: int, extra: list[str]) -> tuple[int, int, int]:
    """(dim, parameters, planned bytes of the fullest device) of the widest model that fits, or (0, 0, 0)."""
    best = (0, 0, 0)
    dim = 16
    while dim <= 4096:
        cfg = config(dim, stage, ac, devices, ep, extra)
        need = plan_memory(cfg).peak().total
        if need > budget:
            break
        best = (dim, count_parameters(cfg.model)["total"], need)
        dim += 16
    return best


def measured(dim: int, stage: int, ac: str, devices: int, ep: int, extra: list[str], steps: int) -> list[dict]:
    """device_memory of the last step of a real run at that size."""
    from orchestrator.driver import Driver

    with tempfile.TemporaryDirectory() as d:
        cfg = config(dim, stage, ac, devices, ep, [*extra, f"train.steps={steps}", f"run.dir={d}"])
        Driver(cfg, Path(d)).run()
        return records(read_jsonl(Path(d) / "metrics.jsonl"))[-1]["device_memory"]


def step_times(stage: int, ac: str, devices: int, ep: int, steps: int, skip: int) -> list[float]:
    from orchestrator.driver import Driver

    with tempfile.TemporaryDirectory() as d:
        over = [f"cluster.num_devices={devices}", f"parallel.expert_parallel={ep}", f"memory.zero_stage={stage}",
                f"memory.activation_checkpointing={ac}", f"train.steps={steps}", "run.progress=quiet",
                "monitor.report=false", "checkpoint.at_end=false", "train.eval_batches=0", f"run.dir={d}",
                f"cluster.cpus_per_device={2 / devices}"]
        Driver(load_config(REPO / "jobs/configs/default.yaml", over), Path(d)).run()
        return [r["step_time_s"] for r in records(read_jsonl(Path(d) / "metrics.jsonl"))][skip:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-mb", type=float, default=48.0)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--confirm", action="store_true", help="train each largest model and measure it")
    ap.add_argument("--confirm-steps", type=int, default=2)
    ap.add_argument("--times", action="store_true", help="step time of every mode against stage 0, default job")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.confirm or args.times:   # real runs: one Ray for all of them, as the job starts it
        import contextlib

        from orchestrator.runtime.cluster import ray_cluster

        with contextlib.ExitStack() as stack:
            stack.enter_context(ray_cluster(config(64, 0, "none", args.devices, args.ep, []).cluster))
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    budget = int(args.budget_mb * 2**20)
    out: dict = {"budget_bytes": budget, "devices": args.devices, "ep": args.ep, "largest": []}
    print(f"budget {args.budget_mb:g} MiB per device, {args.devices} devices, ep {args.ep} x dp "
          f"{args.devices // args.ep}")
    base_params = None
    for stage, ac in MODES:
        dim, params, need = largest(stage, ac, budget, args.devices, args.ep, [])
        base_params = base_params or params
        row = {"zero_stage": stage, "activation_checkpointing": ac, "dim": dim, "parameters": params,
               "planned_bytes": need, "vs_stage0_none": params / base_params if base_params else None}
        if args.confirm and dim:
            mem = measured(dim, stage, ac, args.devices, args.ep, [], args.confirm_steps)
            worst = max(sum(m[c] for c in CATEGORIES) for m in mem)
            row.update(measured_bytes=worst, fits=worst <= budget)
        out["largest"].append(row)
        print(f"stage {stage} {ac:9s} dim {dim:5d} params {params / 1e6:8.2f} M  x{row['vs_stage0_none'] or 0:5.2f}"
              f"  plan {need / 2**20:7.1f} MiB" + (f"  measured {row['measured_bytes'] / 2**20:7.1f} MiB "
                                                  f"{'fits' if row['fits'] else 'OVER'}" if "measured_bytes" in row else ""),
              flush=True)
    if args.times:
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for stage, ac in MODES:
                times.setdefault(f"{stage}/{ac}", []).extend(
                    step_times(stage, ac, args.devices, args.ep, args.steps, args.skip))
        base = statistics.median(times["0/none"])
        out["step_time"] = {k: {"median_s": statistics.median(v), "vs_stage0_none": statistics.median(v) / base}
                            for k, v in times.items()}
        for k, v in out["step_time"].items():
            print(f"step time stage/ckpt {k:12s} {v['median_s'] * 1e3:8.1f} ms  x{v['vs_stage0_none']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
