"""Expert load, as the driver sees it: statistics of each step's global token counts.

Input: `expert_load[layer][expert]`, the tokens (routed copies) each expert received this step over
all devices, the number of devices, and either what each device's experts processed
(`device_load[layer][device]`, measured by the devices) or the placement (default: device d holds
experts [d*El, (d+1)*El) of every layer; an expert with replicas counts 1/r on each).

    MaxVio   = max_i c_i / mean_i c_i - 1     (0: perfectly balanced; per layer, and their mean)
    CV       = std_i c_i / mean_i c_i         (population std)
    dead     = fraction of (layer, expert) pairs that received no token
    device imbalance = max_d load_d / mean_d load_d per layer, load_d = tokens device d's experts got;
               the all_to_all of a layer waits for its most loaded device, so this is what costs time.
"""
from __future__ import annotations

import math
from typing import Any

from orchestrator.config import Config, expert_slots
from orchestrator.config.model import mtp_moe_layers
from orchestrator.experts.placement import ExpertPlacement, plan_placement


def _maxvio(counts: list[int]) -> float:
    mean = sum(counts) / len(counts)
    return max(counts) / mean - 1.0 if mean else 0.0


def _cv(counts: list[int]) -> float:
    mean = sum(counts) / len(counts)
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean if mean else 0.0


def device_loads(counts: list[int], world: int, slots: list[list[int]] | None = None) -> list[float]:
    """Tokens each device's experts got: contiguous placement, or `slots[d]` = the experts device d holds (an
    expert with r replicas: 1/r of its tokens on each)."""
    if slots is None:
        return ExpertPlacement.contiguous(len(counts), world).device_loads([float(c) for c in counts])
    return ExpertPlacement(tuple(map(tuple, slots))).device_loads([float(c) for c in counts])


def load_stats(expert_load: list[list[int]], world: int, placement: list[list[list[int]]] | None = None,
               device_load: list[list[int]] | None = None) -> dict[str, Any]:
    """The step's load statistics (see the module docstring): device loads as measured (`device_load`), else as
    `placement` implies ([layer][device] -> experts; None: contiguous); {} when the model has no MoE layer."""
    if not expert_load:
        return {}
    maxvio = [_maxvio(layer) for layer in expert_load]
    cv = [_cv(layer) for layer in expert_load]
    dev = device_load or [device_loads(layer, world, placement[i] if placement else None)
                          for i, layer in enumerate(expert_load)]
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


Placement = list[list[list[int]]]   # [MoE layer][device] -> expert ids in slot order


class Balancer:
    """Live expert re-placement policy: every `balance.replace_every` steps, plan each MoE layer's placement from
    the mean load of the last `replace_window` recorded steps (records are what a rewind truncates, so a replay
    plans exactly as the first pass did) and propose it when it beats the current one by `replace_min_gain`.
    With `balance.redundant_experts`, the plan fills the extra slots with replicas of the hottest experts."""

    def __init__(self, cfg: Config):
        self.b, self.world, self.E = cfg.balance, cfg.cluster.num_devices, cfg.model.num_experts
        self.slots = expert_slots(cfg) if self.world > 1 else self.E   # expert slots per device
        # MoE layers: the main model's, then the MTP modules' (model/mtp.py), as the model's moe_layers()
        self.layers = max(0, cfg.model.n_layers - cfg.model.first_k_dense) + mtp_moe_layers(cfg.model)
        self.placement: Placement | None = None   # the devices' placement (None: contiguous, never re-placed)
        self.reset()
        self.earlier: list[dict[str, Any]] = []   # a resumed run's records from before it (metrics.jsonl)

    def initial(self) -> Placement | None:
        """The placement devices are built with (see ExpertPlacement.initial); None when it never changes."""
        if not self.enabled:
            return None
        return [[list(dev) for dev in ExpertPlacement.initial(self.E, self.world, self.slots).slots]
                for _ in range(self.layers)]

    def reset(self) -> None:
        self.placement = self.initial()

    def recent(self, records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        """The last `n` records of the run, reaching into the records from before a resume if need be."""
        tail = records[-n:]
        return (self.earlier[len(tail) - n:] + tail) if len(tail) < n and self.earlier else tail

    @property
    def enabled(self) -> bool:
        """Can the placement differ from contiguous (re-placement on, or replicas)?"""
        return self.world > 1 and bool(self.b.replace_every or self.b.replace_on_imbalance or self.b.redundant_experts)

    def due(self, step: int, history: list[dict[str, Any]]) -> bool:
        """Every `replace_every` steps; or on an imbalance alert: the mean device max/mean load of the last
        min(10, replace_window) steps above `replace_on_imbalance`, at most once per `replace_window` steps.
        Judged from the records (the step's own included), so a replay decides as the first pass did."""
        if self.world == 1:
            return False
        if self.b.replace_every and step % self.b.replace_every == 0:
            return True
        if not self.b.replace_on_imbalance:
            return False
        window = self.recent(history, self.b.replace_window)
        if any("replacement" in r for r in window if step - r["step"] < self.b.replace_window):
            return False  # at most one plan per window
        recent = [r["device_imbalance"] for r in window[-min(10, self.b.replace_window):] if "device_imbalance" in r]
        return (step >= self.b.replace_window and len(recent) == min(10, self.b.replace_window)
                and sum(recent) / len(recent) > self.b.replace_on_imbalance)

    def plan(self, records: list[dict[str, Any]]) -> tuple[Placement, float, float] | None:
        """(new placement, current mean device max/mean, planned one) or None when not worth migrating."""
        window = [r["expert_load"] for r in self.recent(records, self.b.replace_window) if r.get("expert_load")]
        if not window:
            return None
        layers = len(window[0])
        loads = [[sum(w[layer][e] for w in window) / len(window) for e in range(self.E)] for layer in range(layers)]
        current = self.placement   # plans are made only when re-placement is on: then it is always set
        assert current is not None
        new = [[list(dev) for dev in plan_placement(loads[layer], self.world, self.slots).slots]
               for layer in range(layers)]
        before = sum(ExpertPlacement(tuple(map(tuple, current[layer]))).imbalance(loads[layer]) for layer in range(layers))
        after = sum(ExpertPlacement(tuple(map(tuple, new[layer]))).imbalance(loads[layer]) for layer in range(layers))
        before, after = before / layers, after / layers
        if new == current or before - after < self.b.replace_min_gain * before:
            return None
        return new, before, after


def placement_from_manifest(expert_files: dict[str, dict[str, str]], world: int, slots: int,
                            saved: Placement | None = None) -> Placement | None:
    """The placement a checkpoint was saved with (`saved`, from its manifest; for checkpoints written before
    manifests held it: device r wrote experts-<r>), if it had `world` devices of `slots` expert slots."""
    if saved:
        fits = len(saved) == len(expert_files) and all(
            len(layer) == world and all(len(dev) == slots for dev in layer) for layer in saved)
        return saved if fits else None
    out = []
    for layer in sorted(expert_files, key=lambda name: int(name.split(".")[1])):
        devices: list[list[int]] = [[] for _ in range(world)]
        for gid, file in expert_files[layer].items():
            rank = int(file.split("-")[1].split(".")[0])
            if rank >= world:
                return None
            devices[rank].append(int(gid))
        if {len(d) for d in devices} != {slots}:
            return None
        out.append([sorted(d) for d in devices])
    return out


__all__ = ["load_stats", "device_loads", "Balancer", "Placement", "placement_from_manifest"]
