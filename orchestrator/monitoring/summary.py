"""What a run leaves behind (summary.json, goodput.json, report.html), and the bounded running totals the driver
keeps to write it."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.runtime import signals
from orchestrator.config import Config
from orchestrator.monitoring.rundir import write_atomic

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """summary.json. `state`: finished (every step and the end work), stopped (a first SIGINT/SIGTERM: after the
    step in flight, with its checkpoint), interrupted (a second signal), failed; `reason`: why it did not
    finish (the signal, the error), None when it did."""
    run_dir: str
    steps_done: int
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float          # trained tokens per second over the run's steps after the first (warm-up) one
    steps_per_s: float           # the step loop's wall-clock rate: steps after the first / wall time between the
                                 # first step's record and the last one's (the driver's work between steps included)
    wall_time_s: float
    device_steps_per_s: float = 0.0   # 1 / mean step_time_s (the devices' round trip only, without the driver's work
                                      # between steps): what steps_per_s was before issue 23
    idle_share: float = 0.0      # mean over steps after the first of the step records' idle_share: the devices' wait
                                 # between train_steps / (that wait + the train_step) (device/steptimes.py)
    idle_s: float = 0.0          # mean seconds a device waited before each step (steps after the first)
    other_calls_s: float = 0.0   # of idle_s, mean seconds in the devices' other calls (snapshot, validation, ...)
    stopped_by_signal: str | None = None
    resumed_from_step: int | None = None
    checkpoints_committed: list[int] = field(default_factory=list)
    checkpoints_failed: list[int] = field(default_factory=list)
    checkpoint_bytes: dict[int, int] = field(default_factory=dict)
    checkpoint_write_s: dict[int, float] = field(default_factory=dict)   # slowest device's background write
    checkpoint_commit_s: dict[int, float] = field(default_factory=dict)  # snapshot start .. manifest committed
    restore_s: float | None = None
    recoveries: int = 0
    incidents: list[dict[str, Any]] = field(default_factory=list)
    faults_injected: list[dict[str, Any]] = field(default_factory=list)
    goodput: dict[str, float] = field(default_factory=dict)
    monitoring_s: float = 0.0      # spent in the metrics sinks and status.json (the monitoring's own cost)
    run_id: str | None = None
    state: str = "finished"        # finished | stopped | interrupted | failed
    reason: str | None = None
    accuracy_before: float | None = None   # RL (data.task=rl): held-out accuracy (greedy) before the first RL step ...
    accuracy_after: float | None = None    # ... and after the last


@dataclass(frozen=True)
class Totals:
    """Running sums over the kept records of this run (what the summary needs, without the records)."""
    steps: int = 0
    step_time_s: float = 0.0
    first_step_time_s: float = 0.0
    tokens: int = 0                # trained tokens (SFT: assistant tokens only) ...
    first_tokens: int = 0          # ... and the first step's, left out with its time
    first_time: float = 0.0        # wall clock of the first step's record ("time") ...
    last_time: float = 0.0         # ... and of the newest one's
    idle_share: float = 0.0        # summed records' idle_share, idle_s, other_calls_s (steps after the first)
    idle_s: float = 0.0
    other_calls_s: float = 0.0

    def add(self, rec: dict[str, Any]) -> "Totals":
        t, n, now = rec["step_time_s"], int(rec.get("tokens", 0)), float(rec.get("time", 0.0))
        if not self.steps:
            return Totals(1, t, t, n, n, now, now)
        return Totals(self.steps + 1, self.step_time_s + t, self.first_step_time_s, self.tokens + n,
                      self.first_tokens, self.first_time, now, self.idle_share + rec.get("idle_share", 0.0),
                      self.idle_s + rec.get("idle_s", 0.0), self.other_calls_s + rec.get("other_calls_s", 0.0))

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens per second over the steps after the first (the same steps as mean_step_time_s)."""
        if self.steps > 1:
            return (self.tokens - self.first_tokens) / max(1e-12, self.step_time_s - self.first_step_time_s)
        return self.tokens / max(1e-12, self.step_time_s)

    @property
    def mean_step_time_s(self) -> float:
        """Mean over the steps after the first (warm-up) one; the first alone when it is the only one."""
        if self.steps > 1:
            return (self.step_time_s - self.first_step_time_s) / (self.steps - 1)
        return self.step_time_s

    @property
    def steps_per_s(self) -> float:
        """The step loop's wall-clock rate: steps after the first over the wall time from the first step's record to
        the last one's, so the driver's work between steps counts (recording, sinks, snapshots, alert rules); a
        rewind's lost time counts too. One step, or records without a time: 1 / mean_step_time_s."""
        if self.steps > 1 and self.last_time > self.first_time:
            return (self.steps - 1) / (self.last_time - self.first_time)
        return self.device_steps_per_s

    @property
    def device_steps_per_s(self) -> float:
        """1 / the devices' mean round trip per step (step_time_s): the rate without the driver's work between steps."""
        return 1.0 / self.mean_step_time_s if self.steps and self.mean_step_time_s > 0 else 0.0

    def mean_after_first(self, key: str) -> float:
        """The mean of a summed idle figure (idle_share, idle_s, other_calls_s) over the steps after the first."""
        return getattr(self, key) / (self.steps - 1) if self.steps > 1 else 0.0


def history_len(cfg: Config) -> int:
    """Records the driver keeps: enough for every window that reads them (re-placement, alert rules)."""
    rules = [a.window + a.steps for a in cfg.monitor.alerts]
    return max([64, cfg.balance.replace_window + 1, *rules])


def write_results(run_dir: Path, summary: RunSummary, goodput: dict[str, float], report: bool,
                  interrupted: Any = None) -> None:
    """summary.json and goodput.json (both with the run's `state` and `reason`), then report.html (when `report`
    and a step finished), each as far as it can be: a file that cannot be written (a full disk) is logged and
    the next one tried, and a report that fails does not fail the run. For an interrupted run, what was not
    written and why goes into `interrupted.not_written`."""
    missing: dict[str, str] = {}
    outcome = {"state": summary.state, "reason": summary.reason}
    for name, content in (("summary.json", asdict(summary)), ("goodput.json", {**goodput, **outcome})):
        try:
            write_atomic(run_dir / name, json.dumps(content, indent=2) + "\n")
        except Exception as e:  # DiskFull, a permission: the run's own outcome is what the job reports
            log.warning("could not write %s: %s", name, e)
            missing[name] = str(e)
    if report and summary.steps_done:
        try:
            from orchestrator.monitoring.report import write_report

            log.info("run report: %s", write_report(run_dir))
        except Exception as e:  # the run's results are written; a report that fails must not fail the run
            log.warning("could not write the run report: %s", e)
            missing["report.html"] = str(e)
        except KeyboardInterrupt as e:  # a second signal while it was being written
            interrupted = signals.interrupted(e)
            interrupted.not_written.update(missing)
            interrupted.not_written["report.html"] = "interrupted while it was being written"
            raise interrupted
    elif report:
        missing["report.html"] = "no step had finished"
    if interrupted is not None:
        interrupted.not_written.update(missing)


__all__ = ["RunSummary", "Totals", "history_len", "write_results"]
