"""How each kind of fault is made to happen on a device (the device half of the fault registry; what each kind is
and how the night watch catches it is orchestrator/healing/faults.py FAULTS, which refers to these)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.config import FaultKind

Arm = Callable[[Any, int, float, bool], None]   # (the device's shard, steps, delay_s, in_collective)


@dataclass(frozen=True)
class Injection:
    """Injected: the driver waits for the newest snapshot first when it `kills` and forces the checkpoint after its
    step when it `fails_save`; the device group (DeviceGroup.inject) has the device's next shard write fail
    (`fails_save`), kills the node's devices (`on_node`) or calls DeviceActor.inject, which kills its own process
    (`kills`; its node's raylet first with `on_node`) or `arm`s its shard for the next step."""
    kills: bool = False                # SIGKILL of the device's process
    on_node: bool = False              # ... and first of its node's raylet: every device on the node dies
    arm: Arm | None = None             # what the device's next step(s) do
    fails_save: bool = False           # the checkpoint after its step is taken, and this device's shard write fails


def _arm_crash(shard: Any, steps: int, delay_s: float, in_collective: bool) -> None:
    shard.crash_next_step = True


def _arm_hang(shard: Any, steps: int, delay_s: float, in_collective: bool) -> None:
    shard.hang_next_step = "collective" if in_collective else True


def _arm_nan(shard: Any, steps: int, delay_s: float, in_collective: bool) -> None:
    shard.nan_next_step = True


def _arm_spike(shard: Any, steps: int, delay_s: float, in_collective: bool) -> None:
    shard.spike_next_step = True


def _arm_slow(shard: Any, steps: int, delay_s: float, in_collective: bool) -> None:
    shard.slow_steps, shard.slow_delay_s = steps, delay_s


INJECTIONS: dict[FaultKind, Injection] = {
    FaultKind.KILL: Injection(kills=True),
    FaultKind.NODE: Injection(kills=True, on_node=True),
    FaultKind.CRASH: Injection(arm=_arm_crash),
    FaultKind.HANG: Injection(arm=_arm_hang),
    FaultKind.NAN: Injection(arm=_arm_nan),
    FaultKind.SLOW: Injection(arm=_arm_slow),
    FaultKind.CHECKPOINT: Injection(fails_save=True),
    FaultKind.SPIKE: Injection(arm=_arm_spike),
}
assert set(INJECTIONS) == set(FaultKind), "every fault kind says how it is injected"


def fault_kind(kind: str) -> FaultKind:
    """A FaultKind from itself or its name; ValueError naming a name that is none."""
    try:
        return FaultKind(kind)
    except ValueError:
        raise ValueError(f"unknown fault kind {kind!r}") from None


def injection(kind: str) -> Injection:
    """How a fault kind (a FaultKind or its name) is injected."""
    return INJECTIONS[fault_kind(kind)]
