"""How much of the dense gradient all-reduce the bucketed, overlapped reduce hides (parallel.overlap_grad_reduce).

    python bench/grad_overlap.py [--steps 10] [--config jobs/configs/default.yaml] [--threads 1] [KEY=VALUE ...]

Pure torch, no Ray: two processes (torch.multiprocessing, gloo on loopback), each a DeviceShard of the config's
model (2 devices: experts split over them, dense parameters replicated). For each setting (overlap off; on with
the default 25 MiB buckets; on with small buckets) it times, per step after two warm-up steps, the forward and
backward passes (with overlap on: the hooks launching buckets) and the gradient sync after them (off:
allreduce_dense_grads; on: OverlappedGradReducer.finish, launching what is left and waiting), and prints the
medians of rank 0. The part of the all-reduce hidden = 1 - (sync time with overlap) / (sync time without).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from orchestrator.parallel import groups  # noqa: E402

SETTINGS = {"off": ["parallel.overlap_grad_reduce=false"], "on, 25 MiB": ["parallel.grad_bucket_mb=25"],
            "on, 0.25 MiB": ["parallel.grad_bucket_mb=0.25"], "on, 0.05 MiB": ["parallel.grad_bucket_mb=0.05"]}


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    from orchestrator.config import load_config
    from orchestrator.data import load_corpus
    from orchestrator.device.shard import DeviceShard

    torch.set_num_threads(args.threads)
    groups.join("gloo", "127.0.0.1", port, rank, 2, timeout_s=120)
    base = ["cluster.num_devices=2", *args.overrides]
    corpus = load_corpus(load_config(args.config, base).data)
    for name, extra in SETTINGS.items():
        shard = DeviceShard(load_config(args.config, base + extra), rank, 2, corpus.train, corpus.val)
        moe = shard.model.moe_layers()
        fb, sync = [], []
        for step in range(1, args.steps + 3):
            shard._begin(step)
            t0 = time.perf_counter()
            shard._forward_backward(step, moe)
            t1 = time.perf_counter()
            shard._sync_grads(moe)
            t2 = time.perf_counter()
            shard.optim.zero_grad()
            if step > 2:
                fb.append(t1 - t0)
                sync.append(t2 - t1)
        if rank == 0:
            reducer = shard._grad_reducers.get("dense")
            dense = sum(p.numel() * p.element_size() for p in shard.dense_params if p.requires_grad)
            out[name] = dict(fb=statistics.median(fb), sync=statistics.median(sync), dense_mb=dense / 2**20,
                             buckets=len(reducer.buckets) if reducer else 1,
                             early=reducer.launched_in_backward if reducer else 0)
    groups.leave()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--config", default=str(REPO / "jobs/configs/default.yaml"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(groups.free_port(), args, out), nprocs=2, join=True)
    off = out["off"]["sync"]
    print(f"dense gradients: {out['off']['dense_mb']:.2f} MiB; medians of {args.steps} steps, rank 0")
    print(f"{'setting':<14}{'buckets':>8}{'early':>7}{'fwd+bwd ms':>12}{'sync ms':>10}{'total ms':>10}{'hidden':>8}")
    for name, r in out.items():
        hidden = "" if name == "off" else f"{1 - r['sync'] / off:.0%}"
        print(f"{name:<14}{r['buckets']:>8}{r['early']:>7}{r['fb'] * 1e3:>12.1f}{r['sync'] * 1e3:>10.2f}"
              f"{(r['fb'] + r['sync']) * 1e3:>10.1f}{hidden:>8}")


if __name__ == "__main__":
    main()
