"""Checkpoint coordination, the driver's side, in one place: in-memory snapshots, shard writes, commits,
retention, the run's timeline.

A checkpoint of step s: every device copies its state to host memory (`DeviceActor.snapshot`; the copy
lands in the object store, owned by the driver, so it outlives the device), then each device writes its
own shard from that copy in a thread of its own (`DeviceActor.write_shard`) while training goes on.
Each write's result is an object ref the driver polls, so the commit never rides on a later step:
    every shard written            -> manifest committed (atomically), retention applied
    a writer died (its actor died) -> the shard is rewritten from the same snapshot by the device that now
                                      holds that rank (a replacement) or by another live one
    a snapshot lost, a write error -> the checkpoint failed: its half-written folder (no manifest: nothing
                                      loads it) is removed at once, so a full disk has its room back for the
                                      retake the Healer schedules
`finish` waits for what is in flight, within a deadline; `commit_through` holds back the commit of a
checkpoint whose step's record could not be written (a full run directory: a committed checkpoint's step is
in metrics.jsonl). `abandon` removes the folders of saves a stopped run leaves unfinished, once their writers
are gone. Commits name their run and the checkpoint they descend from (timeline.py); retention never deletes
the checkpoint just committed or one being written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from orchestrator.checkpoint.manager import (MANIFEST, CheckpointManifest, apply_retention, commit_manifest,
                                             find_resume, fingerprint_hash, model_fingerprint, step_dir)
from orchestrator.checkpoint.shard import merge_optimizer_steps
from orchestrator.checkpoint.snapshots import InMemorySnapshot, SnapshotStore
from orchestrator.checkpoint.timeline import ResumePlan, training_settings
from orchestrator.config import Config, mesh_shape, snapshot_in_thread
from orchestrator.errors import last_line
from orchestrator.monitoring.goodput import Goodput
from orchestrator.checkpoint.storage import Storage, StorageError

log = logging.getLogger(__name__)


@dataclass
class _Write:
    rank: int        # whose shard (the rank of the snapshot it writes)
    ref: Any         # the write_shard call in flight
    actor: Any       # the actor writing it
    attempts: int = 1


@dataclass
class PendingCheckpoint:
    step: int
    uri: str
    started: float
    snapshot: InMemorySnapshot
    writes: dict[int, _Write] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class CheckpointFailure:
    step: int
    detail: str
    ranks: list[int]


class Checkpoints:
    """The run's checkpoints and in-memory snapshots (see the module docstring)."""

    def __init__(self, cfg: Config, plan: ResumePlan, goodput: Goodput):
        self.cfg, self.policy, self.world = cfg, cfg.checkpoint, cfg.cluster.num_devices
        self.run_id = plan.run_id
        self.storage = Storage(plan.folder)
        self.fingerprint = model_fingerprint(cfg)
        self.training = training_settings(cfg)
        ep, dp = mesh_shape(cfg)
        self.layout = {"world": self.world, "expert_parallel": ep, "data_parallel": dp,
                       "zero_stage": cfg.memory.zero_stage}
        self.lr_horizon = plan.lr_horizon
        self.origin = plan.parent                # what this process's first commit descends from
        self.resumed_step = plan.step
        self.snapshots = SnapshotStore(goodput)
        self.pending: dict[int, PendingCheckpoint] = {}
        self.force: set[int] = set()              # steps to checkpoint whatever the policy (checkpoint faults)
        self.committed_steps: list[int] = []      # by this process, in order
        self.failed_steps: list[int] = []
        self.last_saved_step = 0
        self.write_seconds: dict[int, float] = {}    # step -> slowest shard write
        self.commit_seconds: dict[int, float] = {}   # step -> snapshot started .. manifest committed
        self.bytes_saved: dict[int, int] = {}

    # ------------------------------------------------------------ policy
    def wanted(self, step: int, retry_at: int | None) -> bool:
        """Is a checkpoint of `step` due: by checkpoint.every_steps, a planned checkpoint fault, or a retry?"""
        every = self.policy.every_steps
        due = (every and step % every == 0) or step in self.force or (retry_at is not None and step >= retry_at)
        return bool(due) and step not in self.committed_steps and step not in self.pending

    def uri_for(self, step: int) -> str:
        return self.storage.child(step_dir(step)).uri

    def last_checkpoint(self, step: int) -> int | None:
        """The newest committed checkpoint at or before `step` (this run's, or the one it resumed from)."""
        known = [s for s in self.committed_steps + [self.resumed_step] if 0 < s <= step]
        return max(known) if known else None

    # ------------------------------------------------------------ taking
    def snapshot(self, step: int, actors: list[Any], placement: Any, calls: list[Any] | None = None) -> None:
        """In-memory snapshot of every device after `step` (object refs owned by the driver); `calls`: its
        `snapshot_calls`, made already (queued behind `step` by the pipelined driver), else made now."""
        self.snapshots.keep(step, calls if calls is not None else self.snapshot_calls(step, actors),
                            placement=placement)

    def snapshot_queueable(self) -> bool:
        """May a snapshot's calls be queued behind its step, before the step came back (the pipelined driver)? Not
        when serialized from the snapshot thread: `staged_snapshot` waits for the step loop's copy for
        cluster.step_timeout_s from when it starts, which is at once, so the step's own time would count against it,
        and a copy it gave up on would be left for the same step's next snapshot to take."""
        return not snapshot_in_thread(self.cfg)

    def snapshot_calls(self, step: int, actors: list[Any]) -> list[Any]:
        """Every device's (done, snapshot) refs of `step`: serialized from the snapshot thread (config/mesh.py
        snapshot_in_thread), the copy is made in the step loop's order (stage_snapshot) and serialized by
        staged_snapshot while the next step runs; else one `snapshot` call, serialized before the next step."""
        if not snapshot_in_thread(self.cfg):
            return [a.snapshot.options(num_returns=2).remote(step) for a in actors]
        pairs = []
        for a in actors:
            a.stage_snapshot.remote(step)   # its failure is raised by staged_snapshot; its death fails that too
            pairs.append(a.staged_snapshot.options(num_returns=2).remote(step, self.cfg.cluster.step_timeout_s))
        return pairs

    def save(self, step: int, actors: list[Any], placement: Any) -> None:
        """Snapshot every device after `step`, then have each write its shard; committed by `poll`/`finish`."""
        name = step_dir(step)
        try:
            if name in self.storage.list_dirs():  # a leftover of a save that never committed
                self.storage.delete_dir(name)
        except StorageError as e:  # the writes will say whether the storage works
            log.warning("could not clear %s before the checkpoint of step %d: %s", name, step, e)
        self.force.discard(step)
        snap = self.snapshots.keep(step, self.snapshot_calls(step, actors), "checkpoint", placement)
        p = PendingCheckpoint(step, self.uri_for(step), time.perf_counter(), snap)
        for rank, actor in enumerate(actors):
            p.writes[rank] = _Write(rank, actor.write_shard.remote(snap.refs[rank], p.uri), actor)
        self.pending[step] = p
        self.last_saved_step = step
        if not self.policy.async_save:  # training waits until the shards are written
            ray.wait([w.ref for w in p.writes.values()], num_returns=len(p.writes),
                     timeout=self.cfg.cluster.step_timeout_s)

    def after_step(self, step: int, actors: list[Any], placement: Any, retry_at: int | None) -> bool:
        """A checkpoint of `step` when one is wanted, else an in-memory snapshot on the faults.snapshot_every
        cadence (unless one of this step was just taken, by a re-placement). True when a checkpoint started."""
        if self.wanted(step, retry_at):
            self.save(step, actors, placement)
            return True
        if self.snapshot_due(step):
            self.snapshot(step, actors, placement)
        return False

    def snapshot_due(self, step: int) -> bool:
        """Does `step` take an in-memory snapshot on the faults.snapshot_every cadence (none of it taken yet)?"""
        every = self.cfg.faults.snapshot_every
        items = self.snapshots.items
        return bool(every) and step % every == 0 and not (items and items[-1].step == step)

    # ------------------------------------------------------------ completing
    def poll(self, actors: list[Any], timeout_s: float = 0.0,
             commit_through: int | None = None) -> tuple[list[int], list[CheckpointFailure]]:
        """Take the shard writes that finished; commit each checkpoint whose shards are all written (and whose
        step is at most `commit_through`, when given: a later one fails instead). Returns the steps committed and
        the checkpoints that failed."""
        committed, failed = [], []
        for step in sorted(self.pending):
            p = self.pending[step]
            if p.writes:
                refs = {w.ref: w for w in p.writes.values()}
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
                for ref in ready:
                    self._take(p, refs[ref], actors)
            if p.writes and time.perf_counter() - p.started > self.cfg.cluster.step_timeout_s:
                for rank in p.writes:  # a write that hangs (storage stalled) must not hold every later commit
                    p.errors[rank] = (f"device {rank}'s shard was not written within "
                                      f"{self.cfg.cluster.step_timeout_s:.0f}s (cluster.step_timeout_s)")
                p.writes.clear()
            if p.writes:
                continue
            del self.pending[step]
            if commit_through is not None and step > commit_through and not p.errors:
                p.errors[-1] = f"not committed: the record of step {step} could not be written to the run directory"
            missing = sorted(set(range(self.world)) - set(p.results))
            if missing and not p.errors:  # every shard or no commit, whatever interrupted the bookkeeping
                p.errors[-1] = f"no written shard from device(s) {missing}"
            if not p.errors:
                try:
                    self._commit(p)
                    committed.append(step)
                    continue
                except StorageError as e:  # the manifest could not be written: not committed, retaken later
                    p.errors[-1] = f"committing the manifest: {e}"
            failed.append(self._failed(p))
        return committed, failed

    def finish(self, actors: list[Any], timeout_s: float,
               commit_through: int | None = None) -> tuple[list[int], list[CheckpointFailure]]:
        """Wait (at most `timeout_s`) for every write in flight; commit what completes (up to `commit_through`, as
        `poll`), fail what does not."""
        deadline = time.monotonic() + timeout_s
        committed, failed = [], []
        while self.pending:
            left = deadline - time.monotonic()
            c, f = self.poll(actors, timeout_s=max(0.0, min(1.0, left)), commit_through=commit_through)
            committed, failed = committed + c, failed + f
            if left <= 0:
                for step, p in sorted(self.pending.items()):
                    for rank in p.writes:
                        p.errors[rank] = f"device {rank}'s shard was not written within {timeout_s:.0f}s"
                    p.writes.clear()
                    failed.append(self._failed(p))
                self.pending.clear()
        return committed, failed

    def _take(self, p: PendingCheckpoint, w: _Write, actors: list[Any]) -> None:
        try:  # the write leaves p.writes only once its outcome is in hand (a signal may land inside ray.get)
            result = ray.get(w.ref)
        except RayActorError as e:
            del p.writes[w.rank]
            self._rewrite(p, w, actors, e)
            return
        except Exception as e:  # the snapshot was lost with its node, or the writer raised
            del p.writes[w.rank]
            p.errors[w.rank] = f"device {w.rank}: {last_line(e)}"
            return
        del p.writes[w.rank]
        if result.get("error"):
            p.errors[w.rank] = f"rank {w.rank}: {result['error']}"
        else:
            p.results[w.rank] = result

    def _rewrite(self, p: PendingCheckpoint, w: _Write, actors: list[Any], e: Exception) -> None:
        """The writer of rank w.rank's shard died: have another device write it from the same snapshot, unless the
        snapshot itself was never taken (the device died first)."""
        done = p.snapshot.done_refs[w.rank]
        ready, _ = ray.wait([done], timeout=0)
        try:
            if not ready:
                raise RuntimeError("its snapshot was never taken")
            ray.get(done)
        except Exception:
            p.errors[w.rank] = f"device {w.rank} died before its state was copied ({last_line(e)})"
            return
        if w.attempts > self.world:
            p.errors[w.rank] = f"device {w.rank}'s shard: {w.attempts} writers died ({last_line(e)})"
            return
        # The device now holding this rank (a replacement), else the next one: never the same dead handle.
        writer = next((a for a in [actors[w.rank]] + actors[w.rank + 1:] + actors[:w.rank] if a is not w.actor), None)
        if writer is None:  # one device, and it died: the checkpoint is retaken once the group is healed
            p.errors[w.rank] = f"device {w.rank}'s writer died and no other device can rewrite it ({last_line(e)})"
            return
        log.warning("checkpoint of step %d: the writer of device %d's shard died; rewriting it from the snapshot "
                    "(attempt %d)", p.step, w.rank, w.attempts + 1)
        p.writes[w.rank] = _Write(w.rank, writer.write_shard.remote(p.snapshot.refs[w.rank], p.uri), writer,
                                  w.attempts + 1)

    def _commit(self, p: PendingCheckpoint) -> CheckpointManifest:
        files: dict[str, dict[str, Any]] = {}
        expert_files: dict[str, dict[str, str]] = {}
        index: dict[str, list[list[Any]]] = {}
        optimizer_steps: dict[str, int] = {}
        for r in p.results.values():
            files.update(r["files"])
            merge_optimizer_steps(optimizer_steps, r.get("optimizer_steps", {}), f"checkpoint of step {p.step}")
            for layer, placement in r["expert_files"].items():
                expert_files.setdefault(layer, {}).update(placement)
            for key, pieces in r.get("index", {}).items():
                index.setdefault(key, []).extend(pieces)
        first = p.results[0]
        manifest = CheckpointManifest(step=p.step, world_size=self.world, files=files, expert_files=expert_files,
                                      optimizer_step=first["optimizer_step"],
                                      config_hash=fingerprint_hash(self.fingerprint), fingerprint=self.fingerprint,
                                      seed=self.cfg.seed, placement=first.get("placement"), run_id=self.run_id,
                                      parent=self._parent(p.step), lr_horizon=self.lr_horizon,
                                      training=self.training, index=index, layout=self.layout,
                                      optimizer_steps=optimizer_steps)
        commit_manifest(self.storage, manifest)
        self.committed_steps.append(p.step)
        elapsed = time.perf_counter() - p.started
        self.commit_seconds[p.step] = elapsed
        self.write_seconds[p.step] = max(float(r.get("write_s", 0.0)) for r in p.results.values())
        self.bytes_saved[p.step] = manifest.total_bytes
        log.info("checkpoint step %d committed: %.1f MB in %d files, %.2fs from snapshot to commit",
                 p.step, manifest.total_bytes / 1e6, len(files), elapsed)
        try:
            apply_retention(self.storage, self.policy.keep_last, self.policy.keep_every,
                            protect={p.step, *self.pending})
        except StorageError as e:  # the checkpoint is committed; an old one left behind is no reason to stop
            log.warning("retention after the checkpoint of step %d: %s", p.step, e)
        return manifest

    def _parent(self, step: int) -> dict[str, Any] | None:
        """What the checkpoint of `step` descends from: the newest committed before it on this timeline (commits
        can finish out of order), else what the run started from. (A recovery that went back to a checkpoint
        leaves nothing newer committed, so this holds across rewinds too.)"""
        before = [s for s in self.committed_steps if s < step]
        return {"run_id": self.run_id, "step": max(before)} if before else self.origin

    def abandon(self, why: str, wait_s: float = 10.0) -> list[CheckpointFailure]:
        """The saves still in flight when the run stops without settling them (interrupted): once their writers
        are gone (the devices are released first; a kill lands within `wait_s`), each fails and its folder goes."""
        refs = [w.ref for p in self.pending.values() for w in p.writes.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        failed = []
        for step, p in sorted(self.pending.items()):
            p.writes.clear()
            p.errors[-1] = why
            failed.append(self._failed(p))
        self.pending.clear()
        return failed

    def _failed(self, p: PendingCheckpoint) -> CheckpointFailure:
        detail = "; ".join(v for _, v in sorted(p.errors.items()))
        self.failed_steps.append(p.step)
        self._remove_partial(p.step)
        log.error("checkpoint at step %d not committed (%s); the previous checkpoint is kept", p.step, detail)
        return CheckpointFailure(p.step, detail, sorted(p.errors))

    def _remove_partial(self, step: int) -> None:
        """Delete the folder a failed save of `step` left (its shards so far), never a committed checkpoint's: on a
        full disk the retakes need that room. A writer that hangs may still add a file; the next save of that
        step or the next commit's retention clears it."""
        name = step_dir(step)
        try:
            if step in self.committed_steps or self.storage.exists(f"{name}/{MANIFEST}"):
                return
            self.storage.delete_dir(name)
        except StorageError as e:  # the failure itself is what matters; retention clears it later
            log.warning("could not remove the partial checkpoint folder %s: %s", name, e)

    # ------------------------------------------------------------ reading back
    def committed_newest_first(self):
        """(step, storage, manifest) of this run's checkpoints that still verify, newest first (recovery's
        fallback when the in-memory snapshots are gone)."""
        for step in sorted(self.committed_steps, reverse=True):
            try:
                found = find_resume(self.uri_for(step), self.storage.uri)
            except Exception as e:  # deleted by retention meanwhile, or damaged: an older one
                log.warning("checkpoint of step %d cannot be restored (%s)", step, e)
                continue
            if found is not None:
                yield step, found[0], found[1]


__all__ = ["Checkpoints", "CheckpointFailure", "PendingCheckpoint"]
