"""The overlapped, chunked MoE routed path (AllToAllTokenDispatcher.routed, orchestrator/parallel/dispatch.py) is the
same math as the serial one: float64 forward outputs and every gradient against the single-process MoE (all
experts, LocalTokenDispatcher) and against the serial all_to_all path (one chunk, shared expert after the combine),
on 1, 2 and 4 gloo processes (torch.multiprocessing, no Ray), with uneven splits, an expert nobody picks,
capacity-dropped copies and routing replicas. Under bf16 autocast the copies cross the wire in bf16 (both ways)
and the output stays within bf16 tolerance of float32. A layer does one host sync (one .tolist()). A transformers
block with a shared expert after its experts runs it inside the experts' forward (SharedOverlap)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import BalanceConfig
from orchestrator.model.moe import MoE
from orchestrator.parallel import groups
from orchestrator.parallel.dispatch import AllToAllTokenDispatcher

E, D, F, K, B, T = 8, 16, 12, 2, 2, 12   # each rank: B sequences of T tokens


def full_moe(dtype=torch.float64, capacity_factor: float = 0.0) -> MoE:
    """Every expert in one module, seeded weights; expert 7 never chosen (a large negative selection bias)."""
    torch.manual_seed(0)
    moe = MoE(D, E, K, F, 1, "softmax", True, 1.0, list(range(E)), BalanceConfig(capacity_factor=capacity_factor))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.4)
        moe.router.expert_bias[7] = -100.0
    return moe.to(dtype)


def placement(world: int, replicas: bool) -> list[list[int]]:
    """E experts over `world` devices; with replicas each device holds one more slot, repeating experts from 0."""
    per = E // world + (1 if replicas else 0)
    flat = [i % E for i in range(world * per)]
    return [flat[d * per:(d + 1) * per] for d in range(world)]


def device_moe(full: MoE, slots: list[list[int]], rank: int) -> MoE:
    moe = MoE(D, E, K, F, 1, "softmax", True, 1.0, slots[rank], full.balance).to(full.router.gate.weight.dtype)
    state = full.state_dict()
    for name in ("experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF"):
        state[name] = state[name][slots[rank]]
    moe.load_state_dict(state)
    moe.set_placement(slots, rank)
    return moe


def inputs(world: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(world * B, T, D, generator=g, dtype=dtype),
            torch.randn(world * B, T, D, generator=g, dtype=dtype))


def run(moe: MoE, x_BTD: torch.Tensor, probe_BTD: torch.Tensor):
    """Output, input gradient and every parameter gradient of sum(out * probe)."""
    moe.zero_grad(set_to_none=True)
    x = x_BTD.clone().requires_grad_(True)
    out = moe(x)
    (out * probe_BTD.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


def _check(rank: int, world: int, replicas: bool, capacity_factor: float) -> None:
    full = full_moe(capacity_factor=capacity_factor)
    x_all, probe_all = inputs(world)
    mine = slice(rank * B, (rank + 1) * B)
    ref_out, ref_dx, ref_grads = run(full, x_all, probe_all)   # one process, every rank's tokens
    slots = placement(world, replicas)
    moe = device_moe(full, slots, rank)
    results = {}
    for chunks, overlap in ((1, False), (2, True), (30, False)):   # serial; default; empty chunks
        moe.dispatcher = AllToAllTokenDispatcher(world, chunks=chunks, shared_overlap=overlap)
        results[chunks, overlap] = run(moe, x_all[mine], probe_all[mine])
    tol = dict(rtol=1e-10, atol=1e-10)
    serial = results[1, False]
    for key, (out, dx, grads) in results.items():
        torch.testing.assert_close(out, ref_out[mine], **tol, msg=f"{key} output")
        torch.testing.assert_close(dx, ref_dx[mine], **tol, msg=f"{key} input gradient")
        for name, g in grads.items():   # against the serial all_to_all path, replica by replica
            torch.testing.assert_close(g, serial[2][name], **tol, msg=f"{key} {name}")
        for name, g in grads.items():   # against one process: dense gradients summed over ranks, experts by id
            if name.startswith("experts."):
                gathered = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(gathered, g.contiguous())
                summed = torch.zeros_like(ref_grads[name])
                for d, ids in enumerate(slots):
                    for j, e in enumerate(ids):
                        summed[e] += gathered[d][j]
                torch.testing.assert_close(summed, ref_grads[name], **tol, msg=f"{key} {name}")
            else:
                total = g.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, ref_grads[name], **tol, msg=f"{key} {name}")
    if capacity_factor:
        dropped = torch.tensor([moe.last_dropped])
        dist.all_reduce(dropped)
        assert dropped.item() == full.last_dropped > 0
    assert full.last_tokens_per_expert[7] == 0


@contextlib.contextmanager
def wire_dtypes():
    """Records the dtype of every tensor all_to_all_single sends (dispatch.py calls it through `dist`)."""
    seen, real = [], dist.all_to_all_single

    def spy(output, input, *args, **kwargs):
        seen.append(input.dtype)
        return real(output, input, *args, **kwargs)

    dist.all_to_all_single = spy
    try:
        yield seen
    finally:
        dist.all_to_all_single = real


@contextlib.contextmanager
def host_syncs():
    """Counts .tolist() and .item() calls (each a device-to-host sync on a GPU)."""
    calls = {"n": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def tolist(self):
        calls["n"] += 1
        return real_tolist(self)

    def item(self):
        calls["n"] += 1
        return real_item(self)

    torch.Tensor.tolist, torch.Tensor.item = tolist, item
    try:
        yield calls
    finally:
        torch.Tensor.tolist, torch.Tensor.item = real_tolist, real_item


def _check_bf16(rank: int, world: int) -> None:
    full = full_moe(torch.float32)
    x_all, probe_all = inputs(world, torch.float32)
    mine = slice(rank * B, (rank + 1) * B)
    slots = placement(world, False)
    moe = device_moe(full, slots, rank)
    moe.dispatcher = AllToAllTokenDispatcher(world, chunks=2, shared_overlap=True)
    ref_out, ref_dx, _ = run(moe, x_all[mine], probe_all[mine])
    with wire_dtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out, dx, _ = run(moe, x_all[mine], probe_all[mine])
    # forward: counts (int64), 2 dispatches, 2 combines; backward: the 4 gradient exchanges
    assert seen == [torch.int64] + [torch.bfloat16] * 8, seen
    assert out.dtype == torch.float32
    scale = ref_out.abs().max().item()
    torch.testing.assert_close(out, ref_out, rtol=3e-2, atol=3e-2 * scale)
    torch.testing.assert_close(dx, ref_dx, rtol=5e-2, atol=5e-2 * ref_dx.abs().max().item())
    # outside autocast the wire keeps the model's dtype
    with wire_dtypes() as seen:
        run(moe, x_all[mine], probe_all[mine])
    assert set(seen) == {torch.int64, torch.float32}
    # one host sync per layer (the counts of every chunk) in the routed path, whatever the chunks
    for chunks in (1, 4):
        moe.dispatcher = AllToAllTokenDispatcher(world, chunks=chunks)
        with host_syncs() as calls:
            moe(x_all[mine])
        assert calls["n"] == 1, (chunks, calls)


def _check_one_slot_per_device(rank: int, world: int) -> None:
    """One slot per device (no regrouping of what arrives): routed over the devices is routed in one process."""
    from orchestrator.model.moe import GroupedExperts, LocalTokenDispatcher

    torch.manual_seed(1)
    full = GroupedExperts(D, F, list(range(world))).double()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.4)
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(world * 10, D, generator=g, dtype=torch.float64)
    slots_all = torch.randint(0, world + 1, (world * 10, K), generator=g)   # slot `world`: dropped
    gates_all = torch.rand(world * 10, K, generator=g, dtype=torch.float64)
    ref = LocalTokenDispatcher().routed(x_all, slots_all, gates_all, world, full).out_ND
    mine = GroupedExperts(D, F, [rank]).double()
    mine.load_state_dict({k: v[rank:rank + 1] for k, v in full.state_dict().items()})
    rows = slice(rank * 10, (rank + 1) * 10)
    out = AllToAllTokenDispatcher(world, chunks=3).routed(x_all[rows], slots_all[rows], gates_all[rows], world, mine)
    torch.testing.assert_close(out.out_ND, ref[rows], rtol=1e-12, atol=1e-12)


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    for replicas, capacity_factor in ((False, 0.0), (True, 1.0)):   # dropless, one slot per expert; replicas + drops
        _check(rank, world, replicas, capacity_factor)
    _check_one_slot_per_device(rank, world)
    if world == 2:
        _check_bf16(rank, world)
    groups.leave()


def test_overlapped_chunked_dispatch_is_the_serial_math_on_1_2_4_devices():
    for world in (1, 2, 4):
        mp.spawn(_worker, args=(world, groups.free_port("127.0.0.1")), nprocs=world, join=True)


def test_local_dispatcher_routed_path_matches_dispatch_and_combine():
    """LocalTokenDispatcher.routed (what MoE.forward runs) is dispatch + experts + combine + shared, as before."""
    moe = full_moe(capacity_factor=1.0)
    x, probe = inputs(1)
    out, dx, grads = run(moe, x, probe)
    d = moe.dispatcher
    x2 = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    x_ND = x2.reshape(-1, D)
    gates, ids, _, _ = moe.router(x_ND)
    from orchestrator.model.balancing import drop_over_capacity
    import math
    send = drop_over_capacity(ids, T, E, math.ceil(1.0 * T * K / E))
    x_MD, per, _, meta = d.dispatch(x_ND, moe.slots_of(send), moe.num_slots)
    old = (d.combine(moe.experts(x_MD, per), gates, meta, x_ND.shape[0]) + moe.shared(x_ND)).view_as(x)
    (old * probe).sum().backward()
    torch.testing.assert_close(out, old.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, x2.grad, rtol=1e-12, atol=1e-12)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-12)


def test_transformers_shared_expert_runs_inside_the_experts_forward(tmp_path):
    """DeepSeek-V3's block: the shared expert is computed once, by the experts' forward (SharedOverlap.compute),
    and the logits and gradients are transformers' own; Qwen2-MoE (shared expert called first) is left as it is."""
    from orchestrator.config import ModelConfig
    from orchestrator.model.hf import SharedOverlap, build_hf_model
    from tests.hf_tiny import make_tiny_hf

    for kind in ("deepseek_v3", "qwen2_moe"):
        ref = make_tiny_hf(kind, tmp_path / kind)   # float32: transformers' grouped matmul takes no float64
        model = build_hf_model(ModelConfig(hf_path=str(tmp_path / kind)), 0)
        overlapped = [m.__dict__.get("_shared") for m in model.moe_layers()]
        assert all(isinstance(s, SharedOverlap) for s in overlapped) == (kind == "deepseek_v3")
        if kind == "deepseek_v3":
            calls = []
            for s in overlapped:
                s.module.down_proj.register_forward_hook(lambda m, a, o: calls.append(m))   # computed, not handed back
        tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
        logits = model(tokens)
        ref_logits = ref(tokens).logits
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
        logits.square().sum().backward()
        ref_logits.square().sum().backward()
        ref_grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is not None and ref_grads[name].grad is not None:
                torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        if kind == "deepseek_v3":
            assert len(calls) == len(overlapped)   # once per layer: the block's own call computed nothing


