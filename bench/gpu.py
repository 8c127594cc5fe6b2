"""One prepared command for a lent GPU: smoke checks, tokens/s, MFU and peak GPU memory on one GPU, in ~9 minutes.

    python bench/gpu.py [--budget-s 540] [--out DIR] [--only PART,...] [--cpu-dry-run]
    python bench/gpu.py --runner job [--steps 200] [--devices N] [--jobs default,gpu]   # Ray + jobs.train, N GPUs

The default runner trains in this process, without Ray: a `DeviceShard` with world 1 (orchestrator/device/shard.py,
the code a device actor runs around its step), so it needs torch, omegaconf and (for the post-training job)
transformers >= 5.23, not Ray. It runs four parts, each stopped when its share of the budget is spent (time an
earlier part left unspent goes to the next ones), and writes what it has after every run:

    env         the GPU (name, memory, bf16), its dense bf16 peak (monitoring/metrics.py GPU_PEAK_TFLOPS), a
                one-rank nccl process group and one all_reduce on it, the versions of the packages used
    smoke       (a) the default job for 50 steps with bf16 autocast vs float32: each step's loss within
                SMOKE_STEP_RTOL, the mean of the last 10 within SMOKE_TAIL_RTOL; (b) MoE overlap equality, one
                process: float32, parallel.dispatch_chunks=2 + shared_expert_overlap=true vs 1 + false, the
                same losses over OVERLAP_STEPS steps within OVERLAP_RTOL, twice: in this process (world 1, the
                MoE layer's local path), and expert-parallel over EP_WORLD=2 spawned processes sharing the GPU
                over gloo (the all_to_all dispatch; nccl refuses two ranks on one GPU)
    throughput  tokens/s, MFU (bf16 peak), peak allocated GPU memory (torch's peak counter over the last step, from
                its forward to its optimizer step: the device's activation meter resets it every step; the model
                build is not in it) and the collective share of the step
                (collective_s / step time; 0 on one device) for the default job, jobs/configs/gpu.yaml and the
                DeepSeek-V4 SFT post-training job (jobs/configs/sft_tiny.yaml), each on one GPU
    sweep       larger native configs (SWEEP: on jobs/configs/gpu.yaml, and bench/gpu_large.yaml), largest first
                among those whose memory plan (orchestrator/memory/plan.py) fits the GPU: the largest that trains
                without running out of memory, and each one's MFU (goal >= 35%)

MFU = tokens/s x FLOPs per token / peak FLOP/s, the formula and FLOP count of orchestrator/monitoring/metrics.py
(`flops_per_token`, `gpu_peak_flops`); tokens/s counts every position a step computed; step times are the mean
after the first WARMUP_STEPS steps (or 10%). Results: $OUT/gpu-<host>.json (when OUT is set), --out DIR, and
bench/results/gpu-<host>.json, plus a text table at the end (also $OUT/gpu-<host>.txt).

On a session's lent GPU (`run` tool; the machine has torch but not omegaconf nor transformers 5.25, and no
network), once, here, in the repo root: `bash bench/gpu_wheels.sh` (the wheels into .whl/, ~19 MB; or copy a
.whl/ made before), then

    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target
                 /tmp/site .whl/*.whl || exit 3; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; set -o pipefail;
                 python3 bench/gpu.py --budget-s 520 --out $OUT 2>&1 | tee $OUT/gpu-log.txt",
        carry=[".whl"], timeout_s=600)

(one line; the install takes ~6 s, the bench 520 s at most, SIGALRM at 540 s, which leaves the table and the
writes about 45 s of the call's 600; with less device time left than that, `status`'s budget_left_s, lower
--budget-s by the difference; every run's results are written as it ends, so a timeout still brings back what was
measured). Then copy files_at's gpu-<host>.json into
bench/results/. The machine (KINDS.md): one H100 80GB HBM3, 16 cores, Python 3.12 with torch 2.11, no network.
`--cpu-dry-run` runs the whole flow on CPU in about a minute (tiny models, a few steps, cluster.use_gpu=false).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "jobs" / "configs"
GiB = float(2 ** 30)
PARTS: tuple[tuple[str, float], ...] = (("env", 0.03), ("smoke", 0.14), ("throughput", 0.40), ("sweep", 0.43))
SMOKE_STEPS = 50
SMOKE_STEP_RTOL = 0.05   # bf16 vs float32, each step's loss (bf16 rounding of a 50-step curve from one seed)
SMOKE_TAIL_RTOL = 0.02   # the mean loss of the last 10 steps
OVERLAP_STEPS = 4
OVERLAP_RTOL = 1e-5      # float32: chunked matmuls may pick other kernels, so bit-equality is not promised
EP_WORLD = 2             # the expert-parallel overlap check: 2 processes on the one GPU over gloo
EP_TIMEOUT_S = 120.0     # at most this long (spawn, imports, the rendezvous, 2 x OVERLAP_STEPS steps)
MIN_RUN_S = 5.0          # a run is not begun (nor its model built) with less time than this left
WARMUP_STEPS = 3         # step times after these (first-step allocation, kernel selection) or 10%, whichever is more
PLAN_FRACTION = 0.92     # a sweep config is tried when its memory plan is under this share of the GPU's memory

# The jobs the throughput part measures: (name, config file, overrides for one GPU, steps at most)
JOBS: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("default", "jobs/configs/default.yaml", (), 200),
    ("gpu", "jobs/configs/gpu.yaml", (), 60),
    ("sft_dsv4", "jobs/configs/sft_tiny.yaml", (), 60),
)
# The sweep's native configs for one 80 GB GPU: (name, config file, overrides). Each is sized by the memory plan
# (`python -m orchestrator plan`, 16 bytes of float32 state + AdamW per parameter, activations by micro-batch) to
# 41-66 GiB, under PLAN_FRACTION of an H100's 79 GiB; 16 sequences of 2048 tokens a step, bf16 autocast. The sweep
# tries them by total parameters, largest first. gpu_large is bench/gpu_large.yaml (2.6B, 0.94B activated; a
# one-device job, so not among jobs/configs/, whose configs the tests load with multi-device options).
GPU_YAML, LARGE_YAML = "jobs/configs/gpu.yaml", "bench/gpu_large.yaml"


def _native(dim: int, layers: int, experts: int, micro_batches: int) -> tuple[str, ...]:
    """Overrides of jobs/configs/gpu.yaml for a sweep config: heads of 128, expert_dim = dim, dense_dim = 4 dim."""
    return (f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={dim // 128}",
            f"model.num_experts={experts}", f"model.expert_dim={dim}", f"model.dense_dim={4 * dim}",
            f"train.micro_batches={micro_batches}", "data.seq_len=2048", "model.max_seq_len=2048",
            "train.global_batch_size=16")


SWEEP: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("d1536-l12-e16", GPU_YAML, _native(1536, 12, 16, 4)),                      # 1.47B, 0.53B activated, 40.7 GiB
    ("d2048-l16-e8", GPU_YAML, _native(2048, 16, 8, 4)),                        # 2.02B, 1.26B activated, 62.7 GiB
    ("gpu_large", LARGE_YAML, ("train.global_batch_size=16", "train.micro_batches=4")),   # 2.61B, 0.94B, 65.2 GiB
    ("d2048-l8-e32", GPU_YAML, _native(2048, 8, 32, 4)),                        # 3.09B, 0.63B activated, 66.0 GiB
)
SWEEP_STEPS = 10
# --cpu-dry-run: every model tiny, every run a few steps (the flow, not the numbers)
DRY_MODEL = ("model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4", "model.top_k=2",
             "model.expert_dim=32", "model.dense_dim=64", "data.seq_len=32", "model.max_seq_len=64",
             "train.global_batch_size=4")
DRY_JOB = {"default": DRY_MODEL, "gpu": DRY_MODEL, "sft_dsv4": ("data.seq_len=64", "train.global_batch_size=2",
                                                                "data.max_samples=300")}


# ---------------------------------------------------------------------------------------------------- time budget
@dataclass
class Deadline:
    """A point on `clock` (seconds) that a piece of work must stop by."""
    end: float
    clock: Callable[[], float] = time.monotonic

    def left(self) -> float:
        return max(0.0, self.end - self.clock())

    def expired(self) -> bool:
        return self.left() <= 0.0

    def share(self, n: int) -> "Deadline":
        """The deadline of the next of `n` equal pieces of what is left (n >= 1)."""
        return Deadline(self.clock() + self.left() / max(1, n), self.clock)


class Budget:
    """The whole run's time, split into parts by share: part i ends at t0 + (its shares and all before it) x total,
    or its own share from now when earlier parts overran, and never after t0 + total. So time a part leaves unspent
    goes to the parts after it."""

    def __init__(self, total_s: float, parts: tuple[tuple[str, float], ...] = PARTS,
                 clock: Callable[[], float] = time.monotonic):
        if total_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {total_s}")
        shares = [s for _, s in parts]
        if any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"part shares must be > 0 and add up to 1, got {shares}")
        self.total, self.parts, self.clock, self.t0 = total_s, parts, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def part(self, name: str) -> Deadline:
        names = [n for n, _ in self.parts]
        i = names.index(name)
        through = sum(s for _, s in self.parts[: i + 1]) * self.total
        own = self.parts[i][1] * self.total
        now = self.clock()
        return Deadline(min(self.t0 + self.total, max(self.t0 + through, now + own)), self.clock)


GRACE_S = 20   # past the budget, SIGALRM stops the part in progress (a step's or a model build's overrun)


class Watchdog(BaseException):
    """Raised by SIGALRM when the whole budget (plus a grace) is spent: the part in progress stops. A BaseException,
    so that no run's or part's `except Exception` takes it for that run's error and goes on."""
    partial: dict | None = None   # the interrupted run's results so far (train_run)


