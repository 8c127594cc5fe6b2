"""The dense gradient all-reduce in buckets overlapped with the backward (parallel.overlap_grad_reduce,
parallel/grad_sync.py OverlappedGradReducer) sums what allreduce_dense_grads sums, exactly, in float64.

Pure torch.multiprocessing + gloo on loopback, no Ray (as tests/test_dispatch.py). The toy model's weights,
inputs and probes are small integers, so every gradient and every sum over ranks is an integer held exactly in
float64: equality holds whatever order the all-reduce adds in, and any real difference (a bucket summed twice, a
stale gradient, a missing micro-batch) shows. The DeviceShard cases run the project's model in float64 under
activation checkpointing, micro-batches, ZeRO-1 and replicated experts: bit for bit on two devices (a sum of two
numbers is the same in any order); on four to 1e-13 of the tensor's largest entry, since gloo's ring all-reduce
adds an entry's four terms in an order set by its position in the flat buffer, which bucketing changes (in a few
last bits; as different bucket sizes do under torch DDP).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.parallel import allreduce_dense_grads, groups
from orchestrator.parallel.grad_sync import OverlappedGradReducer, grad_buckets

W = 6


class _SumInBackward(torch.autograd.Function):
    """Identity forward; its backward all-reduces the gradient over the default group, as the MoE layers'
    all_to_all does in a real backward: bucket all-reduces must not get mixed up with it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class Toy(nn.Module):
    """`unused` never used (its gradient stays None everywhere), `rank1_skips` unused on rank 1 only, `first_micro`
    used in the first micro-batch only, `frozen` used but frozen; the rest used everywhere."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.unused = nn.Linear(W, W)   # registered first: its bucket is the last
        self.inp = nn.Linear(4, W)
        self.hidden = nn.ModuleList([nn.Linear(W, W) for _ in range(4)])
        self.first_micro = nn.Linear(W, W)
        self.frozen = nn.Linear(W, W)
        self.rank1_skips = nn.Linear(W, W)
        self.out = nn.Linear(W, 3)       # registered last: its bucket is the first
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g, dtype=torch.float64))
        self.frozen.requires_grad_(False)

    def forward(self, x, rank: int, micro: int):
        h = torch.relu(self.inp(x))
        for i, layer in enumerate(self.hidden):
            h = torch.relu(layer(h))
            if i == 1:
                h = _SumInBackward.apply(h)
        h = self.frozen(h)
        if micro == 0:
            h = self.first_micro(h)
        if rank != 1:
            h = self.rank1_skips(h)
        return self.out(h)


def _toy_grads(rank: int, world: int, micro_batches: int, bucket_bytes: int | None, steps: int = 2):
    """The toy's gradients after `steps` steps of `micro_batches` backward passes each, summed by the overlapped
    reducer (bucket_bytes) or by allreduce_dense_grads (None); and the buckets launched during the last backward."""
    torch.set_default_dtype(torch.float64)
    model = Toy()
    params = list(model.parameters())
    reducer = OverlappedGradReducer(params, bucket_bytes) if bucket_bytes else None
    out = []
    for step in range(steps):
        for p in params:
            p.grad = None
        g = torch.Generator().manual_seed(100 * step + rank)
        for i in range(micro_batches):
            x = torch.randint(-2, 3, (5, 4), generator=g).double()
            probe = torch.randint(-2, 3, (5, 3), generator=g).double()
            if reducer is not None:
                reducer.arm(i == micro_batches - 1)
            (model(x, rank, i) * probe).sum().backward()
        if reducer is not None:
            reducer.finish()
        else:
            allreduce_dense_grads(params)
        out.append([None if p.grad is None else p.grad.clone() for p in params])
    return out, (reducer.launched_in_backward if reducer else 0), (len(reducer.buckets) if reducer else 0)


def _toy_worker(rank: int, world: int, port: int, reformed: list[int]) -> None:
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=60)
    try:
        for micro in (1, 3):
            expected, _, _ = _toy_grads(rank, world, micro, None)
            for cap in (1, 200, 2000, 25 * 2**20):   # one parameter a bucket .. a few .. one bucket
                got, launched, buckets = _toy_grads(rank, world, micro, cap)
                for step_got, step_expected in zip(got, expected):
                    for a, b in zip(step_got, step_expected):
                        assert (a is None) == (b is None)
                        assert a is None or torch.equal(a, b), (cap, micro, (a - b).abs().max())
                if cap == 1:
                    assert buckets == 18   # 9 trainable Linear layers, weight and bias each
                # small buckets: `out`'s (the first) go out during the backward on every rank; on rank 1 the next
                # one waits for `rank1_skips`, and with 3 micro-batches `first_micro`'s for `finish`
                if cap <= 200:
                    assert launched > 0
                if cap == 1:
                    assert launched == {(False, 1): 16, (True, 1): 2, (False, 3): 4, (True, 3): 2}[rank == 1, micro]
        # every parameter's gradient: None only where no rank had one
        m = Toy()
        names = [n for n, p in m.named_parameters()]
        got, _, _ = _toy_grads(rank, world, 3, 1, steps=1)
        none = {n for n, g in zip(names, got[0]) if g is None}
        assert none == {"unused.weight", "unused.bias", "frozen.weight", "frozen.bias"}
        assert torch.count_nonzero(got[0][names.index("rank1_skips.weight")]) > 0
        # a reducer built before the default group is re-formed (recovery) makes its group again and goes on
        reducer, model, ref = None, Toy(), Toy()
        reducer = OverlappedGradReducer(list(model.parameters()), 200)
        for p in reformed:
            groups.join("gloo", "127.0.0.1", p, rank, world, timeout_s=60)
            x = torch.full((5, 4), float(rank + 1))
            for m in (model, ref):
                for q in m.parameters():
                    q.grad = None
            reducer.arm(True)
            (model(x, rank, 0)).sum().backward()
            (ref(x, rank, 0)).sum().backward()
            reducer.finish()
            allreduce_dense_grads(list(ref.parameters()))
            for a, b in zip(model.parameters(), ref.parameters()):
                assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    finally:
        groups.leave()


@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_buckets_sum_what_allreduce_dense_grads_sums(world):
    mp.spawn(_toy_worker, args=(world, groups.free_port(), [groups.free_port(), groups.free_port()]), nprocs=world,
             join=True)


def test_buckets_follow_reverse_registration_order_within_the_cap():
    layers = [nn.Linear(4, 4, dtype=torch.float64) for _ in range(3)]   # 128 + 32 bytes each
    params = [p for layer in layers for p in layer.parameters()]
    buckets = grad_buckets(params, 160)
    assert [[id(p) for p in b] for b in buckets] == [[id(p) for p in reversed(params[i:i + 2])] for i in (4, 2, 0)]
    assert len(grad_buckets(params, 1)) == 6            # a parameter over the cap: alone in its bucket
    assert len(grad_buckets(params, 10 ** 6)) == 1
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert len(grad_buckets(mixed, 10 ** 6)) == 2       # one dtype a flat buffer


# ----------------------------------------------------------------------------------- the project's DeviceShard

def _shard_grads(cfg, rank: int, world: int, corpus):
    from orchestrator.device.shard import DeviceShard

    shard = DeviceShard(cfg, rank, world, corpus.train, corpus.val)
    moe = shard.model.moe_layers()
    grads = []
    for step in (1,):
        shard._begin(step)
        shard._forward_backward(step, moe)
        shard._sync_grads(moe)
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in shard.model.named_parameters()})
        shard.optim.zero_grad()
    launched = {k: r.launched_in_backward for k, r in shard._grad_reducers.items()}
    return grads, launched, shard.holds_groups


def _shard_worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    from orchestrator.data import load_corpus
    from tests.conftest import tiny_config

    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=60)
    try:
        base = ["train.dtype=float64", f"cluster.num_devices={world}", "train.freeze=[tok_emb.weight]", *overrides]
        corpus = load_corpus(tiny_config().data)
        expected, none, _ = _shard_grads(tiny_config(None, *base, "parallel.overlap_grad_reduce=false"), rank,
                                         world, corpus)
        assert none == {}
        got, launched, holds = _shard_grads(tiny_config(None, *base, "parallel.grad_bucket_mb=0.002"), rank, world,
                                            corpus)
        assert holds and launched["dense"] > 0
        assert ("experts" in launched) == ("parallel.expert_parallel=2" in overrides)
        assert launched.get("experts", 1) > 0
        for step_got, step_expected in zip(got, expected):
            assert step_got.keys() == step_expected.keys()
            for name, a in step_got.items():
                b = step_expected[name]
                assert (a is None) == (b is None), name
                if a is not None and world == 2:
                    assert torch.equal(a, b), (name, (a - b).abs().max())
                elif a is not None:   # the ring all-reduce adds 4 numbers in an order set by the buffer position
                    assert (a - b).abs().max() <= 1e-13 * b.abs().max(), (name, (a - b).abs().max())
        assert got[0]["tok_emb.weight"] is None
    finally:
        groups.leave()


@pytest.mark.parametrize("world,overrides", [
    (2, ["memory.activation_checkpointing=full", "train.micro_batches=2", "memory.zero_stage=1"]),
    # EP 2 x DP 2: experts replicated over two "dp" groups, their reducer too
    (4, ["memory.activation_checkpointing=selective", "parallel.expert_parallel=2"]),
])
def test_device_shard_overlapped_grads_equal_the_fallback(world, overrides):
    mp.spawn(_shard_worker, args=(world, groups.free_port(), overrides), nprocs=world, join=True)
