"""The Ray-facing device: `DeviceActor`, placed by the DeviceGroup on a bundle of the placement group, holds
one `DeviceShard` (device/shard.py, plain torch) and adds what Ray and the driver need around it: its
process group membership, checkpoint shard writes in a thread of their own, fault injection, and a
progress probe answered from its own thread while a step is stuck.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch

from orchestrator.checkpoint.shard import Snapshot, serialize
from orchestrator.config import config_from_dict
from orchestrator.device import cores as core_binding
from orchestrator.device.faults import injection
from orchestrator.device.steptimes import StepTimes
from orchestrator.device.shard import (DeviceShard, InjectedCrash, StepReport, _bf16_native, autocast_dtype,
                                       rss_bytes)
from orchestrator.parallel import groups
from orchestrator.parallel.groups import CLOCK
from orchestrator.parallel.mesh import current_mesh

log = logging.getLogger(__name__)

__all__ = ["DeviceActor", "RolloutWorker", "StepNotRun", "DeviceShard", "StepReport", "InjectedCrash", "autocast_dtype",
           "rss_bytes"]


class SnapshotHandOver:
    """Host copies of a device's state handed from the step loop's thread (`put`) to the snapshot thread (`take`),
    in the order they were made: a step snapshotted twice (after a rewind) gives its copies in turn."""

    def __init__(self) -> None:
        self.ready: dict[int, deque] = {}
        self.cond = threading.Condition()

    def put(self, step: int, snap: "Snapshot | BaseException", seconds: float) -> None:
        with self.cond:
            self.ready.setdefault(step, deque()).append((snap, seconds))
            self.cond.notify_all()

    def take(self, step: int, timeout_s: float) -> tuple[Snapshot, float]:
        """The oldest copy of `step` (waiting up to `timeout_s` for it); a failure to make it is raised here."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.ready.get(step), timeout=timeout_s):
                raise TimeoutError(f"no snapshot of step {step} was staged within {timeout_s:.0f}s")
            snap, seconds = self.ready[step].popleft()
            if not self.ready[step]:
                del self.ready[step]
        if isinstance(snap, BaseException):
            raise snap
        return snap, seconds


class RolloutWorker:
    """What a rollout worker answers, over its rollout engine (`_engine()`, device/rollout.py): a DeviceActor's own
    (colocated rollouts) or a RolloutActor's (a separate pool, orchestrator/rl/rollout.py)."""

    def _engine(self) -> Any:
        raise NotImplementedError

    def rollout_load(self, refs: list[tuple[str, Any]], version: int) -> int:
        """The trainer's tensors (object refs) into the engine, fetched and copied one at a time; the bytes."""
        return self._engine().load(((name, ray.get(ref)) for name, ref in refs), version)

    def rollout_generate(self, step: int, prompt_ids: list[int]) -> Any:
        return self._engine().generate(step, prompt_ids)

    def rollout_accuracy(self, problems: list[Any]) -> float:
        return self._engine().accuracy(problems)

    def rollout_parameters(self) -> dict[str, torch.Tensor]:
        return self._engine().parameters()

    def rollout_arm_kill(self) -> None:
        """Fault injection (target: rollout): this worker dies in its next generation, after its first prompt."""
        self._engine().kill_armed = True


class StepNotRun(RuntimeError):
    """A train_step refused because a step before it failed on this device and its state was not put back since: a
    step queued behind the failed one (the pipelined driver) must not start, or its collectives would meet the
    peers' collectives of the failed step (on gloo, a size mismatch aborts the peer's process). Not this device's
    own fault: the Watch counts it as collateral (healing/watch.py)."""


