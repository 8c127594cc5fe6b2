"""The driver: owns a run's step loop and carries out what its services decide (see ARCHITECTURE.md).

prepare(): the run's id, folder and starting point (timeline.plan_resume: a checkpoint beyond
train.steps, a setting whose change breaks continuation, a different model fail here, before
anything starts); then the corpus. start(): the abandoned timeline retired and the run directory
rewound, the DeviceGroup (placement group, one DeviceActor per device and per warm standby, process
group), each actor builds its shard.
run(): restore the checkpoint into every device -> for each step: planned faults (Injector), every
actor's train_step, collected by the Watch within a learned deadline -> StepReports -> incidents
judged by the Healer, whose Decisions the driver carries out (replace, rewind, replay) -> metrics
and alerts -> checkpoints and snapshots (Checkpoints: written in the background, committed when every
shard is written, whatever later steps do) -> at the end the final checkpoint, healed and retaken
if a device dies meanwhile -> validation -> the end work, whatever ended the run (_end_work: status.json, the
devices released, summary.json, goodput.json, report.html, each as far as it can, with the run's state and
reason). A checkpoint's start is in its step's record, its commit or failure an event line when it happens.
The driver keeps bounded state: a window of recent records and running totals, never the history.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from tenacity import (Retrying, retry_if_exception_type, retry_if_not_exception_type, stop_after_attempt,
                      wait_exponential)

from orchestrator.runtime import signals
from orchestrator.monitoring.alerts import AlertEngine, Context
from orchestrator.experts.balancer import Balancer, Placement, placement_from_manifest
from orchestrator.checkpoint.coordinator import Checkpoints
from orchestrator.checkpoint.manager import CheckpointManifest
from orchestrator.checkpoint.timeline import ResumePlan, plan_resume, record_run_id, retire
from orchestrator.config import Config, FaultSpec, mesh_shape, to_dict
from orchestrator.data.source import load_data, resolve_tokenizer
from orchestrator.device.actor import StepReport
from orchestrator.device.group import DeviceGroup, get
from orchestrator.runtime.disk import DiskFull, full
from orchestrator.errors import RunError, StateMismatch
from orchestrator.monitoring.goodput import Goodput
from orchestrator.healing import (Decision, Healer, Incident, IncidentKind, Injector, StepFailure, Watch, fault_rule,
                                  plan_faults)
from orchestrator.monitoring.metrics import MetricsStream, check_sinks, flops_per_token, peak_flops, step_record
from orchestrator.monitoring.status import Progress, device_status, write_memory_plan, write_status
from orchestrator.runtime.runlock import hold_run
from orchestrator.monitoring.rundir import FIX, append_jsonl, is_record, read_jsonl, rewind_logs
from orchestrator.checkpoint.storage import Storage
from orchestrator.monitoring.summary import RunSummary, Totals, history_len, write_results

log = logging.getLogger(__name__)


class Driver:
    def __init__(self, cfg: Config, run_dir, plan: ResumePlan | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = cfg.cluster.num_devices
        self.devices = DeviceGroup(cfg)
        self.mixed_precision = cfg.train.mixed_precision   # settled in start() from the devices' hardware
        self.stop_signal: str | None = None
        self.ending = False                   # in the end work (_end_work): a first signal stops nothing more
        self.plan = plan
        self.run_id: str | None = None      # decided with the run directory held (run())
        self.checkpoints: Checkpoints | None = None
        self.resumed_from_step: int | None = None
        self.restore_s: float | None = None
        self.data_refs: tuple[Any, Any] | None = None
        self.corpus = None
        self.injector, self.watch, self.healer = Injector(plan_faults(cfg)), Watch(cfg), Healer(cfg)
        self.goodput = Goodput()
        self.balancer = Balancer(cfg)
        self.history: deque[dict[str, Any]] = deque(maxlen=history_len(cfg))
        self.totals = Totals()
        self.totals_at: dict[int, Totals] = {}   # after steps a rewind can go back to
        self.first = 1
        self.last_kept = 0                  # the last step kept (history is a bounded window of it)
        self.recorded_through = 0           # the last step whose record is in metrics.jsonl
        self.high_water = 0                 # the furthest step ever completed (steps up to it are replays)
        self.metrics: MetricsStream | None = None
        self.progress: Progress | None = None
        self.last_reports: list[StepReport] = []
        self.status_s = 0.0                   # spent writing status.json
        self.alerts: AlertEngine | None = None
        self.skip_steps: set[int] = set()     # steps whose batch an alert's action=skip has the devices skip
        self.peak_flops: float | None = None  # of one device, for MFU
        self.flops_per_token = flops_per_token(cfg)
        self.val_loss: float | None = None    # the newest validation loss (periodic or final)

    # ----------------------------------------------------------------- start
    def prepare(self) -> ResumePlan:
        """Where the run starts and whether its data is good; nothing is started or written yet."""
        if self.checkpoints is None:
            check_sinks(self.cfg)
            if self.cfg.train.freeze:   # every pattern names a parameter (the jobs check it before Ray starts)
                from orchestrator.memory.plan import frozen_names

                frozen_names(self.cfg)
            self.plan = self.plan or plan_resume(self.cfg, self.run_dir, self.run_id)
            for warning in self.plan.warnings:
                log.warning("%s", warning)
            # the schedule's horizon as the devices use it: the checkpoint's on resume (timeline.plan_resume)
            self.cfg = replace(self.cfg, train=replace(self.cfg.train, lr_horizon=self.plan.lr_horizon))
            self.checkpoints = Checkpoints(self.cfg, self.plan, self.goodput)
        return self.plan

    def start(self) -> None:
        cfg, plan = self.cfg, self.prepare()
        tokenizer = resolve_tokenizer(cfg)   # None: bytes; trained first when data.train_tokenizer asks
        corpus = load_data(cfg, tokenizer)
        corpus.check_vocab(cfg.model.vocab_size, cfg.data.path)
        ckpt = self.checkpoints
        if tokenizer is not None:   # in the run dir and beside local checkpoints: what export --hf ships with the model
            tokenizer.save_pretrained(str(Path(self.run_dir) / "tokenizer"))
            if ckpt.storage.local:
                tokenizer.save_pretrained(str(Path(ckpt.storage.root) / "tokenizer"))
        ckpt.storage.check()  # an unreachable checkpoint URI fails now, not at the first save
        if corpus.val is None:
            log.info("run %s: checkpoints in %s; data: %s", plan.run_id, ckpt.storage.shown, corpus.description)
        else:
            log.info("run %s: checkpoints in %s; data: %s, %d train / %d validation tokens", plan.run_id,
                     ckpt.storage.shown, corpus.description, len(corpus.train), len(corpus.val))
        self.devices.start()
        self.mixed_precision = self.devices.settle_mixed_precision()
        self._check_gpu_memory()
        ck = cfg.checkpoint
        if ck.every_steps or ck.at_end or ck.on_signal:
            self.devices.check_storage_reach(ckpt.storage)
        self.data_refs = (ray.put(corpus.train), ray.put(corpus.val))
        self._build(range(self.world), cfg.cluster.start_timeout_s, "build device shards")
        nodes = len({i["node_id"] for i in self.device_info})
        self.peak_flops = peak_flops(cfg, self.device_info[0].get("gpu_name"), self.mixed_precision)
        spares = cfg.faults.standby
        log.info("devices: %d actors on %d node(s), backend %s%s", self.world, nodes, self.devices.backend,
                 f", {spares} warm standby" if spares else "")
        for rank, i in enumerate(self.device_info):
            log.info("device %d: node %s (%s), pid %d%s", rank, str(i["node_id"])[:12], i["ip"], i["pid"],
                     f", GPU {i['gpu_ids']} {i['gpu_name']}" if i.get("gpu_name") else "")

    def _check_gpu_memory(self) -> None:
        """The memory plan must fit each device's share of the smallest GPU (cluster.device_memory_gb unset), with
        the precision the devices settled on: else ConfigError (exit 2) before any shard is built."""
        c = self.cfg.cluster
        gpu_memory = [i["gpu_memory"] for i in self.device_info if i.get("gpu_memory")]
        if not (c.use_gpu and gpu_memory) or c.device_memory_gb:
            return
        from orchestrator.memory.plan import check_fits

        cfg = replace(self.cfg, train=replace(self.cfg.train, mixed_precision=self.mixed_precision))
        share = int(min(gpu_memory) * c.gpus_per_device)
        check_fits(cfg, share, f"{c.gpus_per_device:g} of the smallest GPU's {min(gpu_memory) / 2**30:.1f} GiB; "
                               f"set cluster.device_memory_gb to plan for another budget")

    @property
    def actors(self) -> list[Any]:
        return self.devices.actors

    @property
    def device_info(self) -> list[dict[str, Any]]:
        return self.devices.info

    # ------------------------------------------------------------------ loop
    def step(self, step: int) -> list[StepReport]:
        """Run one step on every device; its reports, or StepFailure."""
        guard = self.watch.guard() if self.cfg.faults.on_spike != "record" else None
        if step in self.skip_steps:
            guard = {**(guard or {}), "skip_batch": True}
        t0 = time.perf_counter()
        return self.watch.collect(self.devices, [a.train_step.remote(step, guard) for a in self.actors], step, t0)

    def _record(self, step: int, reports: list[StepReport], wall: float) -> dict[str, Any]:
        return step_record(step, reports, wall, self.balancer.placement, self.peak_flops, self.flops_per_token)

    @property
    def last_step(self) -> int:
        """The last step kept (after a rewind: the step rewound to)."""
        return self.last_kept

    def run(self) -> RunSummary:
        """The whole run, holding its run directory and local checkpoint folder throughout (orchestrator/runtime/runlock.py:
        re-entrant, so a job that holds them already goes on; RunInUse when another live process holds them)."""
        with hold_run(self.cfg, Path(self.run_dir), self.plan.run_id if self.plan else None) as self.run_id:
            return self._run()

    def _run(self) -> RunSummary:
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.prepare().complete:
            log.info("the checkpoint of step %d is at train.steps=%d: the run is complete, nothing to do",
                     self.plan.step, cfg.train.steps)
            return RunSummary(str(self.run_dir), 0, None, None, 0.0, 0.0, 0.0, resumed_from_step=self.plan.step,
                              run_id=self.plan.run_id)
        restore_signals = self._install_signal_handlers()
        state, reason = "failed", None   # until the run gets to its end
        interrupted = None  # a second SIGINT/SIGTERM (orchestrator/runtime/signals.py): end work below, then raised again
        failure: BaseException | None = None   # the run's own error: end work below, then raised again
        t_loop = None
        try:
            try:
                self.start()
                self.first = first = self.restore() + 1
                # the run continues after `first - 1`: only now (the devices started, the checkpoint loaded) are the
                # abandoned timeline's checkpoints retired and the run directory's logs rewound
                record_run_id(self.run_dir, self.plan.run_id)
                write_memory_plan(self.run_dir, self.cfg)
                retire(self.checkpoints.storage, self.plan.retire, self.plan.step)
                rewind_logs(self.run_dir, self.plan.logs_through)
                self.high_water = self.last_kept = self.recorded_through = first - 1
                self.totals_at[first - 1] = self.totals
                self.metrics = MetricsStream(cfg, self.run_dir, first)
                m = cfg.monitor
                self.alerts = AlertEngine(m.alerts, self.run_dir / "alerts.jsonl", m.webhook_url,
                                          m.webhook_timeout_s, m.webhook_retries)
                self.balancer.earlier = self.metrics.log.tail(self.history.maxlen)  # a resumed run's recent loads
                self.watch.rebuild(self.balancer.earlier)                          # ... and its spike history
                self.progress = Progress(cfg.train.steps, cfg.run.progress, first_step=first)
                self.snapshot(first - 1)
                t_loop = time.perf_counter()
                self._loop(first)
                self.goodput.finish(time.perf_counter() - t_loop)
                self._final_validation()
                state = "stopped" if self.stop_signal else "finished"
                if self.stop_signal:
                    reason = f"{self.stop_signal}: stopped after step {self.last_step}"
            except KeyboardInterrupt as e:  # Ray's blocking calls turn Interrupted into a plain KeyboardInterrupt
                interrupted, state = signals.interrupted(e), "interrupted"
            except BaseException as e:  # the run failed: its end work first (the devices released), then the error
                if full(e) and not isinstance(e, DiskFull):  # a write of a library (TensorBoard's, a tokenizer's)
                    e = DiskFull(e.filename or self.run_dir, None, FIX)
                failure, reason = e, str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            state, interrupted, summary = self._end_work(state, reason, interrupted, t_start, t_loop)
        finally:
            restore_signals()  # only now: a signal during the end work is the run's to count, not an interruption
        if interrupted is not None:
            raise interrupted
        if isinstance(failure, DiskFull):  # where the run stands and how to go on, in the same one line
            newest = self.checkpoints.last_checkpoint(self.last_step)
            at = f"its newest committed checkpoint is step {newest}" if newest else "it has no committed checkpoint"
            raise RunError(f"{failure}; the run stopped, {at}: resume with train.resume=latest once there is room") \
                from failure
        if failure is not None:
            raise failure
        return summary

    def _end_work(self, state: str, reason: str | None, interrupted, t_start: float, t_loop: float | None):
        """What every run does at its end, whatever ended it, each part as far as it can: incidents published,
        the checkpoints in flight committed (a failed run's waited for, an interrupted run's if written already;
        only those whose step's record is written), status.json,
        the devices released, saves left unfinished removed, the sinks closed, webhooks delivered, summary.json,
        goodput.json and report.html. A second signal during it (the first one when every step had finished)
        makes the run interrupted, and the end work goes on (status.json and summary.json say so); an error in
        one part (a full disk) is logged and the next part done. Returns (state, interrupted, summary)."""
        self.ending = True
        if t_loop is not None and not self.goodput.wall:  # the loop did not get to its end: close the books now
            self.goodput.finish(time.perf_counter() - t_loop)
        summary = None

        def part(what: str, fn) -> None:
            nonlocal state, interrupted
            try:
                fn()
            except KeyboardInterrupt as e:
                interrupted, state = signals.interrupted(e), "interrupted"
            except Exception as e:  # a full disk must not hide the run's own error or leave actors behind
                log.warning("%s: %s", what, e)

        def why() -> str | None:
            if state == "interrupted" and interrupted is not None:
                return f"{interrupted.describe()}: interrupted after step {self.last_step}"
            return reason

        def results(report: bool) -> None:
            nonlocal summary
            summary = self._summarize(time.perf_counter() - t_start, interrupted, state, why(), report)

        part("could not publish the incidents", self._publish_incidents)
        if self.checkpoints.pending and self.actors:
            if state == "failed":
                part("could not settle the checkpoints in flight", self._settle_before_shutdown)
            else:  # interrupted: no waiting, but what is written already commits
                part("could not commit the checkpoints written", lambda: self._checkpoint_outcomes(
                    *self.checkpoints.poll(self.actors, commit_through=self.recorded_through), self.last_step,
                    judge=False))
        told = state
        part("could not write status.json", lambda: self.write_status(told, reason=why()))
        part("could not release the devices", self.shutdown)
        if self.checkpoints.pending:  # an interrupted run's saves: their writers are gone with the devices
            part("could not remove the unfinished checkpoints", lambda: self._checkpoint_outcomes(
                [], self.checkpoints.abandon("not committed: the run ended before its shards were written"),
                self.last_step, judge=False))
        for closable in (self.progress, self.metrics):
            if closable is not None:
                part("could not close the metrics", closable.close)
        if self.alerts is not None:
            part("could not deliver the alerts", self.alerts.close)  # webhooks still being posted
        part("could not write the run's results", lambda: results(True))
        if state != told:  # interrupted during the end work: status.json and summary.json say so
            part("could not write status.json", lambda: self.write_status(state, reason=why()))
            part("could not write the run's results", lambda: results(False))
        return state, interrupted, summary

    def _loop(self, step: int) -> None:
        cfg = self.cfg
        while True:
            self._publish_incidents()
            if self.alerts.stop is not None:
                a = self.alerts.stop
                raise RunError(f"step {a.step}: alert {a.rule} ({a.detail}); stopping (its action is stop)")
            if step > cfg.train.steps or self.stop_signal:
                if self.stop_signal:
                    self.progress.message(f"{self.stop_signal}: stopping after step {self.last_step}")
                back = self._finish_checkpoints()
                if back is None:
                    return
                step = back
                continue
            for fault in self.injector.due(step):
                self.inject(fault, step)
            t0 = time.perf_counter()
            try:
                reports = self.step(step)
            except StepFailure as failure:
                self.goodput.failed_steps += time.perf_counter() - t0
                step = self._carry_out(self.healer.failed_step(failure), f"healed: {failure}")
                continue
            wall = time.perf_counter() - t0
            self.watch.observe(wall)
            incidents = self.watch.inspect(step, reports, self.devices)
            decision = self.healer.completed_step(step, reports, incidents) if incidents else None
            if decision is not None:
                self.goodput.rolled_back += wall
                step = self._carry_out(decision, f"step {step} rolled back: {incidents[0].detail}")
                continue
            rec = self._record(step, reports, wall)
            decision = self._alerts(step, rec)
            if decision is not None:
                self.goodput.rolled_back += wall
                step = self._carry_out(decision, f"step {step} rolled back by an alert")
                continue
            self._keep(step, rec, wall)
            if self.balancer.due(step, list(self.history)):  # before the step's checkpoint: it holds the new placement
                rec["replacement"] = self.replace_experts(step)
            if self.after_step(step):
                rec["checkpoint_started"] = True   # started, not committed: that is an event of its own, later
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self._periodic_eval(rec)
            self.metrics.write(rec)
            self.recorded_through = step
            self._poll_checkpoints(step)   # after the record: a committed checkpoint's step is in the log
            self.progress.update(step, rec["loss"], rec["tokens_per_s"], rec["step_time_s"], rec.get("maxvio"),
                                 rec.get("mfu"), len(self.healer.incidents))
            self.write_status("running", reports)
            slow = [i for i in incidents if i.kind == IncidentKind.SLOW]
            decision = self.healer.stragglers(step, slow, self.devices.spares_elsewhere([i.rank for i in slow])) \
                if slow else None
            step = self._carry_out(decision, f"replaced straggler(s) after step {step}") if decision else step + 1

    def _keep(self, step: int, rec: dict[str, Any], wall: float) -> None:
        """A step kept: its record into the window and the totals; bookkeeping no rewind can need is forgotten."""
        if step <= self.high_water:
            self.goodput.recomputed += wall
            self.goodput.steps_recomputed += 1
        else:
            self.goodput.productive += wall
            self.high_water = step
        self.history.append(rec)
        self.last_kept = step
        self.totals = self.totals_at[step] = self.totals.add(rec)
        # A rewind goes back to an in-memory snapshot; rarely (snapshots lost with their node) to the newest
        # committed checkpoint, whose totals are then read back from metrics.jsonl (_totals_from_log).
        floor = min([s.step for s in self.checkpoints.snapshots.items] + [step])
        oldest = min(floor, max(self.checkpoints.committed_steps, default=self.first - 1))
        self.totals_at = {s: t for s, t in self.totals_at.items() if s >= floor or s == self.first - 1}
        self.alerts.forget(floor, {self.first - 1}, oldest)

    def _final_validation(self) -> None:
        cfg = self.cfg
        if not cfg.train.eval_batches or self.stop_signal or not self.history:
            return
        last = self.history[-1]
        if last.get("val_loss") is not None:  # just scored by the periodic validation
            self.val_loss = last["val_loss"]
            return
        self.val_loss = self._get([a.evaluate.remote(cfg.train.eval_batches) for a in self.actors],
                                  cfg.cluster.step_timeout_s, "evaluate")[0]
        self.metrics.validation(last["step"], self.val_loss)

    def _summarize(self, wall_s: float, interrupted=None, state: str = "finished", reason: str | None = None,
                   report: bool = True) -> RunSummary:
        cfg, ck, t = self.cfg, self.checkpoints, self.totals
        last = self.history[-1] if self.history else None
        step_time = t.mean_step_time_s
        self.goodput.steps_done = t.steps
        summary = RunSummary(
            run_dir=str(self.run_dir), steps_done=t.steps, final_loss=last["loss"] if last else None,
            val_loss=self.val_loss if last else None,
            tokens_per_s=t.tokens_per_s if t.steps else 0.0,
            steps_per_s=1.0 / step_time if t.steps else 0.0, wall_time_s=wall_s,
            stopped_by_signal=self.stop_signal, resumed_from_step=self.resumed_from_step,
            checkpoints_committed=list(ck.committed_steps), checkpoints_failed=list(ck.failed_steps),
            checkpoint_bytes=ck.bytes_saved, checkpoint_write_s=ck.write_seconds,
            checkpoint_commit_s=ck.commit_seconds, restore_s=self.restore_s,
            recoveries=self.healer.recoveries, incidents=self.healer.report(), faults_injected=self.injector.fired,
            goodput=self.goodput.to_dict(), run_id=ck.run_id,
            monitoring_s=self.status_s + (self.metrics.seconds if self.metrics else 0.0), state=state, reason=reason)
        if t.steps or not (self.run_dir / "summary.json").exists():
            write_results(self.run_dir, summary, self.goodput.to_dict(), cfg.monitor.report and report, interrupted)
        elif interrupted is not None:  # nothing trained: a finished run's results are not overwritten by nothing
            for name in ("summary.json", "goodput.json", "report.html"):
                interrupted.not_written[name] = "no step had finished; the earlier results are left as they were"
        return summary

    # ------------------------------------------------------------- decisions
    def _carry_out(self, d: Decision, message: str) -> int:
        """Carry out a Healer's decision: recover (retried with exponential backoff), rewind; the next step."""
        f = self.cfg.faults
        self._poll_checkpoints(self.last_step)   # writes finished before the fault commit whatever comes next
        if d.skip is not None:
            self.skip_steps.add(d.skip)
        if d.wait_snapshot:  # of the step just kept, by the devices being replaced too: nothing is recomputed
            items = self.checkpoints.snapshots.items
            if not items or items[-1].step != self.last_step:
                self.snapshot(self.last_step, always=True)
            self.checkpoints.snapshots.wait_newest(f.recovery_timeout_s)
        replace, reform, t0 = list(d.replace), d.reform, time.perf_counter()

        def attempt() -> tuple[int, str]:
            nonlocal replace, reform
            try:
                return self.recover(replace, reform, f.recovery_timeout_s)
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
            raise self.healer.unrestorable(self.last_step, e) from e
        except (RunError, RayActorError) as e:
            raise self.healer.recovery_failed(f.recovery_attempts, e) from e
        self.healer.recovered(d, step, source, time.perf_counter() - t0)
        return self._rewind(step, message)

    def _rewind(self, back: int, message: str) -> int:
        """Continue after step `back`: its later records go (replayed steps are recorded once, when they complete)."""
        while self.history and self.history[-1]["step"] > back:
            self.history.pop()
        self.last_kept = back
        self.recorded_through = min(self.recorded_through, back)
        self.totals = self.totals_at.get(back) or self._totals_from_log(back)
        self.metrics.truncate(back)
        if not self.history and back >= self.first:  # a rewind deeper than the window: refill it from the log
            self.history.extend(r for r in self.metrics.log.tail(self.history.maxlen) if r["step"] >= self.first)
        self.watch.rebuild(self.history)
        self.alerts.rewind(back)
        self.progress.message(f"{message}; continuing from step {back + 1}")
        return back + 1

    def _totals_from_log(self, back: int) -> Totals:
        totals = Totals()
        for rec in read_jsonl(self.run_dir / "metrics.jsonl"):
            if self.first <= rec.get("step", 0) <= back and is_record(rec):
                totals = totals.add(rec)
        return totals

    def _alerts(self, step: int, rec: dict[str, Any]) -> Decision | None:
        """Check the alert rules on this step's record; a Decision when one's action rewinds."""
        fired = self.alerts.evaluate(rec, list(self.history),
                                     Context(self.healer.recovery_steps, self.checkpoints.last_checkpoint(step)))
        if fired:
            rec["alerts"] = [a.rule for a in fired]
        acting = [a for a in fired if a.action in ("rollback", "skip", "stop")]
        if rec.get("skipped"):  # the update was not applied anyway: nothing to rewind for
            acting = [a for a in acting if a.action == "stop"]
        if not acting:
            return None
        action = next(x for x in ("stop", "skip", "rollback") if any(a.action == x for a in acting))
        return self.healer.alert(step, "+".join(a.rule for a in acting), action, "; ".join(a.detail for a in acting))

    def _publish_incidents(self) -> None:
        """New incidents to incidents.jsonl, the sinks and the alert rules; each gets all three even where one fails
        (a full run directory must not cost the alert its webhook); the first error is raised after."""
        error = None
        for incident in self.healer.take_new():
            row = asdict(incident)
            for publish in (lambda: append_jsonl(self.run_dir / "incidents.jsonl", row),
                            lambda: self.metrics is not None and self.metrics.incident(row),
                            lambda: self.alerts is not None and self.alerts.incident(row)):
                try:
                    publish()
                except Exception as e:
                    error = error or e
        if error is not None:
            raise error

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> None:
        """Every device snapshots the state after `step` and writes its shard in the background."""
        self.checkpoints.save(step, self.actors, self.balancer.placement)

    def snapshot(self, step: int, always: bool = False) -> None:
        """In-memory snapshot of every device after `step`; unless `always`, only when healing is on."""
        if always or self.cfg.faults.snapshot_every:
            self.checkpoints.snapshot(step, self.actors, self.balancer.placement)

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

    def _poll_checkpoints(self, now: int) -> list:
        committed, failed = self.checkpoints.poll(self.actors)
        return self._checkpoint_outcomes(committed, failed, now)

    def _checkpoint_outcomes(self, committed: list[int], failed: list, now: int, judge: bool = True) -> list:
        """Commits and failures as they happen: as events to metrics.jsonl and the sinks, then to the healer (which
        retakes or stops the run; not when `judge` is False, at the end of a run). The failures. An event that
        cannot be written (DiskFull) is raised after the healer has judged."""
        error = None
        try:
            if self.metrics is not None:
                ck = self.checkpoints
                for step in committed:
                    self.metrics.event({"event": "checkpoint_committed", "step": step, "time": time.time(),
                                        "bytes": ck.bytes_saved.get(step), "seconds": ck.commit_seconds.get(step)})
                for f in failed:
                    self.metrics.event({"event": "checkpoint_failed", "step": f.step, "time": time.time(),
                                        "reason": f.detail})
        except Exception as e:
            error = e
        if judge:
            if committed:
                self.healer.checkpoint_committed()
            for f in failed:
                self.healer.checkpoint_failed(f.step, f.detail, now, f.ranks)
        if error is not None:
            raise error
        return failed

    def finish_checkpoints(self) -> list:
        """Wait for the writes in flight and commit what they complete; the checkpoints that failed."""
        committed, failed = self.checkpoints.finish(self.actors, self.cfg.cluster.step_timeout_s)
        return self._checkpoint_outcomes(committed, failed, self.last_step)

    def _finish_checkpoints(self) -> int | None:
        """The run's last checkpoint (at its end, or on a stop signal), settled with every write in flight. A final
        checkpoint that fails is taken again (the devices still hold that state); if a device died, the group is
        healed first and the steps since the newest state it kept are replayed: the step to go on at, else None."""
        last, ck = self.last_step, self.cfg.checkpoint
        wanted = (ck.on_signal if self.stop_signal else ck.at_end) and last >= self.first
        if wanted and last not in self.checkpoints.committed_steps and last not in self.checkpoints.pending:
            self._save_final(last)
        while True:
            failed = [f for f in self.finish_checkpoints() if f.step == last]  # (healer: incident, retries left?)
            dead = self.devices.dead_ranks() if (wanted and failed) or self._devices_needed() else []
            if not dead and (not wanted or not failed):
                return None
            if dead:
                now = time.time()
                incidents = [Incident(last, "dead", r, self.devices.node_of(r), now,
                                      "died at the end of the run (final checkpoint, validation ahead)") for r in dead]
                return self._carry_out(self.healer.failed_step(StepFailure(last, incidents, time.perf_counter())),
                                       "healed during the final checkpoint")
            self._save_final(last)

    def _save_final(self, step: int) -> None:
        """The run's last checkpoint (or its retake): begun after the last record, so its start is an event."""
        self.save_checkpoint(step)
        self.metrics.event({"event": "checkpoint_started", "step": step, "time": time.time()})

    def _devices_needed(self) -> bool:
        """Does the end of the run still need every device (the final validation)?"""
        return bool(self.cfg.train.eval_batches) and not self.stop_signal and bool(self.history) \
            and self.history[-1].get("val_loss") is None

    def _settle_before_shutdown(self) -> None:
        """A run that fails still commits the checkpoints whose shards are written (they do not depend on the step
        that failed), but not one whose step's record never reached metrics.jsonl (a full run directory: a
        committed checkpoint's step is in the log); what cannot finish within a minute is left uncommitted, and
        what is not committed has its folder removed."""
        committed, failed = self.checkpoints.finish(self.actors, min(60.0, self.cfg.cluster.step_timeout_s),
                                                    commit_through=self.recorded_through)
        if committed:
            log.info("committed checkpoint(s) %s before stopping", committed)
        self._checkpoint_outcomes(committed, failed, self.last_step, judge=False)

    # -------------------------------------------------------------- recovery
    def dead_ranks(self) -> list[int]:
        return self.devices.dead_ranks()

    def recover(self, replace: list[int], reform: bool, timeout_s: float) -> tuple[int, str]:
        """Replace the devices in `replace` (re-forming the group when `reform`) and put every device back to the
        newest state it can: a complete in-memory snapshot, else the newest checkpoint this run committed, else
        the run's initial state. Returns (step of that state, where it came from)."""
        t0 = time.perf_counter()
        self.devices.replace(replace, timeout_s)
        if reform:
            survivors = [a for rank, a in enumerate(self.actors) if rank not in replace]
            self._get([a.leave_group.remote() for a in survivors], timeout_s, "leave the broken process group")
        t1 = time.perf_counter()
        self.goodput.actor_start += t1 - t0
        if reform:
            self.devices.form_group()
        t2 = time.perf_counter()
        self._build(replace, timeout_s, "build the replacement shards")
        t3 = time.perf_counter()
        step, source = self._restore_state(timeout_s)
        t4 = time.perf_counter()
        self.goodput.restore += t4 - t1
        log.info("recovery: actors %.2fs, process group %.2fs, build %.2fs, state from the %s %.2fs",
                 t1 - t0, t2 - t1, t3 - t2, source, t4 - t3)
        self.watch.fresh = True
        self.watch.slow_count.clear()   # replaced devices start a new episode
        return step, source

    def _restore_state(self, timeout_s: float) -> tuple[int, str]:
        """The newest state every device can go back to: the newest complete in-memory snapshot that can still be
        read (one lost with its node: the one before), else the newest committed checkpoint that verifies, else the
        initial state. One that does not fit the model (StateMismatch) ends the recovery there: an older state of
        the same run would not fit either, and the run's progress is not thrown away in silence."""
        snap = self.checkpoints.snapshots.restore(self.actors, timeout_s, replacing=self.balancer.enabled,
                                                  ep=mesh_shape(self.cfg)[0])
        if snap is not None:
            self.balancer.placement = snap.placement  # the placement of that step: a replay re-plans as before
            moved = next((r.get("replacement") for r in self.history if r["step"] == snap.step), None)
            if moved and moved["placement"] != snap.placement:
                # the snapshot taken just after this step's re-placement was lost: make the same move again
                self._move_experts(snap.step, moved["placement"])
            return snap.step, "snapshot"
        for step, storage, manifest in self.checkpoints.committed_newest_first():
            self._load(storage, manifest, timeout_s)
            self.snapshot(step)
            return step, "checkpoint"
        log.warning("no snapshot or checkpoint of this run to restore; going back to the state it started from")
        self.balancer.reset()
        self._build(range(self.world), timeout_s, "rebuild the initial shards")
        step = self.restore()
        self.snapshot(step)
        return step, "initial"

    def restore(self) -> int:
        """Load the checkpoint the run resumes from (if any) into every device; the last completed step."""
        plan = self.prepare()
        if plan.manifest is None:
            return 0
        t0 = time.perf_counter()
        self._load(plan.storage, plan.manifest, self.cfg.cluster.start_timeout_s)
        self.resumed_from_step = plan.step
        self.restore_s = time.perf_counter() - t0
        log.info("resumed from %s (step %d, saved by %d devices, now %d) in %.2fs", plan.storage.shown, plan.step,
                 plan.manifest.world_size, self.world, self.restore_s)
        return plan.step

    def _load(self, storage: Storage, manifest: CheckpointManifest, timeout_s: float) -> None:
        """Every device loads its part of a checkpoint; with re-placement or replicas on, in the placement it was
        saved with (when it had as many devices and slots), else the initial one."""
        placement = None
        if self.balancer.enabled:
            placement = (placement_from_manifest(manifest.expert_files, self.world, self.balancer.slots,
                                                 manifest.placement) or self.balancer.initial())
        self._get([a.load.remote(storage.uri, asdict(manifest), placement) for a in self.actors], timeout_s,
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
        self._move_experts(step, new)
        seconds = time.perf_counter() - t0
        log.info("step %d: experts re-placed in %.2fs; planned device max/mean load %.3f -> %.3f", step, seconds,
                 before, after)
        return {"seconds": seconds, "device_imbalance_before": before, "device_imbalance_planned": after,
                "placement": new}

    def _move_experts(self, step: int, new: Placement) -> None:
        """Every device adopts `new` and takes its experts from the newest snapshot (of `step`); then a snapshot in
        the new placement."""
        refs = self.checkpoints.snapshots.newest_refs
        try:
            self._get([a.restore_snapshots.remote(*refs, placement=new) for a in self.actors],
                      self.cfg.cluster.step_timeout_s, f"move experts to their new devices after step {step}")
        except StateMismatch as e:   # as in a recovery: an incident, an alert, the run stops
            raise self.healer.unrestorable(step, e) from e
        self.balancer.placement = new
        self.snapshot(step, always=True)

    def global_parameters(self) -> dict[str, Any]:
        """Every parameter of the model, gathered from the devices (experts by global id)."""
        merged: dict[str, Any] = {}
        for part in self._get([a.global_parameters.remote() for a in self.actors],
                              self.cfg.cluster.step_timeout_s, "report their parameters"):
            merged.update(part)
        return merged

    def shutdown(self) -> None:
        self.devices.shutdown()

    # ------------------------------------------------------------- faults
    def inject(self, fault: FaultSpec, step: int) -> None:
        """Make a planned fault happen (DeviceGroup.inject; DeviceActor.inject says what each kind does)."""
        rule = fault_rule(fault.kind)
        if rule.kills:
            # The fault strikes in its step: after the snapshot of the step before. (A kill landing while a
            # snapshot's reply is still on its way loses that snapshot: recovery then goes back one step more.)
            self.checkpoints.snapshots.wait_newest(self.cfg.faults.recovery_timeout_s)
        if rule.fails_save:  # the checkpoint after this step is taken, and one shard write of it fails
            self.checkpoints.force.add(step)
        self.devices.inject(fault)

    # ------------------------------------------------------------- watching
    def _periodic_eval(self, rec: dict[str, Any]) -> None:
        """Validation loss after this step (into its record). A device failing here is left to the next step's
        watch and healer; the run goes on without this value."""
        try:
            self.val_loss = rec["val_loss"] = self._get(
                [a.evaluate.remote(self.cfg.train.eval_batches) for a in self.actors],
                self.cfg.cluster.step_timeout_s, "evaluate")[0]
        except Exception as e:
            log.warning("validation after step %d failed (%s); the next step will find out why", rec["step"], e)

    def write_status(self, state: str, reports: list[StepReport] | None = None, reason: str | None = None) -> None:
        """status.json: the run and each device's health now (rewritten every step; read it while the job runs);
        `reason`: why a run that ended did not finish. A full run directory: DiskFull."""
        t0 = time.perf_counter()
        last = self.history[-1] if self.history else {}
        self.last_reports = reports or self.last_reports
        step = last.get("step", 0)
        checkpoint = self.checkpoints.last_checkpoint(step) if self.checkpoints else None
        ema = self.progress.step_time_ema if self.progress else None
        eta = (ema or 0) * (self.cfg.train.steps - step) if state == "running" else 0
        write_status(self.run_dir / "status.json", {
            "state": state, "reason": reason, "step": step, "steps": self.cfg.train.steps, "updated": time.time(),
            "loss": last.get("loss"), "val_loss": self.val_loss, "tokens_per_s": last.get("tokens_per_s"),
            "mfu": last.get("mfu"), "maxvio": last.get("maxvio"), "eta_s": eta,
            "incidents": len(self.healer.incidents), "recoveries": self.healer.recoveries,
            "last_checkpoint_step": checkpoint,
            "checkpoint_age_steps": step - checkpoint if checkpoint is not None else None,
            "devices": device_status(self.device_info, self.devices.restarts, self.last_reports)})
        self.status_s += time.perf_counter() - t0

    # ------------------------------------------------------------- helpers
    def _build(self, ranks, timeout_s: float, what: str) -> None:
        """The devices of `ranks` build their shards (initial state: init keyed by seed, rank and expert id)."""
        assert self.data_refs is not None
        cfg = to_dict(self.cfg)
        cfg["train"]["mixed_precision"] = self.mixed_precision
        self._get([self.actors[r].build.remote(cfg, r, self.world, *self.data_refs) for r in ranks], timeout_s, what)

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        return get(refs, timeout_s, what)

    def _install_signal_handlers(self):
        """The first SIGINT/SIGTERM sets stop_signal (stop after the step in flight), unless every step has
        finished: then the run ends as a finished one (its final checkpoint, validation and results; exit 0).
        A second raises Interrupted (see signals.py). Returns the function that undoes this."""
        def stop(name: str) -> str | None:
            if self.ending:
                return "the run is ending; its end work goes on (status, devices released, results)"
            if self.last_kept >= self.cfg.train.steps:
                return "every step has finished; the run ends as a finished one (final checkpoint, validation, results)"
            self.stop_signal = name
            return None
        return signals.on_stop(stop)
