"""How every entry point ends (the jobs in jobs/, and `python -m orchestrator`): bad input as one line and exit 2
(`--debug`: the traceback too), a run or tool that failed as one line and exit 1, and the log format. Below both:
jobs/cli.py adds the jobs' command line and signals on top; importing this module costs nothing."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from typing import Callable

from orchestrator.errors import RunError, RunInUse


class BadInput(Exception):
    """Bad input that another error says (a RunError of a checkpoint the run cannot resume from): exit 2 with
    `prefix: message` instead of a failed run."""

    def __init__(self, error: BaseException, prefix: str):
        super().__init__(str(error))
        self.error, self.prefix = error, prefix


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="with bad input (exit 2), also print the traceback of where it was found")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


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


def exit_code(e: BaseException, debug: bool = False, failed: str = "run failed") -> int | None:
    """The exit code an entry point ends with on `e`, its one line said on stderr: bad input (ConfigError, RunInUse,
    BadInput) 2, a RunError 1 (`failed: message`); None for anything else (the caller re-raises it)."""
    from orchestrator.config import ConfigError

    if isinstance(e, BadInput):
        return bad_input(e.error, debug, e.prefix)
    if isinstance(e, (ConfigError, RunInUse)):
        return bad_input(e, debug)
    if isinstance(e, RunError):
        print(f"{failed}: {e}", file=sys.stderr)
        return 1
    return None


def exits(body: Callable[[], int], debug: bool = False, failed: str = "run failed") -> int:
    """`body()`'s exit code, or the one `exit_code` gives for what it raised."""
    try:
        return body()
    except Exception as e:
        code = exit_code(e, debug, failed)
        if code is None:
            raise
        return code
