"""Recovery, the mechanism: carries out a Healer's Decision (healer.py is the policy; it never calls back). Replace
the devices the decision names (re-forming the process group), put every device back to the newest state there
is (an in-memory snapshot, else the newest committed checkpoint, else the run's initial state), retried with
exponential backoff (tenacity), then rewind the run's history, its logs and listeners to that step. Also the
loads it shares with the start of a run (the checkpoint a run resumes from) and with live expert re-placement
(experts taken from the newest snapshot). Every wait has a deadline (faults.recovery_timeout_s and the like)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable

from ray.exceptions import RayActorError
from tenacity import (Retrying, retry_if_exception_type, retry_if_not_exception_type, stop_after_attempt,
                      wait_exponential)

from orchestrator.checkpoint.coordinator import Checkpoints
from orchestrator.checkpoint.manager import CheckpointManifest
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.timeline import ResumePlan
from orchestrator.config import Config, mesh_shape
from orchestrator.device.group import DeviceGroup, get
from orchestrator.errors import RunError, StateMismatch
from orchestrator.experts.balancer import Balancer, Placement, placement_from_manifest
from orchestrator.healing.healer import Decision, Healer
from orchestrator.healing.watch import Watch
from orchestrator.monitoring.goodput import Goodput
from orchestrator.monitoring.history import RunHistory
from orchestrator.monitoring.listeners import Listeners

log = logging.getLogger(__name__)

Recover = Callable[[list[int], bool, float], tuple[int, str]]   # (replace, reform, timeout_s) -> (step, source)
Build = Callable[[Any, float, str], None]                        # (ranks, timeout_s, what): shards built


class Recovery:
    """Carries out recoveries for one run. `build` has devices build their initial shards (the driver's: it holds
    the data and the settled precision). `resumed_from_step` and `restore_s`: the checkpoint the run resumed from
    and how long loading it took."""

    def __init__(self, cfg: Config, plan: ResumePlan, devices: DeviceGroup, checkpoints: Checkpoints,
                 balancer: Balancer, healer: Healer, watch: Watch, goodput: Goodput, history: RunHistory,
                 listeners: Listeners, build: Build):
        self.cfg, self.plan, self.devices, self.checkpoints = cfg, plan, devices, checkpoints
        self.balancer, self.healer, self.watch, self.goodput = balancer, healer, watch, goodput
        self.history, self.listeners, self.build = history, listeners, build
        self.resumed_from_step: int | None = None
        self.restore_s: float | None = None
        self.at_most: int | None = None   # while a Decision with at_most is carried out (restore_state)

    @property
    def actors(self) -> list[Any]:
        return self.devices.actors

    def carry_out(self, d: Decision, last_step: int, recover: Recover) -> int:
        """Carry out `d` (the run's newest kept step: `last_step`) with `recover` (Driver.recover, which a test
        may override), retried with exponential backoff; then rewind to the step recovered. That step."""
        f = self.cfg.faults
        if d.wait_snapshot:  # of the step just kept, by the devices being replaced too: nothing is recomputed
            items = self.checkpoints.snapshots.items
            if not items or items[-1].step != last_step:
                self.snapshot(last_step, always=True)
            self.checkpoints.snapshots.wait_newest(f.recovery_timeout_s)
        replace, reform, t0 = list(d.replace), d.reform, time.perf_counter()
        self.at_most = d.at_most   # restore_state goes back to a state at or before it

        def attempt() -> tuple[int, str]:
            nonlocal replace, reform
            try:
                return recover(replace, reform, f.recovery_timeout_s)
            except (RunError, RayActorError):
                replace, reform = sorted(set(replace) | set(self.devices.dead_ranks())), True
                raise

        def backoff(seconds: float) -> None:
            self.goodput.backoff += seconds
            time.sleep(seconds)

        retrying = Retrying(stop=stop_after_attempt(f.recovery_attempts), reraise=True, sleep=backoff,
                            wait=wait_exponential(multiplier=f.retry_backoff_s, min=f.retry_backoff_s),
                            retry=retry_if_exception_type((RunError, RayActorError))
                            & retry_if_not_exception_type(StateMismatch),   # a state that does not fit stays so
                            before_sleep=lambda s: log.warning("recovery attempt %d failed (%s); retrying",
                                                               s.attempt_number, s.outcome.exception()))
        try:
            step, source = retrying(attempt)
        except StateMismatch as e:
            raise self.healer.unrestorable(last_step, e) from e
        except (RunError, RayActorError) as e:
            raise self.healer.recovery_failed(f.recovery_attempts, e) from e
        finally:
            self.at_most = None   # only this decision's restore is limited
        self.healer.recovered(d, step, source, time.perf_counter() - t0)
        self.rewind(step)
        return step

    def recover(self, replace: list[int], reform: bool, timeout_s: float) -> tuple[int, str]:
        """Replace the devices in `replace` (re-forming the group when `reform`) and put every device back to the
        newest state it can (restore_state). Returns (step of that state, where it came from)."""
        t0 = time.perf_counter()
        self.devices.replace(replace, timeout_s)
        if reform:
            survivors = [a for rank, a in enumerate(self.actors) if rank not in replace]
            get([a.leave_group.remote() for a in survivors], timeout_s, "leave the broken process group")
        t1 = time.perf_counter()
        self.goodput.actor_start += t1 - t0
        if reform:
            self.devices.form_group()
        t2 = time.perf_counter()
        self.build(replace, timeout_s, "build the replacement shards")
        t3 = time.perf_counter()
        step, source = self.restore_state(timeout_s)
        t4 = time.perf_counter()
        self.goodput.restore += t4 - t1
        log.info("recovery: actors %.2fs, process group %.2fs, build %.2fs, state from the %s %.2fs",
                 t1 - t0, t2 - t1, t3 - t2, source, t4 - t3)
        self.watch.fresh = True
        self.watch.slow_count.clear()   # replaced devices start a new episode
        return step, source

    def restore_state(self, timeout_s: float) -> tuple[int, str]:
        """The newest state every device can go back to: the newest complete in-memory snapshot that can still be
        read (one lost with its node: the one before), else the newest committed checkpoint that verifies, else the
        initial state. One that does not fit the model (StateMismatch) ends the recovery there: an older state of
        the same run would not fit either, and the run's progress is not thrown away in silence. While a decision
        with `at_most` is carried out, only states of that step or before count."""
        at_most = self.at_most   # a decision's limit (Decision.at_most): that step's state or an older one
        snap = self.checkpoints.snapshots.restore(self.actors, timeout_s, replacing=self.balancer.enabled,
                                                  ep=mesh_shape(self.cfg)[0], at_most=at_most)
        if snap is not None:
            self.balancer.placement = snap.placement  # the placement of that step: a replay re-plans as before
            moved = (self.history.find(snap.step) or {}).get("replacement")
            if moved and moved["placement"] != snap.placement:
                # the snapshot taken just after this step's re-placement was lost: make the same move again
                self.move_experts(snap.step, moved["placement"])
            return snap.step, "snapshot"
        for step, storage, manifest in self.checkpoints.committed_newest_first():
            if at_most is not None and step > at_most:
                continue
            self.load(storage, manifest, timeout_s)
            self.snapshot(step)
            return step, "checkpoint"
        log.warning("no snapshot or checkpoint of this run to restore; going back to the state it started from")
        self.balancer.reset()
        self.build(range(self.cfg.cluster.num_devices), timeout_s, "rebuild the initial shards")
        step = self.resume()
        self.snapshot(step)
        return step, "initial"

    def resume(self) -> int:
        """Load the checkpoint the run resumes from (if any) into every device; the last completed step."""
        plan = self.plan
        if plan.manifest is None:
            return 0
        t0 = time.perf_counter()
        self.load(plan.storage, plan.manifest, self.cfg.cluster.start_timeout_s)
        self.resumed_from_step = plan.step
        self.restore_s = time.perf_counter() - t0
        log.info("resumed from %s (step %d, saved by %d devices, now %d) in %.2fs", plan.storage.shown, plan.step,
                 plan.manifest.world_size, self.cfg.cluster.num_devices, self.restore_s)
        return plan.step

    def load(self, storage: Storage, manifest: CheckpointManifest, timeout_s: float) -> None:
        """Every device loads its part of a checkpoint; with re-placement or replicas on, in the placement it was
        saved with (when it had as many devices and slots), else the initial one."""
        placement, world = None, self.cfg.cluster.num_devices
        if self.balancer.enabled:
            placement = (placement_from_manifest(manifest.expert_files, world, self.balancer.slots, manifest.placement)
                         or self.balancer.initial())
        get([a.load.remote(storage.uri, asdict(manifest), placement) for a in self.actors], timeout_s,
            f"load checkpoint {storage.shown}")
        self.balancer.placement = placement

    def replace_experts(self, step: int) -> dict[str, Any] | None:
        """Live expert re-placement between two steps: plan; if worth it, every device adopts the new placement and
        takes the experts it now holds (weights and AdamW moments) from the snapshot of this step, which every
        device has just taken; then a snapshot in the new placement. Nothing restarts, the math is unchanged."""
        plan = self.balancer.plan(list(self.history))
        if plan is None:
            return None
        new, before, after = plan
        t0 = time.perf_counter()
        items = self.checkpoints.snapshots.items
        if not items or items[-1].step != step:
            self.snapshot(step, always=True)
        self.move_experts(step, new)
        seconds = time.perf_counter() - t0
        log.info("step %d: experts re-placed in %.2fs; planned device max/mean load %.3f -> %.3f", step, seconds,
                 before, after)
        return {"seconds": seconds, "device_imbalance_before": before, "device_imbalance_planned": after,
                "placement": new}

    def forget(self, step: int, alerts: Any) -> None:
        """After a kept `step`: what no rewind can go back to any more (before the oldest in-memory snapshot) leaves
        the history's window and the alert rules' memory. (A rewind goes back to an in-memory snapshot; rarely,
        snapshots lost with their node, to the newest committed checkpoint, whose totals are then read back from
        metrics.jsonl: RunHistory.rewind.)"""
        first = self.history.first
        floor = min([s.step for s in self.checkpoints.snapshots.items] + [step])
        self.history.forget(floor)
        alerts.forget(floor, {first - 1}, min(floor, max(self.checkpoints.committed_steps, default=first - 1)))

    def move_experts(self, step: int, new: Placement) -> None:
        """Every device adopts `new` and takes its experts from the newest snapshot (of `step`); then a snapshot in
        the new placement."""
        refs = self.checkpoints.snapshots.newest_refs
        try:
            get([a.restore_snapshots.remote(*refs, placement=new) for a in self.actors],
                self.cfg.cluster.step_timeout_s, f"move experts to their new devices after step {step}")
        except StateMismatch as e:   # as in a recovery: an incident, an alert, the run stops
            raise self.healer.unrestorable(step, e) from e
        self.balancer.placement = new
        self.snapshot(step, always=True)

    def snapshot(self, step: int, always: bool = False) -> None:
        """In-memory snapshot of every device after `step`; unless `always`, only when healing is on."""
        if always or self.cfg.faults.snapshot_every:
            self.checkpoints.snapshot(step, self.actors, self.balancer.placement)

    def rewind(self, back: int) -> None:
        """Continue after step `back`: the history's later records go, metrics.jsonl (and the sinks) and the alert
        rules go back (replayed steps are recorded once, when they complete); a window emptied by a rewind deeper
        than it is read back from the log; the Watch relearns from it."""
        self.history.rewind(back)
        self.listeners.rewind(back)
        self.history.refill()
        self.watch.rebuild(self.history)
