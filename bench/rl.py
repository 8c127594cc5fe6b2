"""RL post-training (data.task=rl): the embedded job's held-out accuracy before and after GRPO over seeds, the time
split of an RL step, the weight sync's bytes against the model's, the rollout/trainer mismatch with routing replay
off and on, one step off-policy against on-policy (RL steps/s on the same resources), and the rollout sampler's
tokens/s against transformers' `generate` in one process.

    .venv/bin/python bench/rl.py [--config jobs/configs/rl_tiny.yaml] [--seeds 3] [--skip-job]
                                 [--parts sampler,mismatch,overlap,job] [--out bench/results/rl-<host>.json]

Everything but the sampler comparison runs the real entry point (`python -m jobs.train --config
jobs/configs/rl_tiny.yaml`, bench/jobrun.py). The sampler comparison: the same tiny MoE as a native model (our
KV-cached sampler, G completions of one prompt as one batch) and as transformers' Mixtral with the same weights
(the export mapping, `generate(do_sample=True)`), alternated over several rounds. For a transformers model
(`--config` naming `model.hf_path` / `hf_config`): our sampler on that model (transformers' own cache) against
transformers' `generate` on the same class with the same weights.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.jobrun import run_job  # noqa: E402

CONFIG = ["--config", "jobs/configs/rl_tiny.yaml"]   # --config replaces it


def _mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def job(seeds: int, tmp: Path) -> dict:
    """The embedded job per seed: accuracy before/after, and the RL steps' time split."""
    out = []
    for seed in range(seeds):
        summary, records, wall = run_job(tmp / f"job{seed}", [*CONFIG, f"seed={seed}"])
        rl = [r for r in records if r.get("phase") == "rl"]
        synced = [r for r in rl if r.get("sync_bytes")]
        out.append({"seed": seed, "accuracy_before": summary["accuracy_before"],
                    "accuracy_after": summary["accuracy_after"], "wall_s": round(wall, 1),
                    "rl_steps": len(rl), "reward_first10": _mean(rl[:10], "reward_mean"),
                    "reward_last10": _mean(rl[-10:], "reward_mean"),
                    "split_s": {"step (wall)": _mean(rl, "step_time_s"), "weight sync": _mean(rl, "sync_s"),
                                "generation (rewards included)": _mean(rl, "gen_s"),
                                "rewards (summed over workers)": _mean(rl, "reward_s"),
                                "log-prob recompute": _mean(rl, "recompute_s")},
                    "sync_bytes": synced[0]["sync_bytes"] if synced else 0})
        print(json.dumps(out[-1]), flush=True)
    return {"runs": out, "accuracy_before_mean": statistics.mean(r["accuracy_before"] for r in out),
            "accuracy_after_mean": statistics.mean(r["accuracy_after"] for r in out)}


def model_bytes() -> int:
    from orchestrator.config import load_config
    from orchestrator.model.transformer import count_parameters

    cfg = load_config(REPO / CONFIG[1], [])
    if cfg.model.hf_path or cfg.model.hf_config:
        from orchestrator.model.hf import hf_counts

        return hf_counts(cfg.model)["total"] * 4
    return count_parameters(cfg.model)["total"] * 4   # float32


def _sft_steps() -> tuple[int, str]:
    """The job's warm-up steps, and the override that keeps its learning-rate schedule in a shorter run."""
    from orchestrator.config import load_config

    cfg = load_config(REPO / CONFIG[1], [])
    return cfg.rl.sft_steps, f"train.lr_horizon={cfg.train.steps}"


def mismatch(tmp: Path) -> dict:
    """A bf16 rollout against float32 training, the first 30 RL steps after the warm-up, replay off and on."""
    out = {}
    sft, horizon = _sft_steps()
    for replay in ("false", "true"):
        _, records, _ = run_job(tmp / f"replay-{replay}", [*CONFIG, f"train.steps={sft + 30}", horizon,
                                                           "rl.rollout.dtype=bfloat16", f"rl.routing_replay={replay}"])
        rl = [r for r in records if r.get("phase") == "rl"]
        out[f"replay={replay}"] = {k: _mean(rl, k) for k in ("routing_mismatch", "replay_mismatch", "logprob_gap",
                                                           "logprob_k3", "reward_mean")}
        print(replay, json.dumps(out[f"replay={replay}"]), flush=True)
    return out


