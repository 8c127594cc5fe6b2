"""Routing study: train the same model under each balancing strategy and compare.

    python -m jobs.routing_study [--config FILE] [--steps N] [--strategies none,aux_loss,...]
                                 [--extra NAME:key=value,key=value ...] [key=value ...]

Runs the job once per strategy (same seed, data and steps; one Ray cluster), then writes into the
run directory: comparison.json and comparison.md (final and validation loss, the loss cost against
`none`, MaxVio after warm-up, over the last 5% of steps and of their summed load, device imbalance,
dropped copies, re-placements, step time), maxvio.png and device_imbalance.png (over
steps, every strategy) and heatmap-<strategy>.png (each MoE layer: the share of token copies every
expert got, over steps). Each strategy's own run directory is beside them.
Exit codes: 0 done, 1 a run failed, 2 bad config, 128+signal when stopped by SIGTERM/SIGINT (no comparison).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from jobs.cli import job_parser, run_main, setup_logging
from jobs.study import Arm, arm_configs, plot_curves, run_arms
from orchestrator.config import ConfigError, load_config

# what every strategy starts from: the router left alone
NO_BALANCING = ["balance.aux_loss_coeff=0", "balance.seq_aux_loss_coeff=0", "balance.z_loss_coeff=0",
                "balance.bias_update_speed=0"]
# name -> config overrides; `{world}` is the number of devices
STRATEGIES: dict[str, list[str]] = {
    "none": [],
    "aux_loss": ["balance.aux_loss_coeff=0.01"],
    "seq_aux_loss": ["balance.seq_aux_loss_coeff=0.001"],
    "z_loss": ["balance.z_loss_coeff=0.001"],
    "aux_free_bias": ["balance.bias_update_speed=0.001"],
    "bias_and_seq_aux": ["balance.bias_update_speed=0.001", "balance.seq_aux_loss_coeff=0.0001"],
    "grouped": ["balance.routing=grouped", "balance.num_groups={world}"],
    "capacity_1.25": ["balance.capacity_factor=1.25"],
    "replacement": ["balance.replace_every=50"],
    "bias_and_replacement": ["balance.bias_update_speed=0.001", "balance.seq_aux_loss_coeff=0.0001",
                             "balance.replace_every=50"],
    "replicas": ["balance.replace_every=50", "balance.redundant_experts={world}"],
    "bias_and_replicas": ["balance.bias_update_speed=0.001", "balance.seq_aux_loss_coeff=0.0001",
                          "balance.replace_every=50", "balance.redundant_experts={world}"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = job_parser("python -m jobs.routing_study", __doc__)
    ap.add_argument("--steps", type=int, default=None, help="steps per strategy (default: train.steps)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of: {', '.join(STRATEGIES)}")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME:key=value,...",
                    help="one more strategy of your own (repeatable), e.g. bias_0.01:balance.bias_update_speed=0.01")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the MaxVio mean (default: a fifth)")
    return ap.parse_args(argv)


def parse_extra(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        overrides = [o.strip() for o in body.split(",") if o.strip()]
        if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides):
            raise ConfigError(f"--extra {spec!r}: expected NAME:key=value[,key=value...], "
                              f"e.g. bias_0.01:balance.bias_update_speed=0.01")
        out[name.strip()] = overrides
    return out


def summarize(name: str, records: list[dict], summary: dict, warmup: int) -> dict:
    after = [r for r in records if r["step"] > warmup] or records
    last = records[-max(1, len(records) // 20):]
    moves = [r["replacement"]["seconds"] for r in records if r.get("replacement")]
    return {"strategy": name, "steps": len(records), "final_loss": records[-1]["loss"], "val_loss": summary["val_loss"],
            "maxvio_after_warmup": statistics.mean(r["maxvio"] for r in after),
            "maxvio_last": statistics.mean(r["maxvio"] for r in last),
            "maxvio_last_total": window_maxvio(last),
            "device_imbalance_after_warmup": statistics.mean(r["device_imbalance"] for r in after),
            "device_imbalance_last": statistics.mean(r["device_imbalance"] for r in last),
            "replacements": len(moves), "replacement_s_median": statistics.median(moves) if moves else None,
            "dead_fraction_after_warmup": statistics.mean(r["dead_fraction"] for r in after),
            "dropped_copies_per_step": statistics.mean(r["dropped"] for r in after),
            "step_time_s": statistics.median(r["step_time_s"] for r in records[1:] or records)}


def window_maxvio(records: list[dict]) -> float:
    """MaxVio of the load summed over `records` (mean over layers): how balanced the router is once the noise of
    single small batches averages out (a step's batch is a few sequences whose tokens route alike)."""
    layers = len(records[0]["expert_load"]) if records and records[0]["expert_load"] else 0
    if not layers:
        return 0.0
    totals = [[sum(r["expert_load"][layer][e] for r in records) for e in range(len(records[0]["expert_load"][layer]))]
              for layer in range(layers)]
    return statistics.mean(max(t) / statistics.mean(t) - 1 if sum(t) else 0.0 for t in totals)


def plot(out: Path, runs: dict[str, list[dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, title, scale, file in (
            ("maxvio", "MaxVio (mean over MoE layers)", "Expert load imbalance by strategy", "log", "maxvio.png"),
            ("device_imbalance", "device max/mean load (mean over MoE layers)", "Device load imbalance by strategy",
             "linear", "device_imbalance.png")):
        plot_curves(out / file, {n: [(r["step"], r[key]) for r in records] for n, records in runs.items()},
                    ylabel, title, scale)
        written.append(file)
    from orchestrator.monitoring.report import expert_load_heatmaps

    for name, records in runs.items():
        fig = expert_load_heatmaps(records, f"Expert load per layer over steps: {name}")
        fig.savefig(out / f"heatmap-{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"heatmap-{name}.png")
    return written


def table(rows: list[dict]) -> str:
    base = next((r["final_loss"] for r in rows if r["strategy"] == "none"), None)
    lines = ["| strategy | final loss | vs none | val loss | MaxVio after warm-up | MaxVio last 5% | MaxVio of the last "
             "5% summed | device max/mean after warm-up | device max/mean last 5% | dead experts | dropped copies/step | "
             "re-placements | step time |", "|---" * 13 + "|"]
    for r in rows:
        cost = f"{r['final_loss'] - base:+.4f}" if base is not None else "n/a"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        moves = f"{r['replacements']} ({r['replacement_s_median']:.3f} s)" if r["replacements"] else "0"
        lines.append(f"| {r['strategy']} | {r['final_loss']:.4f} | {cost} | {val} | {r['maxvio_after_warmup']:.3f} | "
                     f"{r['maxvio_last']:.3f} | {r['maxvio_last_total']:.3f} | {r['device_imbalance_after_warmup']:.3f} | "
                     f"{r['device_imbalance_last']:.3f} | {r['dead_fraction_after_warmup']:.1%} | "
                     f"{r['dropped_copies_per_step']:.0f} | {moves} | {r['step_time_s'] * 1000:.0f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # SIGTERM/SIGINT: the strategy's run stops as jobs.train's does and the study ends there, 128 + signal
    return run_main(lambda: study(args), args.debug, keep=argv is None)


def study(args: argparse.Namespace) -> int:
    """One run per strategy, sub-runs of one job (jobs/study.py)."""
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    if unknown:
        raise ConfigError(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(STRATEGIES)}")
    cfg = load_config(args.config, overrides)
    world = cfg.cluster.num_devices
    if world == 1:  # experts cannot move (or have replicas) on one device
        skipped = [n for n in names if any("replace" in o or "redundant" in o for o in STRATEGIES[n])]
        if skipped and args.strategies == ",".join(STRATEGIES):
            print(f"one device: leaving out {', '.join(skipped)}", file=sys.stderr)
            names = [n for n in names if n not in skipped]
    strategies = {n: [o.format(world=world) for o in STRATEGIES[n]] for n in names} | parse_extra(args.extra)
    arms = [Arm(n, o, what=f"strategy {n}: {' '.join(o) or 'no balancing'}") for n, o in strategies.items()]
    # every strategy starts from no balancing (the default job balances its router), then the command
    # line's overrides, then the strategy's own settings
    configs = arm_configs(args.config, NO_BALANCING, overrides, arms)
    done = run_arms(cfg, configs, arms)
    if isinstance(done, int):
        return done
    out, results = done
    warmup = args.warmup if args.warmup is not None else cfg.train.steps // 5
    runs = {r.arm.name: r.records for r in results}
    rows = [summarize(r.arm.name, r.records, r.summary, warmup) for r in results]
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (out / "comparison.md").write_text(text + "\n")
    images = plot(out, runs)
    print(text)
    print(f"written {out}/comparison.json, comparison.md, {', '.join(images)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
