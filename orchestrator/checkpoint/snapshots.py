"""In-memory snapshots: what recovery rewinds to without touching storage.

Every device copies its state (parameters, optimizer moments, RNG) to host memory after every
faults.snapshot_every-th step (and the step a run starts from) and
returns it into the Ray object store, owned by the driver: the copy outlives the device that took
it (not the node that stores it). The newest two are kept; the older one is the fallback when a
device died before it got to take the newest one. A snapshot is kept only once its step came back well (the
pipelined driver may queue the snapshot call behind its step, but keeps it only then: driver/loop.py
`_queue_next`), so neither of the two is ever newer than the last good step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from orchestrator.errors import RunError, StateMismatch, last_line
from orchestrator.monitoring.goodput import Goodput

log = logging.getLogger(__name__)


@dataclass
class InMemorySnapshot:
    step: int
    done_refs: list[Any]    # tiny: {"step", "seconds"} once each device has copied its state
    refs: list[Any]         # the snapshots themselves, in the object store, owned by the driver
    kind: str = "snapshot"  # snapshot | checkpoint (taken by a checkpoint save)
    placement: Any = None   # the expert placement the devices had (None: contiguous)


class SnapshotStore:
    def __init__(self, goodput: Goodput):
        self.items: list[InMemorySnapshot] = []
        self.goodput = goodput

    def keep(self, step: int, pairs: list[Any], kind: str = "snapshot", placement: Any = None) -> InMemorySnapshot:
        """Keep the (done, snapshot) ref pairs of every device's `snapshot` call (num_returns=2)."""
        for old in self.items[:-1]:
            self._account(old)
        snap = InMemorySnapshot(step, [p[0] for p in pairs], [p[1] for p in pairs], kind, placement)
        self.items = self.items[-1:] + [snap]
        return snap

    @property
    def newest_refs(self) -> list[Any]:
        return self.items[-1].refs if self.items else []

    def _account(self, snap: InMemorySnapshot) -> None:
        """Book a superseded snapshot's stall (long finished by now) to goodput."""
        try:
            done = ray.get(snap.done_refs, timeout=10)
        except Exception:
            return  # its device died or raised: the step, or the checkpoint's writes, report that
        seconds = max(d["seconds"] for d in done)
        if snap.kind == "checkpoint":
            self.goodput.checkpoint += seconds
        else:
            self.goodput.snapshots += seconds

    def wait_newest(self, timeout_s: float) -> None:
        if self.items:
            self.complete(self.items[-1], timeout_s)

    @staticmethod
    def complete(snap: InMemorySnapshot, timeout_s: float) -> bool:
        """Did every device finish taking it (a device killed before it got to it leaves it incomplete)?"""
        try:
            ray.get(snap.done_refs, timeout=timeout_s)
            return True
        except Exception as e:
            log.warning("in-memory snapshot of step %d is incomplete (%s)", snap.step, type(e).__name__)
            return False

    def restore(self, actors: list[Any], timeout_s: float, replacing: bool = False, ep: int | None = None,
                at_most: int | None = None) -> InMemorySnapshot | None:
        """Put every device back to the newest complete snapshot that can still be read, with the expert placement
        it was taken with; that snapshot, or None when there is none (all lost, e.g. with their node). A device
        dying meanwhile is a RunError; a snapshot that does not fit the model (a tensor or rows of it missing) is a
        StateMismatch naming it, never a reason to go further back. `replacing`: experts may sit anywhere, so every
        device gets every snapshot. `ep`: the expert-parallel degree (None: every device). `at_most`: only snapshots of
        that step or before (the newer ones are dropped with it)."""
        ep = ep or len(actors)
        for snap in reversed(self.items):
            if at_most is not None and snap.step > at_most:
                continue
            if not self.complete(snap, timeout_s):
                continue
            refs = snap.refs
            try:  # rank 0 holds the replicated dense part and the router buffers, every rank its own pieces, the
                # first data-parallel replica of an ep index (rank ep_rank) the replicated experts; re-placement: all
                ray.get([a.restore_snapshots.remote(*(refs if replacing else [refs[r] for r in sorted({0, rank, rank % ep})]),
                                                    placement=snap.placement if replacing else None)
                         for rank, a in enumerate(actors)], timeout=timeout_s)
            except RayActorError as e:
                raise RunError(f"a device died while restoring the snapshot of step {snap.step}: {e}") from e
            except GetTimeoutError:
                raise RunError(f"timed out restoring the snapshot of step {snap.step}") from None
            except StateMismatch as e:  # it does not fit the model: an older state would not either (a defect)
                raise StateMismatch(f"the in-memory snapshot of step {snap.step} cannot be restored: "
                                    f"{last_line(e)}") from e
            except Exception as e:  # ObjectLostError and kin: stored on a node that died
                log.warning("the snapshot of step %d cannot be restored (%s); trying an older state", snap.step,
                            str(e).splitlines()[0][:200])
                continue
            self.items = [snap]
            return snap
        self.items = []
        return None


__all__ = ["InMemorySnapshot", "SnapshotStore"]
