"""The night watch: planned faults (Injector), failure detection (Watch), recovery (Healer).

A step is a transaction. When a step fails anywhere, the Watch waits for every device's outcome and
sorts them: devices that died (Ray reports the actor dead), devices whose step raised an error of
their own (a crash), and devices that only failed because a peer vanished from a collective
(collateral). A crashed device is killed at once, so its peers' collectives fail fast instead of
waiting for the collective timeout. The Healer then replaces only the dead and crashed devices
(new actors in the same placement-group bundles; survivors keep their processes and memory),
re-forms the process group, puts every device back to the newest in-memory snapshot (owned by the
driver in the object store, so it outlives the device that took it), and the loop replays from the
step after it. Steps are pure functions of (state, step), so the replay computes what the lost
steps would have computed: the run ends bit-identical to a fault-free one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import FaultConfig
from orchestrator.errors import RunError

if TYPE_CHECKING:
    from orchestrator.driver import Driver

log = logging.getLogger(__name__)

# Errors a device raises only because a peer left a collective: the peer is the failure, not this device.
_COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "Broken pipe",
               "connection refused", "Socket Timeout", "ProcessGroupGloo")


@dataclass
class Incident:
    step: int
    kind: str            # dead | crash | hang
    rank: int
    node: str | None
    time: float
    detail: str
    detect_s: float = 0.0    # from the step's start to the failure being known
    recover_s: float = 0.0   # from detection to the devices being ready to replay
    rewound_to: int = -1     # the snapshot step everyone went back to; steps recomputed = step - 1 - rewound_to


class StepFailure(Exception):
    def __init__(self, step: int, incidents: list[Incident], started: float):
        super().__init__(f"step {step} failed: " + "; ".join(f"device {i.rank} {i.kind}: {i.detail}" for i in incidents))
        self.step, self.incidents, self.started = step, incidents, started


class Injector:
    """Fires the planned faults of `faults.plan`, each once, just before its step."""

    def __init__(self, cfg: FaultConfig):
        self.plan = list(cfg.plan)
        self.fired: set[int] = set()

    def before_step(self, driver: "Driver", step: int) -> None:
        for i, fault in enumerate(self.plan):
            if fault.step == step and i not in self.fired:
                self.fired.add(i)
                log.warning("injecting fault: %s on device %d at step %d", fault.kind, fault.rank, step)
                driver.actors[fault.rank].inject.remote(fault.kind)


class Watch:
    """Collects a step's reports; on failure, classifies every device and raises StepFailure."""

    def __init__(self, settle_s: float = 30.0):
        self.settle_s = settle_s  # how long peers get to fail after the first failure

    def collect(self, driver: "Driver", refs: list[Any], step: int, timeout_s: float) -> list[Any]:
        started = time.perf_counter()
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, Exception] = {}
        deadline = started + timeout_s
        while pending:
            if errors:
                deadline = min(deadline, time.perf_counter() + self.settle_s)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            ref = ready[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[rank] = e
                if isinstance(e, RayTaskError) and not _collateral(e):
                    ray.kill(driver.actors[rank], no_restart=True)  # its peers' collectives now fail fast
        if not errors and not pending:
            return [results[r] for r in range(len(refs))]
        if not errors:
            raise RunError(f"timed out after {timeout_s:.0f}s waiting for the devices to run step {step}")
        now = time.time()
        incidents = []
        for rank, e in sorted(errors.items()):
            if isinstance(e, RayActorError):
                kind = "dead"
            elif _collateral(e):
                continue
            else:
                kind = "crash"
            incidents.append(Incident(step, kind, rank, driver.node_of(rank), now, _short(e),
                                      detect_s=time.perf_counter() - started))
        for rank in sorted(pending.values()):  # still inside the step well after a peer failed
            ray.kill(driver.actors[rank], no_restart=True)
            incidents.append(Incident(step, "hang", rank, driver.node_of(rank), now, "no answer after a peer failed",
                                      detect_s=time.perf_counter() - started))
        if not incidents:  # only collective errors: the failing peer could not be told apart; replace none
            incidents.append(Incident(step, "collective", -1, None, now, _short(next(iter(errors.values()))),
                                      detect_s=time.perf_counter() - started))
        raise StepFailure(step, incidents, started)


def _collateral(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in _COLLATERAL)


def _short(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


@dataclass
class Healer:
    """Recovery policy: replace failed devices, rewind everyone to the newest snapshot, replay.

    Stops the run (RunError with the incident list) once `max_recoveries` is spent: a restart loop
    is worse than a stop.
    """
    cfg: FaultConfig
    incidents: list[Incident] = field(default_factory=list)
    recoveries: int = 0

    def heal(self, driver: "Driver", failure: StepFailure) -> int:
        self.incidents.extend(failure.incidents)
        if self.cfg.snapshot_every == 0:
            raise RunError(f"{failure} (healing is off: faults.snapshot_every=0)")
        if self.recoveries >= self.cfg.max_recoveries:
            raise RunError(f"{failure}; stopping: {self.recoveries} recoveries already, the budget "
                           f"(faults.max_recoveries={self.cfg.max_recoveries}) is spent. Incidents: "
                           + "; ".join(f"step {i.step} device {i.rank} {i.kind}" for i in self.incidents))
        self.recoveries += 1
        t0 = time.perf_counter()
        replace = sorted({i.rank for i in failure.incidents if i.kind in ("dead", "crash", "hang")})
        log.warning("step %d failed (%s); replacing device(s) %s", failure.step,
                    ", ".join(f"{i.rank}:{i.kind}" for i in failure.incidents), replace or "none")
        step = driver.recover(replace, timeout_s=self.cfg.recovery_timeout_s)
        for incident in failure.incidents:
            incident.recover_s, incident.rewound_to = time.perf_counter() - t0, step
        log.warning("recovered in %.2fs; replaying from step %d", time.perf_counter() - t0, step + 1)
        return step

    def report(self) -> list[dict[str, Any]]:
        return [asdict(i) for i in self.incidents]


__all__ = ["Incident", "StepFailure", "Injector", "Watch", "Healer"]
