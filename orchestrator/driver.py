"""The driver: owns a run's placement group, device actors and step loop.

start(): load the corpus (bad data fails here, before any actor) -> placement group with one bundle
per device -> one DeviceActor per bundle -> process group -> each actor builds its shard.
run():   for each step, every actor's train_step in parallel -> StepReports -> metrics.jsonl and the
progress display -> validation at the end -> summary.json.
shutdown(): kill the actors and remove the placement group; also after errors, Ctrl-C and SIGTERM
(the first signal stops after the step in flight, a second one interrupts at once).
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import Config, to_dict
from orchestrator.data import load_corpus
from orchestrator.device import DeviceActor, StepReport
from orchestrator.errors import RunError
from orchestrator.monitor import MetricsLog, Progress
from orchestrator.parallel.groups import pick_backend

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


class Driver:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.world = cfg.cluster.num_devices
        self.actors: list[Any] = []
        self.device_info: list[dict[str, Any]] = []
        self.pg = None
        self.stop_signal: str | None = None

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        cfg, c = self.cfg, self.cfg.cluster
        corpus = load_corpus(cfg.data)
        corpus.check_vocab(cfg.model.vocab_size, cfg.data.path)
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
        threads = c.torch_threads or max(1, int(c.cpus_per_device))
        actor_cls = ray.remote(DeviceActor)
        self.actors = [
            actor_cls.options(num_cpus=c.cpus_per_device, num_gpus=1 if c.use_gpu else 0, max_restarts=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                              ).remote(threads)
            for i in range(self.world)]
        self.device_info = self._get([a.info.remote() for a in self.actors], c.start_timeout_s, "start device actors")
        self.form_group()
        train_ref, val_ref = ray.put(corpus.train), ray.put(corpus.val)
        self._get([a.build.remote(to_dict(cfg), rank, self.world, train_ref, val_ref)
                   for rank, a in enumerate(self.actors)], c.start_timeout_s, "build device shards")
        nodes = len({i["node_id"] for i in self.device_info})
        log.info("devices: %d actors on %d node(s), backend %s", self.world, nodes, self.backend)

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
        reports: list[StepReport] = self._get([a.train_step.remote(step) for a in self.actors],
                                              self.cfg.cluster.step_timeout_s, f"run step {step}")
        wall = time.perf_counter() - t0
        r0 = reports[0]
        return {"step": step, "loss": r0.loss, "grad_norm": r0.grad_norm, "lr": r0.lr, "tokens": r0.tokens,
                "tokens_per_s": r0.tokens / wall, "step_time_s": wall,
                "device_step_time_s": [r.compute_time_s for r in reports],
                "expert_load": r0.expert_load, "time": time.time()}

    def run(self) -> RunSummary:
        cfg = self.cfg
        t_start = time.perf_counter()
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        progress = Progress(cfg.train.steps, cfg.run.progress)
        restore = self._install_signal_handlers()
        records: list[dict[str, Any]] = []
        val_loss = None
        try:
            self.start()
            for step in range(1, cfg.train.steps + 1):
                if self.stop_signal:
                    progress.message(f"{self.stop_signal}: stopping after step {step - 1}")
                    break
                rec = self.step(step)
                records.append(rec)
                metrics.write(rec)
                progress.update(step, rec["loss"], rec["tokens_per_s"], rec["step_time_s"])
            if cfg.train.eval_batches and not self.stop_signal and records:
                val_loss = self._get([a.evaluate.remote(cfg.train.eval_batches) for a in self.actors],
                                     cfg.cluster.step_timeout_s, "evaluate")[0]
        finally:
            progress.close()
            metrics.close()
            restore()
            self.shutdown()
        timed = records[1:] or records
        step_time = sum(r["step_time_s"] for r in timed) / max(1, len(timed))
        summary = RunSummary(
            run_dir=str(self.run_dir), steps_done=len(records),
            final_loss=records[-1]["loss"] if records else None, val_loss=val_loss,
            tokens_per_s=(cfg.train.global_batch_size * cfg.data.seq_len) / step_time if records else 0.0,
            steps_per_s=1.0 / step_time if records else 0.0, wall_time_s=time.perf_counter() - t_start,
            stopped_by_signal=self.stop_signal)
        (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        return summary

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
