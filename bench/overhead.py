"""The Ray job's overhead against a plain torch.distributed run of the same DeviceShard steps (issue 23).

    python bench/overhead.py [--devices 2,4] [--steps 100] [--rounds 3] [--arms plain,default,...] [key=value ...]

Arms (each at every N of --devices; key=value overrides go to every arm):

  plain          N processes (torch.multiprocessing), gloo on CPU / nccl on GPU over loopback; each builds a
                 DeviceShard from the config exactly as DeviceActor.build does (the default job's config and data,
                 loaded as the driver's start does) and calls train_step(step) in a loop: no Ray, no driver; its
                 processes bound to cores as cluster.bind_cores binds the device actors (device/cores.py)
  plain_before   the same with the devices' speed options off (the parallel.* keys of BEFORE)
  plain_one_chunk, plain_no_shared_overlap, plain_no_grouped_gemm, plain_no_grad_overlap
                 the plain job with one of the devices' speed options off each (parallel.dispatch_chunks=1,
                 shared_expert_overlap, grouped_gemm, overlap_grad_reduce): its ratio against plain is what that
                 option gains (above 1) or costs (below 1) on this machine
  default        the Ray job through the real entry point (`python -m jobs.train`, bench/jobrun.py), every default on
  no_snapshots   ... with faults.snapshot_every=0
  every_step     ... with faults.snapshot_every=1 (a snapshot after every step: the default before it became 5)
  no_sinks       ... with the sinks that are on by default off (monitor.tensorboard, monitor.prometheus)
  no_alerts      ... with monitor.alerts=[]
  bare           ... with all three off (what the Ray job costs with nothing but metrics.jsonl and status.json)
  before         ... with the speed options off (BEFORE: parallel.pipelined_driver, overlap_grad_reduce,
                 dispatch_chunks=1, shared_expert_overlap, grouped_gemm), every other default on
  serial_driver  ... with parallel.pipelined_driver=false only (the lock-step driver)
  thread_snapshot ... with parallel.snapshot_serialize=thread (the GPU default: the snapshot copied in the step
                 loop, serialized from the device's snapshot thread while the next step runs)
  plain_unbound, unbound
                 the plain and the Ray job with cluster.bind_cores=none (the OS places the devices' threads);
                 unbound is compared with plain_unbound
  ray_bare       the plain job's DeviceShard steps in Ray actors on a private local Ray instance, without the driver
                 (no records, sinks, alerts, snapshots or healing): each step submitted to every actor with
                 `.remote()` and waited for before the next; what Ray itself costs
  ray_compiled   the same through a Ray compiled graph (`ray.dag`, `experimental_compile`): the hand-over of a step
                 over shared-memory channels instead of Ray's task calls

The figure is the step loop's wall clock per step between step 6 and the last (the first steps warm up): for a
Ray arm from the wall-clock `time` of the step records in metrics.jsonl (made when the step's reports are in, so
their differences include the driver's work between steps), for a plain arm rank 0's time.time() after each
train_step. The arms run in rounds: each round runs every arm once per N, in an order rotated by one each
round, and each Ray arm's ratio is taken against the plain arm of the same round and N (plain_before's for
`before` too, when it ran), so a machine whose speed drifts still gives honest ratios; medians over the rounds
are reported. The "median" column is the same ratio from the median of the per-step intervals instead of their
mean (robust to a burst of a shared machine's neighbours within one run). Tokens/s and MFU come from the same
loop time: positions per step / loop time per step, times metrics.py flops_per_token, over N x one device's peak
(metrics.py peak_flops: on CPU a float32 matmul measured once here, the same for every arm). A Ray arm also reports its devices' mean idle share between step 6 and the
last (the step records' idle_share: device/steptimes.py) and summary.json's steps_per_s and device_steps_per_s.
Results: bench/results/overhead-<host>.json (or --out) and a table on stdout. The goal (issue 23): `default` <=
1.05x plain at N = 2 and 4, idle share < 2%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from jobrun import REPO, run_job

sys.path.insert(0, str(REPO))

FROM = 6   # the loop is timed from this step's end to the last step's end
SNAPSHOTS_OFF = ["faults.snapshot_every=0"]
EVERY_STEP = ["faults.snapshot_every=1"]
SINKS_OFF = ["monitor.tensorboard=false", "monitor.prometheus=false"]
ALERTS_OFF = ["monitor.alerts=[]"]
BEFORE = ["parallel.pipelined_driver=false", "parallel.overlap_grad_reduce=false", "parallel.dispatch_chunks=1",
          "parallel.shared_expert_overlap=false", "parallel.grouped_gemm=false"]
SERIAL = ["parallel.pipelined_driver=false"]
THREAD_SNAPSHOT = ["parallel.snapshot_serialize=thread"]
UNBOUND = ["cluster.bind_cores=none"]   # the OS places the devices' threads (the default binds them: device/cores.py)
# arm -> (plain or ray, its overrides, the plain arm it is compared with when that one ran)
ARMS: dict[str, tuple[str, list[str], str]] = {
    "plain": ("plain", [], "plain"),
    "plain_before": ("plain", BEFORE, "plain_before"),
    "plain_one_chunk": ("plain", ["parallel.dispatch_chunks=1"], "plain"),
    "plain_no_shared_overlap": ("plain", ["parallel.shared_expert_overlap=false"], "plain"),
    "plain_no_grouped_gemm": ("plain", ["parallel.grouped_gemm=false"], "plain"),
    "plain_no_grad_overlap": ("plain", ["parallel.overlap_grad_reduce=false"], "plain"),
    "default": ("ray", [], "plain"),
    "no_snapshots": ("ray", SNAPSHOTS_OFF, "plain"),
    "every_step": ("ray", EVERY_STEP, "plain"),
    "no_sinks": ("ray", SINKS_OFF, "plain"),
    "no_alerts": ("ray", ALERTS_OFF, "plain"),
    "bare": ("ray", SNAPSHOTS_OFF + SINKS_OFF + ALERTS_OFF, "plain"),
    "before": ("ray", BEFORE, "plain_before"),
    "serial_driver": ("ray", SERIAL, "plain"),
    "thread_snapshot": ("ray", THREAD_SNAPSHOT, "plain"),
    "plain_unbound": ("plain", UNBOUND, "plain_unbound"),
    "unbound": ("ray", UNBOUND, "plain_unbound"),
    "ray_bare": ("ray_bare", [], "plain"),
    "ray_compiled": ("ray_compiled", [], "plain"),
}


def loop_s_per_step(times: dict[int, float]) -> float:
    """Wall seconds per step from step FROM's end to the last step's end; `times`: step -> wall clock at its end."""
    last = max(times)
    if last <= FROM:
        raise SystemExit(f"--steps must be above {FROM}: the loop is timed from step {FROM} to the last")
    return (times[last] - times[FROM]) / (last - FROM)


def median_step_s(times: dict[int, float]) -> float:
    """The median of the loop's per-step intervals from step FROM on: robust to a burst of the machine's
    neighbours inside one run (the mean of loop_s_per_step is not)."""
    steps = sorted(s for s in times if s > FROM)
    return statistics.median(times[s] - times[s - 1] for s in steps if s - 1 in times)


def load_config(n: int, steps: int, overrides: list[str]):
    """The default job's config as the job loads it, at N devices, for `steps` steps."""
    from orchestrator.config import DEFAULT_CONFIG, load_config as load

    return load(DEFAULT_CONFIG, [f"cluster.num_devices={n}", f"train.steps={steps}", *overrides])


