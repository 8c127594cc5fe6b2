"""The driver's side of anticipatory routing after a spike (DeepSeek-V4 technical report sec. 4.2.3: "an automatic
detection mechanism that triggers a short rollback and activates Anticipatory Routing exclusively when a loss spike
occurs; after operating in this mode for a certain period, the system reverts to standard training").

An alert rule with action=anticipate (loss_spike or grad_spike) on step s rewinds as rollback does, but to the newest
state at or before step s - 1 - delay (Decision.at_most; of the two in-memory snapshots kept, the older one when the
newer is too recent, else a checkpoint): the replay's first `delay` steps route normally and cache the routing of the
steps ahead, so step s itself routes with the parameters of step s - delay. It opens a window of steps [the first replayed step, the spike's step + balance.anticipatory_calm_steps] in which the
devices route anticipatorily (device/anticipate.py); a spike alerted inside a window (or just after it) extends it,
so the mode ends after that many steps without a new one. The report publishes neither the detection rule nor the
length of the mode: the rule is the alert's, the length the calm steps.

The windows are decisions about steps, as an alert's skip is: a later rewind (a fault) replays the same steps with the
same mode, so the run stays deterministic; every step's guard carries them to the devices, whose snapshots and
checkpoints keep them, and a resumed run reads them back from device 0 (`resume`).
"""
from __future__ import annotations

from typing import Any

from orchestrator.config import Config
from orchestrator.device.anticipate import Windows, anticipating


class Anticipation:
    def __init__(self, cfg: Config):
        self.enabled = any(a.action == "anticipate" for a in cfg.monitor.alerts)
        self.always = cfg.balance.anticipatory_routing
        self.calm = cfg.balance.anticipatory_calm_steps
        self.windows: Windows = []

    def on(self, step: int) -> bool:
        return anticipating(step, self.windows, self.always)

    def guard(self, guard: dict[str, Any] | None) -> dict[str, Any] | None:
        """A step's guard with the windows (device/anticipate.py Anticipator.begin reads them)."""
        if not self.enabled:
            return guard
        return {**(guard or {}), "anticipate": [list(w) for w in self.windows]}

    def switch_on(self, back: int, spike: int) -> tuple[int, int]:
        """The run went back to after step `back` for a spike alerted at step `spike`: on from step back+1 to
        spike + calm steps (one window with an earlier one that reaches the replayed steps). That window."""
        first, last = back + 1, spike + self.calm
        if self.windows and self.windows[-1][1] >= back:
            first, last = min(first, self.windows[-1][0]), max(last, self.windows[-1][1])
            self.windows[-1] = (first, last)
        else:
            self.windows.append((first, last))
        return first, last

    def resume(self, actors: list[Any], timeout_s: float) -> None:
        """A run resumed from a checkpoint: the windows it was saved with (device 0's, kept in its own file)."""
        if not self.enabled:
            return
        from orchestrator.device.group import get

        (windows,) = get([actors[0].anticipation_windows.remote()], timeout_s, "read anticipatory routing's windows")
        self.windows = [(int(a), int(b)) for a, b in windows]
