"""Expert load, as the driver sees it: statistics of each step's global token counts.

Input: `expert_load[layer][expert]`, the tokens (routed copies) each expert received this step over
all devices, and the number of devices (device d holds experts [d*El, (d+1)*El) of every layer).

    MaxVio   = max_i c_i / mean_i c_i - 1     (0: perfectly balanced; per layer, and their mean)
    CV       = std_i c_i / mean_i c_i         (population std)
    dead     = fraction of (layer, expert) pairs that received no token
    device imbalance = max_d load_d / mean_d load_d per layer, load_d = tokens device d's experts got;
               the all_to_all of a layer waits for its most loaded device, so this is what costs time.
"""
from __future__ import annotations

import math
from typing import Any


def _maxvio(counts: list[int]) -> float:
    mean = sum(counts) / len(counts)
    return max(counts) / mean - 1.0 if mean else 0.0


def _cv(counts: list[int]) -> float:
    mean = sum(counts) / len(counts)
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean if mean else 0.0


def device_loads(counts: list[int], world: int) -> list[int]:
    per = len(counts) // world
    return [sum(counts[d * per:(d + 1) * per]) for d in range(world)]


def load_stats(expert_load: list[list[int]], world: int) -> dict[str, Any]:
    """The step's load statistics (see the module docstring); {} when the model has no MoE layer."""
    if not expert_load:
        return {}
    maxvio = [_maxvio(layer) for layer in expert_load]
    cv = [_cv(layer) for layer in expert_load]
    dev = [device_loads(layer, world) for layer in expert_load]
    dev_ratio = [max(d) / (sum(d) / world) if sum(d) else 1.0 for d in dev]
    experts = sum(len(layer) for layer in expert_load)
    return {
        "maxvio": sum(maxvio) / len(maxvio),
        "maxvio_layers": maxvio,
        "cv_layers": cv,
        "dead_fraction": sum(1 for layer in expert_load for c in layer if c == 0) / experts,
        "device_tokens": [sum(d[i] for d in dev) for i in range(world)],
        "device_imbalance": sum(dev_ratio) / len(dev_ratio),
        "device_imbalance_layers": dev_ratio,
    }


__all__ = ["load_stats", "device_loads"]