def overlap(tmp: Path, rl_steps: int = 40) -> dict:
    """RL steps/s on the same resources (2 devices, a pool of 2 rollout workers): on-policy against one step
    off-policy (generation of step k+1 overlapping the training of step k), from the records' wall clock."""
    out = {}
    sft, horizon = _sft_steps()
    for staleness in (0, 1):
        _, records, _ = run_job(tmp / f"overlap-{staleness}", [*CONFIG, f"train.steps={sft + rl_steps}", horizon,
                                                              "rl.rollout.workers=2",
                                                              "rl.rollout.cpus_per_worker=0.5",
                                                              f"rl.max_staleness={staleness}"])
        rl = [r for r in records if r.get("phase") == "rl"][1:]   # from the end of the first RL step
        out[f"max_staleness={staleness}"] = {"rl_steps_per_s": (len(rl) - 1) / (rl[-1]["time"] - rl[0]["time"]),
                                             "step_time_s": _mean(rl, "step_time_s"), "gen_s": _mean(rl, "gen_s")}
        print(staleness, json.dumps(out[f"max_staleness={staleness}"]), flush=True)
    out["gain"] = out["max_staleness=1"]["rl_steps_per_s"] / out["max_staleness=0"]["rl_steps_per_s"]
    return out


def sampler(rounds: int = 5, new_tokens: int = 32, group: int = 8) -> dict:
    """tokens/s of our sampler against transformers' generate, the same weights, one process, one thread."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.checkpoint.hf_mapping import hf_config_for, native_to_hf_state
    from orchestrator.config import load_config
    from orchestrator.model import build_model
    from orchestrator.model.generate import sample

    torch.set_num_threads(1)
    cfg = load_config(REPO / CONFIG[1], [])
    if cfg.model.hf_path or cfg.model.hf_config:
        return hf_sampler(cfg, rounds, new_tokens, group)
    cfg = load_config(REPO / CONFIG[1], ["model.max_seq_len=64"])
    native = build_model(cfg.model, cfg.seed, None, cfg.balance).eval()
    hf_cfg = hf_config_for(cfg.model, cfg.balance, dropless=True)
    hf = AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.load_state_dict(native_to_hf_state(native, cfg.model, cfg.balance, dropless=True), strict=False)
    return {**_race(lambda seeds: sample(native, list(b"12+35="), group, new_tokens, temperature=1.0, top_p=1.0,
                                         eos_id=None, seeds=seeds), hf, rounds, new_tokens, group),
            "architecture": type(hf).__name__}


def _race(ours_fn, hf, rounds: int, new_tokens: int, group: int) -> dict:
    """tokens/s of `ours_fn(seeds)` (a sampler call) against `hf.generate`, alternated, the first round a warm-up."""
    import torch

    ids = torch.tensor([list(b"12+35=")] * group)
    ours, theirs = [], []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        ours_fn(list(range(i * group, (i + 1) * group)))
        t1 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, do_sample=True, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
        t2 = time.perf_counter()
        if i:   # the first round warms both up
            ours.append(group * new_tokens / (t1 - t0))
            theirs.append(group * new_tokens / (t2 - t1))
    return {"our sampler tokens/s": statistics.median(ours), "transformers generate tokens/s":
            statistics.median(theirs), "ratio": statistics.median(ours) / statistics.median(theirs),
            "rows": group, "new_tokens": new_tokens, "rounds": rounds}


def hf_sampler(cfg, rounds: int, new_tokens: int, group: int) -> dict:
    """Our sampler on the transformers model (HFMoEModel, transformers' own cache) against transformers' generate on
    the same class with the same weights (fresh_hf_state of the seed), one process, one thread."""
    from transformers import AutoModelForCausalLM

    from orchestrator.model.generate import sample
    from orchestrator.model.hf import build_hf_model, fresh_hf_state, load_hf_config

    ours_model = build_hf_model(cfg.model, cfg.seed).eval()
    hf_config = load_hf_config(cfg.model)
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    hf.load_state_dict(fresh_hf_state(hf_config, cfg.seed))
    return {**_race(lambda seeds: sample(ours_model, list(b"12+35="), group, new_tokens, temperature=1.0,
                                         top_p=1.0, eos_id=None, seeds=seeds, record_routing=True),
                    hf, rounds, new_tokens, group),
            "architecture": type(hf).__name__, "routing recorded": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG[1], help="the RL job's config (default: the embedded job)")
    p.add_argument("--parts", default="sampler,mismatch,overlap,job", help="which measurements, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--skip-job", action="store_true", help="leave out the embedded job's seeds")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"rl-{platform.node()}.json"))
    args = p.parse_args()
    CONFIG[1] = args.config
    parts = set(args.parts.split(","))
    result = {"host": platform.node(), "date": time.strftime("%Y-%m-%d"), "config": args.config,
              "model_bytes_float32": model_bytes()}
    if "sampler" in parts:
        result["sampler"] = sampler()
        print(json.dumps(result["sampler"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "mismatch" in parts:
            result["mismatch"] = mismatch(Path(tmp))
        if "overlap" in parts:
            result["overlap"] = overlap(Path(tmp))
        if "job" in parts and not args.skip_job:
            result["job"] = job(args.seeds, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
