"""Train the MoE model with expert parallelism on Ray device actors.

    python -m jobs.train [--config FILE] [key=value ...]

Starts a local Ray when none is running and joins the running cluster when there is one (so the
same command works under `ray job submit --working-dir . -- python -m jobs.train ...`).
Exit codes: 0 success, 2 bad config or data (one line naming the key or file and the fix; --debug adds the
traceback), or a run directory or checkpoint folder another live job holds (orchestrator/runtime/runlock.py), 1 a run
that failed (a full run directory too: the message names the file and the bytes), 128+signal when stopped by
SIGTERM or SIGINT (143, 130): the first stops after the step in flight with a checkpoint, a second at once, with
the run's end files written as far as they can be (stderr names any that are not); see orchestrator/runtime/signals.py.
A first signal that comes once every step has finished leaves the run finished (its final checkpoint and
validation; exit 0).
"""
from __future__ import annotations

import argparse
import signal
import sys

from jobs.cli import job_parser, run_main, setup_logging
from orchestrator.config import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser("python -m jobs.train", __doc__,
                      epilog="examples:\n  python -m jobs.train train.steps=50 cluster.num_devices=4\n"
                             "  python -m jobs.train --config jobs/configs/tiny.yaml run.dir=runs/t").parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_main(lambda: train(args), args.debug, keep=argv is None)


def train(args: argparse.Namespace) -> int:
    """The run, started as every job starts (jobs/startup.py); the exit code of its end."""
    from jobs.startup import started_job

    cfg = load_config(args.config, args.overrides)
    with started_job(cfg) as job:
        if job.complete:
            print(f"run complete: the checkpoint of step {job.plan.step} ({job.plan.storage.shown}) is at "
                  f"train.steps={cfg.train.steps}; nothing to do (raise train.steps to train further)", file=sys.stderr)
            return 0
        summary = job.run()
    run_dir = job.run_dir
    val = f", validation loss {summary.val_loss:.4f}" if summary.val_loss is not None else ""
    final = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
    print(f"done: {summary.steps_done} steps, final loss {final}{val}, {summary.tokens_per_s:,.0f} tokens/s, "
          f"{summary.steps_per_s:.2f} steps/s, {summary.wall_time_s:.1f}s wall; metrics in {run_dir}/metrics.jsonl")
    from orchestrator.monitoring.goodput import Goodput

    if summary.accuracy_before is not None or summary.accuracy_after is not None:   # an RL run (data.task=rl)
        show = lambda a: "n/a" if a is None else f"{a:.3f}"   # noqa: E731
        print(f"held-out accuracy: {show(summary.accuracy_before)} before RL, {show(summary.accuracy_after)} after "
              f"(greedy; summary.json accuracy_before / accuracy_after)")
    print(Goodput.from_dict(summary.goodput).table())
    if summary.incidents:
        print(f"incidents: {len(summary.incidents)}, recoveries: {summary.recoveries} (each in {run_dir}/incidents.jsonl)")
    if summary.stopped_by_signal:
        return 128 + int(getattr(signal, summary.stopped_by_signal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
