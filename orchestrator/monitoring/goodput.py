"""Goodput: where a run's training-loop time went, by category, and the table printed at the end.

productive      steps computed for the first time, less the snapshot and checkpoint stalls inside them
recomputed      steps computed again after a rewind (work a fault threw away)
failed steps    steps that failed, from their start until the failure was known (detection)
rolled back     steps that completed but were not kept (non-finite or spiking values rolled back)
actor start     starting replacement device actors (0 with a warm standby)
restore         re-forming the process group, building replacement shards, restoring state
backoff         waiting between recovery attempts
snapshots       in-memory snapshots of every device (what bounds the steps a fault recomputes)
checkpoint      the step loop's stall while checkpoints are snapshotted (the write itself is in the background)
other           the rest: the driver's own bookkeeping, metrics, fault injection
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

CATEGORIES = ("productive", "recomputed", "failed_steps", "rolled_back", "actor_start", "restore", "backoff",
              "snapshots", "checkpoint", "other")


@dataclass
class Goodput:
    productive: float = 0.0
    recomputed: float = 0.0
    failed_steps: float = 0.0
    rolled_back: float = 0.0
    actor_start: float = 0.0
    restore: float = 0.0
    backoff: float = 0.0
    snapshots: float = 0.0
    checkpoint: float = 0.0
    other: float = 0.0
    wall: float = 0.0           # the training loop, first step to last
    steps_done: int = 0
    steps_recomputed: int = 0

    def kept(self, wall_s: float, replayed: bool) -> None:
        """A step kept: productive time, or recomputed when it was `replayed` after a rewind."""
        if replayed:
            self.recomputed += wall_s
            self.steps_recomputed += 1
        else:
            self.productive += wall_s

    def finish(self, wall_s: float) -> None:
        """Close the books: `productive` is the step time less stalls counted elsewhere; the rest is `other`."""
        self.wall = wall_s
        self.productive = max(0.0, self.productive - self.snapshots - self.checkpoint)
        counted = sum(getattr(self, c) for c in CATEGORIES if c != "other")
        self.other = max(0.0, wall_s - counted)

    @property
    def ratio(self) -> float:
        return self.productive / self.wall if self.wall else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> "Goodput":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "goodput": self.ratio}

    def table(self) -> str:
        lines = [f"goodput {self.ratio:.1%} of {self.wall:.1f}s in the training loop "
                 f"({self.steps_done} steps, {self.steps_recomputed} recomputed)"]
        for c in CATEGORIES:
            seconds = getattr(self, c)
            share = seconds / self.wall if self.wall else 0.0
            lines.append(f"  {c.replace('_', ' '):<13} {seconds:9.2f}s  {share:6.1%}")
        return "\n".join(lines)


__all__ = ["Goodput", "CATEGORIES"]