def settled_precision(cfg) -> str:
    """train.mixed_precision as the devices settle it (DeviceGroup.settle_mixed_precision): 'bf16' or 'none'."""
    from orchestrator.device.shard import _bf16_native, autocast_dtype

    gpu = cfg.cluster.use_gpu
    if gpu:
        import torch

        gpu = torch.cuda.is_available()
    cast = autocast_dtype(cfg.train.mixed_precision, cfg.train.dtype, "cuda" if cfg.cluster.use_gpu else "cpu",
                          bool(gpu) and _bf16_native())
    return "none" if cast is None else "bf16"


# ------------------------------------------------------------------------------------------- the plain job
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_worker(rank: int, world: int, port: int, shard_cfg: dict, threads: int, train, val, steps: int,
                  out: str) -> None:
    """One process of the plain job: the default group over loopback, the mesh, the DeviceShard (as
    DeviceActor.join_group and .build make them), then train_step(1..steps); rank 0 writes each step's end time."""
    import torch.distributed as dist

    shard = _build_shard(rank, world, port, shard_cfg, threads, train, val)
    ends: dict[int, float] = {}
    for step in range(1, steps + 1):
        report = shard.train_step(step)
        ends[step] = time.time()
    if rank == 0:
        Path(out).write_text(json.dumps({"ends": ends, "loss": report.loss}))
    dist.destroy_process_group()


