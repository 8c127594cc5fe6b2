"""Command-line tools over run directories.

    python -m orchestrator checkpoints list PATH            checkpoints of a run dir / checkpoint root / URI
    python -m orchestrator checkpoints export CKPT OUT      model weights of a checkpoint as one safetensors file
    python -m orchestrator export CKPT --hf OUT             a checkpoint as a Hugging Face transformers model folder
    python -m orchestrator report RUN_DIR [--out FILE]      the run report: one HTML page with plots
    python -m orchestrator plan [--config F] [k=v] [--json] the memory plan of a run; every ZeRO stage x checkpointing
"""
from __future__ import annotations

import argparse
import json
import sys

from orchestrator.exits import add_debug, exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoints", help="list, verify and export checkpoints")
    ck_sub = ck.add_subparsers(dest="action", required=True)
    ls = ck_sub.add_parser("list", help="step, size, world size and verification of each checkpoint")
    ls.add_argument("path", help="a run directory, a checkpoint root, one checkpoint, or a URI (s3://...)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ex = ck_sub.add_parser("export", help="write a checkpoint's model weights as a single safetensors file")
    ex.add_argument("checkpoint", help="one checkpoint folder, or a run dir / root (its newest committed one)")
    ex.add_argument("out", help="output .safetensors file")
    hf = sub.add_parser("export", help="write a checkpoint as the Hugging Face transformers model it equals "
                                       "(Mixtral, ERNIE-4.5-MoE, Qwen2-MoE or GLM-4-MoE; see checkpoint/hf_mapping.py)")
    hf.add_argument("checkpoint", help="one checkpoint folder, or a run dir / root (its newest committed one)")
    hf.add_argument("--hf", required=True, metavar="OUT", help="output folder: config.json, model.safetensors, ...")
    hf.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="a folder with the tokenizer's files to copy (byte-level models need none)")
    hf.add_argument("--config", default=None, metavar="FILE",
                    help="the run's config file, for checkpoints that predate saved routing settings")
    hf.add_argument("--dropless", action="store_true",
                    help="export a model trained with balance.capacity_factor without capacity (no transformers "
                         "MoE drops tokens)")
    add_debug(hf)
    rp = sub.add_parser("report", help="write the run report (HTML with plots) of a run directory")
    rp.add_argument("run_dir", help="a run directory (runs/<time>-<name>)")
    rp.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    pl = sub.add_parser("plan", help="what every device of a run will hold (bytes by category, slices), before it "
                                     "starts; and the table of every ZeRO stage x activation checkpointing mode")
    pl.add_argument("--config", default=None, help="YAML config file (default: jobs/configs/default.yaml, as "
                                                   "python -m jobs.train)")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, as for python -m jobs.train")
    pl.add_argument("--json", action="store_true", help="print JSON (the plan and the table) instead of text")
    add_debug(pl)
    args = parser.parse_args(argv)

    if args.command == "plan":
        return exits(lambda: _plan(args), args.debug, failed="error")
    if args.command == "export":
        return exits(lambda: _export_hf(args), args.debug, failed="error")
    if args.command == "report":
        from orchestrator.monitoring.report import write_report

        try:
            print(f"written {write_report(args.run_dir, args.out)}")
            return 0
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return exits(lambda: _checkpoints(args), failed="error")


def _checkpoints(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint import tools

    if args.action == "list":
        rows = tools.describe(args.path)
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print(f"no checkpoints under {args.path}")
        else:
            print(f"{'step':>8}  {'size MB':>8}  {'devices':>7}  {'files':>5}  {'created':19}  status")
            for r in rows:
                print(f"{r['step'] if r['step'] is not None else '?':>8}  {r.get('size_mb') or '':>8}  "
                      f"{r.get('world_size') or '':>7}  {r.get('files') or '':>5}  {r.get('created') or '':19}  "
                      f"{r['status']}")
        return 0 if all(r["status"] == "verified" or r["status"].startswith("uncommitted") for r in rows) else 1
    info = tools.export(args.checkpoint, args.out)
    print(f"exported step {info['step']} from {info['source']}: {info['tensors']} tensors, "
          f"{info['bytes'] / 1e6:.2f} MB -> {info['file']}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.hf_export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.hf, tokenizer_dir=args.tokenizer, config_file=args.config,
                             dropless=args.dropless)
    print(f"exported step {info['step']} from {info['source']} as {info['model_class']} "
          f"({info['parameters']} parameters) -> {info['out_dir']}")
    for note in info["notes"]:
        print(f"  {note}")
    print(f"  tokenizer: {info['tokenizer']}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from orchestrator.config import DEFAULT_CONFIG, load_config
    from orchestrator.exits import setup_logging

    setup_logging()   # load_config logs the defaults it resolves (stderr; the plan goes to stdout)
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    from orchestrator.memory.render import render
    from orchestrator.memory.plan import MemoryPlanError, check_fits, plan_memory, plan_table

    plan, table = plan_memory(cfg), plan_table(cfg)
    verdict = None  # with cluster.device_memory_gb set: what python -m jobs.train would say
    if plan.budget_bytes:
        try:
            check_fits(cfg)
            verdict = "fits cluster.device_memory_gb"
        except MemoryPlanError as e:
            verdict = f"does not fit: {e}"
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "table": table, "budget_check": verdict}, indent=1))
    else:
        print(render(plan, table) + (f"\n\n{verdict}" if verdict else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
