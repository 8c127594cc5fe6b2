"""Which device holds which expert: `ExpertPlacement`, and the balanced-packing plan that computes one.

Experts are logical (global ids 0..E-1, what the router picks); a placement puts them into physical
slots, `slots_per_device` on each device. With more slots than experts, hot experts get replicas
(their tokens are split between the replicas; the replicas' gradients are summed, so they stay
identical). The plan follows DeepSeek's EPLB in spirit, our own code:

1. replicate: hand spare slots one by one to the expert with the highest load per replica;
2. pack: take the replicas heaviest first (load / replicas each) and put each on the least loaded
   device that has a free slot and does not hold that expert yet (greedy balanced packing, the
   longest-processing-time rule: within 4/3 of the optimum);
3. swap replicas between the most loaded device and the others while that lowers the maximum.

This module is pure Python: the driver plans with it, the dispatcher and devices read the result.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """slots[d] = the expert id in each slot of device d (a layer's placement)."""
    slots: tuple[tuple[int, ...], ...]

    @classmethod
    def contiguous(cls, num_experts: int, world: int) -> "ExpertPlacement":
        per = num_experts // world
        return cls(tuple(tuple(range(d * per, (d + 1) * per)) for d in range(world)))

    @classmethod
    def initial(cls, num_experts: int, world: int, slots_per_device: int | None = None) -> "ExpertPlacement":
        """Where a run starts, before any load is known: device d holds experts [d*El, (d+1)*El) (El = E / world)
        and, in its spare slots (slots_per_device - El), replicas of the experts that follow: spare slot i holds
        expert ((d+1)*El + i) mod E, so no device holds one expert twice."""
        per = num_experts // world
        slots = slots_per_device or per
        if not per <= slots <= num_experts:
            raise ValueError(f"{slots} slots per device cannot hold {per} experts each without repeats")
        return cls(tuple(tuple(range(d * per, (d + 1) * per)) + tuple(((d + 1) * per + i) % num_experts
                                                                      for i in range(slots - per))
                         for d in range(world)))

    @property
    def world(self) -> int:
        return len(self.slots)

    @property
    def num_experts(self) -> int:
        return 1 + max(e for dev in self.slots for e in dev)

    @property
    def slots_per_device(self) -> int:
        return len(self.slots[0])

    def copies(self) -> list[int]:
        """How many replicas each expert has."""
        count = [0] * self.num_experts
        for dev in self.slots:
            for e in dev:
                count[e] += 1
        return count

    def primary(self) -> list[list[bool]]:
        """[device][slot]: is this the expert's first replica (device-major order)? Checkpoints save that copy
        and the gradient norm counts it; the others are identical to it."""
        seen: set[int] = set()
        out = []
        for dev in self.slots:
            row = []
            for e in dev:
                row.append(e not in seen)
                seen.add(e)
            out.append(row)
        return out

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        """(device, slot) of every copy of `expert`."""
        return [(d, s) for d, dev in enumerate(self.slots) for s, e in enumerate(dev) if e == expert]

    def device_loads(self, loads: list[float]) -> list[float]:
        """Expected load of each device when every expert's tokens are split evenly over its replicas."""
        count = self.copies()
        return [sum(loads[e] / count[e] for e in dev) for dev in self.slots]

    def imbalance(self, loads: list[float]) -> float:
        """max / mean of the device loads (1.0: perfectly balanced)."""
        dev = self.device_loads(loads)
        mean = sum(dev) / len(dev)
        return max(dev) / mean if mean else 1.0


def plan_placement(loads: list[float], world: int, slots_per_device: int) -> ExpertPlacement:
    """A placement of `len(loads)` experts on `world` devices of `slots_per_device` slots that balances the
    expected device loads (see the module docstring). Every expert gets at least one slot.

    Giving every spare slot to the hottest experts is not always best (a replica split can leave the
    slot counts unable to balance), so for k = 0..spare it replicates the hottest k times and gives the
    other spare slots to the coldest experts (nearly free), packs each, improves it by swapping replicas
    between the most loaded device and the others, and keeps the most balanced.
    """
    E, total = len(loads), world * slots_per_device
    if total < E:
        raise ValueError(f"{world} devices x {slots_per_device} slots cannot hold {E} experts")
    spare = total - E
    best: tuple[float, list[list[int]]] | None = None
    for hot in range(spare + 1):
        copies = _replicate(loads, hot, spare - hot)
        slots, dev_load = _pack(loads, copies, world, slots_per_device)
        _swap_down(loads, copies, slots, dev_load)
        worst = max(dev_load)
        if best is None or worst < best[0] - 1e-12:
            best = (worst, slots)
    assert best is not None
    return ExpertPlacement(tuple(tuple(sorted(dev)) for dev in best[1]))


def _replicate(loads: list[float], hot: int, cold: int) -> list[int]:
    E = len(loads)
    copies = [1] * E
    for _ in range(hot):  # the expert with the highest load per replica gets one more
        e = max(range(E), key=lambda e: (loads[e] / copies[e], -e))
        copies[e] += 1
    coldest = sorted(range(E), key=lambda e: (loads[e], e))
    for i in range(cold):  # the coldest experts, one more replica each, coldest first
        copies[coldest[i % E]] += 1
    return copies


def _pack(loads: list[float], copies: list[int], world: int, per: int) -> tuple[list[list[int]], list[float]]:
    """Replicas heaviest first onto the least loaded device with room that does not hold the expert yet."""
    items = sorted(((loads[e] / copies[e], e) for e in range(len(loads)) for _ in range(copies[e])),
                   key=lambda x: (-x[0], x[1]))
    dev_load = [0.0] * world
    slots: list[list[int]] = [[] for _ in range(world)]
    for share, e in items:
        open_ = [d for d in range(world) if len(slots[d]) < per]
        fresh = [d for d in open_ if e not in slots[d]] or open_
        d = min(fresh, key=lambda d: (dev_load[d], d))
        slots[d].append(e)
        dev_load[d] += share
    return slots, dev_load


def _swap_down(loads: list[float], copies: list[int], slots: list[list[int]], dev_load: list[float]) -> None:
    """Swap a replica of the most loaded device with one of another device while that lowers the larger of the
    two (slot counts stay as they are; no device gets two replicas of one expert)."""
    share = [loads[e] / copies[e] for e in range(len(loads))]
    for _ in range(10 * len(loads)):
        top = max(range(len(slots)), key=lambda d: dev_load[d])
        best = None
        for d in range(len(slots)):
            if d == top:
                continue
            for i, a in enumerate(slots[top]):
                for j, b in enumerate(slots[d]):
                    delta = share[a] - share[b]
                    if delta <= 1e-12 or (a != b and (a in slots[d] or b in slots[top])):
                        continue
                    worst = max(dev_load[top] - delta, dev_load[d] + delta)
                    if worst < dev_load[top] - 1e-12 and (best is None or worst < best[0]):
                        best = (worst, d, i, j, delta)
        if best is None:
            return
        _, d, i, j, delta = best
        slots[top][i], slots[d][j] = slots[d][j], slots[top][i]
        dev_load[top] -= delta
        dev_load[d] += delta


__all__ = ["ExpertPlacement", "plan_placement"]
