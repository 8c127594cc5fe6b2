"""The driver: owns a run's placement group, device actors and step loop.

start(): load the corpus and find the checkpoint to resume (bad data, an unreachable checkpoint URI
or an incompatible checkpoint fail here, before any actor) -> placement group with one bundle per
device -> one DeviceActor per bundle -> process group -> each actor builds its shard.
run():   restore the checkpoint into every device -> for each step, every actor's train_step in
parallel -> StepReports -> metrics.jsonl and the progress display; checkpoints by the policy
(snapshot now, written in the background, committed by the CheckpointManager once every device
reported its files) -> final checkpoint -> validation -> summary.json.
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
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.checkpoint.manager import CheckpointManager, CheckpointManifest, check_compatible, find_resume
from orchestrator.config import Config, to_dict
from orchestrator.data import load_corpus
from orchestrator.device import DeviceActor, StepReport
from orchestrator.errors import RunError
from orchestrator.healing import Healer, Injector, StepFailure, Watch
from orchestrator.monitor import MetricsLog, Progress
from orchestrator.parallel.groups import pick_backend
from orchestrator.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class InMemorySnapshot:
    step: int
    done_refs: list[Any]   # tiny: resolve once each device has copied its state
    refs: list[Any]        # the snapshots themselves, in the object store, owned by this driver


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


class Driver:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = cfg.cluster.num_devices
        self.actors: list[Any] = []
        self.device_info: list[dict[str, Any]] = []
        self.pg = None
        self.stop_signal: str | None = None
        self.ckpt = CheckpointManager(cfg, cfg.checkpoint.dir or str(run_dir / "checkpoints"))
        self.resume_from: tuple[Storage, CheckpointManifest] | None = None
        self.resumed_from_step: int | None = None
        self.restore_s: float | None = None
        self.snapshots: list[InMemorySnapshot] = []  # the newest two; the older one is the fallback
        self.data_refs: tuple[Any, Any] | None = None
        self.injector, self.watch, self.healer = Injector(cfg.faults), Watch(), Healer(cfg.faults)

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        cfg, c = self.cfg, self.cfg.cluster
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
        bundle = {"CPU": c.cpus_per_device, **({"GPU": 1} if c.use_gpu else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=c.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=c.start_timeout_s)
        except GetTimeoutError:
            raise RunError(f"could not place {self.world} devices of {bundle} each with strategy "
                           f"{c.placement_strategy} within {c.start_timeout_s:.0f}s; the cluster has "
                           f"{ray.cluster_resources()}. Lower cluster.num_devices or cluster.cpus_per_device, "
                           f"or add nodes") from None
        self.actors = [self._new_actor(i) for i in range(self.world)]
        self.device_info = self._get([a.info.remote() for a in self.actors], c.start_timeout_s, "start device actors")
        self.form_group()
        self.data_refs = (ray.put(corpus.train), ray.put(corpus.val))
        self._get([a.build.remote(to_dict(cfg), rank, self.world, *self.data_refs)
                   for rank, a in enumerate(self.actors)], c.start_timeout_s, "build device shards")
        nodes = len({i["node_id"] for i in self.device_info})
        log.info("devices: %d actors on %d node(s), backend %s", self.world, nodes, self.backend)

    def _new_actor(self, rank: int) -> Any:
        c = self.cfg.cluster
        threads = c.torch_threads or max(1, int(c.cpus_per_device))
        return ray.remote(DeviceActor).options(
            num_cpus=c.cpus_per_device, num_gpus=1 if c.use_gpu else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        ).remote(threads)

    def node_of(self, rank: int) -> str | None:
        return self.device_info[rank].get("node_id") if rank < len(self.device_info) else None

    @property
    def backend(self) -> str:
        return pick_backend(self.cfg.cluster.backend, self.cfg.cluster.use_gpu)

    def form_group(self) -> None:
        """(Re)form the process group over the current actors; rank 0's node hosts the rendezvous."""
        if self.world == 1:
            return
        c = self.cfg.cluster
        port = self._get([self.actors[0].free_port.remote()], c.start_timeout_s, "pick a rendezvous port")[0]
        addr = self.device_info[0]["ip"]
        self._get([a.join_group.remote(self.backend, addr, port, rank, self.world, c.collective_timeout_s)
                   for rank, a in enumerate(self.actors)], c.start_timeout_s, "form the process group")

    # ------------------------------------------------------------------ loop
    def step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        reports: list[StepReport] = self.watch.collect(self, [a.train_step.remote(step) for a in self.actors], step,
                                                       self.cfg.cluster.step_timeout_s)
        wall = time.perf_counter() - t0
        self.collect_saves(reports)
        r0 = reports[0]
        return {"step": step, "loss": r0.loss, "grad_norm": r0.grad_norm, "lr": r0.lr, "tokens": r0.tokens,
                "tokens_per_s": r0.tokens / wall, "step_time_s": wall,
                "device_step_time_s": [r.compute_time_s for r in reports],
                "expert_load": r0.expert_load, "time": time.time()}

    def run(self) -> RunSummary:
        cfg = self.cfg
        t_start = time.perf_counter()
        restore_signals = self._install_signal_handlers()
        records: list[dict[str, Any]] = []
        val_loss = None
        progress = metrics = None
        try:
            self.start()
            first = self.restore() + 1
            metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through_step=first - 1)
            progress = Progress(cfg.train.steps, cfg.run.progress, first_step=first)
            self.snapshot(first - 1)
            step = first
            while step <= cfg.train.steps:
                if self.stop_signal:
                    progress.message(f"{self.stop_signal}: stopping after step {step - 1}")
                    break
                self.injector.before_step(self, step)
                try:
                    rec = self.step(step)
                except StepFailure as failure:
                    step = self.healer.heal(self, failure) + 1
                    records = [r for r in records if r["step"] < step]
                    metrics.truncate(step - 1)  # replayed steps are recorded once, when they complete
                    progress.message(f"healed: {failure}; replaying from step {step}")
                    continue
                if self.ckpt.due(step):
                    self.save_checkpoint(step)
                    rec["checkpoint_saved"] = True
                elif cfg.faults.snapshot_every and step % cfg.faults.snapshot_every == 0:
                    self.snapshot(step)
                records.append(rec)
                metrics.write(rec)
                progress.update(step, rec["loss"], rec["tokens_per_s"], rec["step_time_s"])
                step += 1
            last = records[-1]["step"] if records else first - 1
            policy = cfg.checkpoint
            if records and last != self.ckpt.last_saved_step and (policy.on_signal if self.stop_signal else policy.at_end):
                self.save_checkpoint(last)
            self.finish_checkpoints()
            if cfg.train.eval_batches and not self.stop_signal and records:
                val_loss = self._get([a.evaluate.remote(cfg.train.eval_batches) for a in self.actors],
                                     cfg.cluster.step_timeout_s, "evaluate")[0]
        finally:
            for closable in (progress, metrics):
                if closable is not None:
                    closable.close()
            restore_signals()
            self.shutdown()
        timed = records[1:] or records
        step_time = sum(r["step_time_s"] for r in timed) / max(1, len(timed))
        summary = RunSummary(
            run_dir=str(self.run_dir), steps_done=len(records),
            final_loss=records[-1]["loss"] if records else None, val_loss=val_loss,
            tokens_per_s=(cfg.train.global_batch_size * cfg.data.seq_len) / step_time if records else 0.0,
            steps_per_s=1.0 / step_time if records else 0.0, wall_time_s=time.perf_counter() - t_start,
            stopped_by_signal=self.stop_signal, resumed_from_step=self.resumed_from_step,
            checkpoints_committed=list(self.ckpt.committed_steps), checkpoints_failed=list(self.ckpt.failed_steps),
            checkpoint_bytes=self.ckpt.bytes_saved, checkpoint_write_s=self.ckpt.write_seconds,
            checkpoint_commit_s=self.ckpt.commit_seconds, restore_s=self.restore_s,
            recoveries=self.healer.recoveries, incidents=self.healer.report())
        (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        return summary

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> None:
        """Every device snapshots the state after `step` and writes its shard in the background.

        The snapshots come back as object refs owned by this driver: the in-memory copy recovery can
        restore from. The checkpoint is committed once every device reported its files written.
        """
        uri = self.ckpt.uri_for(step)
        self.ckpt.started_save(step)
        self._keep_snapshot(step, [a.save.options(num_returns=2).remote(step, uri, self.cfg.checkpoint.async_save)
                                   for a in self.actors])

    def snapshot(self, step: int) -> None:
        """In-memory snapshot of every device after `step` (object refs owned by this driver)."""
        if self.cfg.faults.snapshot_every:
            self._keep_snapshot(step, [a.snapshot.options(num_returns=2).remote(step) for a in self.actors])

    def _keep_snapshot(self, step: int, pairs: list[Any]) -> None:
        self.snapshots = self.snapshots[-1:] + [InMemorySnapshot(step, [p[0] for p in pairs], [p[1] for p in pairs])]

    @property
    def snapshot_refs(self) -> list[Any]:
        return self.snapshots[-1].refs if self.snapshots else []

    def usable_snapshot(self, timeout_s: float) -> "InMemorySnapshot":
        """The newest snapshot every device finished taking (a device killed before it got to the newest
        one leaves that one incomplete)."""
        for snap in reversed(self.snapshots):
            try:
                ray.get(snap.done_refs, timeout=timeout_s)
                return snap
            except Exception as e:
                log.warning("in-memory snapshot of step %d is incomplete (%s); trying an older one", snap.step,
                            type(e).__name__)
        raise RunError("no complete in-memory snapshot to recover from")

    def recover(self, replace: list[int], timeout_s: float) -> int:
        """Replace the devices in `replace`, re-form the group, put every device back to the newest
        complete snapshot; returns the step of that snapshot."""
        snap = self.usable_snapshot(timeout_s)
        for rank in replace:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # already gone
                pass
            self.actors[rank] = self._new_actor(rank)
        survivors = [a for rank, a in enumerate(self.actors) if rank not in replace]
        self._get([a.leave_group.remote() for a in survivors], timeout_s, "leave the broken process group")
        for rank in replace:
            self.device_info[rank] = self._get([self.actors[rank].info.remote()], timeout_s, "start a replacement")[0]
        self.form_group()
        assert self.data_refs is not None
        self._get([self.actors[r].build.remote(to_dict(self.cfg), r, self.world, *self.data_refs) for r in replace],
                  timeout_s, "build the replacement shards")
        refs = snap.refs
        self._get([a.restore_snapshots.remote(*([refs[0]] if rank == 0 else [refs[0], refs[rank]]))
                   for rank, a in enumerate(self.actors)], timeout_s, f"restore the snapshot of step {snap.step}")
        return snap.step

    def collect_saves(self, reports: list[StepReport]) -> None:
        self.ckpt.add_results([s for r in reports for s in r.saves], self.world)

    def finish_checkpoints(self) -> None:
        """Wait for the writes in flight and commit what they complete."""
        if self.ckpt.pending:
            done = self._get([a.wait_saves.remote(self.cfg.cluster.step_timeout_s) for a in self.actors],
                             self.cfg.cluster.step_timeout_s + 30, "finish writing checkpoints")
            self.ckpt.add_results([s for part in done for s in part], self.world)

    def restore(self) -> int:
        """Load the checkpoint chosen at start (if any) into every device; the last completed step."""
        if self.resume_from is None:
            return 0
        storage, manifest = self.resume_from
        t0 = time.perf_counter()
        self._get([a.load.remote(storage.uri, asdict(manifest)) for a in self.actors],
                  self.cfg.cluster.start_timeout_s, f"load checkpoint {storage.uri}")
        self.resumed_from_step = manifest.step
        self.restore_s = time.perf_counter() - t0
        log.info("resumed from %s (step %d, saved by %d devices, now %d) in %.2fs", storage.uri, manifest.step,
                 manifest.world_size, self.world, self.restore_s)
        return manifest.step

    def global_parameters(self) -> dict[str, Any]:
        """Every parameter of the model, gathered from the devices (experts by global id)."""
        merged: dict[str, Any] = {}
        for part in self._get([a.global_parameters.remote() for a in self.actors],
                              self.cfg.cluster.step_timeout_s, "report their parameters"):
            merged.update(part)
        return merged

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead: nothing to do
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    # ------------------------------------------------------------- helpers
    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise RunError(f"timed out after {timeout_s:.0f}s waiting for the devices to {what}") from None
        except RayActorError as e:
            raise RunError(f"a device actor died while trying to {what}: {e}") from e

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
