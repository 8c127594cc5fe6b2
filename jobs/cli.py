"""What every job's command line shares: --config, key=value overrides, log format."""
from __future__ import annotations

import argparse
import logging

from orchestrator.config import DEFAULT_CONFIG


def job_parser(prog: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with `--config FILE` and the trailing `key=value` overrides; the job adds its own options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. train.steps=50")
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
