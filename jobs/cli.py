"""What every job's command line shares: --config, key=value overrides, log format, exit codes of signals."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestrator.config import DEFAULT_CONFIG
from orchestrator.errors import Interrupted, RunInUse

END_FILES = ("status.json", "summary.json", "goodput.json")  # what a run writes at its end (report.html: optional)


def job_parser(prog: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with `--config FILE` and the trailing `key=value` overrides; the job adds its own options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. train.steps=50")
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def refused(e: Exception) -> int:
    """A run that may not start, said on stderr in one line: a config error, or a run directory or checkpoint
    folder another live job holds (RunInUse, which names the holder); exit code 2."""
    print(e if isinstance(e, RunInUse) else f"config error: {e}", file=sys.stderr)
    return 2


def interrupted_exit(e: Interrupted, run_dir: Path | None = None, since: float = 0.0, report: bool = False) -> int:
    """Say on stderr that the job was interrupted and, for a run directory, which of the run's end files were
    written (after `since`, the job's start) and which not, and why; returns 128 + the first signal."""
    if run_dir is None:
        print(f"interrupted ({e.describe()}) before a run started", file=sys.stderr)
        return e.exit_code
    files = END_FILES + (("report.html",) if report else ())
    fresh = [f for f in files if (run_dir / f).is_file() and (run_dir / f).stat().st_mtime >= since]
    print(f"interrupted ({e.describe()}): {run_dir}: written {', '.join(fresh) or 'none of ' + ', '.join(files)}",
          file=sys.stderr)
    for f in files:
        if f not in fresh:
            why = e.not_written.get(f, "the interruption came before the run's end work got to it")
            print(f"not written: {run_dir / f} ({why})", file=sys.stderr)
    return e.exit_code
