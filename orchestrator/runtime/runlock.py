"""One live run per run directory and per checkpoint folder.

A run holds an OS file lock (`filelock`: flock(2) on Unix) on `<dir>/run.lock`, taken before anything of the
run is read or written and kept until the job exits (its end files written). `<dir>/run.lock.json` says who
holds it: run id, run directory, host, pid and since when (seconds since the epoch), written once the lock is
taken and removed before it is released. A second job is refused (`RunInUse`: exit 2 in the jobs) naming the
holder, having written nothing. The OS drops the lock of a process that dies (kill -9, the OOM killer), so a
dead holder never blocks: the next job takes over, with a warning naming the holder its record still names.

The lock lives inside the directory it guards (created first when missing), not beside it: it is then the
directory's own, whatever path names it (relative, symlinked, mounted elsewhere), and nothing outside the run
directory is touched. The price: a job refused, or stopped by bad input, after that point can leave a new
directory holding only `run.lock`, which the next run there simply uses. `run.lock` stays after a release
(an empty file; deleting a lock file races with a job opening it).

Holds are re-entrant per process (a count, released at zero): jobs.train holds, its `Driver.run` holds
again, and a process can run several runs in one directory one after the other, each releasing at its end.

Object storage (`checkpoint.dir=s3://...`) has no file lock: a run's checkpoint folder there is held by
nothing but its run directory's lock (see README, "Runs, timelines and resume").
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import psutil
from filelock import FileLock, Timeout

from orchestrator.config import Config, ConfigError
from orchestrator.errors import RunInUse

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"
_RECORD_WAIT_S = 2.0   # how long a refused job waits for a holder that has just locked to record itself


@dataclass
class Holder:
    """Who holds a run directory or checkpoint folder (`run.lock.json`)."""
    run_id: str | None      # None until the holder has decided it (and for a job that is no single run)
    run_dir: str
    host: str
    pid: int
    since: float            # when it took the lock, seconds since the epoch

    def describe(self) -> str:
        who = f"run {self.run_id}" if self.run_id else "a job"
        when = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{who} (pid {self.pid} on host {self.host}, since {when})"

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether its process still runs: on this host, its pid exists, is no zombie, and started before the lock
        was taken (a pid reused since is not it). Another host's process cannot be seen from here: False, the OS
        lock it no longer holds being the evidence."""
        if self.host != socket.gethostname():
            return False
        try:
            p = psutil.Process(self.pid)
            return p.status() != psutil.STATUS_ZOMBIE and p.create_time() <= self.since + 1.0
        except psutil.Error:
            return False


