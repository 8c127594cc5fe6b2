"""What every job's command line shares: --config, key=value overrides, --debug, log format, the exit codes
(`run_main`: bad input 2, a failed run 1, a signal 128 + it). How an error becomes its exit code and line is
orchestrator/exits.py, which `python -m orchestrator` uses too (the library does not import the jobs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from orchestrator.config import DEFAULT_CONFIG
from orchestrator.errors import Interrupted
from orchestrator.exits import add_debug, bad_input, exit_code, setup_logging

__all__ = ["END_FILES", "job_parser", "add_debug", "bad_input", "setup_logging", "run_main", "interrupted_exit"]

END_FILES = ("status.json", "summary.json", "goodput.json")  # what a run writes at its end (report.html: optional)


def job_parser(prog: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with `--config FILE` and the trailing `key=value` overrides; the job adds its own options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. train.steps=50")
    add_debug(parser)
    return parser


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


def run_main(body: Callable[[], int], debug: bool = False, keep: bool = False) -> int:
    """A job's main: `body()` under the job's signal gate (`keep`: main(None), this process's own command line,
    the gate stays until it exits), and its exit code: what it returns; bad input 2 and a failed run 1, each one
    line on stderr (orchestrator/exits.py; --debug: the traceback of bad input); a signal that stopped it at once
    128 + the first signal, naming the end files of the run it was in (startup.started_job says which)."""
    from orchestrator.runtime.signals import interrupted, job_signals

    with job_signals(keep=keep):
        try:
            return body()
        except KeyboardInterrupt as e:
            signal = interrupted(e)
            return interrupted_exit(signal, signal.run_dir, signal.since, signal.report)
        except Exception as e:
            code = exit_code(e, debug)
            if code is None:
                raise
            return code
