"""What happened to the checkpoints in flight, told as it happens: each commit and failure as an event to the
listeners (metrics.jsonl, the sinks), and returned to the caller, which decides what it means (the Driver hands
it to the Healer: retake, or stop the run). Mechanism only: nothing here judges a failure or calls back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint.coordinator import CheckpointFailure, Checkpoints


@dataclass
class Settled:
    """The checkpoints committed and failed in one look; `error`: an event that could not be written (DiskFull),
    to raise once the outcome has been judged."""
    committed: list[int] = field(default_factory=list)
    failed: list[CheckpointFailure] = field(default_factory=list)
    error: Exception | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class CheckpointEvents:
    """Completes the checkpoints in flight (Checkpoints.poll/finish/abandon) and tells `listeners` (anything with
    a `checkpoint(event)` method) of each start, commit and failure."""

    def __init__(self, checkpoints: Checkpoints, listeners: Any):
        self.checkpoints, self.listeners = checkpoints, listeners

    def started(self, step: int) -> None:
        self.listeners.checkpoint({"event": "checkpoint_started", "step": step, "time": time.time()})

    def poll(self, actors: list[Any], commit_through: int | None = None) -> Settled:
        """The writes that finished, committed (see Checkpoints.poll); no waiting."""
        return self._told(*self.checkpoints.poll(actors, commit_through=commit_through))

    def finish(self, actors: list[Any], timeout_s: float, commit_through: int | None = None) -> Settled:
        """Every write in flight waited for, at most `timeout_s` (see Checkpoints.finish)."""
        return self._told(*self.checkpoints.finish(actors, timeout_s, commit_through=commit_through))

    def abandon(self, why: str) -> Settled:
        """The saves in flight given up (their writers are gone), each a failure (see Checkpoints.abandon)."""
        return self._told([], self.checkpoints.abandon(why))

    def _told(self, committed: list[int], failed: list[CheckpointFailure]) -> Settled:
        """Commits and failures as events to the listeners; an event that cannot be written is kept in the
        outcome (raised by the caller after judging it), not raised here."""
        ck, out = self.checkpoints, Settled(committed, failed)
        try:
            for step in committed:
                self.listeners.checkpoint({"event": "checkpoint_committed", "step": step, "time": time.time(),
                                           "bytes": ck.bytes_saved.get(step), "seconds": ck.commit_seconds.get(step)})
            for f in failed:
                self.listeners.checkpoint({"event": "checkpoint_failed", "step": f.step, "time": time.time(),
                                           "reason": f.detail})
        except Exception as e:
            out.error = e
        return out


__all__ = ["CheckpointEvents", "Settled"]
