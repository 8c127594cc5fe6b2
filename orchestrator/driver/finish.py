"""FINISHING: the run's last checkpoint (at its end, or on a stop signal), settled with every write in flight and
taken again while it fails (the devices still hold that state); a device lost meanwhile is the Healer's decision
to heal the group first (the steps since the newest state it kept are then replayed); then the final validation.
It gets the services it works on and the Driver's two checkpoint hooks, never the Driver."""
from __future__ import annotations

from typing import Any, Callable

from orchestrator.checkpoint.coordinator import Checkpoints
from orchestrator.checkpoint.events import CheckpointEvents
from orchestrator.config import Config
from orchestrator.device.group import DeviceGroup
from orchestrator.healing import Decision, Healer
from orchestrator.monitoring.history import RunHistory


class Finish:
    def __init__(self, cfg: Config, checkpoints: Checkpoints, events: CheckpointEvents, devices: DeviceGroup,
                 healer: Healer, history: RunHistory, save_checkpoint: Callable[[int], None],
                 finish_checkpoints: Callable[[], list]):
        self.cfg, self.checkpoints, self.events, self.devices = cfg, checkpoints, events, devices
        self.healer, self.history = healer, history
        self.save_checkpoint, self.finish_checkpoints = save_checkpoint, finish_checkpoints

    def final_checkpoint(self, last: int, stop_signal: str | None) -> Decision | None:
        """The last checkpoint settled; a Decision when a device died before it could be (heal, replay, retake)."""
        ck = self.cfg.checkpoint
        wanted = (ck.on_signal if stop_signal else ck.at_end) and last >= self.history.first
        if wanted and last not in self.checkpoints.committed_steps and last not in self.checkpoints.pending:
            self._save(last)
        while True:
            failed = [f for f in self.finish_checkpoints() if f.step == last]  # (healer: incident, retries left?)
            dead = self.devices.dead_ranks() if (wanted and failed) or self.devices_needed(stop_signal) else []
            if not dead and (not wanted or not failed):
                return None
            if dead:
                return self.healer.died_at_end(last, dead, self.devices.node_of)
            self._save(last)

    def _save(self, step: int) -> None:
        """The run's last checkpoint (or its retake): begun after the last record, so its start is an event."""
        self.save_checkpoint(step)
        self.events.started(step)

    def devices_needed(self, stop_signal: str | None) -> bool:
        """Does the end of the run still need every device (the final validation; not when the last step's
        periodic validation scored it already)?"""
        return bool(self.cfg.train.eval_batches) and not stop_signal and bool(self.history) \
            and self.history[-1].get("val_loss") is None

    def validation(self, stop_signal: str | None, metrics: Any) -> float | None:
        """The final validation loss: measured (and given to the metrics) unless the last step's periodic
        validation scored it already; None when the run has none (no eval_batches, a stop signal, no step)."""
        if self.devices_needed(stop_signal):
            val_loss = self.devices.evaluate(self.cfg.train.eval_batches, self.cfg.cluster.step_timeout_s)
            metrics.validation(self.history[-1]["step"], val_loss)
            return val_loss
        if self.cfg.train.eval_batches and not stop_signal and self.history:
            return self.history[-1]["val_loss"]   # just scored by the periodic validation
        return None
