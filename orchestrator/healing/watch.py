"""Detection: the Watch collects a step's outcome within a deadline and classifies what went wrong.

A step is a transaction. The Watch collects every device's outcome within a deadline learned from
recent step times. When a step fails it sorts the devices: dead (Ray reports the actor gone),
crashed (its step raised an error of its own), hung (still inside the step at the deadline and not
waiting in a collective: found by asking each device where it is, from a thread of its own), and
collateral (a collective failed because a peer vanished). Crashed and hung devices are killed at
once, so their peers' collectives fail fast instead of waiting for the collective timeout. Steps
that complete are inspected too: non-finite or spiking loss and gradient norm, and stragglers (a
device whose own work, outside collectives, is several times the others').

The Healer is a policy: it decides what each incident costs and returns a Decision the driver
carries out: replace only the failed devices (survivors keep their processes and memory), re-form
the process group, put every device back to the newest in-memory snapshot (owned by the driver in
the object store, so it outlives the device that took it; the last committed checkpoint when the
snapshot is gone, e.g. with its node), and replay. Steps are pure functions of (state, step), so
the replay computes what the lost steps would have computed: the run ends bit-identical to a
fault-free one. Recoveries are bounded (a budget per time window, a limit on the same step failing
again, retries with backoff): a restart loop is worse than a stop.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import Config
from orchestrator.healing.detectors import against_others, own_work, recent_median
from orchestrator.errors import last_line
from orchestrator.healing.incidents import Incident, IncidentKind, StepFailure

if TYPE_CHECKING:
    from orchestrator.device.actor import StepReport
    from orchestrator.device.group import DeviceGroup

log = logging.getLogger(__name__)

# Errors a device raises only because a peer left a collective: the peer is the failure, not this device.
_COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "Broken pipe",
               "connection refused", "Socket Timeout", "ProcessGroupGloo",
               "StepNotRun")   # device/actor.py: a step queued behind one that failed on the device, not started


# --------------------------------------------------------------------------- detection
class Watch:
    """Collects a step's reports within a learned deadline; classifies failures; inspects completed steps."""

    def __init__(self, cfg: Config, settle_s: float = 30.0):
        self.f = cfg.faults
        self.settle_s = settle_s          # how long peers get to fail after the first failure
        self.step_times: deque[float] = deque(maxlen=20)
        self.fresh = True                 # the next step is the first after start or a recovery (warm-up)
        self.slow_count: dict[int, int] = {}
        self.losses: deque[float] = deque(maxlen=self.f.spike_window)
        self.norms: deque[float] = deque(maxlen=self.f.spike_window)

    # ---- deadlines
    def deadline(self) -> float:
        """Seconds a step may take: hang_factor x the median of recent steps, within [hang_floor_s, hang_cap_s].
        The first step after a recovery (a new process warming up) gets three times that; until a step
        time is known (the first steps of the run), the cap."""
        if not self.step_times:
            return self.f.hang_cap_s
        learned = max(self.f.hang_floor_s, self.f.hang_factor * statistics.median(self.step_times))
        return min(self.f.hang_cap_s, learned * (3 if self.fresh else 1))

    def rebuild(self, records) -> None:
        """After a rewind (or at a resume): the spike history is that of the records kept, as the first pass had it."""
        kept = [r for r in records if not r.get("skipped")]
        self.losses = deque((r["loss"] for r in kept if r.get("phase") != "rl"), maxlen=self.f.spike_window)
        self.norms = deque((r["grad_norm"] for r in kept), maxlen=self.f.spike_window)

    def observe(self, step_time_s: float) -> None:
        if self.fresh:
            self.fresh = False
        else:
            self.step_times.append(step_time_s)

    # ---- collecting one step
    def collect(self, devices: "DeviceGroup", refs: list[Any], step: int, started: float,
                deadline_s: float | None = None) -> list["StepReport"]:
        """Each device's result (rank order), or StepFailure naming who failed. `deadline_s`: the seconds allowed
        instead of the learned step deadline (work that is no training step, e.g. held-out accuracy)."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, Exception] = {}
        hung: dict[int, str] = {}
        deadline = started + (self.deadline() if deadline_s is None else deadline_s)
        probed = False
        while pending:
            if errors:
                deadline = min(deadline, time.perf_counter() + self.settle_s)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                if errors or probed:
                    break
                probed = True  # the deadline passed and nothing failed: find who stopped, stop it
                hung = self._find_hung(devices, sorted(pending.values()), step)
                for rank, detail in hung.items():
                    log.warning("step %d: device %d hangs (%s); killing it", step, rank, detail)
                    ray.kill(devices.actors[rank], no_restart=True)
                deadline = time.perf_counter() + self.settle_s
                continue
            ref = ready[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[rank] = e
                if isinstance(e, RayTaskError) and not _collateral(e):
                    ray.kill(devices.actors[rank], no_restart=True)  # its peers' collectives now fail fast
        if not errors and not pending:
            return [results[r] for r in range(len(refs))]
        detect_s = time.perf_counter() - started
        now = time.time()
        incidents = []
        for rank, e in sorted(errors.items()):
            if rank in hung:
                kind, detail = IncidentKind.HANG, hung[rank]
            elif isinstance(e, RayActorError):
                kind, detail = IncidentKind.DEAD, last_line(e)
            elif _collateral(e):
                continue
            else:
                kind, detail = IncidentKind.CRASH, last_line(e)
            incidents.append(Incident(step, kind, rank, devices.node_of(rank), now, detail, detect_s=detect_s))
        for rank in sorted(pending.values()):  # still inside the step well after a peer failed
            ray.kill(devices.actors[rank], no_restart=True)
            incidents.append(Incident(step, IncidentKind.HANG, rank, devices.node_of(rank), now,
                                      hung.get(rank, "no answer after a peer failed"), detect_s=detect_s))
        if not incidents:  # only collective errors: the failing peer could not be told apart; replace none
            incidents.append(Incident(step, IncidentKind.COLLECTIVE, -1, None, now, last_line(next(iter(errors.values()))),
                                      detect_s=detect_s))
        raise StepFailure(step, incidents, started)

    def _find_hung(self, devices: "DeviceGroup", ranks: list[int], step: int) -> dict[int, str]:
        """Devices still in `step` past its deadline that are not waiting inside a collective (or do not answer
        at all); when every one of them waits inside a collective, all of them."""
        asks = {devices.actors[r].progress.remote(): r for r in ranks}
        ready, _ = ray.wait(list(asks), num_returns=len(asks), timeout=2.0)
        hung = {}
        for ref, rank in asks.items():
            if ref not in ready:
                hung[rank] = "does not answer (its process is stuck)"
                continue
            try:
                where = ray.get(ref)
            except (RayActorError, RayTaskError):
                continue  # died meanwhile: the step's own result reports it
            if where["step"] != step or not where["in_collective"]:
                hung[rank] = f"stopped outside any collective: {where['phase']} for {where['for_s']:.1f}s"
        if not hung:
            hung = {r: "every device waits inside a collective" for r in ranks}
        return hung

    # ---- inspecting a completed step
    def inspect(self, step: int, reports: list["StepReport"], devices: "DeviceGroup") -> list[Incident]:
        """Incidents of a step that completed: non-finite or spiking values, stragglers."""
        r0, now, out = reports[0], time.time(), []
        if r0.skipped == "nonfinite":
            bad = [r.rank for r in reports if r.local_nonfinite]
            rank = bad[0] if len(bad) == 1 else -1
            out.append(Incident(step, IncidentKind.NAN, rank, devices.node_of(rank) if rank >= 0 else None, now,
                                f"non-finite loss {r0.loss} / grad norm {r0.grad_norm}; the update was not applied"))
        else:
            # an RL step's policy loss is centred on 0: no loss spikes (its report's extra holds the policy's numbers;
            # other steps' extra, e.g. anticipatory routing's flags, leave them judged)
            rl = "clip_frac" in (getattr(r0, "extra", None) or {})
            guard = self.guard(rl) or {}
            for kind, value, limit in ((IncidentKind.LOSS_SPIKE, r0.loss, guard.get("max_loss")),
                                       (IncidentKind.GRAD_SPIKE, r0.grad_norm, guard.get("max_grad_norm"))):
                if r0.skipped == kind or (limit and value > limit):
                    out.append(Incident(step, kind, -1, None, now, f"{value:.4g} above {limit:.4g} "
                                        f"(factor x median of the last {len(self.losses)} steps)"))
            if not out:
                if not rl:
                    self.losses.append(r0.loss)
                self.norms.append(r0.grad_norm)
        if len(reports) > 1:
            out += self._stragglers(step, reports, devices, now)
        return out

    def guard(self, policy_loss: bool = False) -> dict[str, float] | None:
        """Spike ceilings the devices enforce (the update of a step above them is not applied); for an RL step
        (`policy_loss`: centred on 0, either sign) the gradient norm's only."""
        enough = max(10, self.f.spike_window // 2)  # early training is too volatile to judge
        loss, norm = recent_median(self.losses, enough), recent_median(self.norms, enough)
        if norm is None or (loss is None and not policy_loss):
            return None
        out = {"max_grad_norm": self.f.grad_spike_factor * norm}
        if not policy_loss:
            out["max_loss"] = self.f.loss_spike_factor * loss
        return out

    def straggler_due(self) -> bool:
        """Can the next step inspected name a straggler (a device slow `straggler_patience - 1` steps in a row; with
        a patience of 1, any device in any step)?"""
        return self.f.straggler_patience <= 1 or self.f.straggler_patience - 1 in self.slow_count.values()

    def _stragglers(self, step: int, reports: list["StepReport"], devices: "DeviceGroup", now: float) -> list[Incident]:
        pairs = against_others(own_work([r.compute_time_s for r in reports], [r.collective_s for r in reports]))
        out = []
        for r in reports:
            mine, others = pairs[r.rank]
            if mine > self.f.straggler_factor * others and mine - others > self.f.straggler_min_s:
                self.slow_count[r.rank] = self.slow_count.get(r.rank, 0) + 1
                if self.slow_count[r.rank] == self.f.straggler_patience:  # once per episode: until it catches up
                    out.append(Incident(step, IncidentKind.SLOW, r.rank, devices.node_of(r.rank), now,
                                        f"own work {mine:.3f}s vs {others:.3f}s on the others, "
                                        f"{self.f.straggler_patience} steps in a row"))
            else:
                self.slow_count[r.rank] = 0
        return out


def _collateral(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in _COLLATERAL)

