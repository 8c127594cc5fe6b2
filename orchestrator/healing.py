"""The night watch: fault plans (Injector), detection (Watch), and the recovery policy (Healer).

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
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import Config, FaultSpec
from orchestrator.detectors import against_others, own_work, recent_median
from orchestrator.errors import RunError, last_line

if TYPE_CHECKING:
    from orchestrator.device import StepReport
    from orchestrator.device_group import DeviceGroup

log = logging.getLogger(__name__)

# Errors a device raises only because a peer left a collective: the peer is the failure, not this device.
_COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "Broken pipe",
               "connection refused", "Socket Timeout", "ProcessGroupGloo")
REPLACE = ("dead", "crash", "hang", "slow")   # incident kinds healed by replacing the device


@dataclass
class Incident:
    step: int
    kind: str            # dead | crash | hang | collective | slow | nan | loss_spike | grad_spike | checkpoint |
                         # restore
    rank: int            # -1: not one device
    node: str | None
    time: float
    detail: str
    detect_s: float = 0.0    # from the step's start to the failure being known
    recover_s: float = 0.0   # from detection to the devices being ready to replay
    rewound_to: int = -1     # the step everyone went back to; steps recomputed = step - 1 - rewound_to
    action: str = ""         # replaced | rolled back | skipped | recorded | retried | stopped
    source: str = ""         # what state was restored from: snapshot | checkpoint | initial


class StepFailure(Exception):
    def __init__(self, step: int, incidents: list[Incident], started: float):
        super().__init__(f"step {step} failed: " + "; ".join(f"device {i.rank} {i.kind}: {i.detail}" for i in incidents))
        self.step, self.incidents, self.started = step, incidents, started


# --------------------------------------------------------------------------- plans
def plan_faults(cfg: Config) -> list[FaultSpec]:
    """The run's faults: `faults.plan` plus, with chaos on, random ones; random ranks drawn. Same seed, same faults."""
    f, world, steps = cfg.faults, cfg.cluster.num_devices, cfg.train.steps
    rng = random.Random(f.chaos.seed)
    plan = [FaultSpec(**{**asdict(s), "rank": rng.randrange(world) if s.rank < 0 else s.rank}) for s in f.plan]
    ch = f.chaos
    if ch.mean_steps_between:
        taken = {s.step for s in plan}
        step = ch.first_step - 1
        while True:
            step += max(1, round(rng.expovariate(1.0 / ch.mean_steps_between)))
            if step > steps:
                break
            if step in taken:
                continue
            kind = rng.choice(list(ch.kinds))
            plan.append(FaultSpec(kind=kind, step=step, rank=rng.randrange(world), steps=ch.slow_steps,
                                  delay_s=ch.slow_delay_s))
    return sorted(plan, key=lambda s: (s.step or 0, s.after_s))


