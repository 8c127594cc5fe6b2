"""What every job's command line shares: --config, key=value overrides, --debug, log format, exit codes of bad
input and of signals."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
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
    add_debug(parser)
    return parser


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="with bad input (exit 2), also print the traceback of where it was found")


def bad_input(e: BaseException, debug: bool = False, prefix: str = "config error") -> int:
    """Bad input (a ConfigError, a checkpoint that cannot be resumed, a run directory another job holds): one line on
    stderr, `prefix: message` (RunInUse: its message, which names the holder), and exit code 2. A traceback only
    with --debug: the message names the key, file, line and fix; the stack is ours."""
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    message = re.sub(r"\s*\n\s*", " ", str(e).strip())   # one line, whatever a library put in it
    # a run directory another live job holds names its holder: no "config error" about it
    print(message if isinstance(e, RunInUse) else f"{prefix}: {message}", file=sys.stderr)
    return 2


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


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
