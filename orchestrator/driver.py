"""The driver: owns a run's step loop and the services it calls (see DESIGN.md's picture).

start(): load the corpus and find the checkpoint to resume (bad data, an unreachable checkpoint URI
or an incompatible checkpoint fail here, before any actor) -> the DeviceGroup (placement group, one
DeviceActor per device and per warm standby, process group) -> each actor builds its shard.
run():   restore the checkpoint into every device -> for each step: planned faults (Injector), every
actor's train_step in parallel, collected by the Watch within a learned deadline -> StepReports ->
incidents (non-finite or spiking values, stragglers) judged by the Healer -> metrics.jsonl and the
progress display; checkpoints by the policy (snapshot now, written in the background, committed by
the CheckpointManager once every device reported its files), otherwise an in-memory snapshot every
`faults.snapshot_every` steps. A failed step goes to the Healer, which replaces what failed,
rewinds and replays (see healing.py). -> final checkpoint -> validation -> summary.json,
goodput.json (incidents.jsonl is written as they happen).
recover(): what the Healer calls: replace devices (DeviceGroup), re-form the group, restore the newest
state there is (SnapshotStore, else the last committed checkpoint, else the initial state).
shutdown(): kill the actors and remove the placement group; also after errors, Ctrl-C and SIGTERM
(the first signal stops after the step in flight, a second one interrupts at once).
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from orchestrator.balancer import Balancer, Placement, load_stats, placement_from_manifest
from orchestrator.checkpoint.manager import (CheckpointError, CheckpointManager, CheckpointManifest,
                                             check_compatible, find_resume)
from orchestrator.config import Config, FaultSpec, to_dict
from orchestrator.data import load_corpus
from orchestrator.device import StepReport, autocast_dtype
from orchestrator.device_group import DeviceGroup, get
from orchestrator.errors import RunError
from orchestrator.goodput import Goodput
from orchestrator.healing import Healer, Incident, Injector, StepFailure, Watch, plan_faults
from orchestrator.alerts import AlertEngine, Context
from orchestrator.metrics import MetricsStream, check_sinks, cpu_peak_flops, flops_per_token, gpu_peak_flops
from orchestrator.monitor import Progress, write_status
from orchestrator.snapshots import SnapshotStore
from orchestrator.storage import Storage

log = logging.getLogger(__name__)


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


class Driver:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = cfg.cluster.num_devices
        self.devices = DeviceGroup(cfg)
        self.mixed_precision = cfg.train.mixed_precision   # settled in start() from the devices' hardware
        self.stop_signal: str | None = None
        self.ckpt = CheckpointManager(cfg, cfg.checkpoint.dir or str(run_dir / "checkpoints"))
        self.resume_from: tuple[Storage, CheckpointManifest] | None = None
        self.resumed_from_step: int | None = None
        self.restore_s: float | None = None
        self.data_refs: tuple[Any, Any] | None = None
        self.injector, self.watch, self.healer = Injector(plan_faults(cfg)), Watch(cfg), Healer(cfg)
        self.healer.on_incident = self._log_incident
        self.goodput = Goodput()
        self.balancer = Balancer(cfg)
        self.snapshots = SnapshotStore(self.goodput, self._snapshot_failed)
        self.force_save: set[int] = set()   # steps to checkpoint whatever the policy (checkpoint faults)
        self.records: list[dict[str, Any]] = []
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
    def start(self) -> None:
        cfg, c = self.cfg, self.cfg.cluster
        check_sinks(cfg)
        corpus = load_corpus(cfg.data)
        corpus.check_vocab(cfg.model.vocab_size, cfg.data.path)
        self.ckpt.storage.check()  # an unreachable checkpoint URI fails now, not at the first save
        if cfg.train.resume:
            self.resume_from = find_resume(cfg.train.resume, self.ckpt.storage.uri)
            if self.resume_from is None:
                log.info("train.resume=latest: no checkpoint under %s yet; starting at step 1", self.ckpt.storage.uri)
            else:
                check_compatible(self.resume_from[1], cfg, self.resume_from[0].uri)
        log.info("data: %s, %d train / %d validation tokens", corpus.description, len(corpus.train), len(corpus.val))
        self.devices.start()
        self.mixed_precision = self._settle_mixed_precision()
        ck = cfg.checkpoint
        if ck.every_steps or ck.at_end or ck.on_signal:
            self.devices.check_storage_reach(self.ckpt.storage)
        self.data_refs = (ray.put(corpus.train), ray.put(corpus.val))
        self._build(range(self.world), c.start_timeout_s, "build device shards")
        nodes = len({i["node_id"] for i in self.device_info})
        self.peak_flops = self._peak_flops()
        spares = cfg.faults.standby
        log.info("devices: %d actors on %d node(s), backend %s%s", self.world, nodes, self.devices.backend,
                 f", {spares} warm standby" if spares else "")
        for rank, i in enumerate(self.device_info):
            log.info("device %d: node %s (%s), pid %d%s", rank, str(i["node_id"])[:12], i["ip"], i["pid"],
                     f", GPU {i['gpu_ids']} {i['gpu_name']}" if i.get("gpu_name") else "")

    @property
    def actors(self) -> list[Any]:
        return self.devices.actors

    @property
    def device_info(self) -> list[dict[str, Any]]:
        return self.devices.info

    def node_of(self, rank: int) -> str | None:
        return self.devices.node_of(rank)

    # ------------------------------------------------------------------ loop
    def step(self, step: int) -> list[StepReport]:
        """Run one step on every device; its reports, or StepFailure."""
        guard = self.watch.guard() if self.cfg.faults.on_spike != "record" else None
        if step in self.skip_steps:
            guard = {**(guard or {}), "skip_batch": True}
        t0 = time.perf_counter()
        reports = self.watch.collect(self, [a.train_step.remote(step, guard) for a in self.actors], step, t0)
        self.collect_saves(reports, step)
        return reports

    def _record(self, step: int, reports: list[StepReport], wall: float) -> dict[str, Any]:
        r0 = reports[0]
        rec = {"step": step, "loss": r0.loss, "grad_norm": r0.grad_norm, "lr": r0.lr, "tokens": r0.tokens,
               "tokens_per_s": r0.tokens / wall, "step_time_s": wall,
               "device_step_time_s": [r.compute_time_s for r in reports],
               "device_collective_s": [r.collective_s for r in reports],
               "device_rss_mb": [round(r.rss_bytes / 2**20, 1) for r in reports],
               "aux_loss": r0.aux_loss, "dropped": r0.dropped, "expert_load": r0.expert_load,
               **load_stats(r0.expert_load, self.world, self.balancer.placement, r0.device_load), "time": time.time()}
        if self.peak_flops:
            rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / (self.world * self.peak_flops)
        if r0.skipped:
            rec["skipped"] = r0.skipped
        return rec

    def run(self) -> RunSummary:
        cfg = self.cfg
        t_start = time.perf_counter()
        restore_signals = self._install_signal_handlers()
        records = self.records
        val_loss = None
        state = "failed"   # until the run gets to its end
        progress = metrics = None
        t_loop = None
        try:
            self.start()
            first = self.restore() + 1
            self.high_water = first - 1
            self.metrics = metrics = MetricsStream(cfg, self.run_dir, first)
            m = cfg.monitor
            self.alerts = AlertEngine(m.alerts, self.run_dir / "alerts.jsonl", m.webhook_url, m.webhook_timeout_s,
                                      m.webhook_retries)
            self.balancer.earlier = metrics.kept_records()  # a resumed run's load history, for re-placement plans
            self.progress = progress = Progress(cfg.train.steps, cfg.run.progress, first_step=first)
            self.snapshot(first - 1)
            step = first
            t_loop = time.perf_counter()
            while step <= cfg.train.steps:
                self.healer.flush()
                if self.alerts.stop is not None:
                    a = self.alerts.stop
                    raise RunError(f"step {a.step}: alert {a.rule} ({a.detail}); stopping (its action is stop)")
                if self.stop_signal:
                    progress.message(f"{self.stop_signal}: stopping after step {step - 1}")
                    break
                self.injector.before_step(self, step)
                t0 = time.perf_counter()
                try:
                    reports = self.step(step)
                except StepFailure as failure:
                    self.goodput.failed_steps += time.perf_counter() - t0
                    step = self._rewind(self.healer.heal(self, failure), f"healed: {failure}")
                    continue
                wall = time.perf_counter() - t0
                self.watch.observe(wall)
                incidents = self.watch.inspect(step, reports, self)
                back = self.healer.judge(self, step, reports, incidents) if incidents else None
                if back is not None:
                    self.goodput.rolled_back += wall
                    step = self._rewind(back, f"step {step} rolled back: {incidents[0].detail}")
                    continue
                rec = self._record(step, reports, wall)
                back = self._alerts(step, rec)
                if back is not None:
                    self.goodput.rolled_back += wall
                    step = self._rewind(back, f"step {step} rolled back by an alert")
                    continue
                if step <= self.high_water:
                    self.goodput.recomputed += wall
                    self.goodput.steps_recomputed += 1
                else:
                    self.goodput.productive += wall
                    self.high_water = step
                records.append(rec)
                if self.balancer.due(step, records):  # before the step's checkpoint, which then holds the new placement
                    rec["replacement"] = self.replace_experts(step)
                if self.after_step(step):
                    rec["checkpoint_saved"] = True
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    self._periodic_eval(rec)
                metrics.write(rec)
                progress.update(step, rec["loss"], rec["tokens_per_s"], rec["step_time_s"], rec.get("maxvio"),
                                rec.get("mfu"), len(self.healer.incidents))
                self.write_status("running", reports)
                back = self.healer.replace_stragglers(self, step, incidents) if incidents else None
                step = self._rewind(back, f"replaced straggler(s) after step {step}") if back is not None else step + 1
            self.goodput.finish(time.perf_counter() - t_loop)
            last = records[-1]["step"] if records else first - 1
            policy = cfg.checkpoint
            if records and last != self.ckpt.last_saved_step and (policy.on_signal if self.stop_signal else policy.at_end):
                self.save_checkpoint(last)
            self.finish_checkpoints()
            if cfg.train.eval_batches and not self.stop_signal and records:
                if records[-1].get("val_loss") is not None:  # just scored by the periodic validation
                    val_loss = records[-1]["val_loss"]
                else:
                    val_loss = self.val_loss = self._get([a.evaluate.remote(cfg.train.eval_batches) for a in self.actors],
                                                         cfg.cluster.step_timeout_s, "evaluate")[0]
                    metrics.validation(records[-1]["step"], val_loss)
            state = "stopped" if self.stop_signal else "finished"
        finally:
            self.healer.flush()
            try:
                self.write_status(state)
            except Exception as e:  # a full disk must not hide the run's own error or leave actors behind
                log.warning("could not write status.json: %s", e)
            for closable in (progress, metrics):
                if closable is not None:
                    closable.close()
            restore_signals()
            self.shutdown()
            if self.alerts is not None:
                self.alerts.close()  # webhooks still being posted: after the devices are released
        timed = records[1:] or records
        step_time = sum(r["step_time_s"] for r in timed) / max(1, len(timed))
        self.goodput.steps_done = len(records)
        summary = RunSummary(
            run_dir=str(self.run_dir), steps_done=len(records),
            final_loss=records[-1]["loss"] if records else None, val_loss=val_loss,
            tokens_per_s=(cfg.train.global_batch_size * cfg.data.seq_len) / step_time if records else 0.0,
            steps_per_s=1.0 / step_time if records else 0.0, wall_time_s=time.perf_counter() - t_start,
            stopped_by_signal=self.stop_signal, resumed_from_step=self.resumed_from_step,
            checkpoints_committed=list(self.ckpt.committed_steps), checkpoints_failed=list(self.ckpt.failed_steps),
            checkpoint_bytes=self.ckpt.bytes_saved, checkpoint_write_s=self.ckpt.write_seconds,
            checkpoint_commit_s=self.ckpt.commit_seconds, restore_s=self.restore_s,
            recoveries=self.healer.recoveries, incidents=self.healer.report(), faults_injected=self.injector.fired,
            goodput=self.goodput.to_dict(),
            monitoring_s=self.status_s + (self.metrics.seconds if self.metrics else 0.0))
        (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        (self.run_dir / "goodput.json").write_text(json.dumps(self.goodput.to_dict(), indent=2) + "\n")
        if cfg.monitor.report and records:
            try:
                from orchestrator.report import write_report

                log.info("run report: %s", write_report(self.run_dir))
            except Exception as e:  # the run's results are written; a report that fails must not fail the run
                log.warning("could not write the run report: %s", e)
        return summary

    def _rewind(self, back: int, message: str) -> int:
        """Continue after step `back`: its later records go (replayed steps are recorded once, when they complete)."""
        self.records[:] = [r for r in self.records if r["step"] <= back]
        self.metrics.truncate(back)
        if self.alerts is not None:
            self.alerts.rewind(back)
        self.progress.message(f"{message}; continuing from step {back + 1}")
        return back + 1

    def after_step(self, step: int) -> bool:
        """Checkpoint by the policy (or a retry, or a checkpoint fault), else an in-memory snapshot on its
        cadence. True when a checkpoint save started."""
        retry = self.healer.checkpoint_retry_at
        wanted = self.ckpt.due(step) or step in self.force_save or (retry is not None and step >= retry)
        if wanted and step not in self.ckpt.committed_steps:
            self.force_save.discard(step)
            self.healer.checkpoint_retry_at = None
            self.save_checkpoint(step)
            return True
        every = self.cfg.faults.snapshot_every
        taken = self.snapshots.items and self.snapshots.items[-1].step == step  # by a re-placement just now
        if every and step % every == 0 and not taken:
            self.snapshot(step)
        return False

    # ------------------------------------------------------------- faults
    def inject(self, fault: FaultSpec, step: int) -> None:
        """Make a planned fault happen (see DeviceActor.inject for what each kind does on the device)."""
        actor = self.actors[fault.rank]
        if fault.kind in ("kill", "node"):
            # The fault strikes in its step: after the snapshot of the step before. (A kill landing while a
            # snapshot's reply is still on its way loses that snapshot: recovery then goes back one step more.)
            self.wait_for_snapshot()
        if fault.kind == "checkpoint":  # the checkpoint after this step is taken, and one shard write of it fails
            actor.fail_next_save.remote("fail")
            self.force_save.add(step)
        elif fault.kind == "node":
            node = self.node_of(fault.rank)
            if node == ray.get_runtime_context().get_node_id():
                # Killing the raylet of the driver's own node ends the run; kill every device actor there instead.
                log.warning("node fault on device %d: its node runs the driver too; killing every device actor "
                            "on it instead of the node", fault.rank)
                for rank in range(self.world):
                    if self.node_of(rank) == node:
                        self.actors[rank].inject.remote("kill")
            else:
                actor.inject.remote("node")
        else:
            actor.inject.remote(fault.kind, fault.steps, fault.delay_s, fault.in_collective)

    def _log_incident(self, incident: Incident) -> None:
        with open(self.run_dir / "incidents.jsonl", "a") as f:
            f.write(json.dumps(asdict(incident), separators=(",", ":")) + "\n")
        if self.metrics is not None:
            self.metrics.incident(asdict(incident))
        if self.alerts is not None:
            self.alerts.incident(asdict(incident))

    def _alerts(self, step: int, rec: dict[str, Any]) -> int | None:
        """Check the alert rules on this step's record; the step to replay after when one's action rewinds."""
        if self.alerts is None:
            return None
        fired = self.alerts.evaluate(rec, self.records, Context(self.healer.recovery_steps, self.last_checkpoint(step)))
        if fired:
            rec["alerts"] = [a.rule for a in fired]
        acting = [a for a in fired if a.action in ("rollback", "skip", "stop")]
        if rec.get("skipped"):  # the update was not applied anyway: nothing to rewind for
            acting = [a for a in acting if a.action == "stop"]
        if not acting:
            return None
        action = next(x for x in ("stop", "skip", "rollback") if any(a.action == x for a in acting))
        rules = "+".join(a.rule for a in acting)
        return self.healer.alert(self, step, rules, action, "; ".join(a.detail for a in acting))

    def last_checkpoint(self, step: int) -> int | None:
        """The newest committed checkpoint at or before `step` (this run's, or the one it resumed from)."""
        known = [s for s in self.ckpt.committed_steps + [self.resumed_from_step or 0] if 0 < s <= step]
        return max(known) if known else None

    # ------------------------------------------------------------- watching
    def _peak_flops(self) -> float | None:
        """Peak FLOP/s of one device: monitor.peak_tflops, else a known GPU's, else measured on this CPU."""
        cfg = self.cfg
        if cfg.monitor.peak_tflops:
            return cfg.monitor.peak_tflops * 1e12
        if cfg.cluster.use_gpu:
            name = self.device_info[0].get("gpu_name") or ""
            peak = gpu_peak_flops(name, "bfloat16" if self.mixed_precision == "bf16" else cfg.train.dtype)
            if peak is None:
                log.warning("MFU: peak FLOP/s of GPU %r unknown; set monitor.peak_tflops", name)
            return peak
        c = cfg.cluster
        return cpu_peak_flops(c.torch_threads or max(1, int(c.cpus_per_device)))

    def _periodic_eval(self, rec: dict[str, Any]) -> None:
        """Validation loss after this step (into its record). A device failing here is left to the next step's
        watch and healer; the run goes on without this value."""
        try:
            self.val_loss = rec["val_loss"] = self._get(
                [a.evaluate.remote(self.cfg.train.eval_batches) for a in self.actors],
                self.cfg.cluster.step_timeout_s, "evaluate")[0]
        except Exception as e:
            log.warning("validation after step %d failed (%s); the next step will find out why", rec["step"], e)

    def write_status(self, state: str, reports: list[StepReport] | None = None) -> None:
        """status.json: the run and each device's health now (rewritten every step; read it while the job runs)."""
        t0 = time.perf_counter()
        last = self.records[-1] if self.records else {}
        self.last_reports = reports or self.last_reports
        by_rank = {r.rank: r for r in self.last_reports}
        devices = []
        for rank, info in enumerate(self.device_info):
            r = by_rank.get(rank)
            devices.append({"rank": rank, "pid": info.get("pid"), "node_id": info.get("node_id"), "ip": info.get("ip"),
                            "gpu": info.get("gpu_name"), "restarts": self.devices.restarts[rank],
                            "step_time_s": r.compute_time_s if r else None, "collective_s": r.collective_s if r else None,
                            "rss_mb": r.rss_bytes / 2**20 if r else None,
                            "device_mem_mb": r.device_mem_bytes / 2**20 if r else None})
        step = last.get("step", 0)
        checkpoint = self.last_checkpoint(step)
        ema = self.progress.step_time_ema if self.progress else None
        eta = (ema or 0) * (self.cfg.train.steps - step) if state == "running" else 0
        write_status(self.run_dir / "status.json", {
            "state": state, "step": step, "steps": self.cfg.train.steps, "updated": time.time(),
            "loss": last.get("loss"), "val_loss": self.val_loss, "tokens_per_s": last.get("tokens_per_s"),
            "mfu": last.get("mfu"), "maxvio": last.get("maxvio"), "eta_s": eta,
            "incidents": len(self.healer.incidents), "recoveries": self.healer.recoveries,
            "last_checkpoint_step": checkpoint,
            "checkpoint_age_steps": step - checkpoint if checkpoint is not None else None,
            "devices": devices})
        self.status_s += time.perf_counter() - t0

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> None:
        """Every device snapshots the state after `step` and writes its shard in the background.

        The snapshots come back as object refs owned by this driver: the in-memory copy recovery can
        restore from. The checkpoint is committed once every device reported its files written.
        """
        uri = self.ckpt.uri_for(step)
        self.ckpt.started_save(step)
        self.snapshots.keep(step, [a.save.options(num_returns=2).remote(step, uri, self.cfg.checkpoint.async_save)
                                   for a in self.actors], "checkpoint", self.balancer.placement)

    def snapshot(self, step: int, always: bool = False) -> None:
        """In-memory snapshot of every device after `step` (object refs owned by this driver); unless `always`,
        only when healing is on."""
        if always or self.cfg.faults.snapshot_every:
            self.snapshots.keep(step, [a.snapshot.options(num_returns=2).remote(step) for a in self.actors],
                                placement=self.balancer.placement)

    @property
    def snapshot_refs(self) -> list[Any]:
        return self.snapshots.newest_refs

    def wait_for_snapshot(self) -> None:
        self.snapshots.wait_newest(self.cfg.faults.recovery_timeout_s)

    def _snapshot_failed(self, step: int, detail: str) -> None:
        if step in self.ckpt.pending:
            self.ckpt.failed(step, detail)
            self.healer.checkpoint_failed(step, detail, step)

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
        return step, source

    def _restore_state(self, timeout_s: float) -> tuple[int, str]:
        snap = self.snapshots.restore(self.actors, timeout_s, replacing=self.balancer.enabled)
        if snap is not None:
            self.balancer.placement = snap.placement  # the placement of that step: a replay re-plans as before
            moved = next((r.get("replacement") for r in self.records if r["step"] == snap.step), None)
            if moved and moved["placement"] != snap.placement:
                # the snapshot taken just after this step's re-placement was lost: make the same move again
                self._move_experts(snap.step, moved["placement"])
            return snap.step, "snapshot"
        for step in sorted(self.ckpt.committed_steps, reverse=True):
            try:
                storage, manifest = find_resume(self.ckpt.uri_for(step), self.ckpt.storage.uri) or (None, None)
            except CheckpointError as e:  # deleted by retention meanwhile, or damaged: an older one
                log.warning("checkpoint of step %d cannot be restored (%s)", step, e)
                continue
            self._load(storage, manifest, timeout_s)
            self.snapshot(step)
            return step, "checkpoint"
        log.warning("no snapshot or checkpoint of this run to restore; going back to the initial state")
        self.balancer.reset()
        self._build(range(self.world), timeout_s, "rebuild the initial shards")
        step = self.restore()
        self.snapshot(step)
        return step, "initial"

    def collect_saves(self, reports: list[StepReport], step: int) -> None:
        before = len(self.ckpt.failed_steps)
        committed = self.ckpt.add_results([s for r in reports for s in r.saves], self.world)
        if committed:
            self.healer.checkpoint_committed()
        for failed in self.ckpt.failed_steps[before:]:
            self._checkpoint_failed(failed, step)

    def _checkpoint_failed(self, failed: int, now: int) -> None:
        self.healer.checkpoint_failed(failed, self.ckpt.failure_detail.get(failed, ""), now,
                                      self.ckpt.failure_ranks.get(failed, []))

    def finish_checkpoints(self) -> None:
        """Wait for the writes in flight and commit what they complete; a final checkpoint that failed is
        taken again (the devices still hold that state), up to faults.checkpoint_retries times."""
        for _ in range(self.cfg.faults.checkpoint_retries + 1):
            if not self.ckpt.pending:
                return
            done = self._get([a.wait_saves.remote(self.cfg.cluster.step_timeout_s) for a in self.actors],
                             self.cfg.cluster.step_timeout_s + 30, "finish writing checkpoints")
            last = self.records[-1]["step"] if self.records else None
            before = len(self.ckpt.failed_steps)
            self.ckpt.add_results([s for part in done for s in part], self.world)
            failed = self.ckpt.failed_steps[before:]
            if last is None or last not in failed:
                return
            self._checkpoint_failed(last, last)
            self.save_checkpoint(last)

    def restore(self) -> int:
        """Load the checkpoint chosen at start (if any) into every device; the last completed step."""
        if self.resume_from is None:
            return 0
        storage, manifest = self.resume_from
        t0 = time.perf_counter()
        self._load(storage, manifest, self.cfg.cluster.start_timeout_s)
        self.resumed_from_step = manifest.step
        self.restore_s = time.perf_counter() - t0
        log.info("resumed from %s (step %d, saved by %d devices, now %d) in %.2fs", storage.uri, manifest.step,
                 manifest.world_size, self.world, self.restore_s)
        return manifest.step

    def _load(self, storage: Storage, manifest: CheckpointManifest, timeout_s: float) -> None:
        """Every device loads its part of a checkpoint; with re-placement or replicas on, in the placement it was
        saved with (when it had as many devices and slots), else the initial one."""
        placement = None
        if self.balancer.enabled:
            placement = (placement_from_manifest(manifest.expert_files, self.world, self.balancer.slots,
                                                 manifest.placement) or self.balancer.initial())
        self._get([a.load.remote(storage.uri, asdict(manifest), placement) for a in self.actors], timeout_s,
                  f"load checkpoint {storage.uri}")
        self.balancer.placement = placement

    def replace_experts(self, step: int) -> dict[str, Any] | None:
        """Live expert re-placement between two steps: plan; if worth it, every device adopts the new placement and
        takes the experts it now holds (weights and AdamW moments) from the snapshot of this step, which every
        device has just taken; then a snapshot in the new placement. Nothing restarts, the math is unchanged."""
        plan = self.balancer.plan(self.records)
        if plan is None:
            return None
        new, before, after = plan
        t0 = time.perf_counter()
        if not self.snapshots.items or self.snapshots.items[-1].step != step:
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
        refs = self.snapshots.newest_refs
        self._get([a.restore_snapshots.remote(*refs, placement=new) for a in self.actors],
                  self.cfg.cluster.step_timeout_s, f"move experts to their new devices after step {step}")
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

    # ------------------------------------------------------------- helpers
    def _settle_mixed_precision(self) -> str:
        """train.mixed_precision as every device will run it ('bf16' or 'none'): the same on all devices (the
        combine all_to_all carries the autocast dtype), bf16 only where every device has it in hardware."""
        cfg = self.cfg
        kind = "cuda" if cfg.cluster.use_gpu else "cpu"
        casts = {autocast_dtype(cfg.train.mixed_precision, cfg.train.dtype, kind, bool(i.get("bf16")))
                 for i in self.device_info}
        if len(casts) > 1:
            log.warning("train.mixed_precision=%s: some devices have bf16 in hardware and some not; all run "
                        "without autocast", cfg.train.mixed_precision)
        settled = "none" if None in casts else "bf16"   # each device's cast is bf16 or None
        if cfg.train.mixed_precision == "bf16" and settled == "none":
            log.warning("train.mixed_precision=bf16, but a device's GPU has no bf16 in hardware: running float32")
        return settled

    def _build(self, ranks, timeout_s: float, what: str) -> None:
        """The devices of `ranks` build their shards (initial state: init keyed by seed, rank and expert id)."""
        assert self.data_refs is not None
        cfg = to_dict(self.cfg)
        cfg["train"]["mixed_precision"] = self.mixed_precision
        self._get([self.actors[r].build.remote(cfg, r, self.world, *self.data_refs) for r in ranks], timeout_s, what)

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        return get(refs, timeout_s, what)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name
            signal.signal(signum, previous[signum])  # a second signal acts at once

        for s in previous:
            signal.signal(s, handler)

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore
