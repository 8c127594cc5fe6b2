"""Faults in: each kind of fault (FAULTS: how it is made to happen, how it is caught), the run's fault plan
(`faults.plan` and chaos) and the Injector that fires each one before its step."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config import Config, FaultKind, FaultSpec
from orchestrator.device.faults import INJECTIONS, Injection, fault_kind
from orchestrator.healing.incidents import REPLACE, IncidentKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultRule:
    """One kind of fault: what it does, how it is injected (its `injection`, orchestrator/device/faults.py: kills,
    on_node, arm, fails_save) and the incident kinds the Watch (or the Healer, for a checkpoint) catches it as."""
    kind: FaultKind
    does: str                          # what happens, in words
    caught_as: frozenset[IncidentKind]

    @property
    def injection(self) -> Injection:
        return INJECTIONS[self.kind]

    @property
    def kills(self) -> bool:
        return self.injection.kills

    @property
    def fails_save(self) -> bool:
        return self.injection.fails_save

    @property
    def replaces_device(self) -> bool:
        """Healed by replacing the device (and rewinding everyone), not only by a rewind or a retry."""
        return bool(self.caught_as & REPLACE)


_I = IncidentKind
FAULTS: dict[FaultKind, FaultRule] = {r.kind: r for r in (
    FaultRule(FaultKind.KILL, "SIGKILL of the device's process now", frozenset({_I.DEAD})),
    FaultRule(FaultKind.NODE, "SIGKILL of the device's node's raylet (the parent of every worker process on the "
                              "node: the node dies with all its actors and objects), then of its process; where "
                              "the node runs the driver too, every device actor on it is killed instead",
              frozenset({_I.DEAD, _I.HANG})),
    FaultRule(FaultKind.CRASH, "an exception in the next step, between forward and backward",
              frozenset({_I.CRASH})),
    FaultRule(FaultKind.HANG, "the next step stops between forward and backward and never returns (peers wait "
                              "inside all_to_all), looking as if in compute or, with in_collective, inside a "
                              "collective itself", frozenset({_I.HANG})),
    FaultRule(FaultKind.NAN, "the device's loss in the next step is NaN", frozenset({_I.NAN})),
    FaultRule(FaultKind.SLOW, "the next `steps` steps each take `delay_s` longer", frozenset({_I.SLOW})),
    FaultRule(FaultKind.CHECKPOINT, "the checkpoint after its step is taken, and the device's shard write of it "
                                    "fails midway", frozenset({_I.CHECKPOINT})),
    FaultRule(FaultKind.SPIKE, "the device's batch in the next step is replaced by uniformly random tokens (a "
                               "corrupted batch): the step's loss and gradient norm spike, caught as a spike when "
                               "above faults.loss_spike_factor / grad_spike_factor x their median (and by a "
                               "loss_spike alert rule)", frozenset({_I.LOSS_SPIKE, _I.GRAD_SPIKE})),
)}
assert set(FAULTS) == set(FaultKind), "every fault kind has its rule"


def fault_rule(kind: str) -> FaultRule:
    """The rule of a fault kind (a FaultKind or its name); ValueError for a name that is none."""
    return FAULTS[fault_kind(kind)]


def make_happen(fault: FaultSpec, step: int, devices: Any, checkpoints: Any, timeout_s: float) -> None:
    """Make a planned fault happen in `step`, as its kind's rule says (DeviceGroup.inject). A fault that kills
    strikes after the newest snapshot (waited for, at most `timeout_s`: a kill landing while a snapshot's reply is
    still on its way loses that snapshot, and recovery then goes back to the one before); one that
    fails a save has the checkpoint after this step taken, one of its shard writes then failing."""
    rule = fault_rule(fault.kind)
    if rule.kills:
        checkpoints.snapshots.wait_newest(timeout_s)
    if rule.fails_save:
        checkpoints.force.add(step)
    devices.inject(fault)


def plan_faults(cfg: Config) -> list[FaultSpec]:
    """The run's faults: `faults.plan` plus, with chaos on, random ones; random ranks drawn. Same seed, same faults."""
    f, world, steps = cfg.faults, cfg.cluster.num_devices, cfg.train.steps
    rng = random.Random(f.chaos.seed)
    plan = [FaultSpec(**{**asdict(s), "rank": rng.randrange(world) if s.rank < 0 else s.rank}) for s in f.plan]
    ch = f.chaos
    if ch.mean_steps_between:
        rollout_rng = random.Random(f"rollout/{ch.seed}")
        taken = {s.step for s in plan}
        step = ch.first_step - 1
        while True:
            step += max(1, round(rng.expovariate(1.0 / ch.mean_steps_between)))
            if step > steps:
                break
            if step in taken:
                continue
            kind = rng.choice(list(ch.kinds))
            rank = rng.randrange(world)
            # an RL run's kill may strike a rollout worker mid-generation instead, drawn from a generator of its own:
            # the steps and kinds stay the ones the seed gives without it
            # (one step off-policy, step s's generation runs during step s-1: the last step has none after it)
            last = steps - 1 if cfg.rl.max_staleness else steps
            if (ch.rollout_share and kind == FaultKind.KILL and cfg.rl.sft_steps < step <= last
                    and rollout_rng.random() < ch.rollout_share):
                plan.append(FaultSpec(kind=kind, step=step, target="rollout",
                                      rank=rollout_rng.randrange(cfg.rl.rollout.workers or world)))
                continue
            plan.append(FaultSpec(kind=kind, step=step, rank=rank, steps=ch.slow_steps, delay_s=ch.slow_delay_s))
    return sorted(plan, key=lambda s: (s.step or 0, s.after_s))


class Injector:
    """Fires each planned fault just before its step (or the first step after its time), `repeat` times."""

    def __init__(self, plan: list[FaultSpec]):
        self.plan = plan
        self.fired: list[dict[str, Any]] = []
        self._count: dict[int, int] = {}
        self.t0: float | None = None

    def quiet(self, step: int) -> bool:
        """No planned fault can strike in `step` (a timed one not fired yet might: it strikes when its time comes)."""
        return all(self._count.get(i, 0) >= fault.repeat or (fault.step and fault.step != step)
                   for i, fault in enumerate(self.plan))

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
            self.fired.append({"step": step, "kind": fault.kind, "rank": fault.rank, "time": time.time(),
                               **({"target": fault.target} if fault.target != "device" else {})})
            due.append(fault)
        return due

