"""How balanced a run's router is: MaxVio of the expert load summed over its first and last steps.

    python bench/balance_default.py RUN_DIR [RUN_DIR ...] [--first 10] [--last 20] [--json OUT]

Reads each run directory's metrics.jsonl (`expert_load`: per MoE layer, every expert's global token
count that step), summary.json and alerts.jsonl, and prints one row per run: MaxVio of the load summed
over the first `--first` and the last `--last` steps, the mean per-step MaxVio over the same steps,
final loss, mean loss of the last 50 steps, validation loss, tokens/s and the `maxvio` alerts fired.
MaxVio is orchestrator/experts/balancer.py's definition, max_i c_i / mean_i c_i - 1 per layer, mean over the
MoE layers; summing over steps first averages out the noise of one small batch, whose sequences
route alike (see README, Expert load balancing).

To reproduce the README's figures of the default job (2 devices, 500 steps), now and unbalanced:

    .venv/bin/python -m jobs.train run.dir=/tmp/defrun
    .venv/bin/python -m jobs.train run.dir=/tmp/defrun-none balance.bias_update_speed=0 balance.seq_aux_loss_coeff=0
    .venv/bin/python bench/balance_default.py /tmp/defrun-none /tmp/defrun
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.experts.balancer import load_stats  # noqa: E402  (after the path: runs as a plain script)


def summed_maxvio(records: list[dict]) -> float:
    """MaxVio of the load summed over `records`, mean over MoE layers (load_stats' own definition)."""
    layers = records[0]["expert_load"]
    totals = [[sum(r["expert_load"][i][e] for r in records) for e in range(len(layer))]
              for i, layer in enumerate(layers)]
    return load_stats(totals, world=1)["maxvio"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def balance_figures(run_dir: Path, first: int = 10, last: int = 20) -> dict:
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("expert_load")]
    if not records:
        raise SystemExit(f"{run_dir}: no metrics.jsonl records with expert_load (a dense model, or no step done)")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    alerts = [a for a in read_jsonl(run_dir / "alerts.jsonl") if a.get("rule") == "maxvio"]
    head, tail = records[:first], records[-last:]
    return {"run_dir": str(run_dir), "steps": len(records),
            f"maxvio_first_{first}_summed": summed_maxvio(head), f"maxvio_last_{last}_summed": summed_maxvio(tail),
            f"maxvio_first_{first}_mean": statistics.mean(r["maxvio"] for r in head),
            f"maxvio_last_{last}_mean": statistics.mean(r["maxvio"] for r in tail),
            "final_loss": records[-1]["loss"],
            "mean_loss_last_50": statistics.mean(r["loss"] for r in records[-50:]),
            "val_loss": summary.get("val_loss"),
            "tokens_per_s": summary.get("tokens_per_s"), "maxvio_alerts": [a.get("step") for a in alerts]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--first", type=int, default=10, help="steps at the start (default 10)")
    ap.add_argument("--last", type=int, default=20, help="steps at the end (default 20)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [balance_figures(d, args.first, args.last) for d in args.run_dirs]
    f, la = args.first, args.last
    print(f"| run | steps | MaxVio first {f} summed | last {la} summed | first {f} per step | last {la} per step "
          f"| final loss | mean loss last 50 | val loss | tokens/s | maxvio alerts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-"
        print(f"| {r['run_dir']} | {r['steps']} | {r[f'maxvio_first_{f}_summed']:.3f} "
              f"| {r[f'maxvio_last_{la}_summed']:.3f} | {r[f'maxvio_first_{f}_mean']:.3f} "
              f"| {r[f'maxvio_last_{la}_mean']:.3f} | {r['final_loss']:.4f} | {r['mean_loss_last_50']:.4f} | {val} "
              f"| {tps} | {len(r['maxvio_alerts'])} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
