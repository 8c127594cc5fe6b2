"""What the studies share (jobs/routing_study.py, jobs/technique_study.py): arms of one job, each a sub-run of the
same model and data with its own config overrides, run one after the other on one Ray cluster; their step records
read back; a curve per arm plotted.

An arm's config is the study's config file, then `base` (what every arm starts from), then the command line's
overrides, then the arm's own overrides: so an arm always gets what it studies.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.config import Config, ConfigError, load_config
from orchestrator.monitoring.rundir import read_jsonl, records as step_records


@dataclass
class Arm:
    name: str                    # its folder in the study's run directory
    overrides: list[str]         # config overrides of this arm (key=value)
    what: str = ""               # one line for the log (default: the overrides)
    group: str = ""              # arms compared with each other (a table each)


@dataclass
class ArmResult:
    arm: Arm
    records: list[dict]          # metrics.jsonl's step records
    summary: dict                # the run's summary.json (RunSummary as a dict)
    run_dir: Path = field(default=Path("."))


def arm_configs(config_file: str | None, base: list[str], overrides: list[str], arms: list[Arm]) -> dict[str, Config]:
    """Each arm's validated config (ConfigError naming the arm's key when one is bad)."""
    out = {}
    for arm in arms:
        try:
            out[arm.name] = load_config(config_file, base + overrides + arm.overrides)
        except ConfigError as e:
            raise ConfigError(f"arm {arm.name!r} ({' '.join(arm.overrides)}): {e}") from None
    return out


def run_arms(cfg: Config, configs: dict[str, Config], arms: list[Arm],
             on_done: Callable[[ArmResult], None] | None = None) -> tuple[Path, list[ArmResult]] | int:
    """Run every arm as a sub-run of one job started from `cfg` (jobs/startup.py), in order. Returns (the study's
    run directory, the results), or 128 + signal number when a signal stopped an arm (the study ends there)."""
    from jobs.startup import started_job

    results = []
    with started_job(cfg, sub_runs=True, announce=None) as job:
        out = job.run_dir
        for arm in arms:
            c = configs[arm.name]
            c.run.dir = str(out / arm.name)
            print(f"{arm.name}: {arm.what or ' '.join(arm.overrides) or 'as configured'}", file=sys.stderr)
            summary = asdict(job.run(c))
            if summary["stopped_by_signal"]:
                print(f"{arm.name}: stopped by {summary['stopped_by_signal']}; no comparison", file=sys.stderr)
                return 128 + int(getattr(signal, summary["stopped_by_signal"]))
            result = ArmResult(arm, step_records(read_jsonl(out / arm.name / "metrics.jsonl")), summary,
                               out / arm.name)
            results.append(result)
            if on_done:
                on_done(result)
    return out, results


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (each point averages the values up to it)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(path: Path, curves: dict[str, list[tuple[int, float]]], ylabel: str, title: str,
                yscale: str = "linear", smooth: int | None = None) -> None:
    """One line per arm: (step, value) points, smoothed by a trailing mean (default: a fiftieth of the steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per arm, up to 20
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        window = smooth or max(1, len(points) // 50)
        ax.plot(steps, smoothed(list(values), window), label=name, linewidth=1.2)
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale=yscale)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Arm", "ArmResult", "arm_configs", "run_arms", "smoothed", "plot_curves"]