def _hf_model(path: str, expert_ids=None):
    from orchestrator.config import ModelConfig
    from orchestrator.model.hf import build_hf_model

    model = build_hf_model(ModelConfig(hf_path=path), 0, expert_ids)
    model.hf.config._experts_implementation_internal = "eager"   # the grouped matmul takes no float64
    return model.double()


def _hf_grads(model, tokens_BT):
    model.zero_grad(set_to_none=True)
    logits = model(tokens_BT)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_worker(rank: int, world: int, port: int, path: str) -> None:
    from orchestrator.parallel.dispatch import apply_expert_parallel

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    tokens = torch.randint(0, 256, (world * 2, 12), generator=torch.Generator().manual_seed(5))
    mine = tokens[rank * 2:(rank + 1) * 2]
    ref_logits, _ = _hf_grads(_hf_model(path), tokens)   # one process, every expert, every rank's tokens
    el = 4 // world
    slots = [list(range(d * el, (d + 1) * el)) for d in range(world)]
    model = _hf_model(path, slots[rank])
    runs = {}
    for chunks, overlap in ((1, False), (3, True)):
        apply_expert_parallel(model, world, chunks=chunks, shared_overlap=overlap)
        for m in model.moe_layers():
            m.set_placement(slots, rank)
        runs[chunks] = _hf_grads(model, mine)
    torch.testing.assert_close(runs[1][0], ref_logits[rank * 2:(rank + 1) * 2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs[3][0], runs[1][0], rtol=1e-10, atol=1e-10)
    assert runs[3][1].keys() == runs[1][1].keys()
    for name, g in runs[3][1].items():
        torch.testing.assert_close(g, runs[1][1][name], rtol=1e-10, atol=1e-12, msg=name)
    groups.leave()


def test_transformers_chunked_overlapped_dispatch_is_the_serial_math(tmp_path):
    """DeepSeek-V3 (shared expert overlapped) on 2 gloo processes in float64: 3 chunks with the shared expert during
    the dispatch give the serial path's logits and gradients; both give the single-process model's logits."""
    from tests.hf_tiny import make_tiny_hf

    make_tiny_hf("deepseek_v3", tmp_path / "v3")
    mp.spawn(_hf_worker, args=(2, groups.free_port("127.0.0.1"), str(tmp_path / "v3")), nprocs=2, join=True)
