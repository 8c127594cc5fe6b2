"""Micro-benchmark of one MoE layer's expert-parallel dispatch (orchestrator/parallel/dispatch.py): N gloo processes
on loopback (torch.multiprocessing, no Ray), one MoE layer of the default job's size (jobs/configs/default.yaml:
dim, experts, top-k, expert_dim, shared experts) on the default job's tokens per device.

    python bench/dispatch.py [--devices 2,4] [--iters 20] [--warmup 3] [--threads 1]

Reports per device count (the slowest rank's median over --iters, in ms):
  (a) dispatch_combine_ms  AllToAllTokenDispatcher.routed with identity experts (forward: counts exchange, sort,
      dispatch, combine), one chunk, against raw_a2a_ms: two raw all_to_all_single of the same bytes with the same
      splits; goal ratio <= 1.2. counts_a2a_ms: one all_to_all of the counts alone (a latency the routed path pays
      once per layer and the raw exchange does not).
  (b) layer_serial_ms / layer_overlap_ms  the layer's forward+backward (router, experts, shared expert, balancing
      off), serial (parallel.dispatch_chunks=1, shared_expert_overlap=false) against overlapped (the defaults: 2
      chunks, shared expert during the dispatch); exchange_ms: the four raw all_to_all of the layer's forward and
      backward; hidden_share = (serial - overlapped) / exchange: the share of the exchange time the overlap hides.
  host_syncs_before / after: device-to-host syncs of one layer forward (counted on the CPU: .tolist(), .item(),
      int(tensor), and the ops that sync on a GPU: nonzero, bincount, repeat_interleave without output_size,
      masked_select, boolean indexing), the old dispatch/combine path against the routed one.
Results go to bench/results/dispatch-<host>.json. Loopback gloo on a shared CPU is not a GPU interconnect: read the
ratios, not the milliseconds; the real measurement runs on the project's machines.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select"}


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs of what runs inside (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.n, self.ops = 0, {}
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        counter, real = self, self._tolist

        def tolist(t):
            counter._count("tolist")
            return real(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def _count(self, name: str) -> None:
        self.n += 1
        self.ops[name] = self.ops.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if (name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                 and isinstance(args[0], torch.Tensor) and len(args) < 3)
                or (name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                            for i in (args[1] or [])))):
            self._count(name)
        return func(*args, **kwargs)


def layer_dims():
    from orchestrator.config import load_config

    cfg = load_config(REPO / "jobs/configs/default.yaml", [])
    m = cfg.model
    tokens = cfg.train.global_batch_size * cfg.data.seq_len // cfg.cluster.num_devices // cfg.train.micro_batches
    return m, tokens, cfg.data.seq_len


def build_layer(m, rank: int, world: int):
    from orchestrator.model.moe import MoE

    torch.manual_seed(0)
    El = m.num_experts // world
    moe = MoE(m.dim, m.num_experts, m.top_k, m.expert_dim, m.num_shared_experts, m.score_func, m.norm_topk_prob,
              m.route_scale, list(range(rank * El, (rank + 1) * El)))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    moe.set_placement([list(range(d * El, (d + 1) * El)) for d in range(world)], rank)
    return moe


def timed(fn, iters: int, warmup: int) -> float:
    """The slowest rank's median of fn's wall time, ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times) * 1e3])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def old_forward(moe, x_BTD):
    """The layer forward before the routed path (dispatch, experts, combine, shared), for the host-sync count."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    gates, ids, _, _ = moe.router(x_ND)
    torch.bincount(ids.reshape(-1), minlength=moe.num_experts)
    x_MD, per, _, meta = moe.dispatcher.dispatch(x_ND, moe.slots_of(ids), moe.num_slots)
    int(sum(per))
    out = moe.dispatcher.combine(moe.experts(x_MD, per), gates, meta, x_ND.shape[0])
    return out + moe.shared(x_ND)


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    from orchestrator.parallel import groups
    from orchestrator.parallel.dispatch import AllToAllTokenDispatcher

    torch.set_num_threads(args.threads)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    m, tokens, T = layer_dims()
    moe = build_layer(m, rank, world)
    g = torch.Generator().manual_seed(rank)
    x_BTD = torch.randn(tokens // T, T, m.dim, generator=g)
    x_ND = x_BTD.reshape(-1, m.dim)
    with torch.no_grad():
        gates, ids, _, _ = moe.router(x_ND)
    slots = moe.slots_of(ids)
    serial = AllToAllTokenDispatcher(world, chunks=1, shared_overlap=False)
    overlapped = AllToAllTokenDispatcher(world, chunks=args.chunks, shared_overlap=True)
    # the splits of this routing, for the raw all_to_all of the same bytes
    El = m.num_experts // world
    counts = torch.bincount(slots.reshape(-1), minlength=m.num_experts)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts)
    in_splits, out_splits = counts.view(world, El).sum(1).tolist(), recv.view(world, El).sum(1).tolist()
    send = torch.randn(sum(in_splits), m.dim)
    got = torch.empty(sum(out_splits), m.dim)

    def raw_two():   # dispatch and combine: there and back
        dist.all_to_all_single(got, send, out_splits, in_splits)
        dist.all_to_all_single(send, got, in_splits, out_splits)

    def routed_identity(d):
        with torch.no_grad():
            d.routed(x_ND, slots, gates, moe.num_slots, lambda x, per: x)

    small = torch.zeros(m.num_experts, dtype=torch.long)

    def counts_exchange():
        dist.all_to_all_single(torch.empty_like(small), small)

    res = {"raw_a2a_ms": timed(raw_two, args.iters, args.warmup),
           "counts_a2a_ms": timed(counts_exchange, args.iters, args.warmup),
           "dispatch_combine_ms": timed(lambda: routed_identity(serial), args.iters, args.warmup),
           "dispatch_combine_chunked_ms": timed(lambda: routed_identity(overlapped), args.iters, args.warmup)}
    res["dispatch_combine_ratio"] = res["dispatch_combine_ms"] / res["raw_a2a_ms"]

    def layer(d):
        moe.dispatcher = d
        moe.zero_grad(set_to_none=True)
        x = x_BTD.clone().requires_grad_(True)
        moe(x).square().mean().backward()

    res["exchange_ms"] = 2 * res["raw_a2a_ms"]     # forward's dispatch and combine, backward's two
    res["layer_serial_ms"] = timed(lambda: layer(serial), args.iters, args.warmup)
    res["layer_overlap_ms"] = timed(lambda: layer(overlapped), args.iters, args.warmup)
    res["hidden_share"] = (res["layer_serial_ms"] - res["layer_overlap_ms"]) / res["exchange_ms"]
    moe.dispatcher = serial
    with torch.no_grad(), SyncCounter() as before:
        old_forward(moe, x_BTD)
    moe.dispatcher = overlapped
    with torch.no_grad(), SyncCounter() as after:
        moe(x_BTD)
    res.update(host_syncs_before=before.n, host_syncs_before_ops=before.ops, host_syncs_after=after.n,
               host_syncs_after_ops=after.ops)
    if rank == 0:
        res.update(world=world, tokens_per_device=tokens, dim=m.dim, num_experts=m.num_experts, top_k=m.top_k,
                   expert_dim=m.expert_dim, chunks=args.chunks, iters=args.iters, threads=args.threads)
        Path(out_path).write_text(json.dumps(res))
    groups.leave()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="2,4")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--chunks", type=int, default=2, help="parallel.dispatch_chunks of the overlapped run")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from orchestrator.parallel import groups

    results = []
    for world in [int(w) for w in args.devices.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "res.json")
            mp.spawn(_worker, args=(world, groups.free_port("127.0.0.1"), args, out), nprocs=world, join=True)
            r = json.loads(Path(out).read_text())
        results.append(r)
        print(f"{world} devices, {r['tokens_per_device']} tokens/device: dispatch+combine "
              f"{r['dispatch_combine_ms']:.2f} "
              f"ms vs raw all_to_all {r['raw_a2a_ms']:.2f} ms (x{r['dispatch_combine_ratio']:.2f}; counts exchange "
              f"{r['counts_a2a_ms']:.2f} ms; "
              f"{r['chunks']} chunks {r['dispatch_combine_chunked_ms']:.2f} ms) | layer fwd+bwd serial "
              f"{r['layer_serial_ms']:.2f} ms, overlapped {r['layer_overlap_ms']:.2f} ms, exchange "
              f"{r['exchange_ms']:.2f} ms: {100 * r['hidden_share']:.0f}% hidden | host syncs per layer "
              f"{r['host_syncs_before']} -> {r['host_syncs_after']}")
    host = platform.node() or "host"
    path = REPO / "bench" / "results" / f"dispatch-{host}.json"
    path.write_text(json.dumps({"host": host, "torch": torch.__version__, "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
