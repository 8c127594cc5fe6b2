"""Hugging Face MoE checkpoints (issue 15): training throughput of the DeepSeek-V4 tiny SFT job at N devices against
transformers in one process, and the memory a sharded checkpoint read saves each device.

    python bench/hf.py [--devices 1,2,4] [--steps 10] [--warmup 3] [--rounds 2] [--all-cores-baseline]
                       [--experts 256] [--expert-dim 128] [--load-rounds 3] [--only throughput|load]

1. Throughput. The job of jobs/configs/sft_tiny.yaml (transformers' DeepseekV4ForCausalLM from
   jobs/configs/hf/deepseek_v4_tiny, fresh weights from the seed, SFT on the standard-library instructions with
   the run's trained BPE, one sample per row as the job runs it, global batch 8 x 256). N = 1, 2, 4: N
   DeviceShards in spawned processes over gloo on loopback (torch.multiprocessing + parallel.groups.join, as
   tests/test_hf_models.py runs them; no Ray, which adds nothing to a step), each with the job's torch threads
   (cluster.torch_threads or floor(cpus_per_device) = 1). The baseline: transformers' model alone in one spawned
   process, the same initial weights (fresh_hf_state, the seed), the same global batch of the same rows each
   step (orchestrator.data.source.load_data / make_stream with world=1), a plain loop: forward with position_ids and
   use_cache=False, cross-entropy with ignore_index=-100 summed / the step's trained tokens, backward, gradient
   clipping, AdamW with the run's learning-rate schedule, at the threads one device gets (and, with
   --all-cores-baseline, at every core).
   Each configuration runs `--warmup` steps, then `--steps` timed steps (barrier before and after); tokens are the
   step's trained (assistant) tokens, StepReport.tokens. `--rounds` rounds, configurations alternating within each;
   the figure is the median over rounds.
2. Sharded load. A DeepSeek-V4 checkpoint with `--experts` routed experts per layer (the tiny config otherwise,
   `--expert-dim` = moe_intermediate_size), written by save_pretrained (one tensor per expert on disk). Each load
   runs in a fresh subprocess: after the imports, it builds the model and reports the wall time and the peak RSS
   above the RSS after the imports (VmHWM; file pages mmap'd by safetensors count while mapped; a sampler thread
   splits the peak into anonymous memory and mapped file pages). A device holding 1/4 and 1/2 of the experts
   (orchestrator.model.hf.build_hf_model: dense tensors + own experts, with its ReadStats), the project's reader
   holding all experts, and transformers' AutoModelForCausalLM.from_pretrained (what loading the whole checkpoint
   on every device costs). `--load-rounds` rounds, alternating; medians.
   One more subprocess checks that the sharded read gives from_pretrained's tensors (experts E/4..E/2 and every
   dense tensor, exactly).

Results: bench/results/hf-throughput.json and bench/results/hf-load.json and a table on stdout. The machine's
core count is recorded: N devices on fewer cores than N oversubscribe (on 2 cores, N=4 runs 4 processes on 2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

JOB = REPO / "jobs/configs/sft_tiny.yaml"
HF_CONFIG = REPO / "jobs/configs/hf/deepseek_v4_tiny/config.json"


def machine() -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit, "loadavg_at_start": os.getloadavg()}


def header(argv: list[str]) -> dict:
    return {"command": " ".join([".venv/bin/python", "bench/hf.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine()}


# ---------------------------------------------------------------- 1. throughput

def job_config(world: int):
    from orchestrator.config import load_config

    return load_config(JOB, [f"cluster.num_devices={world}", "run.progress=quiet"])


def _project_worker(rank: int, world: int, port: int, threads: int, warmup: int, steps: int, out: str) -> None:
    """N DeviceShards of the job over gloo: rank 0 times each step (the steps synchronise through collectives)."""
    import torch
    import torch.distributed as dist

    from orchestrator.data.source import load_data
    from orchestrator.device.shard import DeviceShard
    from orchestrator.parallel import groups

    torch.set_num_threads(threads)
    if world > 1:
        groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=300)
    cfg = job_config(world)
    data = load_data(cfg)
    shard = DeviceShard(cfg, rank, world, data.train, data.val)
    barrier = dist.barrier if world > 1 else (lambda: None)
    reports, times = [], []
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            barrier()
        t0 = time.perf_counter()
        reports.append(shard.train_step(step))
        times.append(time.perf_counter() - t0)
    barrier()
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({"times": times[warmup:], "tokens": [r.tokens for r in reports[warmup:]],
                         "losses": [r.loss for r in reports], "skipped": [r.skipped for r in reports],
                         "rss_bytes": reports[-1].rss_bytes, "experts_per_device": len(shard.model.moe_layers()[0].expert_ids)},
                        f)
    if world > 1:
        groups.leave()


def _transformers_worker(_rank: int, threads: int, warmup: int, steps: int, out: str) -> None:
    """transformers' model in one process, the job's weights, rows and schedule: a plain training loop."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from orchestrator.data.source import load_data, make_stream
    from orchestrator.device.shard import rss_bytes
    from orchestrator.model.hf import fresh_hf_state, load_hf_config
    from orchestrator.device.schedule import lr_of

    torch.set_num_threads(threads)
    cfg = job_config(1)
    t = cfg.train
    data = load_data(cfg)
    stream = make_stream(cfg, data.train, data.val, 1, 0)
    hf_config = load_hf_config(cfg.model)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.load_state_dict(fresh_hf_state(hf_config, cfg.seed))   # the weights every device draws (same seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    times, tokens, losses = [], [], []
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        x_BT, y_BT, pos_BT = stream.train_batch(step)
        n = stream.loss_tokens(step)
        logits = model(input_ids=x_BT, position_ids=pos_BT, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y_BT.flatten(), reduction="sum", ignore_index=-100) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_of(t, step)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    with open(out, "wb") as f:
        pickle.dump({"times": times[warmup:], "tokens": tokens[warmup:], "losses": losses, "skipped": [],
                     "rss_bytes": rss_bytes()}, f)