def _build_shard(rank: int, world: int, port: int, shard_cfg: dict, threads: int, train, val, pick_gpu: bool = True):
    """In a device's process (the plain job's, or a bare Ray actor's): torch's threads, the binding, the default
    group over loopback, the mesh and the DeviceShard, as DeviceActor.join_group and .build make them.
    `pick_gpu`: a GPU is this process's to choose (the plain job), not Ray's to give."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    gpu = shard_cfg["cluster"]["use_gpu"]
    if gpu and pick_gpu:   # one GPU per process, as Ray gives each actor: DeviceShard uses cuda:0 of what it sees
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[rank] if len(visible) > rank and visible[rank] else str(rank)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from orchestrator.config import config_from_dict, mesh_shape
    from orchestrator.device.shard import DeviceShard
    from orchestrator.parallel.mesh import current_mesh

    gpu = gpu and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(0)
    torch.set_num_threads(max(1, threads))
    from orchestrator.device import cores as core_binding

    # bound as DeviceGroup.bind_cores binds the device actors (cluster.bind_cores), before the group's threads start
    core_binding.bind_device(rank, world, shard_cfg["cluster"]["bind_cores"], gpu, core_binding.usable_cpus())
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    cfg = config_from_dict(shard_cfg)
    current_mesh(world, rank, mesh_shape(cfg)[0], "cuda" if gpu else "cpu")
    return DeviceShard(cfg, rank, world, train, val)


def _devices_setup(n: int, steps: int, overrides: list[str]):
    """What every device of the plain job and the bare Ray arms gets: the config as a dict, torch's threads, the
    corpus. As the driver: the LR horizon a fresh run plans (timeline.plan_resume), the precision the devices settle
    on (DeviceGroup.settle_mixed_precision), the data loaded as start_devices loads it."""
    from orchestrator.config import to_dict
    from orchestrator.data.source import load_data, resolve_tokenizer

    cfg = load_config(n, steps, overrides)
    cfg = replace(cfg, train=replace(cfg.train, lr_horizon=cfg.train.lr_horizon or cfg.train.steps))
    shard_cfg = to_dict(cfg)
    shard_cfg["train"]["mixed_precision"] = settled_precision(cfg)
    corpus = load_data(cfg, resolve_tokenizer(cfg))
    threads = cfg.cluster.torch_threads or max(1, int(cfg.cluster.cpus_per_device))
    return cfg, shard_cfg, threads, corpus


def run_plain(n: int, steps: int, overrides: list[str]) -> dict:
    """The plain job at N devices: rank 0's step end times and the last step's loss."""
    import torch.multiprocessing as mp

    cfg, shard_cfg, threads, corpus = _devices_setup(n, steps, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "plain.json")
        t0 = time.perf_counter()
        mp.spawn(_plain_worker, args=(n, _free_port(), shard_cfg, threads, corpus.train, corpus.val, steps, out),
                 nprocs=n, join=True)
        wall = time.perf_counter() - t0
        got = json.loads(Path(out).read_text())
    ends = {int(k): v for k, v in got["ends"].items()}
    return {"s_per_step": loop_s_per_step(ends), "median_step_s": median_step_s(ends), "final_loss": got["loss"],
            "command_wall_s": wall}


# -------------------------------------------------------------------------------------------- the Ray job
def run_ray(n: int, steps: int, overrides: list[str]) -> dict:
    """The Ray job through the entry point: the loop time per step from its records, its idle share, summary's rates."""
    args = [f"cluster.num_devices={n}", f"train.steps={steps}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        summary, records, wall = run_job(Path(tmp), args)
    ends = {r["step"]: r["time"] for r in records}
    timed = [r for r in records if r["step"] > FROM]
    return {"s_per_step": loop_s_per_step(ends), "median_step_s": median_step_s(ends),
            "final_loss": summary["final_loss"], "command_wall_s": wall,
            "idle_share": statistics.mean(r.get("idle_share", 0.0) for r in timed),
            "idle_ms": 1000 * statistics.mean(r.get("idle_s", 0.0) for r in timed),
            "other_calls_ms": 1000 * statistics.mean(r.get("other_calls_s", 0.0) for r in timed),
            "device_step_ms": 1000 * statistics.mean(r["step_time_s"] for r in timed),
            "steps_per_s": summary["steps_per_s"], "device_steps_per_s": summary.get("device_steps_per_s"),
            "command": "python -m jobs.train " + " ".join(args)}


# --------------------------------------------------------------------- Ray actors without the driver
class _BareDevice:
    """A Ray actor around the plain job's DeviceShard (`_build_shard`): no driver, records, sinks, snapshots or
    healing. What Ray itself costs: its processes beside the devices, the actors' worker processes, the call's
    hand-over."""

    def setup(self, rank: int, world: int, port: int, shard_cfg: dict, threads: int, train, val) -> int:
        self.shard = _build_shard(rank, world, port, shard_cfg, threads, train, val, pick_gpu=False)
        return os.getpid()

    def step(self, step: int) -> float:
        self.loss = self.shard.train_step(step).loss
        return self.loss

    def last_loss(self) -> float:
        return self.loss


def run_ray_bare(n: int, steps: int, overrides: list[str], compiled: bool) -> dict:
    """N `_BareDevice` actors on the Ray the job would use (runtime/cluster.py ray_cluster: a private local instance),
    each step submitted to all of them and waited for before the next: through `.remote()` calls, or through a
    compiled graph (`ray.dag`, `experimental_compile`: the call's hand-over over shared-memory channels). The time
    of a step is the loop's clock when every device's result is in, as the job's records are."""
    import ray

    from orchestrator.runtime.cluster import ray_cluster

    cfg, shard_cfg, threads, corpus = _devices_setup(n, steps, overrides)
    t0 = time.perf_counter()
    with ray_cluster(cfg.cluster):
        Bare = ray.remote(num_cpus=cfg.cluster.cpus_per_device,
                          num_gpus=cfg.cluster.gpus_per_device if cfg.cluster.use_gpu else 0)(_BareDevice)
        actors = [Bare.remote() for _ in range(n)]
        train, val, port = ray.put(corpus.train), ray.put(corpus.val), _free_port()
        ray.get([a.setup.remote(rank, n, port, shard_cfg, threads, train, val) for rank, a in enumerate(actors)])
        ends: dict[int, float] = {}
        if compiled:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as step_in:
                dag = MultiOutputNode([a.step.bind(step_in) for a in actors])
            graph = dag.experimental_compile()
            for step in range(1, steps + 1):
                ray.get(graph.execute(step))
                ends[step] = time.time()
            graph.teardown()
        else:
            for step in range(1, steps + 1):
                ray.get([a.step.remote(step) for a in actors])
                ends[step] = time.time()
        loss = ray.get(actors[0].last_loss.remote())
    return {"s_per_step": loop_s_per_step(ends), "median_step_s": median_step_s(ends), "final_loss": loss,
            "command_wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------- rounds
def peak_of(cfg) -> tuple[float | None, str]:
    """One device's peak FLOP/s as the job's MFU takes it (metrics.py peak_flops), and what it is."""
    from orchestrator.monitoring.metrics import peak_flops

    name = None
    if cfg.cluster.use_gpu:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return peak_flops(cfg, name, settled_precision(cfg)), name or f"CPU, {cfg.cluster.torch_threads or int(cfg.cluster.cpus_per_device)} thread(s)"


def summarize(runs: dict[str, list[dict]], baseline: dict[str, str], positions: int, flops: float, n: int,
              peak: float | None) -> dict:
    """Per arm: the medians over rounds, and the per-round ratios against its plain arm of the same round."""
    out = {}
    for arm, rows in runs.items():
        base = baseline[arm] if baseline[arm] in runs else "plain"
        s = statistics.median(r["s_per_step"] for r in rows)
        tokens = positions / s
        row = {"s_per_step": s, "tokens_per_s": tokens, "mfu": tokens * flops / (n * peak) if peak else None,
               "rounds": rows}
        if base in runs and arm != base:
            ratios = [r["s_per_step"] / b["s_per_step"] for r, b in zip(rows, runs[base])]
            row.update({"vs": base, "ratios": ratios, "ratio": statistics.median(ratios)})
            if all("median_step_s" in r for r in rows + runs[base]):
                medians = [r["median_step_s"] / b["median_step_s"] for r, b in zip(rows, runs[base])]
                row.update({"median_ratios": medians, "median_ratio": statistics.median(medians)})
        for key in ("idle_share", "idle_ms", "other_calls_ms", "device_step_ms"):
            if key in rows[0]:
                row[key] = statistics.median(r[key] for r in rows)
        out[arm] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="2,4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    ap.add_argument("--out", default=None, help="the results file (default: bench/results/overhead-<host>.json)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "plain" not in arms:
        raise SystemExit(f"--arms: {unknown or 'plain missing'}; choose from {', '.join(ARMS)} (plain is the baseline)")
    devices = [int(x) for x in args.devices.split(",")]
    cfg = load_config(devices[0], args.steps, args.overrides)
    from orchestrator.monitoring.metrics import flops_per_token

    flops, (peak, peak_of_what) = flops_per_token(cfg), peak_of(cfg)
    positions = cfg.train.global_batch_size * cfg.data.seq_len
    runs: dict[int, dict[str, list[dict]]] = {n: {a: [] for a in arms} for n in devices}
    for r in range(args.rounds):
        for n in devices:
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                kind, extra, _ = ARMS[arm]
                how = [*args.overrides, *extra]
                run = (run_plain(n, args.steps, how) if kind == "plain" else run_ray(n, args.steps, how)
                       if kind == "ray" else run_ray_bare(n, args.steps, how, compiled=kind == "ray_compiled"))
                runs[n][arm].append(run)
                print(f"round {r + 1} N={n} {arm}: {1000 * run['s_per_step']:.1f} ms/step", flush=True)
    baseline = {a: ARMS[a][2] for a in arms}
    table = {n: summarize(runs[n], baseline, positions, flops, n, peak) for n in devices}
    print(f"\n{'N':>2} {'arm':<23} {'ms/step':>8} {'vs plain':>9} {'median':>7} {'tokens/s':>10} {'MFU':>7} {'idle':>6}")
    for n in devices:
        for arm, row in table[n].items():
            ratio = f"{row['ratio']:.3f}" if "ratio" in row else ""
            median = f"{row['median_ratio']:.3f}" if "median_ratio" in row else ""
            mfu = f"{row['mfu']:.2%}" if row["mfu"] is not None else "n/a"
            idle = f"{row['idle_share']:.1%}" if "idle_share" in row else ""
            print(f"{n:>2} {arm:<23} {1000 * row['s_per_step']:8.1f} {ratio:>9} {median:>7} {row['tokens_per_s']:10,.0f} "
                  f"{mfu:>7} {idle:>6}")
    host = platform.node() or "host"
    result = {"host": host, "cpus": os.cpu_count(), "peak_flops_per_device": peak, "peak_of": peak_of_what,
              "flops_per_token": flops, "positions_per_step": positions, "steps": args.steps, "timed_from_step": FROM,
              "rounds": args.rounds, "overrides": args.overrides, "arms": {a: ARMS[a][1] for a in arms},
              "devices": {str(n): table[n] for n in devices},
              "goal": "default <= 1.05x plain at N = 2 and 4; idle share < 2%",
              "command": "python bench/overhead.py " + " ".join(
                  [f"--devices {args.devices}", f"--steps {args.steps}", f"--rounds {args.rounds}",
                   f"--arms {args.arms}", *([f"--out {args.out}"] if args.out else []), *args.overrides])}
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"overhead-{host}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
