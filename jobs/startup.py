"""How every job starts a run, in one order: what each step refuses is refused before anything after it happens.

1. preflight: the memory plan against cluster.device_memory_gb (when set), then the input files (model weights'
   headers, data, chat roles, token ids): bad input is a ConfigError (exit 2) before Ray starts and before the run
   directory exists;
2. the run directory decided once (`run.dir`, else a new runs/<time>-<name>), then held (runlock.py) before anything
   is read or written there: by the run and its local checkpoint folder (`hold_run`) for a job that is one run, by
   the job alone for a job of several runs (each of which holds its own folder when it starts: `Job.run`);
3. a job that is one run: where it starts (`timeline.plan_resume`: a checkpoint it cannot resume from is bad input,
   "cannot resume", exit 2); one already at train.steps is `complete` and nothing more starts;
4. the run directory made (its config.yaml), then Ray (`cluster.ray_cluster`, room for the standbys too).

A signal that interrupts the job once its directory exists says so on the Interrupted (its `run_dir`: the run it
was in), for the job's exit to list that run's end files; one that only cuts Ray's shutdown short after the job's
work is done is said and the job ends as its work did. Imports nothing heavy until a step needs it.
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from orchestrator.config import Config

if TYPE_CHECKING:
    from orchestrator.checkpoint.timeline import ResumePlan
    from orchestrator.monitoring.summary import RunSummary


def preflight(cfg: Config) -> None:
    """Bad input found before anything starts (ConfigError): the memory plan, when there is a budget, and the input
    files."""
    if cfg.cluster.device_memory_gb > 0:   # MemoryPlanError: the numbers and the knob that would make it fit
        from orchestrator.memory.plan import check_fits

        check_fits(cfg)
    from orchestrator.runtime.preflight import check_inputs

    check_inputs(cfg)


@dataclass
class Job:
    """A started job: its config and directory; for a job that is one run, its id and where it starts."""
    cfg: Config
    run_dir: Path
    started: float                       # time.time() at its start: its end files are those written since
    run_id: str | None = None
    plan: "ResumePlan | None" = None
    current: Path | None = None          # the directory of the run it is in (itself, or its latest sub-run)

    @property
    def complete(self) -> bool:
        """A run whose checkpoint is at train.steps already: nothing was started."""
        return self.plan is not None and self.plan.complete

    def run(self, cfg: Config | None = None) -> "RunSummary":
        """A run on the job's cluster: the job's own (from where start-up found it starts), or, given `cfg`, one of
        its sub-runs in its own `cfg.run.dir` (held before its config.yaml is written)."""
        from orchestrator.driver import Driver
        from orchestrator.monitoring.status import make_run_dir, run_dir_path
        from orchestrator.runtime.runlock import hold_run

        if cfg is None:
            return Driver(self.cfg, self.run_dir, self.plan).run()
        with hold_run(cfg, run_dir_path(cfg)):
            self.current = make_run_dir(cfg)
            return Driver(cfg, self.current).run()


@contextmanager
def started_job(cfg: Config, sub_runs: bool = False, announce: str | None = "") -> Iterator[Job]:
    """Start a job as the module's docstring says: a job that is one run, or with `sub_runs` one whose runs are
    sub-runs in folders of its own (`Job.run(cfg)`). `announce`: what the "run directory: PATH" line on stderr
    adds (None: no line).
    Yields the Job (a complete one before its directory or Ray exists). Raises ConfigError, RunInUse, BadInput
    ("cannot resume"), RunError (a full disk), Interrupted."""
    from orchestrator.exits import BadInput
    from orchestrator.errors import RunError
    from orchestrator.monitoring.status import make_run_dir, run_dir_path
    from orchestrator.runtime.runlock import hold, hold_run

    started = time.time()
    preflight(cfg)
    cfg.run.dir = str(run_dir_path(cfg))   # decided once: the plan and the run use the same directory
    with ExitStack() as held:
        if not sub_runs:
            job = Job(cfg, Path(cfg.run.dir), started, held.enter_context(hold_run(cfg, Path(cfg.run.dir))))
            from orchestrator.checkpoint.timeline import plan_resume

            try:   # before anything starts or is written (a finished run's results stay as they are)
                job.plan = plan_resume(cfg, job.run_dir, job.run_id)
            except RunError as e:   # the checkpoint to resume from is missing, damaged or of another model
                raise BadInput(e, "cannot resume") from e
            if job.complete:
                yield job
                return
        else:
            held.enter_context(hold(Path(cfg.run.dir)))
            job = Job(cfg, Path(cfg.run.dir), started)
        job.run_dir = job.current = make_run_dir(cfg)
        if announce is not None:
            print(f"run directory: {job.run_dir}{announce}", file=sys.stderr)
        with _on_ray(job):
            yield job


@contextmanager
def _on_ray(job: Job) -> Iterator[None]:
    from orchestrator.runtime.cluster import ray_cluster
    from orchestrator.runtime.signals import interrupted

    done = False
    try:
        with ray_cluster(job.cfg.cluster, spare_devices=job.cfg.faults.standby):
            # Ray and torch are imported only now: the config is good and the cluster's network chosen.
            yield
            done = True
    except KeyboardInterrupt as e:   # Interrupted: a second signal, or one while no step loop listened
        signal = interrupted(e)
        if done:   # the job's work is done, its files written: the signal only cut Ray's shutdown short (its
            # watchdog finishes that); the job ends as its work did
            print(f"{signal.describe()} after the run ended: Ray's shutdown cut short", file=sys.stderr)
            return
        if signal.run_dir is None:
            signal.run_dir, signal.since, signal.report = job.current, job.started, job.cfg.monitor.report
        if signal is e:
            raise
        raise signal from e
