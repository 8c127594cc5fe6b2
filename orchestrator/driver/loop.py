"""The driver: owns a run and only runs its loop, an explicit state machine (see ARCHITECTURE.md).

RunState: STARTING (prepare(): the run's id, folder and starting point, checked before anything starts; start():
the DeviceGroup and every shard; the checkpoint resumed from loaded; the abandoned timeline retired and the run
directory rewound: start.py) -> STEPPING (planned faults, every actor's train_step collected by the Watch
within a learned deadline; incidents judged by the Healer; a kept step's record to the listeners, its checkpoint
or snapshot) -> RECOVERING (a Healer's Decision carried out by Recovery: replace, restore, rewind; then stepping
again) -> FINISHING (the final checkpoint, healed and retaken if a device dies meanwhile; validation) -> DONE; an
error ends it FAILED. Then the end work, whatever ended the run (end.py: status.json, the devices released,
summary.json, goodput.json, report.html, each as far as it can, with the run's outcome and reason).
Collaborators: Healer (policy), Recovery (mechanism), Checkpoints (written in the background, committed when
every shard is written, whatever later steps do; their commits and failures told by CheckpointEvents, judged by
the Healer), listeners (metrics.jsonl and sinks, incidents.jsonl, alert rules), RunHistory (bounded: a window of
recent records and running totals, never the history), StatusFile (status.json).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from ray.exceptions import RayError

from orchestrator.checkpoint.coordinator import Checkpoints
from orchestrator.checkpoint.events import CheckpointEvents, Settled
from orchestrator.checkpoint.timeline import ResumePlan
from orchestrator.config import Config, FaultSpec
from orchestrator.device.actor import StepReport
from orchestrator.device.group import DeviceGroup
from orchestrator.errors import RunError
from orchestrator.experts.balancer import Balancer
from orchestrator.healing import Decision, Healer, IncidentKind, Injector, StepFailure, Watch, plan_faults
from orchestrator.healing.faults import make_happen
from orchestrator.healing.recovery import Recovery
from orchestrator.monitoring.alerts import AlertEngine, Context
from orchestrator.monitoring.goodput import Goodput
from orchestrator.monitoring.history import RunHistory
from orchestrator.monitoring.listeners import IncidentLog, Listeners
from orchestrator.monitoring.metrics import MetricsStream, flops_per_token, step_record
from orchestrator.monitoring.status import Progress, StatusFile
from orchestrator.monitoring.summary import RunSummary, history_len
from orchestrator.runtime import signals
from orchestrator.runtime.runlock import hold_run
from orchestrator.driver.end import RunEnd, end_work, failure_of, nothing_to_do, raise_failure
from orchestrator.driver.anticipate import Anticipation
from orchestrator.driver.finish import Finish
from orchestrator.driver.start import check_before_start, log_devices, open_monitoring, rewind_run_dir, start_devices

log = logging.getLogger(__name__)


class RunState(str, Enum):
    """Where a run's loop is (the run's outcome in status.json and summary.json is another thing: finished,
    stopped, interrupted, failed)."""
    STARTING = "starting"
    STEPPING = "stepping"
    RECOVERING = "recovering"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"

    def is_terminal(self) -> bool:
        return self in (RunState.DONE, RunState.FAILED)


@dataclass
class InFlight:
    """A step submitted to every device and not collected yet."""
    step: int
    refs: list[Any]     # every device's train_step, rank order
    t0: float           # when it was submitted (perf_counter): the Watch's deadline counts from it
    snapshot: list[Any] | None = None   # queued behind the step before it: that step's in-memory snapshot, every
                                        # device's (done, snapshot) refs, submitted between the two (_queue_next)


class Driver:
    def __init__(self, cfg: Config, run_dir, plan: ResumePlan | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = cfg.cluster.num_devices
        self.devices = DeviceGroup(cfg)
        self.mixed_precision = cfg.train.mixed_precision   # settled in start() from the devices' hardware
        self.stop_signal: str | None = None
        self.ending = False                   # in the end work (end.py): a first signal stops nothing more
        self.plan = plan
        self.run_id: str | None = None      # decided with the run directory held (run())
        self.checkpoints: Checkpoints | None = None
        self.events: CheckpointEvents | None = None   # the checkpoints' commits and failures told (prepare())
        self.recovery: Recovery | None = None    # made with the checkpoints (prepare())
        self.finish: Finish | None = None        # FINISHING's mechanics, made with them too
        self.injector, self.watch, self.healer = Injector(plan_faults(cfg)), Watch(cfg), Healer(cfg)
        self.goodput = Goodput()
        self.balancer = Balancer(cfg)
        self.history = RunHistory(history_len(cfg), Path(run_dir) / "metrics.jsonl")
        self.listeners = Listeners(IncidentLog(Path(run_dir) / "incidents.jsonl"))  # + metrics, alerts: STARTING
        self.state = RunState.STARTING
        self.next_step = 1
        self.pending: tuple[Decision, str] | None = None   # the decision RECOVERING carries out, and why
        self.t_loop: float | None = None      # when stepping began (goodput's wall time)
        self.metrics: MetricsStream | None = None
        self.progress: Progress | None = None
        self.status = StatusFile(Path(run_dir), cfg.train.steps)
        self.alerts: AlertEngine | None = None
        self.skip_steps: set[int] = set()     # steps whose batch an alert's action=skip has the devices skip
        self.anticipation = Anticipation(cfg)  # the steps an alert's action=anticipate routes anticipatorily
        self.peak_flops: float | None = None  # of one device, for MFU
        self.flops_per_token = flops_per_token(cfg)
        self.val_loss: float | None = None    # the newest validation loss (periodic or final)
        self.rl = None                        # RL post-training's service (data.task=rl): each step's batch
        self.inflight: InFlight | None = None  # the pipelined driver's next step, submitted before this one's record
        self.queued: InFlight | None = None    # ... submitted even before this step came back (_queue_next)
        self.t_collected: float | None = None  # when the last step's reports came in (the loop's clock per step)

    # ----------------------------------------------------------------- start
    def prepare(self) -> ResumePlan:
        """Where the run starts and whether its data is good; nothing is started or written yet."""
        if self.checkpoints is None:
            self.plan = check_before_start(self.cfg, self.run_dir, self.plan, self.run_id)
            # the schedule's horizon as the devices use it: the checkpoint's on resume (timeline.plan_resume)
            self.cfg = replace(self.cfg, train=replace(self.cfg.train, lr_horizon=self.plan.lr_horizon))
            self.checkpoints = Checkpoints(self.cfg, self.plan, self.goodput)
            self.events = CheckpointEvents(self.checkpoints, self.listeners)
            self.recovery = Recovery(self.cfg, self.plan, self.devices, self.checkpoints, self.balancer, self.healer,
                                     self.watch, self.goodput, self.history, self.listeners, self.devices.build)
            self.finish = Finish(self.cfg, self.checkpoints, self.events, self.devices, self.healer, self.history,
                                 self.save_checkpoint, self.finish_checkpoints)   # the hooks, as a subclass has them
        return self.plan

    def start(self) -> None:
        """The data, the devices (checked against the memory plan) and every device's shard (start.py)."""
        cfg = self.cfg
        started = start_devices(cfg, Path(self.run_dir), self.prepare(), self.devices, self.checkpoints)
        self.mixed_precision, self.peak_flops = started.mixed_precision, started.peak_flops
        self.devices.build(range(self.world), cfg.cluster.start_timeout_s, "build device shards")
        log_devices(cfg, self.devices)
        if cfg.data.task == "rl":
            from orchestrator.rl.service import RLService

            self.rl = RLService(cfg, self.devices, self.watch)
            self.rl.start()

    @property
    def actors(self) -> list[Any]:
        return self.devices.actors

    @property
    def device_info(self) -> list[dict[str, Any]]:
        return self.devices.info

    @property
    def last_step(self) -> int:
        """The last step kept (after a rewind: the step rewound to)."""
        return self.history.last_kept

    def step(self, step: int) -> list[StepReport]:
        """Run one step on every device (submitted now, or already by the pipelined driver); its reports, or
        StepFailure."""
        flight = self.inflight if self.inflight is not None and self.inflight.step == step else self._submit(step)
        self.inflight = None
        try:
            return self.watch.collect(self.devices, flight.refs, step, self._began(flight))
        finally:
            self.t_collected = time.perf_counter()
            self.inflight, self.queued = self.queued, None   # the step queued behind it is the one in flight now

    def _began(self, flight: InFlight) -> float:
        """When `flight` could start on the devices (perf_counter): its submission, or when the step before it came
        back if that was later (submitted early: pipelined, or queued behind it). Its deadline, wall time and
        goodput count from here."""
        return max(flight.t0, self.t_collected or 0.0)

    def _submit(self, step: int) -> InFlight:
        """Every device's train_step of `step`, submitted (Ray runs an actor's calls in the order they are made, so
        it follows whatever was submitted to the devices before it: the snapshot of the step before)."""
        rl_step = self.rl is not None and step > self.cfg.rl.sft_steps
        guard = self.watch.guard(rl_step) if self.cfg.faults.on_spike != "record" else None
        if step in self.skip_steps:
            guard = {**(guard or {}), "skip_batch": True}
        guard = self.anticipation.guard(guard)
        t0 = time.perf_counter()
        batch = self._rl_batch(step) if self.rl is not None else None
        return InFlight(step, [a.train_step.remote(step, guard, batch) for a in self.actors], t0)

    def _launch(self, step: int) -> None:
        """The faults due at `step` made to happen, then the step submitted (in flight until `step()` collects it)."""
        for fault in self.injector.due(step):
            self.inject(fault, step)
        self.inflight = self._submit(step)

    def _plain_next(self, step: int) -> bool:
        """Can the step after `step` be submitted before `step`'s record is made and its alert rules checked? Only
        after a plain step: not after one that takes a checkpoint, runs validation or may re-place experts, nor in
        an RL run, at the last step or after a stop signal (their device work needs the record first, or must not
        follow a step an alert may still roll back)."""
        nxt = step + 1
        return (self.cfg.parallel.pipelined_driver and self.rl is None and nxt <= self.cfg.train.steps
                and not self.stop_signal and self.alerts.stop is None and not self.balancer.enabled
                and not (self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0)
                and not self.checkpoints.wanted(step, self.healer.checkpoint_retry_at))

    def _queue_next(self, step: int) -> None:
        """The pipelined driver's second step in flight: while `step` runs, the next step is submitted behind it,
        so a device starts the next step the moment it ends this one, with no round trip through the driver between
        them. Only when nothing about the next step can depend on how `step` ends: a plain step (`_plain_next`), no
        spike guard (faults.on_spike=record), no planned fault due in the next step (its injection stays where it
        is, after `step` came back), and no straggler that `step` could name (its replacement restores the state of
        `step` itself). When `step` fails or is rolled back, the queued step is drained and thrown away (`_late`), as
        the pipelined driver's next step always is. A step that takes an in-memory snapshot has it queued too,
        between it and the next step; the snapshot store keeps it only once `step` came back well (`_ahead`), so the
        two it holds are never newer than the last good step (checkpoint/snapshots.py); when `step` fails, it is
        thrown away with the queued step. Not a snapshot serialized from the devices' snapshot thread
        (`Checkpoints.snapshot_queueable`): that step is not queued behind."""
        nxt = step + 1
        due = self.checkpoints.snapshot_due(step)
        if (self.queued is not None or not self._plain_next(step) or self.cfg.faults.on_spike != "record"
                or not self.injector.quiet(nxt) or self.watch.straggler_due()
                or (due and not self.checkpoints.snapshot_queueable())):
            return
        snapshot = self.checkpoints.snapshot_calls(step, self.actors) if due else None
        self.queued = replace(self._submit(nxt), snapshot=snapshot)

    def _ahead(self, step: int) -> bool:
        """The pipelined driver (parallel.pipelined_driver): `step` came back well (no incident to act on), so its
        device work is submitted (its snapshot) and then the next step (with its faults), before the driver builds
        this step's record, checks the alert rules, writes the sinks, status.json and the progress line: the devices
        compute while the driver does its bookkeeping. Only on a plain step: a step that takes a checkpoint, runs
        validation, may re-place experts, an RL step, the last step or one after a stop signal stay lock-step (their
        device work needs the record first, or must not follow a step an alert may still roll back), and so does a
        step with a straggler (`_stepping`). An alert that rolls `step` back then finds the next step in flight: it
        is waited for and thrown away, and the rewind goes to a state before `step` (`_late`). True when the next
        step is in flight (submitted now, or queued already while `step` ran: `_queue_next`)."""
        nxt = step + 1
        if self.inflight is not None and self.inflight.step == nxt:   # queued behind `step` (_queue_next)
            if self.inflight.snapshot is not None:   # with the snapshot of `step`: kept now that `step` came back well
                self.checkpoints.snapshot(step, self.actors, self.balancer.placement, self.inflight.snapshot)
            return True
        if not self._plain_next(step):
            return False
        self.after_step(step)   # its snapshot on the faults.snapshot_every cadence (no checkpoint is wanted)
        self._launch(nxt)
        return True

    def _drain(self, replacing: list[int] | None = None) -> Decision | None:
        """The step in flight (the pipelined driver's next one) waited for and thrown away: a decision about the
        step before it was taken meanwhile. Its time goes to goodput's rolled-back time; when it failed, the
        Healer's decision about that failure (its devices to replace). `replacing`: the step before it failed,
        replacing these devices; the one it queued behind failing too is part of that failure (Healer.failed_behind)."""
        if self.inflight is None:
            return None
        flight, self.inflight = self.inflight, None
        began = self._began(flight)
        try:
            self.watch.collect(self.devices, flight.refs, flight.step, began)
        except StepFailure as failure:
            self.goodput.failed_steps += time.perf_counter() - began
            if replacing is not None:
                return self.healer.failed_behind(failure, replacing)
            return self.healer.failed_step(failure)
        self.goodput.rolled_back += time.perf_counter() - began
        return None

    def _late(self, decision: Decision, step: int, failed_step: bool = False) -> Decision:
        """A decision about `step` taken after the next step was submitted (pipelined driver): that step is drained
        and its devices replaced too when it failed (its incidents added); the rewind goes to a state before `step`
        (a snapshot of `step` was taken before the next step was submitted, and must not be restored: `at_most`).
        `failed_step`: the decision is about `step` failing (the next step was queued behind it: `_queue_next`)."""
        at_most = step - 1 if decision.at_most is None else min(decision.at_most, step - 1)
        failed = self._drain(decision.replace if failed_step else None)
        if failed is not None:
            decision = replace(decision, replace=sorted(set(decision.replace) | set(failed.replace)),
                               reform=decision.reform or failed.reform, incidents=decision.incidents + failed.incidents)
        return replace(decision, at_most=at_most)

    def _rl_batch(self, step: int) -> Any:
        """An RL step's batch (rl/service.py); before the first RL step, the held-out accuracy it starts from."""
        if step == self.cfg.rl.sft_steps + 1 and self.rl.accuracy_before is None:
            self.rl.accuracy_before = self.rl.accuracy(step - 1)
            self.progress.message(f"held-out accuracy before RL: {self.rl.accuracy_before:.3f}")
        batch = self.rl.batch(step)
        for rank, detail in self.rl.take_failures():   # a pool's worker failed, replaced: the step goes on the same
            self.healer.rollout_failed(step, rank, detail)
        return batch

    # ------------------------------------------------------------------ run
    def run(self) -> RunSummary:
        """The whole run, holding its run directory and local checkpoint folder throughout (orchestrator/runtime/runlock.py:
        re-entrant, so a job that holds them already goes on; RunInUse when another live process holds them)."""
        with hold_run(self.cfg, Path(self.run_dir), self.plan.run_id if self.plan else None) as self.run_id:
            return self._run()

    def _run(self) -> RunSummary:
        t_start = time.perf_counter()
        if self.prepare().complete:
            return nothing_to_do(self.plan, self.cfg.train.steps, self.run_dir)
        restore_signals = self._install_signal_handlers()
        outcome, reason = "failed", None   # until the run gets to its end
        interrupted = None  # a second SIGINT/SIGTERM (orchestrator/runtime/signals.py): end work below, then raised again
        failure: BaseException | None = None   # the run's own error: end work below, then raised again
        handlers = {RunState.STARTING: self._starting, RunState.STEPPING: self._stepping,
                    RunState.RECOVERING: self._recovering, RunState.FINISHING: self._finishing}
        try:
            try:
                self.state = RunState.STARTING
                while not self.state.is_terminal():
                    self.state = handlers[self.state]()
                outcome = "stopped" if self.stop_signal else "finished"
                if self.stop_signal:
                    reason = f"{self.stop_signal}: stopped after step {self.last_step}"
            except KeyboardInterrupt as e:  # Ray's blocking calls turn Interrupted into a plain KeyboardInterrupt
                self.state, interrupted, outcome = RunState.FAILED, signals.interrupted(e), "interrupted"
            except BaseException as e:  # the run failed: its end work first (the devices released), then the error
                self.state, (failure, reason) = RunState.FAILED, failure_of(e, self.run_dir)
            self.ending = True
            outcome, interrupted, summary = end_work(self.run_end(), outcome, reason, interrupted, t_start)
        finally:
            restore_signals()  # only now: a signal during the end work is the run's to count, not an interruption
        if interrupted is not None:
            raise interrupted
        if failure is not None:
            raise_failure(failure, self.checkpoints.last_checkpoint(self.last_step))
        return summary

    # ----------------------------------------------------------- the states
    def _starting(self) -> RunState:
        """The devices started and the checkpoint loaded; only now (the run continues after `first - 1`) are the
        abandoned timeline's checkpoints retired and the run directory's logs rewound; then the listeners."""
        self.start()
        self.next_step = first = self.restore() + 1
        if first > 1:   # resumed: the steps an alert had route anticipatorily (saved with the devices' state)
            self.anticipation.resume(self.actors, self.cfg.cluster.start_timeout_s)
        rewind_run_dir(self.cfg, Path(self.run_dir), self.plan, self.checkpoints.storage)
        self.history.begin(first)
        self.metrics, self.alerts, self.progress = open_monitoring(self.cfg, Path(self.run_dir), first, self.listeners)
        self.balancer.earlier = self.metrics.log.tail(self.history.maxlen)  # a resumed run's recent loads
        self.watch.rebuild(self.balancer.earlier)                          # ... and its spike history
        self.snapshot(first - 1)
        self.t_loop = time.perf_counter()
        return RunState.STEPPING

    def _stepping(self) -> RunState:
        """The next step: its faults, every device's step, judged (by the Watch, the Healer, the alert rules); kept
        (_keep), or a decision to carry out (RECOVERING). FINISHING after the last step or a stop signal."""
        self.listeners.incidents(self.healer.take_new())
        if self.alerts.stop is not None:
            self._drain()
            a = self.alerts.stop
            raise RunError(f"step {a.step}: alert {a.rule} ({a.detail}); stopping (its action is stop)")
        step = self.next_step
        if self.inflight is None and (step > self.cfg.train.steps or self.stop_signal):
            if self.stop_signal:   # (a step in flight when the signal came is collected and kept first)
                self.progress.message(f"{self.stop_signal}: stopping after step {self.last_step}")
            return RunState.FINISHING
        t0 = time.perf_counter()
        try:
            if self.inflight is None:   # (an RL step's rollouts run here, and a colocated one can fail the step)
                self._launch(step)
            self._queue_next(step)
            # The step's time: since it was submitted, or since the step before came back if it was submitted
            # earlier (pipelined): the loop's own clock per step, whatever overlaps.
            t0 = self._began(self.inflight)
            reports = self.step(step)
        except StepFailure as failure:
            self.goodput.failed_steps += time.perf_counter() - t0
            decision = self.healer.failed_step(failure)
            if self.inflight is not None:   # the next step, queued behind this one
                decision = self._late(decision, step, failed_step=True)
            return self._decided(decision, f"healed: {failure}")
        wall = time.perf_counter() - t0
        self.watch.observe(wall)
        incidents = self.watch.inspect(step, reports, self.devices)
        decision = self.healer.completed_step(step, reports, incidents) if incidents else None
        if decision is not None:
            if self.inflight is not None:   # the next step, queued behind this one
                decision = self._late(decision, step)
            return self._decided(decision, f"step {step} rolled back: {incidents[0].detail}", rolled_back=wall)
        slow = [i for i in incidents if i.kind == IncidentKind.SLOW]
        assert not slow or self.inflight is None or self.cfg.faults.on_straggler != "replace", \
            "a straggler was named with the next step queued (Watch.straggler_due)"
        # pipelined: the next step computes while this one is judged and recorded; not after a straggler, whose
        # replacement restores this very step's state (Decision.wait_snapshot: a snapshot of it is taken then if the
        # faults.snapshot_every cadence took none), so no later step may have run on the devices first
        ahead = (self.inflight is not None or not slow) and self._ahead(step)   # (in flight: queued, with its snapshot)
        rec = self._record(step, reports, wall)
        acts = self.alerts.check(rec, list(self.history),   # the alert rules: the Healer decides on their actions
                                 Context(self.healer.recovery_steps, self.checkpoints.last_checkpoint(step)))
        decision = self.healer.alert(step, *acts) if acts else None
        if decision is not None:
            return self._decided(self._late(decision, step), f"step {step} rolled back by an alert", rolled_back=wall)
        self._keep(step, rec, wall, reports, ahead)
        decision = self.healer.stragglers(step, slow, self.devices.spares_elsewhere([i.rank for i in slow])) \
            if slow else None
        if decision is not None:
            # nothing in flight (lock-step after a straggler): the state of `step` is restored and nothing recomputed
            return self._decided(decision, f"replaced straggler(s) after step {step}")
        self.next_step = step + 1
        return RunState.STEPPING

    def _decided(self, decision: Decision, why: str, rolled_back: float = 0.0) -> RunState:
        """RECOVERING next, to carry out `decision`; `rolled_back`: the time of a completed step thrown away."""
        self.goodput.rolled_back += rolled_back
        self.pending = (decision, why)
        return RunState.RECOVERING

    def _recovering(self) -> RunState:
        """The pending decision carried out (Recovery: replace, restore, rewind); stepping again after the step
        recovered. Writes finished before the fault commit first, whatever comes next."""
        (decision, why), self.pending = self.pending, None
        self._judged(self.events.poll(self.actors), self.last_step)
        if decision.skip is not None:
            self.skip_steps.add(decision.skip)
        back = self.recovery.carry_out(decision, self.last_step, self.recover)
        if decision.anticipate is not None:
            first, last = self.anticipation.switch_on(back, decision.anticipate)
            why += f"; anticipatory routing on for steps {first}..{last}"
        if self.rl is not None:   # the devices' weights went back: the rollout engines sync again before using them
            self.rl.invalidate()
        self.progress.message(f"{why}; continuing from step {back + 1}")
        self.next_step = back + 1
        return RunState.STEPPING

    def _finishing(self) -> RunState:
        """The run's last checkpoint settled (a device lost meanwhile: RECOVERING, then the steps since the state
        it went back to are replayed); the final validation."""
        decision = self.finish.final_checkpoint(self.last_step, self.stop_signal)
        if decision is not None:
            return self._decided(decision, "healed during the final checkpoint")
        self.goodput.finish(time.perf_counter() - self.t_loop)
        val_loss = self.finish.validation(self.stop_signal, self.metrics)
        self.val_loss = self.val_loss if val_loss is None else val_loss
        if self.rl is not None and not self.stop_signal and self.history:
            try:   # the run's checkpoint is committed: a device or worker lost now costs the figure, not the run
                self.rl.accuracy_after = self.rl.accuracy(self.last_step)
                self.progress.message(f"held-out accuracy after step {self.last_step}: {self.rl.accuracy_after:.3f}")
            except (StepFailure, RuntimeError, RayError) as e:
                log.warning("held-out accuracy after step %d not measured: %s: %s", self.last_step,
                            type(e).__name__, e)
        return RunState.DONE

    def _record(self, step: int, reports: list[StepReport], wall: float) -> dict[str, Any]:
        rec = step_record(step, reports, wall, self.balancer.placement, self.peak_flops, self.flops_per_token)
        if self.rl is not None:   # the rollouts' numbers and the devices' RL numbers (device/rl.py)
            rec.update(self.rl.record(step))
        return rec

    def _keep(self, step: int, rec: dict[str, Any], wall: float, reports: list[StepReport], ahead: bool = False
              ) -> None:
        """A step kept: into the history and totals (what no rewind can need forgotten), its re-placement and
        checkpoint or snapshot, its validation; its record to the listeners (then its checkpoint can commit: a
        committed checkpoint's step is in the log), the progress line and status.json. `ahead`: its snapshot was
        taken already, before the next step was submitted (`_ahead`: no checkpoint, validation or re-placement)."""
        self.goodput.kept(wall, replayed=self.history.keep(step, rec))
        self.recovery.forget(step, self.alerts)
        if self.rl is not None:   # one step off-policy: the next step's batch kept with this step's state
            self.rl.keep_pending(step)
        if self.balancer.due(step, list(self.history)):  # before the step's checkpoint: it holds the new placement
            rec["replacement"] = self.replace_experts(step)
        if not ahead and self.after_step(step):
            rec["checkpoint_started"] = True   # started, not committed: that is an event of its own, later
        if self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0:
            self._periodic_eval(rec)
        self.listeners.record(rec)
        self.history.recorded_through = step
        self._judged(self.events.poll(self.actors), step)
        self.progress.update(step, rec["loss"], rec["tokens_per_s"], rec["step_time_s"], rec.get("maxvio"),
                             rec.get("mfu"), len(self.healer.incidents))
        self.write_status("running", reports)

    # ------------------------------------------------------- devices, state
    def dead_ranks(self) -> list[int]:
        return self.devices.dead_ranks()

    def recover(self, replace: list[int], reform: bool, timeout_s: float) -> tuple[int, str]:
        """Replace the devices in `replace` (re-forming the group when `reform`) and put every device back to the
        newest state it can (Recovery.recover). Returns (step of that state, where it came from)."""
        return self.recovery.recover(replace, reform, timeout_s)

    def restore(self) -> int:
        """Load the checkpoint the run resumes from (if any) into every device; the last completed step."""
        self.prepare()
        return self.recovery.resume()

    def snapshot(self, step: int, always: bool = False) -> None:
        """In-memory snapshot of every device after `step`; unless `always`, only when healing is on."""
        self.recovery.snapshot(step, always)

    def replace_experts(self, step: int) -> dict[str, Any] | None:
        """Live expert re-placement between two steps, if worth it (Recovery.replace_experts); what it did."""
        return self.recovery.replace_experts(step)

    def global_parameters(self) -> dict[str, Any]:
        """Every parameter of the model, gathered from the devices (experts by global id)."""
        return self.devices.global_parameters(self.cfg.cluster.step_timeout_s)

    def shutdown(self) -> None:
        self.devices.shutdown()

    # ------------------------------------------------------------- faults
    def inject(self, fault: FaultSpec, step: int) -> None:
        """Make a planned fault happen, as its kind's rule says (healing/faults.py make_happen); one with target
        rollout arms a rollout worker to die mid-generation (rl/service.py)."""
        if fault.target == "rollout":
            if not self.cfg.rl.rollout.workers:   # colocated: the device's actor dies; its snapshot reply first
                self.checkpoints.snapshots.wait_newest(self.cfg.faults.recovery_timeout_s)
            self.rl.kill_worker(fault.rank)
            return
        make_happen(fault, step, self.devices, self.checkpoints, self.cfg.faults.recovery_timeout_s)

    def _periodic_eval(self, rec: dict[str, Any]) -> None:
        """Validation loss after this step (into its record). A device failing here is left to the next step's
        watch and healer; the run goes on without this value."""
        try:
            self.val_loss = rec["val_loss"] = self.devices.evaluate(self.cfg.train.eval_batches,
                                                                    self.cfg.cluster.step_timeout_s)
        except Exception as e:
            log.warning("validation after step %d failed (%s); the next step will find out why", rec["step"], e)

    def write_status(self, state: str, reports: list[StepReport] | None = None, reason: str | None = None) -> None:
        """status.json now (monitoring/status.py StatusFile); `reason`: why a run that ended did not finish."""
        last = self.history[-1] if self.history else {}
        checkpoint = self.checkpoints.last_checkpoint(last.get("step", 0)) if self.checkpoints else None
        self.status.write(state, reason, last, self.val_loss, checkpoint,
                          self.progress.step_time_ema if self.progress else None, self.healer, self.devices, reports)

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> None:
        """Every device snapshots the state after `step` and writes its shard in the background."""
        self.checkpoints.save(step, self.actors, self.balancer.placement)

    @property
    def snapshot_refs(self) -> list[Any]:
        return self.checkpoints.snapshots.newest_refs

    def after_step(self, step: int) -> bool:
        """Checkpoint by the policy (or a retry, or a checkpoint fault), else an in-memory snapshot on its
        cadence. True when a checkpoint save started."""
        saved = self.checkpoints.after_step(step, self.actors, self.balancer.placement, self.healer.checkpoint_retry_at)
        if saved:
            self.healer.checkpoint_retry_at = None
        return saved

    def _judged(self, out: Settled, now: int) -> list:
        """The checkpoints' outcome to the healer (which retakes a failed one, or stops the run); the failures. An
        event that could not be written (DiskFull) is raised after."""
        self.healer.checkpoints_settled(out.committed, out.failed, now)
        out.raise_error()
        return out.failed

    def finish_checkpoints(self) -> list:
        """Wait for the writes in flight and commit what they complete; the checkpoints that failed."""
        return self._judged(self.events.finish(self.actors, self.cfg.cluster.step_timeout_s), self.last_step)

    def run_end(self) -> RunEnd:
        """What the end of the run works with (end.py)."""
        return RunEnd(self.cfg, Path(self.run_dir), self.history, self.checkpoints, self.events, self.devices,
                      self.healer, self.listeners, self.injector, self.recovery, self.goodput, self.status,
                      lambda state, reason: self.write_status(state, reason=reason), self.metrics, self.progress,
                      self.alerts, self.t_loop, self.stop_signal, self.val_loss, self.rl)

    # ------------------------------------------------------------- helpers
    def _install_signal_handlers(self):
        """The first SIGINT/SIGTERM sets stop_signal (stop after the step in flight), unless every step has
        finished: then the run ends as a finished one (its final checkpoint, validation and results; exit 0).
        A second raises Interrupted (see signals.py). Returns the function that undoes this."""
        def stop(name: str) -> str | None:
            if self.ending:
                return "the run is ending; its end work goes on (status, devices released, results)"
            if self.history.last_kept >= self.cfg.train.steps:
                return "every step has finished; the run ends as a finished one (final checkpoint, validation, results)"
            self.stop_signal = name
            return None
        return signals.on_stop(stop)