class Injector:
    """Fires each planned fault just before its step (or the first step after its time), `repeat` times."""

    def __init__(self, plan: list[FaultSpec]):
        self.plan = plan
        self.fired: list[dict[str, Any]] = []
        self._count: dict[int, int] = {}
        self.t0: float | None = None

    def due(self, step: int) -> list[FaultSpec]:
        """The faults that strike in `step` (each recorded in `fired`); the driver makes them happen."""
        if self.t0 is None:
            self.t0 = time.perf_counter()
        elapsed = time.perf_counter() - self.t0
        due = []
        for i, fault in enumerate(self.plan):
            if self._count.get(i, 0) >= fault.repeat:
                continue
            if fault.step != step and (fault.step or elapsed < fault.after_s):
                continue
            if not fault.step:
                fault.step = step  # a timed fault repeats at the step it first struck
            self._count[i] = self._count.get(i, 0) + 1
            log.warning("injecting fault: %s on device %d at step %d", fault.kind, fault.rank, step)
            self.fired.append({"step": step, "kind": fault.kind, "rank": fault.rank, "time": time.time()})
            due.append(fault)
        return due


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
        self.losses = deque((r["loss"] for r in kept), maxlen=self.f.spike_window)
        self.norms = deque((r["grad_norm"] for r in kept), maxlen=self.f.spike_window)

    def observe(self, step_time_s: float) -> None:
        if self.fresh:
            self.fresh = False
        else:
            self.step_times.append(step_time_s)

    # ---- collecting one step
    def collect(self, devices: "DeviceGroup", refs: list[Any], step: int, started: float) -> list["StepReport"]:
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, Exception] = {}
        hung: dict[int, str] = {}
        deadline = started + self.deadline()
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
                kind, detail = "hang", hung[rank]
            elif isinstance(e, RayActorError):
                kind, detail = "dead", last_line(e)
            elif _collateral(e):
                continue
            else:
                kind, detail = "crash", last_line(e)
            incidents.append(Incident(step, kind, rank, devices.node_of(rank), now, detail, detect_s=detect_s))
        for rank in sorted(pending.values()):  # still inside the step well after a peer failed
            ray.kill(devices.actors[rank], no_restart=True)
            incidents.append(Incident(step, "hang", rank, devices.node_of(rank), now,
                                      hung.get(rank, "no answer after a peer failed"), detect_s=detect_s))
        if not incidents:  # only collective errors: the failing peer could not be told apart; replace none
            incidents.append(Incident(step, "collective", -1, None, now, last_line(next(iter(errors.values()))),
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
            out.append(Incident(step, "nan", rank, devices.node_of(rank) if rank >= 0 else None, now,
                                f"non-finite loss {r0.loss} / grad norm {r0.grad_norm}; the update was not applied"))
        else:
            guard = self.guard() or {}
            for kind, value, limit in (("loss_spike", r0.loss, guard.get("max_loss")),
                                       ("grad_spike", r0.grad_norm, guard.get("max_grad_norm"))):
                if r0.skipped == kind or (limit and value > limit):
                    out.append(Incident(step, kind, -1, None, now, f"{value:.4g} above {limit:.4g} "
                                        f"(factor x median of the last {len(self.losses)} steps)"))
            if not out:
                self.losses.append(r0.loss)
                self.norms.append(r0.grad_norm)
        if len(reports) > 1:
            out += self._stragglers(step, reports, devices, now)
        return out

    def guard(self) -> dict[str, float] | None:
        """Spike ceilings the devices enforce (the update of a step above them is not applied)."""
        enough = max(10, self.f.spike_window // 2)  # early training is too volatile to judge
        loss, norm = recent_median(self.losses, enough), recent_median(self.norms, enough)
        if loss is None or norm is None:
            return None
        return {"max_loss": self.f.loss_spike_factor * loss, "max_grad_norm": self.f.grad_spike_factor * norm}

    def _stragglers(self, step: int, reports: list["StepReport"], devices: "DeviceGroup", now: float) -> list[Incident]:
        pairs = against_others(own_work([r.compute_time_s for r in reports], [r.collective_s for r in reports]))
        out = []
        for r in reports:
            mine, others = pairs[r.rank]
            if mine > self.f.straggler_factor * others and mine - others > self.f.straggler_min_s:
                self.slow_count[r.rank] = self.slow_count.get(r.rank, 0) + 1
                if self.slow_count[r.rank] == self.f.straggler_patience:  # once per episode: until it catches up
                    out.append(Incident(step, "slow", r.rank, devices.node_of(r.rank), now,
                                        f"own work {mine:.3f}s vs {others:.3f}s on the others, "
                                        f"{self.f.straggler_patience} steps in a row"))
            else:
                self.slow_count[r.rank] = 0
        return out


def _collateral(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in _COLLATERAL)


# --------------------------------------------------------------------------- policy
@dataclass
class Decision:
    """A recovery for the driver to carry out: replace the devices of `replace` (re-forming the process group when
    `reform`), put every device back to the newest state there is, replay after it. With `skip`, the replay skips
    that step's batch; with `wait_snapshot`, the snapshot of the step just kept is complete first (nothing is
    recomputed). The incidents' `action` is set to `action` once it is done."""
    incidents: list[Incident]
    replace: list[int] = field(default_factory=list)
    reform: bool = False
    action: str = "replaced"
    skip: int | None = None
    wait_snapshot: bool = False


class Healer:
    """Recovery policy: observations in (failed steps, completed steps with incidents, alerts, failed checkpoints),
    decisions out (a Decision to carry out, None to go on, or a RunError when the run must stop). It never touches
    a device or the driver. Every incident it sees ends up in `incidents` (new ones: `take_new`).

    The budget: at most `faults.max_recoveries` recoveries within any `faults.recovery_window_s` seconds (0: over
    the whole run), as torchft and NVIDIA's resiliency extension bound restarts per time window, so a long run
    with isolated faults goes on while a restart loop stops; and a step failing `faults.max_repeats` times stops."""

    def __init__(self, cfg: Config, clock=time.monotonic):
        self.f = cfg.faults
        self.clock = clock
        self.incidents: list[Incident] = []
        self.recoveries = 0
        self.recovery_times: deque[float] = deque()  # when each recovery within the window was spent
        self.failures_at: dict[int, int] = {}     # step -> times it failed or was rolled back
        self.rolled_back: set[int] = set()
        self.checkpoint_failures = 0              # in a row
        self.checkpoint_retry_at: int | None = None
        self.recovery_steps: list[int] = []       # the step of each recovery spent (the restarts alert counts them)
        self.alerted: set[int] = set()            # steps an alert has rewound (once each)
        self._published = 0

    def _record(self, incidents: list[Incident]) -> None:
        self.incidents.extend(incidents)

    def take_new(self) -> list[Incident]:
        """The incidents decided since the last call (once their action is known)."""
        new = self.incidents[self._published:]
        self._published = len(self.incidents)
        return new

    def _stop(self, why: str) -> RunError:
        listing = "; ".join(f"step {i.step} device {i.rank} {i.kind}" for i in self.incidents)
        return RunError(f"{why}. Incidents: {listing}")

    def _spend(self, step: int, what: str) -> None:
        if self.f.snapshot_every == 0:
            raise self._stop(f"{what} (healing is off: faults.snapshot_every=0)")
        now, window = self.clock(), self.f.recovery_window_s
        while window and self.recovery_times and now - self.recovery_times[0] >= window:
            self.recovery_times.popleft()
        if len(self.recovery_times) >= self.f.max_recoveries:
            within = f" in the last {window:.0f}s" if window else ""
            raise self._stop(f"{what}; stopping: {len(self.recovery_times)} recoveries already{within}, the budget "
                             f"(faults.max_recoveries={self.f.max_recoveries} per faults.recovery_window_s="
                             f"{window:g}) is spent")
        self.failures_at[step] = self.failures_at.get(step, 0) + 1
        if self.failures_at[step] >= self.f.max_repeats:
            raise self._stop(f"{what}; stopping: step {step} failed {self.failures_at[step]} times "
                             f"(faults.max_repeats={self.f.max_repeats}), a fault that repeats is not healed by replaying")
        self.recoveries += 1
        self.recovery_times.append(now)
        self.recovery_steps.append(step)

    def failed_step(self, failure: StepFailure) -> Decision:
        """A failed step: replace the devices that failed, rewind everyone."""
        self._record(failure.incidents)
        try:
            self._spend(failure.step, str(failure))
        except RunError:
            for i in failure.incidents:
                i.action = "stopped"
            raise
        replace = sorted({i.rank for i in failure.incidents if i.kind in REPLACE and i.rank >= 0})
        log.warning("step %d failed (%s); replacing device(s) %s", failure.step,
                    ", ".join(f"{i.rank}:{i.kind}" for i in failure.incidents), replace or "none")
        return Decision(failure.incidents, replace, reform=True)

    def completed_step(self, step: int, reports: list["StepReport"], incidents: list[Incident]) -> Decision | None:
        """A completed step with incidents. None: keep the step; else a rollback to carry out."""
        self._record(incidents)
        skipped = reports[0].skipped
        for i in incidents:
            if i.kind == "nan" or (i.kind in ("loss_spike", "grad_spike") and skipped):
                policy = self.f.on_nonfinite if i.kind == "nan" else self.f.on_spike
                if policy == "rollback" and step not in self.rolled_back:
                    self.rolled_back.add(step)
                    self._spend(step, f"step {step}: {i.detail}")
                    log.warning("step %d: %s; rolling back to the last snapshot", step, i.detail)
                    return Decision([i], action="rolled back")
                i.action = "skipped"
                log.warning("step %d: %s; the batch is skipped%s", step, i.detail,
                            " (it repeated after a rollback)" if policy == "rollback" else "")
            elif i.kind in ("loss_spike", "grad_spike"):
                i.action = "recorded"
                log.warning("step %d: %s", step, i.detail)
        return None

    def alert(self, step: int, rule: str, action: str, detail: str) -> Decision | None:
        """An alert rule's action on a completed step: stop the run, or rewind to the newest snapshot (rollback;
        skip also has the step's batch skipped on the replay). Once per step: a replay that fires again is kept."""
        incident = Incident(step, f"alert:{rule}", -1, None, time.time(), detail)
        self._record([incident])
        if action == "stop":
            incident.action = "stopped"
            raise self._stop(f"step {step}: alert {rule} ({detail}); stopping (its action is stop)")
        if step in self.alerted:
            incident.action = "recorded"
            return None
        self.alerted.add(step)
        self._spend(step, f"step {step}: alert {rule}")
        log.warning("step %d: alert %s (%s); rolling back%s", step, rule, detail,
                    ", then skipping its batch" if action == "skip" else "")
        return Decision([incident], action="skipped" if action == "skip" else "rolled back",
                        skip=step if action == "skip" else None)

    def stragglers(self, step: int, incidents: list[Incident], spare_elsewhere: set[int]) -> Decision | None:
        """After a kept step (and its snapshot): replace straggling devices per `faults.on_straggler`, only with a
        warm standby on another node (`spare_elsewhere`: the ranks one exists for); a slow node's own bundle
        would put the replacement back on the slow node. Otherwise the straggler is recorded (and alerted)."""
        slow = [i for i in incidents if i.kind == "slow"]
        if not slow:
            return None
        movable = [i for i in slow if self.f.on_straggler == "replace" and i.rank in spare_elsewhere]
        for i in slow:
            if i not in movable:
                i.action = "recorded"
                if self.f.on_straggler == "replace":
                    i.detail += "; no warm standby on another node to replace it with (faults.standby)"
                log.warning("step %d: device %d straggles (%s)", step, i.rank, i.detail)
        if not movable:
            return None
        ranks = [i.rank for i in movable]
        try:
            self._spend(step, f"step {step}: straggler device(s) {ranks}")
        except RunError as e:  # a slow device is no reason to stop the run: it stays, recorded and alerted
            for i in movable:
                i.action, i.detail = "recorded", f"{i.detail}; not replaced: {str(e).split('. Incidents')[0]}"
            log.warning("step %d: device(s) %s straggle; not replaced (%s)", step, ranks, e)
            return None
        log.warning("step %d: device(s) %s straggle; replacing them with standbys on other nodes", step, ranks)
        return Decision(movable, ranks, reform=True, wait_snapshot=True)

    def recovered(self, decision: Decision, step: int, source: str, seconds: float) -> None:
        """The driver carried `decision` out: everyone is back at `step` (restored from `source`)."""
        for i in decision.incidents:
            i.recover_s, i.rewound_to, i.source = seconds, step, source
            i.action = i.action or (decision.action if i.rank in decision.replace or not decision.replace else "recorded")
        log.warning("recovered in %.2fs from the %s of step %d; replaying from step %d", seconds, source, step, step + 1)

    def recovery_failed(self, attempts: int, error: Exception) -> RunError:
        return self._stop(f"recovery failed {attempts} times (faults.recovery_attempts={self.f.recovery_attempts}); "
                          f"the last error: {error}")

    def unrestorable(self, step: int, error: Exception) -> RunError:
        """Recovery found a state it cannot restore (StateMismatch: a snapshot or checkpoint that does not fit the
        model). An incident, and the run stops: an older state of the same run would not fit either, and going
        back to step 0 would throw the run's progress away in silence. Its committed checkpoints stay."""
        incident = Incident(step, "restore", -1, None, time.time(), last_line(error), action="stopped")
        self._record([incident])
        return self._stop(f"step {step}: recovery cannot restore the run's state ({last_line(error)}); stopping "
                          f"rather than replaying from an older state")

    def checkpoint_failed(self, step: int, detail: str, current_step: int, ranks: list[int] = ()) -> None:
        """A checkpoint did not commit: retry after 1, 2, 4 ... steps; stop after checkpoint_retries in a row."""
        self.checkpoint_failures += 1
        rank = ranks[0] if len(ranks) == 1 else -1
        incident = Incident(step, "checkpoint", rank, None, time.time(), detail, action="retried")
        if self.checkpoint_failures > self.f.checkpoint_retries:
            incident.action = "stopped"
            self._record([incident])
            raise self._stop(f"{self.checkpoint_failures} checkpoints in a row failed (faults.checkpoint_retries="
                             f"{self.f.checkpoint_retries}); the last: {detail}. Check the storage at checkpoint.dir")
        self._record([incident])
        self.checkpoint_retry_at = current_step + 2 ** (self.checkpoint_failures - 1)
        log.warning("checkpoint at step %d failed (%s); retrying at step %d", step, detail, self.checkpoint_retry_at)

    def checkpoint_committed(self) -> None:
        self.checkpoint_failures, self.checkpoint_retry_at = 0, None

    def report(self) -> list[dict[str, Any]]:
        return [asdict(i) for i in self.incidents]


__all__ = ["Incident", "StepFailure", "Decision", "Injector", "Watch", "Healer", "plan_faults"]
