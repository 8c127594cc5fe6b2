"""What the driver remembers of a run, bounded however long it runs: a window of the newest kept records beside
the running totals (summary.Totals) and the totals after each step a rewind can still go back to. The records
themselves are in metrics.jsonl; a rewind deeper than the window reads them back from there."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Iterator

from orchestrator.monitoring.rundir import is_record, read_jsonl, tail_jsonl
from orchestrator.monitoring.summary import Totals


class RunHistory:
    """The kept records' window (iterate, index and len() it as the list of the newest records) and their totals.
    `first`: the run's first step here; `last_kept`: the newest step kept (after a rewind: the step rewound to);
    `recorded_through`: the newest step whose record is in metrics.jsonl; `high_water`: the furthest step ever
    completed (the steps up to it are replays)."""

    def __init__(self, maxlen: int, metrics_path: Path):
        self.window: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.metrics_path = metrics_path
        self.totals = Totals()
        self.totals_at: dict[int, Totals] = {}   # after steps a rewind can go back to
        self.first = 1
        self.last_kept = self.recorded_through = self.high_water = 0

    @property
    def maxlen(self) -> int:
        return self.window.maxlen

    def __len__(self) -> int:
        return len(self.window)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.window)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.window[i]

    def begin(self, first: int) -> None:
        """The run goes on at `first` (a resumed run's steps before it are neither in the window nor counted)."""
        self.first = first
        self.high_water = self.last_kept = self.recorded_through = first - 1
        self.totals_at[first - 1] = self.totals

    def keep(self, step: int, rec: dict[str, Any]) -> bool:
        """A step kept: its record into the window and the totals. True when it replays a step done before."""
        replay = step <= self.high_water
        self.high_water = max(self.high_water, step)
        self.window.append(rec)
        self.last_kept = step
        self.totals = self.totals_at[step] = self.totals.add(rec)
        return replay

    def forget(self, floor: int) -> None:
        """The totals no rewind can need any more: before `floor` (the oldest in-memory snapshot), but the start."""
        self.totals_at = {s: t for s, t in self.totals_at.items() if s >= floor or s == self.first - 1}

    def rewind(self, back: int) -> None:
        """Continue after step `back`: later records go (a replayed step is kept again when it completes)."""
        while self.window and self.window[-1]["step"] > back:
            self.window.pop()
        self.last_kept = back
        self.recorded_through = min(self.recorded_through, back)
        self.totals = self.totals_at.get(back) or self._totals_from_log(back)

    def refill(self) -> None:
        """After a rewind deeper than the window (metrics.jsonl truncated to the step rewound to): the window
        again, from the log's last records."""
        if not self.window and self.last_kept >= self.first:
            tail = tail_jsonl(self.metrics_path, self.maxlen, is_record)
            self.window.extend(r for r in tail if r["step"] >= self.first)

    def find(self, step: int) -> dict[str, Any] | None:
        return next((r for r in self.window if r["step"] == step), None)

    def _totals_from_log(self, back: int) -> Totals:
        totals = Totals()
        for rec in read_jsonl(self.metrics_path):
            if self.first <= rec.get("step", 0) <= back and is_record(rec):
                totals = totals.add(rec)
        return totals


__all__ = ["RunHistory"]
