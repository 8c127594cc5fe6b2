"""Faults in: the run's fault plan (`faults.plan` and chaos) and the Injector that fires each one before its step."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from typing import Any

from orchestrator.config import Config, FaultSpec

log = logging.getLogger(__name__)


def plan_faults(cfg: Config) -> list[FaultSpec]:
    """The run's faults: `faults.plan` plus, with chaos on, random ones; random ranks drawn. Same seed, same faults."""
    f, world, steps = cfg.faults, cfg.cluster.num_devices, cfg.train.steps
    rng = random.Random(f.chaos.seed)
    plan = [FaultSpec(**{**asdict(s), "rank": rng.randrange(world) if s.rank < 0 else s.rank}) for s in f.plan]
    ch = f.chaos
    if ch.mean_steps_between:
        taken = {s.step for s in plan}
        step = ch.first_step - 1
        while True:
            step += max(1, round(rng.expovariate(1.0 / ch.mean_steps_between)))
            if step > steps:
                break
            if step in taken:
                continue
            kind = rng.choice(list(ch.kinds))
            plan.append(FaultSpec(kind=kind, step=step, rank=rng.randrange(world), steps=ch.slow_steps,
                                  delay_s=ch.slow_delay_s))
    return sorted(plan, key=lambda s: (s.step or 0, s.after_s))


class Injector:
    """Fires each planned fault just before its step (or the first step after its time), `repeat` times."""

    def __init__(self, plan: list[FaultSpec]):
        self.plan = plan
        self.fired: list[dict[str, Any]] = []
        self._count: dict[int, int] = {}
        self.t0: float | None = None

    def due(self, step: int) -> list[FaultSpec]:
        """The faults that strike in `step` (each recorded in `fired`); the driver makes them happen."""
        if self.t0 is None:
            self.t0 = time.perf_counter()
        elapsed = time.perf_counter() - self.t0
        due = []
        for i, fault in enumerate(self.plan):
            if self._count.get(i, 0) >= fault.repeat:
                continue
            if fault.step != step and (fault.step or elapsed < fault.after_s):
                continue
            if not fault.step:
                fault.step = step  # a timed fault repeats at the step it first struck
            self._count[i] = self._count.get(i, 0) + 1
            log.warning("injecting fault: %s on device %d at step %d", fault.kind, fault.rank, step)
            self.fired.append({"step": step, "kind": fault.kind, "rank": fault.rank, "time": time.time()})
            due.append(fault)
        return due