def run_config(name: str, world: int, threads: int, warmup: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    from orchestrator.parallel import groups

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "res.pkl")
        wall = time.perf_counter()
        if name == "transformers":
            mp.spawn(_transformers_worker, args=(threads, warmup, steps, out), nprocs=1)
        else:
            mp.spawn(_project_worker, args=(world, groups.free_port("127.0.0.1"), threads, warmup, steps, out),
                     nprocs=world)
        wall = time.perf_counter() - wall
        with open(out, "rb") as f:
            r = pickle.load(f)
    total = sum(r["times"])
    r.update(step_s=total / len(r["times"]), trained_tokens_per_s=sum(r["tokens"]) / total, process_wall_s=wall)
    return r


def throughput(args: argparse.Namespace, argv: list[str]) -> dict:
    cfg = job_config(1)
    per_device = cfg.cluster.torch_threads or max(1, int(cfg.cluster.cpus_per_device))
    cores = os.cpu_count() or 1
    rows_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    configs = [("transformers", 1, per_device),
               *(("transformers", 1, cores) for _ in [0] if args.all_cores_baseline and cores != per_device),
               *(("devices", n, per_device) for n in args.devices)]
    runs: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        for name, world, threads in configs:
            r = run_config(name, world, threads, args.warmup, args.steps)
            runs.setdefault((name, world, threads), []).append(r)
            print(f"  round {rnd + 1} {name:12s} N={world} threads={threads}: {r['step_s'] * 1e3:7.1f} ms/step  "
                  f"{r['trained_tokens_per_s']:7.0f} trained tok/s  (step-1 loss {r['losses'][0]:.6f})", flush=True)
    base_key = ("transformers", 1, per_device)
    all_key = ("transformers", 1, cores)
    med = {k: statistics.median(r["trained_tokens_per_s"] for r in v) for k, v in runs.items()}
    rows = []
    for key in configs:
        name, world, threads = key
        v = runs[key]
        step_s = statistics.median(r["step_s"] for r in v)
        rows.append({"config": "transformers, one process" if name == "transformers" else f"{world} devices (gloo)",
                     "devices": world, "torch_threads_per_process": threads, "processes": world,
                     "oversubscribed": world * threads > cores,
                     "step_s_median": step_s, "trained_tokens_per_s_median": med[key],
                     "row_tokens_per_s_median": rows_tokens / step_s,
                     "vs_transformers_1_thread": med[key] / med[base_key],
                     "vs_transformers_all_cores": med[key] / med[all_key] if all_key in med else None,
                     "trained_tokens_per_step": v[0]["tokens"], "step1_loss": v[0]["losses"][0],
                     "losses": v[0]["losses"], "skipped_steps": sum(s is not None for s in v[0]["skipped"]),
                     "rss_mib_rank0": v[0]["rss_bytes"] / 2**20,
                     "experts_per_device": v[0].get("experts_per_device"),
                     "rounds": [{"step_s": r["step_s"], "trained_tokens_per_s": r["trained_tokens_per_s"],
                                 "process_wall_s": r["process_wall_s"]} for r in v]})
    return {**header(argv), "job": str(JOB.relative_to(REPO)), "global_batch": [cfg.train.global_batch_size,
                                                                                 cfg.data.seq_len],
            "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
            "note": f"{cores} CPU cores: N devices run N processes of {per_device} torch thread(s) each, so N > "
                    f"{cores // per_device} oversubscribes the cores; tokens = trained (assistant) tokens per step",
            "rows": rows}


