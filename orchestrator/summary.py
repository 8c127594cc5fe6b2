"""What a run leaves behind in summary.json, and the bounded running totals the driver keeps to write it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Config


@dataclass
class RunSummary:
    run_dir: str
    steps_done: int
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float          # mean over the run's steps after the first (warm-up) one
    steps_per_s: float
    wall_time_s: float
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


@dataclass(frozen=True)
class Totals:
    """Running sums over the kept records of this run (what the summary needs, without the records)."""
    steps: int = 0
    step_time_s: float = 0.0
    first_step_time_s: float = 0.0

    def add(self, rec: dict[str, Any]) -> "Totals":
        t = rec["step_time_s"]
        return Totals(self.steps + 1, self.step_time_s + t, self.first_step_time_s if self.steps else t)

    @property
    def mean_step_time_s(self) -> float:
        """Mean over the steps after the first (warm-up) one; the first alone when it is the only one."""
        if self.steps > 1:
            return (self.step_time_s - self.first_step_time_s) / (self.steps - 1)
        return self.step_time_s


def history_len(cfg: Config) -> int:
    """Records the driver keeps: enough for every window that reads them (re-placement, alert rules)."""
    rules = [a.window + a.steps for a in cfg.monitor.alerts]
    return max([64, cfg.balance.replace_window + 1, *rules])


__all__ = ["RunSummary", "Totals", "history_len"]
