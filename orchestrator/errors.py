"""Errors the entry points turn into exit codes; importing this module costs nothing."""
from __future__ import annotations

import signal
from typing import Any


def last_line(e: BaseException, limit: int = 300) -> str:
    """The last non-empty line of an error's message (where Ray's wrapped tracebacks put the cause), cut to
    `limit` characters; the error's type when the message is empty."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(e).__name__


class RunError(RuntimeError):
    """A run could not start or go on; the message says what failed, where, and what to do."""


class CheckpointError(RunError):
    """A checkpoint or in-memory snapshot cannot be used; the message names the checkpoint, the file or the tensor."""


class StateMismatch(CheckpointError):
    """A checkpoint or snapshot that does not fit the model: a tensor or rows of it missing. Unlike a damaged file,
    neither a retry nor an older state of the same run helps (recovery stops on it: Healer.unrestorable)."""


class RunInUse(RuntimeError):
    """A run directory or checkpoint folder another live job holds (orchestrator/runtime/runlock.py): the message names
    it and its holder (run id, pid, host, since when) in one line; the jobs exit 2, having changed nothing."""


class Interrupted(KeyboardInterrupt):
    """A signal that stops a run at once: the second SIGINT/SIGTERM (the first one stops after the step in flight),
    or the first one where no step loop is listening (see signals.py). The `finally` work still happens (devices
    released, status.json `interrupted`, summary.json and the report); the job exits 128 + the first signal.

    A KeyboardInterrupt because Ray's blocking calls (ray.get, ray.wait) give way to that and nothing else, and
    then re-raise a plain KeyboardInterrupt: `signals.interrupted(e)` finds this one again. Not an Exception, so
    `except Exception` recovery code does not swallow it."""

    def __init__(self, signum: int, first: int | None = None):
        self.signum = signum
        self.first = first if first is not None else signum  # the signal that asked to stop first
        self.second = first is not None                      # a second signal (the first asked for a graceful stop)
        self.not_written: dict[str, str] = {}  # end-of-run file -> why the interrupted run did not write it
        # the run directory the job was in (jobs/startup.py says; jobs/cli.py interrupted_exit lists its end
        # files written since `since`, the job's start, report.html too with `report`); None: before any
        self.run_dir: Any = None
        self.since, self.report = 0.0, False
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.first

    def describe(self) -> str:
        first, now = signal.Signals(self.first).name, signal.Signals(self.signum).name
        return f"{first}, then {now}" if self.second else now