# ------------------------------------------------------------------------------------------------------- one run
def steps_stats(losses: list[float], walls: list[float], colls: list[float], positions: int,
                flops_per_token: float, peak_flops: float | None) -> dict[str, Any]:
    """Throughput of a run's steps: mean step time after the warm-up (WARMUP_STEPS or 10% of the steps, whichever is
    more, while any step is left), tokens/s = positions per step / that, MFU = tokens/s x FLOPs per token / peak
    (orchestrator/monitoring/metrics.py), the collective share of the step time."""
    if not walls:
        return {"steps_done": 0, "step_time_s": None, "tokens_per_s": None, "mfu": None, "collective_share": None}
    skip = max(WARMUP_STEPS, len(walls) // 10)
    timed = walls[skip:] or walls[-1:]
    timed_coll = colls[skip:] or colls[-1:]
    step_s = sum(timed) / len(timed)
    tps = positions / step_s
    return {"steps_done": len(walls), "timed_steps": len(timed), "step_time_s": round(step_s, 5),
            "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / peak_flops, 4) if peak_flops else None,
            "collective_share": round(sum(timed_coll) / len(timed_coll) / step_s, 4),
            "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5)}


def _device_reset() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def no_host_init():
    """Within: the native model's deterministic init (orchestrator/model/transformer.py `init_weights`, drawn by a
    CPU generator per parameter, ~50M parameters/s: a minute for the sweep's 3B) is skipped; `device_init` then
    draws the same distributions on the device. For throughput runs only: other numbers than the seed's."""
    from orchestrator.model import transformer

    original = transformer.init_weights
    transformer.init_weights = lambda model, seed: None
    try:
        yield
    finally:
        transformer.init_weights = original


def device_init(model: Any) -> None:
    """`init_weights`'s distributions drawn where the parameters are (the GPU): norms their constants, each matrix
    Normal(0, std) with `init_stds`' std for its kind (embedding, output projections, the rest)."""
    import torch

    from orchestrator.model.transformer import init_stds

    cfg = model.cfg
    stds = init_stds(cfg)
    out_scale = {"attn_out_norm.weight": cfg.sandwich_attn_scale / math.sqrt(cfg.n_layers),
                 "ffn_out_norm.weight": cfg.sandwich_ffn_scale / math.sqrt(cfg.n_layers)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(next((v for k, v in out_scale.items() if name.endswith(k)), 1.0))
            elif name == "tok_emb.weight":
                p.normal_(0.0, stds["embedding"])
            else:
                output = name.endswith(("wo.weight", "w2.weight", "w2_EDF"))
                p.normal_(0.0, stds["output"] if output else stds["matrix"])


def train_run(cfg: Any, steps: int, deadline: Deadline, data_cache: dict | None = None,
              fast_init: bool = False, min_run_s: float = MIN_RUN_S) -> dict[str, Any]:
    """Train `cfg` for up to `steps` steps on one device in this process (a DeviceShard with world 1) and stop early
    before a step that would end past `deadline`. Its losses, throughput (steps_stats), peak allocated GPU memory;
    `stopped`: steps | time | oom | error (with the error's last line); not begun with under `min_run_s` left
    (0: begun, and its first step taken, whatever the time).
    `fast_init` (a native model): its weights
    drawn on the device (no_host_init, device_init) instead of by the seed's CPU generators."""
    import torch

    from orchestrator.data.source import load_data
    from orchestrator.device.shard import DeviceShard
    from orchestrator.monitoring.metrics import flops_per_token, peak_flops

    t0 = time.perf_counter()
    out: dict[str, Any] = {"stopped": "steps"}
    losses: list[float] = []
    walls: list[float] = []
    colls: list[float] = []
    positions, shard, watchdog = 0, None, None
    if deadline.left() < min_run_s:
        return {"stopped": "time", "steps_done": 0, "losses": [], "note": f"under {min_run_s:g} s left: not begun"}
    try:
        key = repr((cfg.data, cfg.model.vocab_size, cfg.seed))
        if data_cache is not None and key in data_cache:
            data = data_cache[key]
        else:
            data = load_data(cfg)
            if data_cache is not None:
                data_cache[key] = data
        _device_reset()
        with no_host_init() if fast_init else contextlib.nullcontext():
            shard = DeviceShard(cfg, rank=0, world=1, train_tokens=data.train, val_tokens=data.val)
        if fast_init:
            device_init(shard.model)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        for step in range(1, steps + 1):
            if (walls or min_run_s > 0) and (deadline.left() < (walls[-1] if walls else 0.0) or deadline.expired()):
                out["stopped"] = "time"
                break
            ts = time.perf_counter()
            report = shard.train_step(step)
            if shard.device.type == "cuda":   # the optimizer's kernels are queued after the step's last .item()
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - ts)
            losses.append(report.loss)
            colls.append(report.collective_s)
            positions = report.positions or report.tokens
    except Watchdog as w:   # the whole budget is spent: this run's steps so far go with the exception
        out["stopped"], watchdog = "watchdog", w
    except torch.cuda.OutOfMemoryError as e:
        out["stopped"], out["error"] = "oom", str(e).splitlines()[0][:300]
    except Exception as e:   # noqa: BLE001 - a part records what broke and the bench goes on
        first = str(e).splitlines()[0][:300] if str(e) else ""
        # cuBLAS and other CUDA libraries report running out of memory as a plain RuntimeError
        oom = any(m in str(e) for m in ("out of memory", "ALLOC_FAILED"))
        out["stopped"], out["error"] = ("oom" if oom else "error"), f"{type(e).__name__}: {first}"
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if torch.cuda.is_available():
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        del shard
        _device_reset()
    gpu = torch.cuda.get_device_name(0) if cfg.cluster.use_gpu and torch.cuda.is_available() else None
    fpt = flops_per_token(cfg)
    peak = peak_flops(cfg, gpu, cfg.train.mixed_precision if cfg.train.mixed_precision != "auto" else
                      ("bf16" if gpu else "none"))
    out.update(steps_stats(losses, walls, colls, positions, fpt, peak))
    out.update({"losses": [round(x, 6) for x in losses], "positions_per_step": positions,
                "flops_per_token": fpt, "peak_tflops": round(peak / 1e12, 1) if peak else None,
                "wall_s": round(time.perf_counter() - t0, 2)})
    if watchdog is not None:
        watchdog.partial = out
        raise watchdog
    return out


def _ep_worker(rank: int, world: int, port: int, runs: dict, steps: int, out: str) -> None:
    """One rank of ep_run: joins a gloo group on loopback, trains each of `runs` (name -> load()'s arguments) for
    `steps` steps as DeviceShard(rank, world); rank 0 writes {"losses": {name: [...]}} or {"error": ...} to `out`."""
    import torch

    from orchestrator.data.source import load_data
    from orchestrator.device.shard import DeviceShard
    from orchestrator.parallel import groups

    torch.set_num_threads(2)
    result: dict[str, Any] = {"losses": {}}
    try:
        groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=60)
        data = None
        for name, (path, overrides, setting) in runs.items():
            cfg = load(path, overrides, setting)
            data = data or load_data(cfg)
            shard = DeviceShard(cfg, rank, world, data.train, data.val)
            result["losses"][name] = [shard.train_step(step).loss for step in range(1, steps + 1)]
            del shard
    except Exception as e:   # noqa: BLE001 - the parent reports it
        result["error"] = f"rank {rank}: {type(e).__name__}: {e}"[:500]
        result["traceback"] = traceback.format_exc()[-1500:]
    finally:
        if rank == 0 or "error" in result:
            Path(f"{out}.{rank}").write_text(json.dumps(result))
        with contextlib.suppress(Exception):
            groups.leave()


def ep_run(runs: dict, steps: int, timeout_s: float) -> dict[str, Any]:
    """`runs` on EP_WORLD spawned processes (torch.multiprocessing, gloo on loopback; on the GPU, all of them on
    cuda:0), killed after `timeout_s`: rank 0's losses per run, or the first error, and the seconds it took."""
    import torch.multiprocessing as mp

    from orchestrator.parallel import groups

    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ep")
        port = groups.free_port("127.0.0.1")
        procs = [ctx.Process(target=_ep_worker, args=(r, EP_WORLD, port, runs, steps, out), daemon=True)
                 for r in range(EP_WORLD)]
        try:
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs) and time.perf_counter() - t0 < timeout_s:
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        result: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
        if time.perf_counter() - t0 >= timeout_s:
            result["error"] = f"timeout after {timeout_s:.0f} s"
        for r in range(EP_WORLD):
            f = Path(f"{out}.{r}")
            if f.exists():
                got = json.loads(f.read_text())
                if "error" in got:
                    result.setdefault("error", got["error"])
                    result.setdefault("traceback", got.get("traceback"))
                elif r == 0:
                    result["losses"] = got["losses"]
        if "losses" not in result and "error" not in result:
            result["error"] = f"no result (exit codes {[p.exitcode for p in procs]})"
    return result


