"""Technique study: the same job under each stable-training technique of issue 22, compared.

    python -m jobs.technique_study [--config FILE] [--steps N] [--seeds S] [--groups stability,scopes,mtp,anticipate]
                                   [--high-lr X] [key=value ...]

Built like the routing study (jobs/study.py runs every arm as a sub-run of one job on one Ray cluster; the same
seed, data and steps per arm, the command line's overrides on every arm). Groups of arms:

  stability   pre-norm vs DSSN + TinyInit (model.norm=sandwich model.init=tiny), each at the job's learning rate
              and at --high-lr (default 4x): gradient-norm spike rate, loss spikes, final and validation loss;
              --seeds S runs each arm (and the scopes and mtp groups') with seeds 0..S-1 (the tables show the mean
              and the min..max spread). Both
              arms untie the head from the embedding (model.tie_embeddings=false, as Pangu Ultra): TinyInit's
              embedding std 0.5 as a tied head would start the logits at std 0.5 sqrt(dim)
  scopes      the Switch auxiliary loss (balance.aux_loss_coeff=0.01) per sequence, per EP group, over the global
              batch (balance.aux_loss_scope): MaxVio, device max/mean load, final loss. EP groups differ from the
              global batch only with data parallelism beside EP: these arms run with
              parallel.expert_parallel=num_devices/2 when num_devices >= 2 (2 EP groups)
  mtp         multi-token prediction off vs model.mtp_depth=1: the main loss at equal steps, tokens/s
  anticipate  a crafted loss spike (fault kind spike: every device's batch of step --spike-step replaced by random
              tokens, once) under a loss_spike alert rule (--spike-threshold x the median, 1.3) whose action is record (the bad update
              stays), rollback, or anticipate (rollback, then anticipatory routing until 50 calm steps): final and
              validation loss, steps with anticipatory routing, rewinds, step time

A spike, in this study's tables: a step whose value exceeds --spike-factor (default 2 for gradient norms, 1.1 for
the loss) times the median of the previous 20 steps (orchestrator/healing/detectors.py recent_median).

Writes into the run directory: comparison.json, comparison.md (a table per group), loss.png, grad_norm.png,
maxvio.png (every arm), and each arm's own run directory beside them.
Exit codes: 0 done, 1 a run failed, 2 bad config, 128+signal when stopped by SIGTERM/SIGINT (no comparison).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from jobs.cli import job_parser, run_main, setup_logging
from jobs.study import Arm, ArmResult, arm_configs, plot_curves, run_arms
from orchestrator.config import ConfigError, load_config
from orchestrator.healing.detectors import recent_median

GROUPS = ("stability", "scopes", "mtp", "anticipate")
WINDOW = 20   # steps whose median a value is compared with


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = job_parser("python -m jobs.technique_study", __doc__)
    ap.add_argument("--steps", type=int, default=None, help="steps per arm (default: train.steps)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per stability arm (0..S-1; default 1)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of: {', '.join(GROUPS)}")
    ap.add_argument("--high-lr", type=float, default=None, help="the stability group's high learning rate "
                                                                "(default: 4x train.lr)")
    ap.add_argument("--spike-step", type=int, default=None, help="the anticipate group's crafted spike (default: "
                                                                 "half of the steps)")
    ap.add_argument("--spike-threshold", type=float, default=1.3, help="the anticipate group's loss_spike alert "
                                                                        "threshold (x the median; default 1.3)")
    ap.add_argument("--grad-spike-factor", type=float, default=2.0)
    ap.add_argument("--loss-spike-factor", type=float, default=1.1)
    return ap.parse_args(argv)


def spikes(values: list[float], factor: float) -> int:
    """Steps whose value exceeds `factor` x the median of the previous WINDOW ones (from step WINDOW + 1 on)."""
    return sum(1 for i in range(WINDOW, len(values))
               if (m := recent_median(values[i - WINDOW:i], WINDOW)) is not None and values[i] > factor * m)


def arms_of(groups: list[str], cfg, seeds: int, high_lr: float, spike_step: int, spike_threshold: float
            ) -> list[Arm]:
    arms: list[Arm] = []
    if "stability" in groups:
        for lr_name, lr in (("lr", cfg.train.lr), ("high_lr", high_lr)):
            for tech, extra in (("pre_norm", []), ("dssn_tinyinit", ["model.norm=sandwich", "model.init=tiny"])):
                for seed in range(seeds):
                    arms.append(Arm(f"{tech}-{lr_name}-s{seed}", ["model.tie_embeddings=false", *extra,
                                                                  f"train.lr={lr}", f"seed={seed}"],
                                    group="stability"))
    if "scopes" in groups:
        # two EP groups of at least 2 devices (EP x DP = 2 x 2 on a small job: fractional CPUs on a laptop)
        world = max(4, cfg.cluster.num_devices + cfg.cluster.num_devices % 2)
        mesh = [f"cluster.num_devices={world}", f"parallel.expert_parallel={world // 2}"]
        if world > cfg.cluster.num_devices:
            mesh.append(f"cluster.cpus_per_device={cfg.cluster.cpus_per_device * cfg.cluster.num_devices / world:g}")
        for scope in ("sequence", "ep_group", "global"):
            for seed in range(seeds):
                arms.append(Arm(f"scope_{scope}-s{seed}" if seeds > 1 else f"scope_{scope}",
                                ["balance.aux_loss_coeff=0.01", f"balance.aux_loss_scope={scope}",
                                 "balance.seq_aux_loss_coeff=0", "balance.bias_update_speed=0", *mesh, f"seed={seed}"],
                                group="scopes"))
    if "mtp" in groups:
        for name, extra in (("mtp_off", []), ("mtp_1", ["model.mtp_depth=1"])):
            for seed in range(seeds):
                arms.append(Arm(f"{name}-s{seed}" if seeds > 1 else name, [*extra, f"seed={seed}"], group="mtp"))
    if "anticipate" in groups:
        # every device's batch of the spike step corrupted (fault kind spike: random tokens), once: a loss_spike rule
        # answers it by recording it only, by rolling back, or by rolling back into anticipatory routing for 50 calm
        # steps
        faults = ", ".join(f"{{kind: spike, step: {spike_step}, rank: {r}}}" for r in range(cfg.cluster.num_devices))
        spike = [f"faults.plan=[{faults}]", "faults.snapshot_every=5"]
        for action, extra in (("record", []), ("rollback", []), ("anticipate", ["balance.anticipatory_calm_steps=50"])):
            arms.append(Arm(f"spike_{action}", [*spike, *extra, f"monitor.alerts=[{{rule: loss_spike, threshold: "
                                                                 f"{spike_threshold}, action: {action}}}]"],
                            group="anticipate"))
    return arms


def row_of(r: ArmResult, args: argparse.Namespace) -> dict:
    rec = r.records
    losses = [x["loss"] for x in rec]
    norms = [x["grad_norm"] for x in rec]
    after = rec[len(rec) // 5:] or rec
    return {"arm": r.arm.name, "group": r.arm.group, "steps": len(rec), "final_loss": losses[-1],
            "final_loss_mean_last_5pct": statistics.mean(losses[-max(1, len(losses) // 20):]),
            "val_loss": r.summary.get("val_loss"),
            "grad_spikes": spikes(norms, args.grad_spike_factor),
            "grad_spike_rate": spikes(norms, args.grad_spike_factor) / max(1, len(norms) - WINDOW),
            "loss_spikes": spikes(losses, args.loss_spike_factor),
            "maxvio_after_warmup": statistics.mean(x.get("maxvio", 0.0) for x in after),
            "device_imbalance_after_warmup": statistics.mean(x.get("device_imbalance", 1.0) for x in after),
            "mtp_loss_last": next((x["mtp_loss"] for x in reversed(rec) if x.get("mtp_loss") is not None), None),
            "anticipatory_steps": sum(1 for x in rec if x.get("anticipatory")),
            "incidents": len(r.summary.get("incidents") or []),
            "tokens_per_s": r.summary.get("tokens_per_s"),
            "step_time_s": statistics.median(x["step_time_s"] for x in rec[1:] or rec)}


def _spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ({min(values):.4f}..{max(values):.4f})"


TABLES = (  # group, title, columns (row key, label)
    ("stability", "Stability: pre-norm vs DSSN + TinyInit",
     (("final_loss_mean_last_5pct", "final loss (last 5%)"), ("val_loss", "val loss"),
      ("grad_spike_rate", "grad-norm spike rate"), ("loss_spikes", "loss spikes"), ("step_time_s", "step time"))),
    ("scopes", "Balancing-loss scopes (EP x DP = 2 x 2)",
     (("final_loss_mean_last_5pct", "final loss (last 5%)"), ("val_loss", "val loss"),
      ("maxvio_after_warmup", "MaxVio after warm-up"), ("device_imbalance_after_warmup", "device max/mean"),
      ("step_time_s", "step time"))),
    ("mtp", "Multi-token prediction",
     (("final_loss_mean_last_5pct", "main loss (last 5%)"), ("val_loss", "val loss"),
      ("mtp_loss_last", "MTP loss (last step)"), ("tokens_per_s", "tokens/s"), ("step_time_s", "step time"))),
    ("anticipate", "A crafted loss spike: record, rollback, anticipatory routing",
     (("final_loss_mean_last_5pct", "final loss (last 5%)"), ("val_loss", "val loss"),
      ("loss_spikes", "loss spikes"), ("anticipatory_steps", "anticipatory steps"), ("incidents", "incidents"),
      ("step_time_s", "step time"))))


def _base(arm: str) -> str:
    """An arm's name without its seed suffix (`-s<seed>`)."""
    head, sep, tail = arm.rpartition("-s")
    return head if sep and tail.isdigit() else arm


