"""Train under injected faults, then prove nothing changed: the chaos job.

    python -m jobs.chaos [--config FILE] [--every N] [--kinds kill,crash,...] [--seed S] [--no-twin] [key=value ...]

Runs the job with a fault plan (`faults.plan=...`) or random chaos (`--every N`: a fault every N steps
on average, of the given kinds, on random devices, drawn from --seed), then the same job without
faults (the twin), and compares: the loss of every step and every tensor of the final checkpoint
(parameters, optimizer moments, RNG) must be bit-identical. Prints the incidents, the faults injected
vs healed and the goodput table; writes <run dir>/chaos_report.json. Runs on the cluster it finds
like jobs.train, so it also works under `ray job submit -- python -m jobs.chaos ...`.
Exit codes: 0 every fault healed and the state identical, 1 not, 2 bad config, 128+signal when stopped by
SIGTERM/SIGINT (the chaos run stops as jobs.train does; the twin run and the comparison are skipped).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli import job_parser, run_main, setup_logging
from orchestrator.config import Config, ConfigError, load_config
from orchestrator.monitoring.rundir import read_jsonl, records

if TYPE_CHECKING:
    from jobs.startup import Job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = job_parser("python -m jobs.chaos", __doc__,
                    epilog="examples:\n  python -m jobs.chaos --every 50 train.steps=1500\n"
                           "  python -m jobs.chaos 'faults.plan=[{step: 30, kind: hang, rank: 1}]'")
    ap.add_argument("--every", type=float, default=None, help="random chaos: mean steps between faults")
    ap.add_argument("--kinds", default=None, help="random chaos: comma-separated fault kinds "
                                                  "(default kill,crash,hang,slow,nan,checkpoint)")
    ap.add_argument("--seed", type=int, default=None, help="random chaos: seed of the fault draw")
    ap.add_argument("--no-twin", action="store_true", help="skip the fault-free twin run and the comparison")
    return ap.parse_intermixed_args(argv)


def match_faults(injected: list[dict], incidents: list[dict]) -> list[dict]:
    """Each injected fault with the incident that caught it (the first unmatched one of its kind at or after
    its step: its rule's `caught_as`, orchestrator/healing/faults.py), or None."""
    from orchestrator.healing.faults import fault_rule

    used: set[int] = set()
    out = []
    for fault in injected:
        found = None
        # a separate pool's rollout worker killed: the pool replaces it (incident kind rollout); a colocated one is a
        # device actor, caught as any device
        caught_as = set(fault_rule(fault["kind"]).caught_as) | ({"rollout"} if fault.get("target") == "rollout" else set())
        for n, i in enumerate(incidents):
            if n not in used and i["kind"] in caught_as and i["step"] >= fault["step"]:
                found = n
                break
        if found is not None:
            used.add(found)
        out.append({**fault, "caught_as": incidents[found]["kind"] if found is not None else None,
                    "caught_at": incidents[found]["step"] if found is not None else None,
                    "action": incidents[found]["action"] if found is not None else None})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_main(lambda: chaos(args), args.debug, keep=argv is None)


def chaos(args: argparse.Namespace) -> int:
    """The chaos run and its fault-free twin, sub-runs of one job started as every job starts
    (jobs/startup.py); the exit code of the comparison."""
    from jobs.startup import started_job

    overrides = list(args.overrides)
    if args.every is not None:
        overrides.append(f"faults.chaos.mean_steps_between={args.every}")
    if args.kinds:
        overrides.append(f"faults.chaos.kinds=[{args.kinds}]")
    if args.seed is not None:
        overrides.append(f"faults.chaos.seed={args.seed}")
    cfg = load_config(args.config, overrides + ["checkpoint.at_end=true"])
    if not cfg.faults.plan and not cfg.faults.chaos.mean_steps_between:
        raise ConfigError("no faults to inject: give --every N (random chaos) or faults.plan=[...]")
    # the job holds its directory; each of its two runs holds its own too
    with started_job(cfg, sub_runs=True, announce=" (chaos/ and twin/)") as job:
        report = _chaos(args, cfg, job)
    run_dir = job.run_dir
    if "stopped_by_signal" in report:
        return _stopped(run_dir, report)
    (run_dir / "chaos_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    ok = report.get("interruptions") == 0 and report.get("faults_healed") == report.get("faults_injected")
    if not args.no_twin:
        ok = ok and bool(report.get("identical_losses")) and bool(report.get("identical_state"))
    return 0 if ok else 1


def _chaos(args: argparse.Namespace, cfg: Config, job: "Job") -> dict:
    """The two runs on the job's cluster and their comparison: the report."""
    from orchestrator.checkpoint.manager import list_checkpoints
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.checkpoint.timeline import run_folder
    from orchestrator.checkpoint.tools import differences, read_state
    from orchestrator.config import config_from_dict, to_dict
    from orchestrator.errors import RunError

    run_dir = job.run_dir
    report: dict = {"run_dir": str(run_dir)}

    def sub(name: str, **faults) -> tuple:
        d = to_dict(cfg)
        d["run"]["dir"] = str(run_dir / name)
        d["run"]["id"] = f"{cfg.run.id}-{name}" if cfg.run.id else None  # two runs, two checkpoint folders
        d["faults"].update(faults)
        c = config_from_dict(d)
        return c, Path(c.run.dir)

    chaos_cfg, chaos_dir = sub("chaos")
    print(f"chaos run: {len(chaos_cfg.faults.plan)} planned fault(s)"
          + (f", random chaos every {cfg.faults.chaos.mean_steps_between:g} steps on average"
             if cfg.faults.chaos.mean_steps_between else ""), file=sys.stderr)
    try:
        summary = job.run(chaos_cfg)
        report["interruptions"] = 0
    except RunError as e:
        print(f"chaos run stopped: {e}", file=sys.stderr)
        report.update(interruptions=1, stopped=str(e))
        summary = None
    if summary is not None:
        caught = match_faults(summary.faults_injected, summary.incidents)
        report.update(steps=summary.steps_done, faults_injected=len(caught),
                      faults_healed=sum(1 for f in caught if f["caught_as"]), recoveries=summary.recoveries,
                      faults=caught, incidents=summary.incidents, goodput=summary.goodput)
    if summary is not None and summary.stopped_by_signal:
        report["stopped_by_signal"] = summary.stopped_by_signal
    elif summary is not None and not args.no_twin:
        twin_cfg, twin_dir = sub("twin", plan=[], chaos={**to_dict(cfg)["faults"]["chaos"], "mean_steps_between": 0.0})
        print("fault-free twin run ...", file=sys.stderr)
        twin = job.run(twin_cfg)
        if twin.stopped_by_signal:
            report["stopped_by_signal"] = twin.stopped_by_signal
            return report
        losses = [_losses(chaos_dir), _losses(twin_dir)]
        states = []
        for c, d, s in ((chaos_cfg, chaos_dir, summary), (twin_cfg, twin_dir, twin)):
            root = Storage(run_folder(c, d, s.run_id))
            states.append(read_state(list_checkpoints(root)[-1][1]))
        diff = differences(*states)
        report.update(identical_losses=losses[0] == losses[1], identical_state=not diff,
                      tensors_compared=len(states[0]), tensors_different=diff[:20])
    return report


def _stopped(run_dir: Path, report: dict) -> int:
    """A run stopped by a signal (after its step in flight): the report so far, no comparison; 128 + signal."""
    (run_dir / "chaos_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"stopped by {report['stopped_by_signal']}: no comparison with the twin", file=sys.stderr)
    return 128 + int(getattr(signal, report["stopped_by_signal"]))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(read_jsonl(run_dir / "metrics.jsonl"))]


def render(report: dict) -> str:
    from orchestrator.monitoring.goodput import Goodput

    lines = ["", "== chaos report =="]
    if "stopped" in report:
        lines.append(f"the run STOPPED: {report['stopped']}")
    for f in report.get("faults", []):
        caught = (f"caught as {f['caught_as']} at step {f['caught_at']}, {f['action']}" if f["caught_as"]
                  else "NOT CAUGHT")
        who = "rollout worker" if f.get("target") == "rollout" else "device"
        lines.append(f"  step {f['step']:>5}  {f['kind']:<10} {who} {f['rank']}  {caught}")
    if "faults_injected" in report:
        lines.append(f"faults injected {report['faults_injected']}, healed {report['faults_healed']}, "
                     f"job interruptions {report['interruptions']}, steps {report['steps']}")
    if "identical_state" in report:
        same = report["identical_losses"] and report["identical_state"]
        lines.append(f"final state identical to the fault-free twin: {'yes' if same else 'NO'} "
                     f"({report['tensors_compared']} tensors, losses of every step "
                     f"{'equal' if report['identical_losses'] else 'DIFFERENT'})")
    if report.get("goodput"):
        lines.append(Goodput.from_dict(report["goodput"]).table())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
