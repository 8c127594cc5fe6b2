"""When a device's steps begin and end, and what the device does between them (issue 23: the device's idle time).

A device is busy while its `train_step` runs; everything between the end of one `train_step` and the start of the
next is idle time as the step loop sees it: the driver's work between steps (recording, sinks, alert rules,
fault injection), Ray's hand-over of the call, and the device's other calls (an in-memory snapshot every
faults.snapshot_every steps, a validation, an RL weight sync). Of that idle time, the part spent in this device's
other calls is counted apart (`other_calls_s`), so a report can tell the driver's share from the device's own side
work.

Times are wall clock (`time.time()`, seconds since the epoch: comparable across the processes of one machine, and
across machines as far as their clocks agree); durations within a process use `time.perf_counter()`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator


class StepTimes:
    """One device's step clock: `begin()` before a train_step, `end(report, began)` after it fills the report's
    started_at, ended_at, idle_s (since the previous train_step ended; 0 for the first after `reset()`) and
    other_calls_s (of idle_s, time inside `other_call()` blocks since then)."""

    def __init__(self) -> None:
        self.last_end: float | None = None   # wall clock when the previous train_step ended (None: none yet)
        self.other_s = 0.0                   # seconds in other calls since then

    def reset(self) -> None:
        """A new shard (built or rebuilt): its first step has no previous step to be idle after."""
        self.last_end, self.other_s = None, 0.0

    def begin(self) -> float:
        """A train_step begins now: its wall-clock start."""
        return time.time()

    def end(self, report: Any, began: float) -> Any:
        """The train_step that began at `began` ended now: its timing fields filled in `report` (returned)."""
        ended = time.time()
        report.started_at, report.ended_at = began, ended
        report.idle_s = max(0.0, began - self.last_end) if self.last_end is not None else 0.0
        report.other_calls_s = min(self.other_s, report.idle_s) if self.last_end is not None else 0.0
        self.last_end, self.other_s = ended, 0.0
        return report

    @contextmanager
    def other_call(self) -> Iterator[None]:
        """A call of this device that is not a train_step (snapshot, validation, weight sync): its duration counted
        into the next step's other_calls_s."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.other_s += time.perf_counter() - t0


__all__ = ["StepTimes"]
