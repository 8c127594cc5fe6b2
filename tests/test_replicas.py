"""Redundant expert replicas: a hot expert on several devices, its tokens split between the replicas, their
gradients summed. The math is the single-process reference's (float64), the gradient norm counts each expert
once, checkpoints hold one copy, and healing and resuming in a placement with replicas are exact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.checkpoint.manager import list_checkpoints
from orchestrator.checkpoint.tools import read_parameters, read_state
from orchestrator.config import ConfigError
from orchestrator.device.actor import DeviceShard
from orchestrator.driver import Driver
from orchestrator.model.moe import MoE
from orchestrator.parallel import groups
from orchestrator.experts.placement import ExpertPlacement
from orchestrator.reference import reference_run
from orchestrator.checkpoint.storage import Storage
from tests.conftest import step_records, tiny_config

STEPS = 6
REPLICAS = ["balance.replace_every=2", "balance.replace_window=2", "balance.replace_min_gain=0",
            "model.num_experts=8", "train.global_batch_size=8", "train.eval_batches=0"]


def records(run_dir: Path) -> list[dict]:
    return step_records(run_dir)


def final_checkpoint(run_dir: Path):
    return list_checkpoints(Storage(str(run_dir / "checkpoints")))[-1][1]


def test_initial_placement_and_primary_copies():
    p = ExpertPlacement.initial(8, 2, 5)
    assert p.slots == ((0, 1, 2, 3, 4), (4, 5, 6, 7, 0))   # spare slots: the next device's first experts
    assert p.copies() == [2, 1, 1, 1, 2, 1, 1, 1]
    assert p.primary() == [[True] * 5, [False, True, True, True, False]]
    assert ExpertPlacement.initial(8, 4, 2) == ExpertPlacement.contiguous(8, 4)
    with pytest.raises(ValueError):
        ExpertPlacement.initial(4, 2, 5)


def test_tokens_are_split_between_replicas():
    moe = MoE(dim=4, num_experts=4, top_k=1, expert_dim=4, num_shared_experts=0, score_func="softmax",
              norm_topk_prob=False, route_scale=1.0, expert_ids=[0, 1, 2])
    slots = [[0, 1, 2], [3, 0, 1]]   # experts 0 and 1 on both devices
    for rank, first in ((0, 0), (1, 1)):
        moe.set_placement(slots, rank)
        assert moe.num_slots == 6 and moe.copies_E.tolist() == [2, 2, 1, 1, 1]
        experts = torch.tensor([[0]] * 7 + [[3], [1], [4]])   # 4: dropped by capacity
        slot = moe.slots_of(experts).flatten().tolist()
        # expert 0's seven copies alternate between its slots 0 and 4, starting at the rank's turn
        assert slot[:7] == [[0, 4][(i + first) % 2] for i in range(7)]
        assert slot[7:] == [3, [1, 5][first], 6]   # expert 3 on device 1 slot 0; dropped copies to num_slots
    assert moe.experts.primary == [True, False, False]  # device 1: expert 3, then replicas of 0 and 1
    with pytest.raises(ValueError, match="expert slots"):
        moe.set_placement([[0, 1], [2, 3]], 0)


# Replicas of expert 0 twice on device 0 and of expert 1 on both devices; the other layer replicates 2 and 3.
ODD_PLACEMENT = [[[0, 0, 1], [2, 3, 1]], [[2, 0, 3], [1, 2, 3]]]


def _replica_worker(rank: int, port: int, out: dict) -> None:
    groups.join("gloo", "127.0.0.1", port, rank, 2, timeout_s=60)
    cfg = tiny_config(None, "cluster.num_devices=2", "balance.redundant_experts=2", "train.lr=3e-2")
    tokens = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint16)
    shard = DeviceShard(cfg, rank, 2, tokens, tokens[:10_000])
    snaps: list = [None, None]
    dist.all_gather_object(snaps, shard.snapshot(0))   # the experts of the initial placement, from both devices
    shard.set_placement(ODD_PLACEMENT)
    shard.restore_snapshots(snaps)
    reports = [shard.train_step(step) for step in (1, 2, 3)]
    state = []
    for m in shard.model.moe_layers():
        for p in m.experts.parameters():
            moments = shard.optim.state_of(p)
            for j, e in enumerate(m.experts.expert_ids):
                state.append((e, p[j].detach().clone(), moments["exp_avg"][j].clone(), moments["exp_avg_sq"][j].clone()))
    gathered: list = [None, None]
    dist.all_gather_object(gathered, state)
    groups.leave()
    if rank == 0:
        out["state"], out["reports"] = gathered, reports


def test_replicas_stay_bit_identical_across_and_within_devices():
    """Two processes (gloo, no Ray) train 3 steps in a placement where one expert has two replicas on one device
    and others sit on both: every replica's weights and AdamW moments are bit-identical to its expert's others."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_replica_worker, args=(groups.free_port(), out), nprocs=2, join=True)
        state, reports = out["state"], out["reports"]
    assert all(r.skipped is None and r.loss < 6 for r in reports)
    # each device processed its replicas' shares: within a copy per source device of the even split
    for layer, slots in enumerate(ODD_PLACEMENT):
        expected = ExpertPlacement(tuple(map(tuple, slots))).device_loads(reports[-1].expert_load[layer])
        assert all(abs(got - want) <= 2 * 3 for got, want in zip(reports[-1].device_load[layer], expected))
    slots = 3
    for block in range(0, len(state[0]), slots):   # one (layer, parameter): the same order on both ranks
        copies: dict[int, list] = {}
        for rank in (0, 1):
            for e, *tensors in state[rank][block:block + slots]:
                copies.setdefault(e, []).append(tensors)
        assert sorted(copies) == [0, 1, 2, 3] and any(len(reps) > 1 for reps in copies.values())
        for e, reps in copies.items():
            for other in reps[1:]:
                assert all(torch.equal(a, b) for a, b in zip(reps[0], other)), f"replicas of expert {e} differ"