# ---------------------------------------------------------------- 2. sharded load

def make_checkpoint(path: Path, experts: int, expert_dim: int) -> dict:
    """save_pretrained of the tiny DeepSeek-V4 with `experts` routed experts of width `expert_dim`."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.config import ModelConfig
    from orchestrator.model.hf import load_hf_config

    hf_config = load_hf_config(ModelConfig(hf_config=str(HF_CONFIG)))
    hf_config.n_routed_experts = experts
    hf_config.moe_intermediate_size = expert_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj",
                                                                                         "experts.down_proj")))
    return {"experts": experts, "moe_intermediate_size": expert_dim, "parameters": params,
            "expert_parameters": expert_params, "files": len(files),
            "checkpoint_bytes": sum(f.stat().st_size for f in files)}


def _proc_status(keys: tuple[str, ...]) -> dict:
    """Fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


class _RssSampler:
    """The largest anonymous and file-backed resident memory of this process seen every `every_s` (/proc/self/status
    RssAnon, RssFile): what the peak is made of (heap vs the checkpoint's mmap'd pages)."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.peak = every_s, {"RssAnon": 0, "RssFile": 0, "sum": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read(keys: tuple[str, ...] = ("RssAnon", "RssFile")) -> dict:
        return _proc_status(keys)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            self.peak["sum"] = max(self.peak["sum"], sum(now.values()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "_RssSampler":
        self.base = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def above_base(self) -> dict:
        return {"anon": self.peak["RssAnon"] - self.base["RssAnon"], "file": self.peak["RssFile"] - self.base["RssFile"],
                "sampled_total": self.peak["sum"] - sum(self.base.values())}


def _load_child(mode: str, path: str, share: float) -> None:
    """One load in this fresh process; prints a JSON line."""
    import gc

    import psutil
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.conversion_mapping  # noqa: F401  (both loaders use these; imported before the baseline)
    import transformers.core_model_loading  # noqa: F401
    import transformers.models.deepseek_v4.modeling_deepseek_v4  # noqa: F401
    from transformers import AutoModelForCausalLM

    from orchestrator.config import ModelConfig
    from orchestrator.model import hf_load  # noqa: F401
    from orchestrator.model.hf import build_hf_model

    E = json.loads((Path(path) / "config.json").read_text())["n_routed_experts"]
    gc.collect()
    proc = psutil.Process()
    # The peak is VmHWM (this address space's high-water mark, new at exec), not ru_maxrss: Linux carries
    # ru_maxrss over fork + exec, so a child of a large parent starts with the parent's peak.
    rss0, peak0 = proc.memory_info().rss, _proc_status(("VmHWM",))["VmHWM"]
    stats: dict = {}
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        if mode == "transformers":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ids = list(range(E))
        else:
            ids = list(range(round(E * share)))
            model = build_hf_model(ModelConfig(hf_path=path), 0, ids, None, stats)
        secs = time.perf_counter() - t0
    peak1 = _proc_status(("VmHWM",))["VmHWM"]
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"load_s": secs, "peak_rss_above_imports": peak1 - rss0, "rss_after_imports": rss0,
                      "peak_rss_during_imports": peak0, "rss_after_load_above_imports": proc.memory_info().rss - rss0,
                      "param_bytes_held": held, "experts_held": len(ids),
                      "peak_split": sampler.above_base(),
                      "read": {k: v for k, v in stats.items() if k != "keys_read"}}))


def _check_child(path: str) -> None:
    """The sharded read equals from_pretrained's tensors: experts [E/4, E/2) of every MoE layer, every dense one."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.config import ModelConfig
    from orchestrator.model.hf import build_hf_model

    E = json.loads((Path(path) / "config.json").read_text())["n_routed_experts"]
    ids = list(range(E // 4, E // 2))
    ours = build_hf_model(ModelConfig(hf_path=path), 0, ids, None, {}).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    worst, compared, missing = 0.0, 0, []
    for name, t in ref.items():
        if name not in ours:
            missing.append(name)
            continue
        mine = ours[name]
        want = t[ids] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
        if mine.shape != want.shape:
            missing.append(f"{name} shape {list(mine.shape)} vs {list(want.shape)}")
            continue
        if want.is_floating_point():
            worst = max(worst, (mine - want).abs().max().item() if want.numel() else 0.0)
        elif not torch.equal(mine, want):
            worst = float("inf")
        compared += 1
    print(json.dumps({"experts_checked": [ids[0], ids[-1]], "tensors_compared": compared,
                      "max_abs_diff": worst, "not_compared": missing[:10]}))


def child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/hf.py {' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load(args: argparse.Namespace, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt"
        ckpt = make_checkpoint(path, args.experts, args.expert_dim)
        print(f"  checkpoint: {ckpt['experts']} experts/layer, {ckpt['parameters'] / 1e6:.1f} M parameters "
              f"({ckpt['expert_parameters'] / 1e6:.1f} M routed-expert), {ckpt['checkpoint_bytes'] / 2**20:.1f} MiB",
              flush=True)
        modes = [("project", 0.25), ("project", 0.5), ("project", 1.0), ("transformers", 1.0)]
        child("--_load", "project", str(path), "0.25")   # warm-up: the checkpoint in the page cache for every mode
        runs: dict[tuple, list[dict]] = {}
        for rnd in range(args.load_rounds):
            for mode, share in modes:
                r = child("--_load", mode, str(path), str(share))
                runs.setdefault((mode, share), []).append(r)
                print(f"  round {rnd + 1} {mode:12s} {share:4.2f} of the experts: {r['load_s']:6.2f} s  peak "
                      f"+{r['peak_rss_above_imports'] / 2**20:6.1f} MiB", flush=True)
        check = child("--_check", str(path))
    whole = runs[("transformers", 1.0)]
    whole_s = statistics.median(r["load_s"] for r in whole)
    whole_peak = statistics.median(r["peak_rss_above_imports"] for r in whole)
    rows = []
    for mode, share in modes:
        v = runs[(mode, share)]
        s = statistics.median(r["load_s"] for r in v)
        peak = statistics.median(r["peak_rss_above_imports"] for r in v)
        rows.append({"loader": ("transformers AutoModelForCausalLM.from_pretrained (whole checkpoint)"
                                if mode == "transformers" else "orchestrator.model.hf.build_hf_model (sharded read)"),
                     "experts_share": share, "experts_held": v[0]["experts_held"],
                     "load_s_median": s, "peak_rss_above_imports_median": peak,
                     "peak_anon_median": statistics.median(r["peak_split"]["anon"] for r in v),
                     "peak_file_pages_median": statistics.median(r["peak_split"]["file"] for r in v),
                     "rss_after_load_above_imports_median": statistics.median(
                         r["rss_after_load_above_imports"] for r in v),
                     "param_bytes_held": v[0]["param_bytes_held"],
                     "vs_whole_load_time": s / whole_s, "vs_whole_load_peak": peak / whole_peak,
                     "read": v[0]["read"] or None,
                     "rounds": [{k: r[k] for k in ("load_s", "peak_rss_above_imports", "rss_after_imports",
                                                   "peak_split")}
                                for r in v]})
    return {**header(argv), "checkpoint": ckpt, "rounds": args.load_rounds,
            "note": "each load in a fresh subprocess after its imports; peak = VmHWM - RSS after the imports "
                    "(file pages safetensors maps count while mapped; peak_split: sampled every 2 ms, anonymous "
                    "memory vs mapped file pages); the checkpoint is in the page cache (warm)",
            "rows": rows, "equality_check": check}


# ---------------------------------------------------------------- main

def print_tables(tp: dict | None, ld: dict | None) -> None:
    if tp:
        print(f"\n{tp['command']}  ({tp['date']}, load average at start {tp['machine'].get('loadavg_at_start')})")
        print(tp["note"])
        print(f"{'configuration':28s} {'threads':>7s} {'ms/step':>8s} {'trained tok/s':>14s} {'row tok/s':>10s} "
              f"{'vs transformers':>15s} {'step-1 loss':>12s}")
        for r in tp["rows"]:
            print(f"{r['config']:28s} {r['torch_threads_per_process']:7d} {r['step_s_median'] * 1e3:8.1f} "
                  f"{r['trained_tokens_per_s_median']:14.0f} {r['row_tokens_per_s_median']:10.0f} "
                  f"{r['vs_transformers_1_thread']:15.2f} {r['step1_loss']:12.6f}")
    if ld:
        c = ld["checkpoint"]
        print(f"\n{ld['command']}  ({ld['date']})")
        print(f"checkpoint {c['experts']} experts x {c['moe_intermediate_size']} wide, "
              f"{c['checkpoint_bytes'] / 2**20:.1f} MiB; {ld['note']}")
        print(f"{'loader':14s} {'experts':>8s} {'load s':>7s} {'x whole':>7s} {'peak MiB':>9s} {'x whole':>7s} "
              f"{'anon MiB':>8s} {'file MiB':>8s} {'params MiB':>10s} {'tensors read':>12s} {'MiB read':>8s}")
        for r in ld["rows"]:
            rd = r["read"] or {}
            print(f"{'transformers' if 'transformers' in r['loader'] else 'sharded':14s} "
                  f"{r['experts_held']:8d} {r['load_s_median']:7.2f} {r['vs_whole_load_time']:7.2f} "
                  f"{r['peak_rss_above_imports_median'] / 2**20:9.1f} {r['vs_whole_load_peak']:7.2f} "
                  f"{r['peak_anon_median'] / 2**20:8.1f} {r['peak_file_pages_median'] / 2**20:8.1f} "
                  f"{r['param_bytes_held'] / 2**20:10.1f} {rd.get('tensors_read', '-'):>12} "
                  + (f"{rd['bytes_read'] / 2**20:8.1f}" if rd else f"{'-':>8s}"))
        print(f"equality check (sharded read vs from_pretrained): {ld['equality_check']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_load"]:
        _load_child(argv[1], argv[2], float(argv[3]))
        return 0
    if argv[:1] == ["--_check"]:
        _check_child(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (configurations alternate)")
    ap.add_argument("--all-cores-baseline", action="store_true",
                    help="also run transformers with every core's threads (on a shared 2-core machine OpenMP "
                         "threads then stall behind other processes: 10x slower)")
    ap.add_argument("--experts", type=int, default=256, help="routed experts per layer of the load checkpoint")
    ap.add_argument("--expert-dim", type=int, default=128, help="moe_intermediate_size of the load checkpoint")
    ap.add_argument("--load-rounds", type=int, default=3)
    ap.add_argument("--only", choices=("throughput", "load"))
    ap.add_argument("--table", action="store_true", help="print the tables of bench/results/hf-*.json; run nothing")
    args = ap.parse_args(argv)
    results = REPO / "bench" / "results"
    tp = ld = None
    if args.only != "load" and not args.table:
        print(f"throughput: {JOB.relative_to(REPO)}, {os.cpu_count()} CPU cores", flush=True)
        tp = throughput(args, argv)
        (results / "hf-throughput.json").write_text(json.dumps(tp, indent=1) + "\n")
    if args.only != "throughput" and not args.table:
        print("sharded load", flush=True)
        ld = load(args, argv)
        (results / "hf-load.json").write_text(json.dumps(ld, indent=1) + "\n")
    if args.table:   # the tables of the saved results, nothing run
        tp, ld = (json.loads(p.read_text()) if p.is_file() else None for p in (results / "hf-throughput.json",
                                                                                results / "hf-load.json"))
    print_tables(tp if args.only != "load" else None, ld if args.only != "throughput" else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
