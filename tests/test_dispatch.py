"""Token dispatch/combine: local sort-by-expert against a naive loop, and all_to_all across 2 processes
(gloo on loopback, torch.multiprocessing, no Ray) against the local dispatcher on all tokens."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.model.moe import GroupedExperts, LocalTokenDispatcher
from orchestrator.parallel import AllToAllTokenDispatcher, groups

E, D, HID, N, K, WORLD = 4, 8, 16, 6, 2, 2


def make_experts(expert_ids) -> GroupedExperts:
    experts = GroupedExperts(D, HID, expert_ids)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        full = [torch.randn(E, *p.shape[1:], generator=g) * 0.3 for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)]
        for p, w in zip((experts.w1_EFD, experts.w3_EFD, experts.w2_EDF), full):
            p.copy_(w[list(expert_ids)])
    return experts


def inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(N, D, generator=g), torch.rand(N, K, generator=g), torch.randn(N, D, generator=g)


def moe_forward(experts, dispatcher, x_ND, experts_NK, gates_NK):
    x_MD, per_expert, counts_E, meta = dispatcher.dispatch(x_ND, experts_NK, E)
    return dispatcher.combine(experts(x_MD, per_expert), gates_NK, meta, x_ND.shape[0]), per_expert, counts_E


# Routing of each rank's N tokens (top-2), per scenario.
SCENARIOS = {
    # Everything goes to device 0's experts: device 1 receives zero tokens, experts 2 and 3 none.
    "all_to_device0": [[[0, 1]] * N, [[1, 0]] * N],
    # Skewed with expert 3 never chosen and device 0 sending nothing to device 1.
    "skewed_expert3_empty": [[[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]],
                             [[2, 0], [2, 1], [2, 0], [0, 2], [2, 1], [1, 2]]],
    # Each device sends every token to the other device only.
    "crosswise": [[[2, 3]] * N, [[0, 1]] * N],
    "mixed": [[[0, 3], [1, 2], [2, 0], [3, 1], [0, 2], [1, 3]], [[3, 2], [2, 1], [1, 0], [0, 3], [3, 1], [2, 0]]],
}


def _check_scenario(rank: int, routing) -> None:
    el = E // WORLD
    # Reference: all experts in one place, both ranks' tokens.
    ref_experts = make_experts(range(E))
    ref_out = []
    ref_x = []
    for r in range(WORLD):
        x, gates, probe = inputs(r)
        x.requires_grad_(True)
        out, _, _ = moe_forward(ref_experts, LocalTokenDispatcher(), x, torch.tensor(routing[r]), gates)
        (out * probe).sum().backward()
        ref_out.append(out.detach())
        ref_x.append(x)
    # Distributed: this rank's tokens, this rank's experts.
    mine = make_experts(range(rank * el, (rank + 1) * el))
    x, gates, probe = inputs(rank)
    x.requires_grad_(True)
    out, per_expert, counts = moe_forward(mine, AllToAllTokenDispatcher(WORLD), x, torch.tensor(routing[rank]), gates)
    (out * probe).sum().backward()
    expected_counts = torch.bincount(torch.tensor(routing).view(-1), minlength=E)
    assert per_expert == expected_counts[rank * el:(rank + 1) * el].tolist()
    assert counts.tolist() == torch.bincount(torch.tensor(routing[rank]).view(-1), minlength=E).tolist()
    torch.testing.assert_close(out.detach(), ref_out[rank])
    torch.testing.assert_close(x.grad, ref_x[rank].grad)
    for p, ref_p in zip(mine.parameters(), ref_experts.parameters()):
        torch.testing.assert_close(p.grad, ref_p.grad[rank * el:(rank + 1) * el])


def _worker(rank: int, ports: list[int]) -> None:
    groups.join("gloo", "127.0.0.1", ports[0], rank, WORLD, timeout_s=60)
    for routing in SCENARIOS.values():
        _check_scenario(rank, routing)
    # The group can be torn down and formed again in the same processes (recovery relies on it).
    groups.join("gloo", "127.0.0.1", ports[1], rank, WORLD, timeout_s=60)
    _check_scenario(rank, SCENARIOS["mixed"])
    groups.leave()


def test_all_to_all_dispatch_matches_local_dispatch():
    mp.spawn(_worker, args=([groups.free_port(), groups.free_port()],), nprocs=WORLD, join=True)


def test_local_dispatch_matches_naive_loop():
    experts = make_experts(range(E))
    x, gates, _ = inputs(0)
    routing = torch.tensor(SCENARIOS["skewed_expert3_empty"][1])
    out, per_expert, _ = moe_forward(experts, LocalTokenDispatcher(), x, routing, gates)
    assert per_expert == [3, 3, 6, 0]
    with torch.no_grad():
        naive = torch.zeros_like(x)
        for t in range(N):
            for k in range(K):
                e = routing[t, k]
                h = F.silu(x[t] @ experts.w1_EFD[e].t()) * (x[t] @ experts.w3_EFD[e].t())
                naive[t] += gates[t, k] * (h @ experts.w2_EDF[e].t())
    torch.testing.assert_close(out.detach(), naive)