def load(path: str, overrides: tuple[str, ...] | list[str], setting: dict[str, Any] | None = None) -> Any:
    """A job's config (`path` from the repo root) with `overrides`, then `setting` set on the dataclasses directly
    ({"parallel.dispatch_chunks": 2}): not user keys, so no idle-key rule refuses them on one device."""
    from orchestrator.config.load import load_config

    cfg = load_config(REPO / path, list(overrides))
    for key, value in (setting or {}).items():
        section, attr = key.split(".")
        if not hasattr(getattr(cfg, section), attr):
            raise KeyError(f"no config key {key}")
        setattr(getattr(cfg, section), attr, value)
    return cfg


# -------------------------------------------------------------------------------------------------------- parts
@dataclass
class Bench:
    budget: Budget
    gpu: bool                                   # cluster.use_gpu for every run (false: --cpu-dry-run)
    dry: bool
    write: Callable[[dict], None]
    jobs: tuple[str, ...] = tuple(j[0] for j in JOBS)   # which of JOBS the throughput part runs
    results: dict[str, Any] = field(default_factory=dict)
    data_cache: dict = field(default_factory=dict)

    def base(self, job: str) -> tuple[str, ...]:
        """Overrides every run of `job` gets: one device, on the GPU or not; a tiny model under a dry run."""
        common = (f"cluster.use_gpu={str(self.gpu).lower()}", "cluster.num_devices=1")
        return common + (DRY_JOB.get(job, DRY_MODEL) if self.dry else ())

    def steps(self, n: int) -> int:
        return min(n, 5) if self.dry else n

    def run(self, cfg: Any, steps: int, deadline: Deadline, fast_init: bool = False) -> dict[str, Any]:
        """train_run with this bench's data cache; under a dry run every run begins (the flow, not the numbers)."""
        return train_run(cfg, steps, deadline, self.data_cache, fast_init, 0.0 if self.dry else MIN_RUN_S)

    def record(self, part: str, key: str, value: Any) -> None:
        self.results.setdefault(part, {})[key] = value
        self.results["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.write(self.results)

    def env(self, deadline: Deadline) -> None:
        import torch

        from orchestrator.monitoring.metrics import gpu_peak_flops

        info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                                "cuda_available": torch.cuda.is_available(), "host": socket.gethostname()}
        for pkg in ("omegaconf", "transformers", "tokenizers", "huggingface_hub", "safetensors", "ray"):
            with contextlib.suppress(Exception):
                from importlib.metadata import version
                info[pkg] = version(pkg)
            info.setdefault(pkg, None)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update({"gpu": p.name, "gpu_mem_gib": round(p.total_memory / GiB, 1), "sms": p.multi_processor_count,
                         "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported(False),
                         "cuda": torch.version.cuda, "nccl": str(torch.cuda.nccl.version())})
            peak = gpu_peak_flops(p.name, "bfloat16")
            info["bf16_peak_tflops"] = peak / 1e12 if peak else None
        info["process_group"] = one_rank_all_reduce("nccl" if self.gpu and torch.cuda.is_available() else "gloo")
        self.record("env", "info", info)

    def smoke(self, deadline: Deadline) -> None:
        steps = self.steps(SMOKE_STEPS)
        runs: dict[str, dict] = {}
        for name, precision in (("bf16", "bf16"), ("float32", "none")):
            cfg = load("jobs/configs/default.yaml", self.base("default"), {"train.mixed_precision": precision,
                                                               "train.steps": steps})
            # float32 runs the steps bf16 got done in its time, so the two curves cover the same steps
            n = runs["bf16"]["steps_done"] if runs else steps
            runs[name] = self.run(cfg, n, Deadline(deadline.end + 30, deadline.clock) if runs else deadline.share(3))
            self.record("smoke", f"default_{name}", runs[name])
        self.record("smoke", "bf16_vs_float32", compare_curves(runs["bf16"]["losses"], runs["float32"]["losses"],
                                                               SMOKE_STEP_RTOL, SMOKE_TAIL_RTOL))
        ov = {}
        for name, chunks, overlap in (("chunks2_overlap", 2, True), ("chunks1_plain", 1, False)):
            cfg = load("jobs/configs/default.yaml", self.base("default"), {
                "train.mixed_precision": "none", "train.steps": OVERLAP_STEPS,
                "parallel.dispatch_chunks": chunks, "parallel.shared_expert_overlap": overlap})
            ov[name] = self.run(cfg, OVERLAP_STEPS, Deadline(deadline.end + 30, deadline.clock))
        self.record("smoke", "overlap_equality", {
            **compare_curves(ov["chunks2_overlap"]["losses"], ov["chunks1_plain"]["losses"], OVERLAP_RTOL,
                             OVERLAP_RTOL),
            "where": "one process, world 1: the MoE layer's local path (no all_to_all; nccl refuses 2 ranks on 1 GPU)",
            "bit_equal": ov["chunks2_overlap"]["losses"] == ov["chunks1_plain"]["losses"],
            "losses": {k: v["losses"] for k, v in ov.items()},
            "errors": {k: v["error"] for k, v in ov.items() if "error" in v}})
        runs_ep = {name: ("jobs/configs/default.yaml", self.base("default") + (f"cluster.num_devices={EP_WORLD}",),
                          {"train.mixed_precision": "none", "train.steps": OVERLAP_STEPS,
                           "parallel.dispatch_chunks": chunks, "parallel.shared_expert_overlap": overlap})
                   for name, chunks, overlap in (("chunks2_overlap", 2, True), ("chunks1_plain", 1, False))}
        ep = ep_run(runs_ep, OVERLAP_STEPS, min(EP_TIMEOUT_S, deadline.left() + 30))
        losses = ep.get("losses", {})
        self.record("smoke", "overlap_equality_ep", {
            **compare_curves(losses.get("chunks2_overlap", []), losses.get("chunks1_plain", []), OVERLAP_RTOL,
                             OVERLAP_RTOL),
            "where": f"{EP_WORLD} processes on {'one GPU' if self.gpu else 'CPU'} over gloo, expert-parallel "
                     f"{EP_WORLD}: the all_to_all dispatch (nccl refuses 2 ranks on 1 GPU)",
            "bit_equal": bool(losses) and losses.get("chunks2_overlap") == losses.get("chunks1_plain"), **ep})

    def throughput(self, deadline: Deadline) -> None:
        jobs = [j for j in JOBS if j[0] in self.jobs]
        for i, (name, config, extra, steps) in enumerate(jobs):
            try:
                cfg = load(config, self.base(name) + extra, {"train.steps": self.steps(steps)})
            except Exception as e:   # noqa: BLE001 - (transformers too old for DeepSeek-V4, say): the next job runs
                self.record("throughput", name, {"config": config, "steps_done": 0,
                                                 "stopped": "error", "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            self.record("throughput", name, {"config": config, **summary_of(cfg),
                                             **self.run(cfg, self.steps(steps), deadline.share(len(jobs) - i))})

    def sweep(self, deadline: Deadline) -> None:
        import torch

        from orchestrator.memory.plan import plan_memory

        total = torch.cuda.get_device_properties(0).total_memory if self.gpu and torch.cuda.is_available() else None
        candidates = []
        for name, config, overrides in SWEEP:
            try:
                cfg = load(config, self.base("gpu") + (() if self.dry else overrides),
                           {"train.steps": SWEEP_STEPS, "cluster.device_memory_gb": 0.0})
                planned = plan_memory(cfg).peak().total
            except Exception as e:   # noqa: BLE001
                self.record("sweep", name, {"skipped": f"{type(e).__name__}: {e}"})
                continue
            fits = total is None or planned <= PLAN_FRACTION * total
            row = {"config": config, "overrides": list(overrides), **summary_of(cfg),
                   "plan_gib": round(planned / GiB, 2), "plan_fits": fits}
            if fits:
                candidates.append((name, cfg, row))
            else:
                self.record("sweep", name, {**row, "skipped": "memory plan over the GPU's memory"})
        largest = None
        candidates.sort(key=lambda c: -c[2].get("params_m", 0))
        for i, (name, cfg, row) in enumerate(candidates):   # largest first
            if deadline.expired() and not self.dry:
                self.record("sweep", name, {**row, "skipped": "time"})
                continue
            result = self.run(cfg, self.steps(SWEEP_STEPS), deadline.share(len(candidates) - i), fast_init=True)
            if result["stopped"] == "error" and "build_s" not in result:   # the fast init's fault? the seed's own then
                row["fast_init_error"] = result.get("error")
                result = self.run(cfg, self.steps(SWEEP_STEPS), deadline.share(len(candidates) - i))
            self.record("sweep", name, {**row, "fast_init": "fast_init_error" not in row, **result})
            if largest is None and result["steps_done"] > WARMUP_STEPS and result["stopped"] != "oom":
                largest = name
                self.record("sweep", "largest_fitting", name)