class DeviceActor(RolloutWorker):
    """What the driver talks to: made a Ray actor with `ray.remote(DeviceActor)`, one per bundle."""

    def __init__(self, torch_threads: int):
        torch.set_num_threads(max(1, torch_threads))
        # The first optimizer a process builds imports torch._dynamo (1.5 s on a laptop core): pay it now, so a
        # warm standby only has to build its shard when it replaces a device.
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        self.shard: DeviceShard | None = None
        self._build_args: tuple | None = None
        self._save_fault: str | None = None
        self.times = StepTimes()   # when each train_step began and ended, the idle time between (device/steptimes.py)
        self.usable_cpus = core_binding.usable_cpus()   # before any binding: what bind_cores splits
        self.staging = SnapshotHandOver()   # stage_snapshot -> staged_snapshot (the asynchronous snapshot)
        self.failed: int | None = None      # the step that raised here, until the state is put back (StepNotRun)

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": ray.get_gpu_ids(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "bf16": torch.cuda.is_available() and _bf16_native(),
                "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "gpu_memory": torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None,
                "usable_cpus": self.usable_cpus}

    def touch(self, uri: str, name: str) -> str | None:
        """Write a small file `name` under `uri` from this device's node; why it failed, or None (storage check)."""
        from orchestrator.checkpoint.storage import Storage

        try:
            Storage(uri).write(name, b"written by a device\n")
            return None
        except Exception as e:
            return str(e)

    def open_rendezvous(self, addr: str) -> int:
        """Rank 0: listen on addr:<a port the OS picks>, held until join_group serves the group's store on it;
        the port, for the other ranks (bound, not probed: nothing else can take it in between)."""
        return groups.open_rendezvous(addr)

    def join_group(self, backend: str, addr: str, port: int, rank: int, world: int, timeout_s: float,
                   ep: int | None = None) -> None:
        """Join the default process group (rank 0 serving the store on the socket open_rendezvous holds) and build
        the device mesh on it (expert-parallel degree `ep`; every device of the group together). A shard whose
        sharded state or optimizer holds process groups of the group before is built again: the driver restores
        its state next (recovery)."""
        groups.join(backend, addr, port, rank, world, timeout_s, own_ip=ray.util.get_node_ip_address())
        current_mesh(world, rank, ep or world, "cuda" if backend == "nccl" else "cpu")
        if self.shard is not None and self.shard.holds_groups and self._build_args is not None:
            cfg, train, val = self._build_args
            self.shard = DeviceShard(cfg, rank, world, train, val)

    def leave_group(self) -> None:
        groups.leave()

    def build(self, cfg: dict[str, Any], rank: int, world: int, train: np.ndarray, val: np.ndarray) -> None:
        self._build_args = (config_from_dict(cfg), train, val)
        self.shard = DeviceShard(self._build_args[0], rank, world, train, val)
        self.times.reset()
        self.failed = None

    def bind_cores(self, index: int, count: int, mode: str, gpu: bool) -> list[int] | None:
        """cluster.bind_cores: bind this process to the cores of the `index`-th of the `count` devices on its host
        (device/cores.py bind_device); the logical CPUs it runs on now, or None when unbound (also when the OS
        refused: logged, never a failure)."""
        try:
            return core_binding.bind_device(index, count, mode, gpu, self.usable_cpus)
        except OSError as e:
            log.warning("device %d of %d on this host: could not bind it to cores (%s); it stays unbound", index,
                        count, e)
            return None

    def train_step(self, step: int, guard: dict[str, float] | None = None, batch: Any = None) -> StepReport:
        """One step; `batch`: an RL step's batch (data/rl.py RLBatch, resolved from the object store)."""
        assert self.shard is not None, "build() first"
        if self.failed is not None:
            raise StepNotRun(f"step {step} not run: step {self.failed} failed on this device, whose state has not "
                             f"been restored since")
        began = self.times.begin()
        try:
            return self.times.end(self.shard.train_step(step, guard, batch), began)
        except Exception:
            self.failed = step
            raise

    # ----------------------------------------------------------------- RL
    def sync_weights(self) -> tuple[list[tuple[str, Any]], int]:
        """The tensors this device sends the rollout engines (device/rl.py sync_tensors), each put in the object
        store on its own: (name, ref) pairs and their bytes. Collective: every device calls it."""
        assert self.shard is not None, "build() first"
        out, size = [], 0
        from orchestrator.device.rl import sync_tensors

        with self.times.other_call():
            for name, t in sync_tensors(self.shard):
                out.append((name, ray.put(t)))
                size += t.numel() * t.element_size()
        return out, size

    def _engine(self) -> Any:
        if getattr(self, "engine", None) is None:
            from orchestrator.device.rollout import RolloutEngine

            assert self._build_args is not None, "build() first"
            with torch.random.fork_rng():   # the device's own RNG state (checkpointed) is not the engine's to draw on
                self.engine = RolloutEngine(self._build_args[0])
        return self.engine

    def set_rl_pending(self, batch: Any) -> None:
        """RL one step off-policy: the next step's batch (resolved from the object store; None: none), kept in this
        device's snapshots and checkpoints (rank 0's)."""
        from orchestrator.data.rl import flatten

        assert self.shard is not None, "build() first"
        self.shard.rl_pending = flatten(batch) if batch is not None else {}

    def rl_pending(self) -> Any:
        """The batch set_rl_pending kept, as restored with a snapshot or checkpoint (None: none)."""
        from orchestrator.data.rl import unflatten

        assert self.shard is not None, "build() first"
        return unflatten(self.shard.rl_pending) if self.shard.rl_pending else None

    def anticipation_windows(self) -> list[tuple[int, int]]:
        """The windows of anticipatory routing this device holds (as restored with a checkpoint; device/anticipate.py)."""
        assert self.shard is not None, "build() first"
        return list(self.shard.anticipator.windows) if self.shard.anticipator is not None else []

    # ------------------------------------------------------------ checkpoints
    @ray.method(concurrency_group="io")
    def write_shard(self, snap: Snapshot, uri: str) -> dict[str, Any]:
        """Persist one device's snapshot (any rank's: a shard whose writer died is rewritten by another device)
        as its files under `uri`; the result the driver commits from: {step, rank, files: name -> {size,
        sha256}, expert_files, optimizer_step, placement, write_s, error}. Runs in a thread of its own, so
        training goes on meanwhile; the snapshot comes from the object store (the driver owns it)."""
        from orchestrator.checkpoint.storage import Storage

        fault, self._save_fault = self._save_fault, None
        result: dict[str, Any] = {"step": snap.step, "rank": snap.rank, "files": {}, "error": None,
                                  "expert_files": snap.expert_files, "optimizer_step": snap.optimizer_step,
                                  "placement": snap.placement, "index": snap.index,
                                  "optimizer_steps": snap.optimizer_steps, "writer_pid": os.getpid()}
        t0 = time.perf_counter()
        try:
            storage = Storage(uri)
            for name, tensors in snap.files.items():
                data, meta = serialize(tensors)
                if fault in ("fail", "hang"):  # injected: half a file written, then the writer fails or hangs
                    storage.write(name, data[: len(data) // 2])
                    if fault == "hang":
                        time.sleep(3600)
                    raise OSError(f"injected failure while writing {name}")
                storage.write(name, data)
                result["files"][name] = meta
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        result["write_s"] = time.perf_counter() - t0
        return result

    def inject(self, kind: str, steps: int = 0, delay_s: float = 0.0, in_collective: bool = False) -> None:
        """Fault injection, called just before the step it strikes: what `kind` does is its rule in
        orchestrator/device/faults.py (INJECTIONS): the process killed now (with its node's raylet first, for a node
        fault), or the shard armed for its next step(s)."""
        rule = injection(kind)
        if rule.on_node:
            os.kill(os.getppid(), signal.SIGKILL)
        if rule.kills:
            os.kill(os.getpid(), signal.SIGKILL)
        if rule.arm is None:
            raise ValueError(f"a {kind} fault is not injected into a device's step")
        assert self.shard is not None, "build() first"
        rule.arm(self.shard, steps, delay_s, in_collective)

    @ray.method(concurrency_group="watch")
    def progress(self) -> dict[str, Any]:
        """Where this device is in its step; answered from its own thread, even while a step is stuck."""
        return CLOCK.state()

    def snapshot(self, step: int) -> tuple[dict[str, Any], Snapshot]:
        """Copy this device's state to host memory: called with num_returns=2, a tiny "done" record (how long the step
        loop stalled) and the snapshot, which lands in the object store owned by the caller (the driver): an
        in-memory copy that outlives this actor, what recovery restores and `write_shard` persists. The serial
        form (parallel.snapshot_serialize=inline): the object store's copy is made before the next train_step runs."""
        # No host copy of CPU tensors: Ray serializes the return value into the object store (its one copy) before
        # this actor runs its next call of the same group (train_step), which is what could change them (that
        # serialization falls after the other-call clock: it counts as idle time, not as this call's).
        snap, seconds = self._snapshot(step, copy=False)
        return {"step": step, "seconds": seconds}, snap

    def _snapshot(self, step: int, copy: bool) -> tuple[Snapshot, float]:
        """This device's state after `step` (DeviceShard.snapshot), timed as an other call; and its seconds."""
        assert self.shard is not None, "build() first"
        t0 = time.perf_counter()
        with self.times.other_call():
            snap = self.shard.snapshot(step, copy=copy)
        return snap, time.perf_counter() - t0

    def stage_snapshot(self, step: int) -> None:
        """The asynchronous snapshot's first half, in the step loop's order (before the next train_step): this
        device's state copied to host memory (a memcpy on CPU; on a GPU queued into pinned buffers and waited
        for), handed to `staged_snapshot`. A failure is handed over too, and raised there."""
        try:
            self.staging.put(step, *self._snapshot(step, copy=True))
        except Exception as e:
            self.staging.put(step, e, 0.0)

    @ray.method(concurrency_group="snapshot")
    def staged_snapshot(self, step: int, timeout_s: float) -> tuple[dict[str, Any], Snapshot]:
        """The asynchronous snapshot's second half (parallel.snapshot_serialize=thread), in a thread of its own: the
        copy `stage_snapshot(step)` made, returned as `snapshot` returns it (num_returns=2). Its serialization into the
        object store (the driver owns it) runs here, while the next train_step runs; the "done" record's seconds
        are the staging's, the stall of the step loop. TimeoutError when no copy of `step` comes in `timeout_s`."""
        snap, seconds = self.staging.take(step, timeout_s)
        return {"step": step, "seconds": seconds}, snap

    def restore_snapshots(self, *snapshots: Snapshot, placement: list[list[list[int]]] | None = None) -> None:
        """Restore from in-memory snapshots of one step (rank 0's and those holding this device's experts);
        with `placement`, adopt it first (expert re-placement: the experts come from whichever snapshot has them)."""
        assert self.shard is not None, "build() first"
        if placement is not None:
            self.shard.set_placement(placement)
        self.shard.restore_snapshots(list(snapshots))
        self.failed = None

    def fail_next_save(self, mode: str = "fail") -> None:
        """Fault hook: the next shard this device writes stops midway and fails (`fail`) or hangs there (`hang`)."""
        self._save_fault = mode

    def load(self, uri: str, manifest: dict[str, Any], placement: list[list[list[int]]] | None = None) -> None:
        from orchestrator.checkpoint.storage import Storage

        assert self.shard is not None, "build() first"
        if placement is not None:
            self.shard.set_placement(placement)
        storage = Storage(uri)
        self.shard.restore(manifest, storage.read, uri)
        self.failed = None

    def evaluate(self, num_batches: int) -> float:
        assert self.shard is not None, "build() first"
        with self.times.other_call():
            return self.shard.evaluate(num_batches)

    def global_parameters(self) -> dict[str, torch.Tensor]:
        assert self.shard is not None, "build() first"
        return self.shard.global_parameters()
