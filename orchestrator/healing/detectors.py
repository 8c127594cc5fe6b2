"""The detectors the Watch (healing.py) and the alert rules (alerts.py) share, so that a spike or a straggler means
the same thing to the policy that acts on it and to the rule that reports it.

    spike      a value / the median of the recent values (finite ones only), once enough of them are known
    straggler  a device's own work (its step time less its time inside collectives, where it waits for the
               others) / the median of the other devices' own work
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence


def recent_median(values: Iterable[float | None], min_count: int) -> float | None:
    """The median of the finite values, or None with fewer than `min_count` of them (too early to judge)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite and len(finite) >= min_count else None


def own_work(step_times: Sequence[float], collective_s: Sequence[float] | None = None) -> list[float]:
    """Each device's own work in a step: its step time less its time inside collectives."""
    waits = collective_s or [0.0] * len(step_times)
    return [t - w for t, w in zip(step_times, waits)]


def against_others(own: Sequence[float]) -> list[tuple[float, float]]:
    """For each device: (its own work, the median of the other devices' own work); empty for fewer than two."""
    if len(own) < 2:
        return []
    return [(mine, statistics.median(list(own[:r]) + list(own[r + 1:]))) for r, mine in enumerate(own)]


__all__ = ["recent_median", "own_work", "against_others"]