def summary_of(cfg: Any) -> dict[str, Any]:
    """The shape of a run, for the table: parameters (total, activated per token), tokens per step."""
    from orchestrator.model.transformer import count_parameters

    m = cfg.model
    out = {"dim": m.dim, "n_layers": m.n_layers, "num_experts": m.num_experts, "seq_len": cfg.data.seq_len,
           "global_batch_size": cfg.train.global_batch_size, "mixed_precision": cfg.train.mixed_precision}
    if not (m.hf_path or m.hf_config):
        counts = count_parameters(m)
        out.update({"params_m": round(counts["total"] / 1e6, 1),
                    "active_params_m": round(counts["activated"] / 1e6, 1)})
    else:
        out["hf_config"] = m.hf_config or m.hf_path
    return out


def compare_curves(a: list[float], b: list[float], step_rtol: float, tail_rtol: float, tail: int = 10) -> dict:
    """Two loss curves of the same steps: the largest relative difference of one step, that of the last `tail`
    steps' means; `ok` when both are within tolerance and the curves have the same (non-zero) length."""
    n = min(len(a), len(b))
    if n == 0:
        return {"ok": False, "steps": 0, "reason": "no steps to compare"}
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))
    k = min(tail, n)
    ta, tb = sum(a[n - k:n]) / k, sum(b[n - k:n]) / k
    tail_rel = abs(ta - tb) / max(abs(tb), 1e-12)
    ok = len(a) == len(b) and rel <= step_rtol and tail_rel <= tail_rtol and all(map(math.isfinite, a[:n] + b[:n]))
    return {"ok": ok, "steps": n, "max_step_rel": float(f"{rel:.3g}"), "tail_rel": float(f"{tail_rel:.3g}"),
            "step_rtol": step_rtol, "tail_rtol": tail_rtol}


