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
import time
from contextlib import ExitStack

from jobs.cli import bad_input, interrupted_exit, job_parser, setup_logging
from orchestrator.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser("python -m jobs.train", __doc__,
                      epilog="examples:\n  python -m jobs.train train.steps=50 cluster.num_devices=4\n"
                             "  python -m jobs.train --config jobs/configs/tiny.yaml run.dir=runs/t").parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from orchestrator.runtime.signals import interrupted, job_signals

    # main(None) runs this process's own command line: the gate then stays until the process exits
    with job_signals(keep=argv is None):
        try:
            return train(args)
        except KeyboardInterrupt as e:  # a signal before the run directory existed
            return interrupted_exit(interrupted(e))


def train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return bad_input(e, args.debug)

    from orchestrator.errors import RunInUse
    from orchestrator.monitoring.status import run_dir_path
    from orchestrator.runtime.preflight import check_inputs
    from orchestrator.runtime.runlock import hold_run

    started = time.time()
    cfg.run.dir = str(run_dir_path(cfg))   # decided once: the plan and the run use the same directory
    if cfg.cluster.device_memory_gb > 0:  # the memory plan must fit the budget before anything starts
        from orchestrator.memory.plan import check_fits

        try:
            check_fits(cfg)
        except ConfigError as e:  # MemoryPlanError: the numbers and the knob that would make it fit
            return bad_input(e, args.debug)
    try:  # the input files (model weights, data, chat roles, token ids), before Ray and the run directory
        check_inputs(cfg)
    except ConfigError as e:
        return bad_input(e, args.debug)
    # The run holds its directory (and a local checkpoint folder) before it reads or writes anything there, until
    # its end files are written: a second job on either is refused here and changes nothing of this one.
    with ExitStack() as held:
        try:
            run_id = held.enter_context(hold_run(cfg, run_dir_path(cfg)))
        except (RunInUse, ConfigError) as e:  # ConfigError: a run.dir or checkpoint folder that cannot be created
            return bad_input(e, args.debug)
        return _train(cfg, run_id, started, args.debug)


def _train(cfg: Config, run_id: str, started: float, debug: bool) -> int:
    """The held run: where it starts, then the run on Ray; the exit code."""
    from orchestrator.checkpoint.timeline import plan_resume
    from orchestrator.runtime.cluster import ray_cluster
    from orchestrator.errors import RunError
    from orchestrator.monitoring.status import make_run_dir, run_dir_path
    from orchestrator.runtime.signals import interrupted

    try:  # where the run starts, before anything starts or is written (a finished run's results stay as they are)
        plan = plan_resume(cfg, run_dir_path(cfg), run_id)
    except ConfigError as e:
        return bad_input(e, debug)
    except RunError as e:  # the checkpoint to resume from is missing, damaged or of another model
        return bad_input(e, debug, "cannot resume")
    if plan.complete:
        print(f"run complete: the checkpoint of step {plan.step} ({plan.storage.shown}) is at train.steps="
              f"{cfg.train.steps}; nothing to do (raise train.steps to train further)", file=sys.stderr)
        return 0
    try:
        run_dir = make_run_dir(cfg)
    except RunError as e:  # a full disk (DiskFull names the path and the bytes)
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}", file=sys.stderr)
    summary = None
    try:
        with ray_cluster(cfg.cluster, spare_devices=cfg.faults.standby):
            # Ray and torch are imported only now: the config is good and the cluster's network chosen.
            from orchestrator.driver import Driver

            summary = Driver(cfg, run_dir, plan).run()
    except ConfigError as e:  # what only the devices can find (the memory of the GPUs they got, ...)
        return bad_input(e, debug)
    except RunError as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Interrupted: a second signal, or one while no step loop listened
        if summary is None:
            return interrupted_exit(interrupted(e), run_dir, started, cfg.monitor.report)
        # the run had ended, its end files written: the signal only cut Ray's shutdown short (its watchdog
        # finishes that); the job exits as the run ended
        print(f"{interrupted(e).describe()} after the run ended: Ray's shutdown cut short", file=sys.stderr)
    val = f", validation loss {summary.val_loss:.4f}" if summary.val_loss is not None else ""
    final = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
    print(f"done: {summary.steps_done} steps, final loss {final}{val}, {summary.tokens_per_s:,.0f} tokens/s, "
          f"{summary.steps_per_s:.2f} steps/s, {summary.wall_time_s:.1f}s wall; metrics in {run_dir}/metrics.jsonl")
    from orchestrator.monitoring.goodput import Goodput

    print(Goodput.from_dict(summary.goodput).table())
    if summary.incidents:
        print(f"incidents: {len(summary.incidents)}, recoveries: {summary.recoveries} (each in {run_dir}/incidents.jsonl)")
    if summary.stopped_by_signal:
        return 128 + int(getattr(signal, summary.stopped_by_signal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