def _cell(key: str, values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if key == "step_time_s":
        return f"{statistics.median(values) * 1000:.0f} ms"
    if key == "tokens_per_s":
        return f"{statistics.mean(values):.0f}"
    if all(isinstance(v, int) for v in values) and len(values) == 1:
        return str(values[0])
    return _spread([float(v) for v in values])


def tables(rows: list[dict], seeds: int) -> str:
    """A table per group; the arms run with several seeds show the mean (min..max) over them."""
    out = []
    for group, title, cols in TABLES:
        rs = [r for r in rows if r["group"] == group]
        if not rs:
            continue
        per_arm = {name: [r for r in rs if _base(r["arm"]) == name] for name in dict.fromkeys(_base(r["arm"]) for r in rs)}
        n = max(len(v) for v in per_arm.values())
        note = f" ({n} seeds: mean (min..max))" if n > 1 else ""
        out += [f"### {title}{note}", "", "| arm | " + " | ".join(label for _, label in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for name, group_rows in per_arm.items():
            out.append(f"| {name} | " + " | ".join(_cell(k, [r[k] for r in group_rows]) for k, _ in cols) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_main(lambda: study(args), args.debug, keep=argv is None)


def study(args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ConfigError(f"--groups: unknown {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} must be 1 or more")
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    high_lr = args.high_lr if args.high_lr is not None else 4 * cfg.train.lr
    spike_step = args.spike_step or max(WINDOW + 2, cfg.train.steps // 2)
    if "anticipate" in groups and spike_step > cfg.train.steps:
        raise ConfigError(f"--spike-step={spike_step} is after the last step ({cfg.train.steps})")
    arms = arms_of(groups, cfg, args.seeds, high_lr, spike_step, args.spike_threshold)
    configs = arm_configs(args.config, [], overrides, arms)
    done = run_arms(cfg, configs, arms)
    if isinstance(done, int):
        return done
    out, results = done
    rows = [row_of(r, args) for r in results]
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = tables(rows, args.seeds)
    (out / "comparison.md").write_text(text + "\n")
    images = []
    for key, ylabel, scale in (("loss", "training loss", "linear"), ("grad_norm", "gradient norm", "log"),
                               ("maxvio", "MaxVio (mean over MoE layers)", "log")):
        plot_curves(out / f"{key}.png", {r.arm.name: [(x["step"], x[key]) for x in r.records if key in x]
                                         for r in results}, ylabel, f"{ylabel} by arm", scale)
        images.append(f"{key}.png")
    print(text)
    print(f"written {out}/comparison.json, comparison.md, {', '.join(images)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