def test_redundant_experts_config_errors():
    with pytest.raises(ConfigError, match="multiple of cluster.num_devices"):
        tiny_config(None, "cluster.num_devices=2", "model.num_experts=8", "balance.redundant_experts=1")
    with pytest.raises(ConfigError, match="needs cluster.num_devices > 1"):
        tiny_config(None, "balance.redundant_experts=2")
    with pytest.raises(ConfigError, match="at most 4"):
        tiny_config(None, "cluster.num_devices=2", "balance.redundant_experts=6")


@pytest.mark.parametrize("world,redundant,zero_stage", [(2, 2, 1), (4, 4, 3)])
def test_replicas_keep_the_reference_math(ray_session, tmp_path, world, redundant, zero_stage):
    """Re-placement moves experts (weights and moments) between devices, replicas split tokens and sum gradients,
    with dense state ZeRO-sharded (stage 1: moments partitioned; stage 3: FSDP2): still the reference's math."""
    overrides = ["train.dtype=float64", f"train.steps={STEPS}", "model.num_experts=8", "train.global_batch_size=8",
                 "train.eval_batches=0"]
    ref_reports, ref_params = reference_run(tiny_config(None, *overrides))
    cfg = tiny_config(tmp_path, *overrides, *REPLICAS, f"cluster.num_devices={world}",
                      f"balance.redundant_experts={redundant}", f"memory.zero_stage={zero_stage}")
    Driver(cfg, tmp_path).run()
    recs = records(tmp_path)
    moves = [r["replacement"]["placement"] for r in recs if r.get("replacement")]
    assert moves and all(len(dev) == (8 + redundant) // world for layer in moves[-1] for dev in layer)
    assert all(r["device_tokens"] for r in recs)
    # the spare slots hold replicas: every expert somewhere, some on two devices
    for layer in moves[-1]:
        held = [e for dev in layer for e in dev]
        assert sorted(set(held)) == list(range(8)) and len(held) > len(set(held))
    # measured device loads: in each step's placement every replica took its share of its expert's copies (an
    # even split give or take one copy per source device and replica slot)
    slots = (8 + redundant) // world
    current = [ExpertPlacement.initial(8, world, slots)] * len(recs[0]["expert_load"])
    for r in recs:
        expected = [sum(x) for x in zip(*(current[layer].device_loads(load) for layer, load in enumerate(r["expert_load"])))]
        assert all(abs(got - want) <= world * slots * len(current) for got, want in zip(r["device_tokens"], expected))
        if r.get("replacement"):
            current = [ExpertPlacement(tuple(map(tuple, layer))) for layer in r["replacement"]["placement"]]
    assert [r["loss"] for r in recs] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
    assert [r["grad_norm"] for r in recs] == pytest.approx([r.grad_norm for r in ref_reports], rel=1e-9)
    assert [r["expert_load"] for r in recs] == [r.expert_load for r in ref_reports]
    params, manifest = read_parameters(final_checkpoint(tmp_path))
    experts = sorted(k for k in params if ".experts." in k)   # one copy of each expert, keyed by its id
    assert experts == sorted(k for k in ref_params if ".experts." in k)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert manifest["placement"] == moves[-1]


def test_fault_in_a_placement_with_replicas_heals_to_the_same_state(ray_session, tmp_path):
    base = [f"train.steps={STEPS}", "cluster.num_devices=2", "faults.hang_floor_s=1", *REPLICAS,
            "balance.redundant_experts=2"]
    Driver(tiny_config(tmp_path / "twin", *base), tmp_path / "twin").run()
    faulty = tmp_path / "faulty"
    summary = Driver(tiny_config(faulty, *base, "faults.plan=[{step: 5, kind: kill, rank: 1}]"), faulty).run()
    assert summary.recoveries == 1 and summary.incidents[0]["rewound_to"] == 4
    assert [r["loss"] for r in records(faulty)] == [r["loss"] for r in records(tmp_path / "twin")]
    a, b = read_state(final_checkpoint(faulty)), read_state(final_checkpoint(tmp_path / "twin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_replicas_is_exact(ray_session, tmp_path):
    base = [f"train.steps={STEPS}", "cluster.num_devices=2", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
            *REPLICAS, "balance.redundant_experts=2", "balance.replace_window=3"]
    whole = tmp_path / "whole"
    Driver(tiny_config(whole, *base), whole).run()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (whole / "metrics.jsonl").read_text()
                                                   .splitlines() if json.loads(line)["step"] <= 4))
    # the same run continued in another run directory: its id goes with it (else it is a new run from that
    # checkpoint, and a new run's logs start empty)
    shutil.copy(whole / "run.json", resumed / "run.json")
    summary = Driver(tiny_config(resumed, *base, f"train.resume={whole / 'checkpoints' / 'step_00000004'}"),
                     resumed).run()
    assert summary.resumed_from_step == 4
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(whole)]
    a, b = read_state(final_checkpoint(resumed)), read_state(final_checkpoint(whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same checkpoint onto 4 devices without replicas: every expert found once, training goes on alike
    four = tmp_path / "four"
    Driver(tiny_config(four, *base, "cluster.num_devices=4", "balance.redundant_experts=0",
                       f"train.resume={whole / 'checkpoints' / 'step_00000004'}"), four).run()
    assert [r["step"] for r in records(four)] == [5, 6]
    assert [r["loss"] for r in records(four)] == pytest.approx([r["loss"] for r in records(whole)][4:], rel=1e-4)
