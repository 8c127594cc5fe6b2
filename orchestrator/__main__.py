"""Command-line tools over run directories.

    python -m orchestrator checkpoints list PATH            checkpoints of a run dir / checkpoint root / URI
    python -m orchestrator checkpoints export CKPT OUT      model weights of a checkpoint as one safetensors file
    python -m orchestrator report RUN_DIR [--out FILE]      the run report: one HTML page with plots
"""
from __future__ import annotations

import argparse
import json
import sys

from orchestrator.errors import RunError


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
    rp = sub.add_parser("report", help="write the run report (HTML with plots) of a run directory")
    rp.add_argument("run_dir", help="a run directory (runs/<time>-<name>)")
    rp.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)

    if args.command == "report":
        from orchestrator.report import write_report

        try:
            print(f"written {write_report(args.run_dir, args.out)}")
            return 0
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    from orchestrator.checkpoint import tools

    try:
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
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