def one_rank_all_reduce(backend: str) -> dict[str, Any]:
    """A one-rank process group of `backend` and an all_reduce on it (the init path the device actors take); torn
    down after, so the runs here see no process group."""
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        t0 = time.perf_counter()
        from datetime import timedelta

        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")   # as orchestrator/parallel/groups.py: loopback only
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        t = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t)
        ok = t.sum().item() == 4.0
        return {"backend": backend, "ok": ok, "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:   # noqa: BLE001
        return {"backend": backend, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------- output
def table(results: dict[str, Any]) -> str:
    """The short text table printed at the end: one line per run."""
    head = f"{'part':<11}{'run':<22}{'steps':>6}{'step_s':>9}{'tok/s':>11}{'MFU':>7}{'peakGiB':>9}{'coll':>6}  note"
    lines = [head, "-" * len(head)]
    env = results.get("env", {}).get("info", {})
    for part in ("smoke", "throughput", "sweep"):
        for name, r in results.get(part, {}).items():
            if not isinstance(r, dict) or ("steps_done" not in r and "skipped" not in r):
                continue

            def f(key: str, fmt: str) -> str:
                return format(r[key], fmt) if r.get(key) is not None else "-"
            note = r.get("skipped") or (r["stopped"] if r.get("stopped") != "steps" else "") + (
                f" {r['error'][:40]}" if r.get("error") else "")
            lines.append(f"{part:<11}{name:<22}{r.get('steps_done', 0):>6}{f('step_time_s', '.4f'):>9}"
                         f"{f('tokens_per_s', ',.0f'):>11}{f('mfu', '.1%'):>7}"
                         f"{f('peak_mem_gib', '.2f'):>9}{f('collective_share', '.2f'):>6}  {note.strip()}")
    smoke = results.get("smoke", {})
    for key in ("bf16_vs_float32", "overlap_equality", "overlap_equality_ep"):
        if key in smoke:
            c = smoke[key]
            lines.append(f"{key}: {'PASS' if c.get('ok') else 'FAIL'} (max step rel {c.get('max_step_rel')}, "
                         f"tail rel {c.get('tail_rel')}, tolerances {c.get('step_rtol')}/{c.get('tail_rtol')})")
    if "largest_fitting" in results.get("sweep", {}):
        lines.append(f"largest sweep config that trains on one GPU: {results['sweep']['largest_fitting']}")
    lines.append(f"device: {env.get('gpu') or 'cpu'}  bf16 peak {env.get('bf16_peak_tflops')} TFLOP/s  "
                 f"torch {env.get('torch')}  elapsed {results.get('elapsed_s')} s")
    return "\n".join(lines)


def writer(paths: list[Path]) -> Callable[[dict], None]:
    def write(results: dict) -> None:
        text = json.dumps(results, indent=1, default=str) + "\n"
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(p)
    return write


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all parts (default 540; 150 with --cpu-dry-run)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results here (default: $OUT when set)")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {[p for p, _ in PARTS]} (env always runs)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the whole flow on CPU: tiny models, a few steps")
    ap.add_argument("--no-repo-result", action="store_true", help="do not write bench/results/gpu-<host>.json")
    ap.add_argument("--runner", choices=["shard", "job"], default="shard",
                    help="shard: in this process, one GPU (default); job: jobs.train through Ray on --devices GPUs")
    ap.add_argument("--steps", type=int, default=200, help="--runner job: steps per job")
    ap.add_argument("--devices", type=int, default=0, help="--runner job: devices per job (default: every GPU)")
    ap.add_argument("--jobs", default=None, help=f"which jobs: of {[j[0] for j in JOBS]} (throughput part; default "
                                                 f"all), --runner job: of default,gpu (default both)")
    ap.add_argument("extra", nargs="*", help="--runner job: key=value overrides for every job")
    args = ap.parse_args(argv)
    names = [p for p, _ in PARTS]
    wanted = names if args.only is None else ["env", *[p for p in args.only.split(",") if p]]
    bad = [p for p in wanted if p not in names]
    if bad:
        ap.error(f"--only: unknown part(s) {bad}; known: {names}")
    args.parts = [p for p in names if p in wanted]   # in the order of PARTS
    if args.budget_s is None:
        args.budget_s = 150.0 if args.cpu_dry_run else 540.0
    if args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    if args.extra and args.runner != "job":
        ap.error("key=value overrides are for --runner job")
    known = ["default", "gpu"] if args.runner == "job" else [j[0] for j in JOBS]
    args.jobs = known if args.jobs is None else [j for j in args.jobs.split(",") if j]
    if not args.jobs or any(j not in known for j in args.jobs):
        ap.error(f"--jobs: {args.jobs} not among {known}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner == "job":
        return run_jobs(args)
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())   # names the run tool brings back from $OUT
    name = f"gpu-{host}" + ("-cpu-dry-run" if args.cpu_dry_run else "")
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    paths = [out_dir / f"{name}.json"] if out_dir else []
    if not args.no_repo_result and not args.cpu_dry_run:
        paths.append(REPO / "bench" / "results" / f"{name}.json")
    chosen = [(p, s) for p, s in PARTS if p in args.parts]   # the parts run share the whole budget
    budget = Budget(args.budget_s, tuple((p, s / sum(x for _, x in chosen)) for p, s in chosen))
    import torch

    gpu = not args.cpu_dry_run
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: torch.cuda.is_available() is False (use --cpu-dry-run to try the flow)")
    bench = Bench(budget, gpu=gpu, dry=args.cpu_dry_run, write=writer(paths), jobs=tuple(args.jobs))
    bench.results.update({"budget_s": args.budget_s, "parts": args.parts, "dry_run": args.cpu_dry_run,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def alarm(signum: int, frame: Any) -> None:
        raise Watchdog(f"the budget of {args.budget_s:.0f} s (+{GRACE_S} s grace) is spent")
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(args.budget_s) + GRACE_S)
    try:
        for part in args.parts:
            deadline = budget.part(part)
            t0 = time.perf_counter()
            try:
                getattr(bench, part)(deadline)
            except Watchdog as e:
                bench.record(part, "stopped", str(e))
                if getattr(e, "partial", None):
                    bench.record(part, "interrupted_run", e.partial)
                break
            except Exception as e:   # noqa: BLE001 - the next part still runs
                bench.record(part, "failed", f"{type(e).__name__}: {e}"[:500] + "\n" + traceback.format_exc()[-1500:])
            bench.record(part, "part_s", round(time.perf_counter() - t0, 1))
    finally:
        signal.alarm(0)
    text = table(bench.results)
    print(text)
    for p in paths:
        p.with_suffix(".txt").write_text(text + "\n")
    print("wrote " + ", ".join(map(str, paths)) if paths else "(no results file: --no-repo-result and no --out/$OUT)")
    return 0


# ------------------------------------------------------------------------ the Ray path (several GPUs, jobs.train)
def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


def measure(name: str, config: list[str], steps: int, devices: int, extra: list[str], tmp: Path) -> dict:
    """One job through `python -m jobs.train` (Ray, one actor per GPU, nccl): tokens/s and MFU of its records."""
    from bench.jobrun import run_job

    run_dir = tmp / name
    summary, records, wall = run_job(run_dir, [*config, f"train.steps={steps}", f"cluster.num_devices={devices}",
                                               "cluster.use_gpu=true", "monitor.report=false", *extra])
    after = records[max(1, len(records) // 10):]
    status = json.loads((run_dir / "status.json").read_text())
    mfu = [r["mfu"] for r in after if r.get("mfu") is not None]
    return {"config": name, "devices": devices, "steps": summary["steps_done"], "wall_s": round(wall, 1),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in after) / len(after), 1),
            "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
            "final_loss": summary["final_loss"], "val_loss": summary["val_loss"],
            "gpu": status["devices"][0].get("gpu"),
            "device_mem_mb": max(d.get("device_mem_mb") or 0 for d in status["devices"]),
            "step_time_s": round(sum(r["step_time_s"] for r in after) / len(after), 4)}


def run_jobs(args: argparse.Namespace) -> int:
    devices = args.devices or gpu_count()
    if devices < 1:
        raise SystemExit("no GPU found (nvidia-smi -L lists none); pass --devices N to run anyway")
    runs = {"default": ["--config", str(CONFIGS / "default.yaml")], "gpu": ["--config", str(CONFIGS / "gpu.yaml")]}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs:
            results.append(measure(name, runs[name], args.steps, devices, args.extra, Path(tmp)))
            print(json.dumps(results[-1]))
    out = REPO / "bench" / "results" / f"gpu-jobs-{socket.gethostname()}.json"
    out.write_text(json.dumps({"steps": args.steps, "extra": args.extra, "runs": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
