"""The placement plan balances devices on skewed loads, with and without replicas of hot experts."""
from __future__ import annotations

import random

import pytest

from orchestrator.experts.placement import ExpertPlacement, plan_placement


def test_contiguous_placement_is_the_default_layout():
    p = ExpertPlacement.contiguous(8, 2)
    assert p.slots == ((0, 1, 2, 3), (4, 5, 6, 7)) and p.replicas(5) == [(1, 1)]
    assert p.device_loads([1, 1, 1, 1, 3, 3, 3, 3]) == [4, 12] and p.imbalance([1, 1, 1, 1, 3, 3, 3, 3]) == 1.5


def test_packing_balances_skewed_loads_without_replicas():
    loads = [400, 300, 200, 100, 100, 100, 50, 50]   # contiguous: 1000 vs 300, max/mean 1.54
    assert ExpertPlacement.contiguous(8, 2).imbalance(loads) == pytest.approx(1000 / 650)
    p = plan_placement(loads, world=2, slots_per_device=4)
    assert sorted(e for dev in p.slots for e in dev) == list(range(8)) and all(len(d) == 4 for d in p.slots)
    assert p.imbalance(loads) == 1.0   # 650 / 650: these loads allow it


def test_replicas_split_a_hot_expert_that_no_packing_could_balance():
    loads = [900, 100, 100, 100, 100, 100, 100, 100]  # one expert holds more than a device's fair share
    assert plan_placement(loads, 2, 4).imbalance(loads) > 1.3
    p = plan_placement(loads, world=2, slots_per_device=5)   # two spare slots
    # expert 0 split over both devices (450 + 450); three replicas (300 each) could not balance 5 slots each
    assert len(p.replicas(0)) == 2 and len({d for d, _ in p.replicas(0)}) == 2
    assert p.imbalance(loads) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_zipf_loads_on_eight_devices_within_a_few_percent(seed):
    rng = random.Random(seed)
    loads = [rng.paretovariate(1.2) * 100 for _ in range(64)]
    contiguous = ExpertPlacement.contiguous(64, 8).imbalance(loads)
    planned = plan_placement(loads, world=8, slots_per_device=9)   # 8 spare slots for hot experts
    assert planned.imbalance(loads) < 1.05 < contiguous