def read_holder(directory: Path) -> Holder | None:
    """The holder recorded in `directory`/run.lock.json; None when there is none or it cannot be read."""
    try:
        d = json.loads((Path(directory) / HOLDER_FILE).read_text())
        return Holder(d.get("run_id"), str(d["run_dir"]), str(d["host"]), int(d["pid"]), float(d["since"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class _Hold:
    """This process's hold on one directory: the OS lock, how many holds share it, and its record."""

    def __init__(self, directory: Path, lock: FileLock, holder: Holder):
        self.directory, self.lock, self.holder, self.count = directory, lock, holder, 1

    def record(self, run_id: str | None) -> None:
        """Write run.lock.json (atomically: a reader never sees half of it); ConfigError when it cannot be."""
        if run_id is not None:
            self.holder.run_id = run_id
        tmp = self.directory / f"{HOLDER_FILE}.tmp"
        try:
            tmp.write_text(json.dumps(asdict(self.holder)) + "\n")
            tmp.replace(self.directory / HOLDER_FILE)
        except OSError as e:
            raise ConfigError(f"{self.directory}: cannot write {HOLDER_FILE} ({e.strerror or e}); a run needs its "
                              f"directory writable") from None

    def release(self) -> None:
        # the record goes first: once the OS lock is free, run.lock.json belongs to whoever takes it next
        try:
            (self.directory / HOLDER_FILE).unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s (the next job will take it over with a warning)",
                        self.directory / HOLDER_FILE, e)
        self.lock.release(force=True)


_holds: dict[str, _Hold] = {}     # the directory's real path -> this process's hold on it
_guard = threading.Lock()


@contextmanager
def hold(directory: Path, what: str = "run directory", run_id: str | None = None, run_dir: Path | None = None,
         instead: str = "choose another run.dir") -> Iterator[_Hold]:
    """Hold `directory` (created if missing) for the duration: re-entrant in this process, exclusive between
    processes. `what` names it in messages, `instead` is the fix a refused job is told besides waiting.

    Raises RunInUse when another live process holds it (the message names the holder: run id, pid, host,
    since when), ConfigError when the directory cannot be created or locked (naming it and why)."""
    directory = Path(directory).expanduser().absolute()
    key = os.path.realpath(directory)
    with _guard:
        h = _holds.get(key)
        if h is not None:
            if run_id is not None and run_id != h.holder.run_id:
                h.record(run_id)
            h.count += 1
        else:
            h = _holds[key] = _acquire(directory, what, run_id, run_dir or directory, instead)
    try:
        yield h
    finally:
        with _guard:
            h.count -= 1
            if h.count == 0:
                del _holds[key]
                h.release()


def _acquire(directory: Path, what: str, run_id: str | None, run_dir: Path, instead: str) -> _Hold:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory / LOCK_FILE), thread_local=False)
        lock.acquire(timeout=0)
    except Timeout:
        raise RunInUse(_in_use(directory, what, _holder_of(directory), instead)) from None
    except OSError as e:
        raise ConfigError(f"{what} {directory}: cannot create or lock it ({e.strerror or e}); choose a writable "
                          f"local path") from None
    held = _Hold(directory, lock, Holder(run_id, str(Path(run_dir).absolute()), socket.gethostname(), os.getpid(),
                                         time.time()))
    try:
        before = read_holder(directory)
        if before is not None and not before.is_this_process():
            if before.alive():   # the OS lock was free, yet its holder runs: this filesystem does not honour flock
                raise RunInUse(_in_use(directory, what, before, instead) + f" ({what} on a filesystem whose file "
                               f"locks do not hold: use a local disk)")
            log.warning("taking over %s %s from %s, whose process is gone", what, directory, before.describe())
        held.record(run_id)
    except BaseException:
        lock.release(force=True)
        raise
    return held


def _holder_of(directory: Path) -> Holder | None:
    """The holder's record; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while (holder := read_holder(directory)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _in_use(directory: Path, what: str, holder: Holder | None, instead: str) -> str:
    if holder is None:
        who = f"another job (which has not recorded itself in {directory / HOLDER_FILE})"
    else:
        who = holder.describe()
        if what != "run directory":
            who += f" of run directory {holder.run_dir}"
    return f"{what} {directory} is in use by {who}; wait for it to finish, stop it, or {instead}"


@contextmanager
def hold_run(cfg: Config, run_dir: Path, run_id: str | None = None) -> Iterator[str]:
    """Hold a run's directory and, when it is local and outside the run directory, its checkpoint folder
    (`<checkpoint.dir>/<run id>`, which runs in other directories can name too) until the block ends.
    Yields the run's id: `run_id`, else the one `timeline.run_id_of` decides, read under the lock.
    Raises RunInUse or ConfigError (see `hold`)."""
    from orchestrator.checkpoint.timeline import run_folder, run_id_of
    from orchestrator.checkpoint.storage import Storage, StorageError

    run_dir = Path(run_dir)
    with ExitStack() as stack:
        held = stack.enter_context(hold(run_dir, "run directory", run_id, run_dir))
        if run_id is None:
            run_id = run_id_of(cfg, run_dir)
            held.record(run_id)
        try:
            folder = Storage(run_folder(cfg, run_dir, run_id))
        except StorageError:
            folder = None   # the driver's storage check names what is wrong with checkpoint.dir
        if folder is not None and folder.local:
            path = Path(folder.root)
            if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run_dir.absolute())):
                stack.enter_context(hold(path, "checkpoint folder", run_id, run_dir,
                                         "give this run another run.id"))
        yield run_id


__all__ = ["Holder", "HOLDER_FILE", "LOCK_FILE", "hold", "hold_run", "read_holder"]
