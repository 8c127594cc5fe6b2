"""The cost of each stable-training option in step time, against the default job's step, side by side.

    python bench/techniques.py [--steps 12] [--rounds 3] [--options sandwich,tiny,...] [key=value ...]

One in-process DeviceShard (the reference run's: one device holding every expert, no Ray) of the default job per
option, each a copy of the baseline with the option's overrides; the options run round-robin, `--rounds` times
`--steps` steps each (the first step of each round left out), so a slow spell of the machine hits every option
alike. Reports each option's median step time and its ratio to the baseline measured in the same rounds. Results go to
bench/results/techniques-<host>.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS: dict[str, list[str]] = {
    "baseline": [],
    "sandwich_norm": ["model.norm=sandwich"],
    "tiny_init": ["model.init=tiny"],
    "sqrtsoftplus": ["model.score_func=sqrtsoftplus"],
    "swiglu_limit": ["model.swiglu_limit=10"],
    "aux_scope_sequence": ["balance.aux_loss_coeff=0.01", "balance.aux_loss_scope=sequence"],
    "anticipatory_routing": ["balance.anticipatory_routing=true"],
    "mla": ["model.attention=mla"],
    "mtp_1": ["model.mtp_depth=1"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    import torch

    from orchestrator.config import ConfigError, load_config
    from orchestrator.data import load_corpus
    from orchestrator.device.actor import DeviceShard

    names = ["baseline"] + [n for n in args.options.split(",") if n and n != "baseline"]
    base = ["cluster.num_devices=1", "checkpoint.every_steps=0", f"train.steps={args.steps * args.rounds + 1}"]
    torch.set_num_threads(1)   # one device actor's thread in the default job (cpus_per_device 1)
    shards, skipped = {}, {}
    corpus = None
    for name in names:
        try:
            cfg = load_config(REPO / "jobs/configs/default.yaml", base + args.overrides + OPTIONS[name])
        except ConfigError as e:   # an option this checkout does not have
            skipped[name] = str(e)
            continue
        corpus = corpus or load_corpus(cfg.data)
        shards[name] = (DeviceShard(cfg, 0, 1, corpus.train, corpus.val), [])
    step = {n: 0 for n in shards}
    for _ in range(args.rounds):
        for name, (shard, times) in shards.items():
            for i in range(args.steps + 1):
                step[name] += 1
                t0 = time.perf_counter()
                shard.train_step(step[name])
                if i:   # the first step of a round warms the caches up
                    times.append(time.perf_counter() - t0)
    base_t = statistics.median(shards["baseline"][1])
    rows = [{"option": n, "overrides": OPTIONS[n], "step_ms_median": statistics.median(t) * 1000,
             "step_ms_min": min(t) * 1000, "ratio_vs_baseline": statistics.median(t) / base_t, "steps": len(t)}
            for n, (_, t) in shards.items()]
    out = REPO / "bench" / "results" / f"techniques-{platform.node() or 'host'}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                               "threads": 1, "rows": rows, "skipped": skipped,
                               "command": "python bench/techniques.py " + " ".join(argv or sys.argv[1:])},
                              indent=2) + "\n")
    print("| option | step time (median) | vs baseline |\n|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['step_ms_median']:.0f} ms | {r['ratio_vs_baseline']:.2f}x |")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}", file=sys.stderr)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
