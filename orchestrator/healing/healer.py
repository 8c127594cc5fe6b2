"""Recovery policy: the Healer takes observations (failed and completed steps, alerts, failed checkpoints) and
returns a Decision for the driver to carry out; it never calls back into the driver."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.config import Config
from orchestrator.errors import RunError, last_line
from orchestrator.healing.incidents import REPLACE, Incident, IncidentKind, StepFailure

if TYPE_CHECKING:
    from orchestrator.device.actor import StepReport

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- policy
# Incidents of a completed step's values, each with the faults.* setting that says what its skipped step does
# (rollback | skip); one whose update was applied (a spike under the ceiling's guard off) is only recorded.
VALUE_POLICY = {IncidentKind.NAN: "on_nonfinite", IncidentKind.LOSS_SPIKE: "on_spike",
                IncidentKind.GRAD_SPIKE: "on_spike"}

@dataclass
class Decision:
    """A recovery for the driver to carry out: replace the devices of `replace` (re-forming the process group when
    `reform`), put every device back to the newest state there is, replay after it. With `skip`, the replay skips
    that step's batch; with `wait_snapshot`, the snapshot of the step just kept is complete first (nothing is
    recomputed); with `anticipate` (a spike's step), anticipatory routing is on from the replay on. The incidents' `action` is set to `action` once it is done."""
    incidents: list[Incident]
    replace: list[int] = field(default_factory=list)
    reform: bool = False
    action: str = "replaced"
    skip: int | None = None
    wait_snapshot: bool = False
    anticipate: int | None = None
    at_most: int | None = None    # back to the newest state at or before this step (None: the newest there is)


class Healer:
    """Recovery policy: observations in (failed steps, completed steps with incidents, alerts, failed checkpoints),
    decisions out (a Decision to carry out, None to go on, or a RunError when the run must stop). It never touches
    a device or the driver. Every incident it sees ends up in `incidents` (new ones: `take_new`).

    The budget: at most `faults.max_recoveries` recoveries within any `faults.recovery_window_s` seconds (0: over
    the whole run), as torchft and NVIDIA's resiliency extension bound restarts per time window, so a long run
    with isolated faults goes on while a restart loop stops; and a step failing `faults.max_repeats` times stops."""

    def __init__(self, cfg: Config, clock=time.monotonic):
        self.f = cfg.faults
        self.anticipatory_delay = cfg.balance.anticipatory_delay
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

    def failed_behind(self, failure: StepFailure, replacing: list[int]) -> Decision:
        """The step queued behind a failed one (the pipelined driver's next step) failed too: the devices that
        failed in it and are not being replaced already are replaced with them, their incidents recorded; the
        failure that made the queued step fail is the one fault, and spends the one recovery (no second one here)."""
        new = [i for i in failure.incidents if i.kind in REPLACE and i.rank >= 0 and i.rank not in replacing]
        self._record(new)
        if new:
            log.warning("step %d, queued behind the failed step, failed on device(s) %s too", failure.step,
                        sorted({i.rank for i in new}))
        return Decision(new, sorted({i.rank for i in new}), reform=True)

    def died_at_end(self, step: int, dead: list[int], node_of) -> Decision:
        """Devices found dead after the last step (`node_of`: a rank's node): heal the group as for a failed step,
        so that the final checkpoint and validation have every device."""
        now = time.time()
        incidents = [Incident(step, IncidentKind.DEAD, r, node_of(r), now,
                              "died at the end of the run (final checkpoint, validation ahead)") for r in dead]
        return self.failed_step(StepFailure(step, incidents, time.perf_counter()))

    def completed_step(self, step: int, reports: list["StepReport"], incidents: list[Incident]) -> Decision | None:
        """A completed step with incidents. None: keep the step; else a rollback to carry out."""
        self._record(incidents)
        skipped = reports[0].skipped
        for i in incidents:
            knob = VALUE_POLICY.get(i.kind)
            if knob is None:
                continue
            if skipped or i.kind == IncidentKind.NAN:   # a NaN step is skipped by the devices whatever the policy
                policy = getattr(self.f, knob)
                if policy == "rollback" and step not in self.rolled_back:
                    self.rolled_back.add(step)
                    self._spend(step, f"step {step}: {i.detail}")
                    log.warning("step %d: %s; rolling back to the last snapshot", step, i.detail)
                    return Decision([i], action="rolled back")
                i.action = "skipped"
                log.warning("step %d: %s; the batch is skipped%s", step, i.detail,
                            " (it repeated after a rollback)" if policy == "rollback" else "")
            else:   # a spike whose update was applied
                i.action = "recorded"
                log.warning("step %d: %s", step, i.detail)
        return None

    def alert(self, step: int, rule: str, action: str, detail: str) -> Decision | None:
        """An alert rule's action on a completed step: stop the run, or rewind to the newest snapshot (rollback;
        skip also has the step's batch skipped on the replay; anticipate has the replay and the steps after it route
        anticipatorily). Once per step: a replay that fires again is kept."""
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
        then = {"skip": ", then skipping its batch", "anticipate": ", then routing anticipatorily"}.get(action, "")
        log.warning("step %d: alert %s (%s); rolling back%s", step, rule, detail, then)
        done = {"skip": "skipped", "anticipate": "rolled back, anticipatory routing on"}.get(action, "rolled back")
        # anticipate: back far enough that the replay computes the spike step's routing with the parameters of
        # anticipatory_delay steps before it (the snapshot of step - 1 has only the parameters of that step)
        return Decision([incident], action=done, skip=step if action == "skip" else None,
                        anticipate=step if action == "anticipate" else None,
                        at_most=step - 1 - self.anticipatory_delay if action == "anticipate" else None)

    def stragglers(self, step: int, incidents: list[Incident], spare_elsewhere: set[int]) -> Decision | None:
        """After a kept step (and its snapshot): replace straggling devices per `faults.on_straggler`, only with a
        warm standby on another node (`spare_elsewhere`: the ranks one exists for); a slow node's own bundle
        would put the replacement back on the slow node. Otherwise the straggler is recorded (and alerted)."""
        slow = [i for i in incidents if i.kind == IncidentKind.SLOW]
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

    def rollout_failed(self, step: int, rank: int, detail: str) -> None:
        """A separate pool's rollout worker failed in `step`: the pool replaced it and generated its prompts again
        (rl/rollout.py); the step goes on, the same. Recorded, nothing to decide."""
        self._record([Incident(step, IncidentKind.ROLLOUT, rank, None, time.time(), detail, action="replaced")])

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
        incident = Incident(step, IncidentKind.RESTORE, -1, None, time.time(), last_line(error), action="stopped")
        self._record([incident])
        return self._stop(f"step {step}: recovery cannot restore the run's state ({last_line(error)}); stopping "
                          f"rather than replaying from an older state")

    def checkpoint_failed(self, step: int, detail: str, current_step: int, ranks: list[int] = ()) -> None:
        """A checkpoint did not commit: retry after 1, 2, 4 ... steps; stop after checkpoint_retries in a row."""
        self.checkpoint_failures += 1
        rank = ranks[0] if len(ranks) == 1 else -1
        incident = Incident(step, IncidentKind.CHECKPOINT, rank, None, time.time(), detail, action="retried")
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

    def checkpoints_settled(self, committed: list[int], failed: list[Any], current_step: int) -> None:
        """What became of the checkpoints in flight (checkpoint/events.py Settled): a commit resets the retries,
        each failure (a CheckpointFailure: step, detail, ranks) is retaken later or stops the run."""
        if committed:
            self.checkpoint_committed()
        for f in failed:
            self.checkpoint_failed(f.step, f.detail, current_step, f.ranks)

    def report(self) -> list[dict[str, Any]]:
        return [asdict(i) for i in self.incidents]

