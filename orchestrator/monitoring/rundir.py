"""The run directory's step-keyed logs: one tolerant reader, one rewind rule.

`metrics.jsonl`, `incidents.jsonl` and `alerts.jsonl` hold one JSON object per line, each with a
`step`. A driver killed mid-write or a full disk can leave a torn last line: `read_jsonl` drops it
with a warning (and any other line that is not a JSON object), so nothing that reads a run
directory fails on it. Every file of the run directory follows the same rewind rule, applied by
`rewind_logs` alone: a run that continues after step k (a resume, or a new timeline started from
scratch in a reused directory) first drops every line of a step after k, so each step's record,
incident and alert appears once, from the live timeline. (Rewinds inside one run, the healer's,
drop only the metrics records of the steps that will be replayed: their incidents and alerts did
happen on the live timeline.) TensorBoard is told the same at its first step (`purge_step`), and
status.json, summary.json, goodput.json and report.html are rewritten whole.

`metrics.jsonl` also holds event lines (`{"event": "checkpoint_committed", "step": ...}`, see metrics.py):
they carry the step they are about, so the rewind rule takes them with that step; `records` reads the step
records alone.

Every write to the run directory goes through `append_line` or `write_atomic`: on a full disk they leave
no torn line and no `.tmp` behind (a line cut short is cut off again, a temporary file removed) and raise
`DiskFull` naming the file, the bytes needed and the bytes free (orchestrator/runtime/disk.py, with its test hook).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from orchestrator.runtime.disk import DiskFull, full, room

log = logging.getLogger(__name__)

STEP_LOGS = ("metrics.jsonl", "incidents.jsonl", "alerts.jsonl")
FIX = "free space there, or move the run directory to a disk with room and point run.dir at it"  # its user's part


def read_jsonl(path: Path | str, what: str | None = None) -> Iterator[dict[str, Any]]:
    """The JSON objects of a .jsonl file, in order, streamed; a line that does not parse (a torn last line)
    is skipped with a warning naming the file and the line. A missing file reads as empty."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                torn = "" if line.endswith("\n") else " (torn: no line end, as a write cut short leaves it)"
                log.warning("%s line %d is not a JSON object%s; dropped: %.80r", what or path, number, torn, line)
                continue
            yield obj


def tail_jsonl(path: Path | str, n: int, keep: Callable[[dict[str, Any]], bool] | None = None
               ) -> list[dict[str, Any]]:
    """The last `n` objects of a .jsonl file (those `keep` accepts, when given), read in one pass, holding at
    most n."""
    from collections import deque

    objs = read_jsonl(path) if keep is None else filter(keep, read_jsonl(path))
    return list(deque(objs, maxlen=n)) if n > 0 else []


def truncate_jsonl(path: Path | str, keep_through_step: int) -> int:
    """Keep the lines of steps <= keep_through_step (none for 0), dropping torn lines; atomically (a temporary
    file and a rename). The number of lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    tmp = path.with_name(path.name + ".tmp")
    dropped = 0
    try:
        with open(tmp, "wb") as out:
            for obj in read_jsonl(path):
                if int(obj.get("step") or 0) <= keep_through_step:
                    line = jsonl_line(obj).encode()
                    room(tmp, len(line))
                    out.write(line)
                else:
                    dropped += 1
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if full(e):   # the rewritten file needs at most what the file holds now
            raise DiskFull(path, path.stat().st_size, FIX) from None
        raise
    return dropped


def rewind_logs(run_dir: Path, keep_through_step: int) -> dict[str, int]:
    """The one rewind rule for a run that continues after `keep_through_step` (0: starts from scratch): every
    step-keyed log of the run directory loses the lines of later steps. Lines dropped, by file."""
    dropped = {name: truncate_jsonl(run_dir / name, keep_through_step) for name in STEP_LOGS}
    gone = {k: v for k, v in dropped.items() if v}
    if gone:
        log.info("run directory %s continues after step %d: dropped %s of the abandoned timeline", run_dir,
                 keep_through_step, ", ".join(f"{v} line(s) of {k}" for k, v in gone.items()))
    return dropped


def jsonl_line(obj: dict[str, Any]) -> str:
    """One object as a line of a .jsonl file (compact, newline-terminated): how every writer writes one."""
    return json.dumps(obj, separators=(",", ":")) + "\n"


def is_record(obj: dict[str, Any]) -> bool:
    """Is this object of metrics.jsonl a step record (not an event line, which has an `event` key)?"""
    return "event" not in obj


def records(objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl's objects: its event lines left out."""
    return [o for o in objs if is_record(o)]


def append_line(f: BinaryIO, path: Path, line: str) -> None:
    """Append one line to `f` (a file opened "ab", unbuffered) whole or not at all: on a full disk what part of it
    was written is cut off again and DiskFull names `path`; another OSError is raised as it is."""
    data = line.encode()
    start = os.fstat(f.fileno()).st_size
    try:
        room(path, len(data))
        view = memoryview(data)
        while view:   # a short write (the disk filling up) writes the rest, or fails on it
            view = view[f.write(view):]
    except OSError as e:
        try:
            os.ftruncate(f.fileno(), start)
        except OSError:
            pass
        if full(e):
            raise DiskFull(path, len(data), FIX) from None
        raise


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "ab", buffering=0) as f:
        append_line(f, path, jsonl_line(obj))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` through a temporary file and a rename (a reader never sees half a file); on
    failure the temporary file is removed; a full disk raises DiskFull naming `path`."""
    raw = data.encode() if isinstance(data, str) else data
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        room(tmp, len(raw))
        with open(tmp, "wb") as f:
            f.write(raw)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if full(e):
            raise DiskFull(path, len(raw), FIX) from None
        raise


__all__ = ["read_jsonl", "tail_jsonl", "truncate_jsonl", "rewind_logs", "append_jsonl", "append_line", "write_atomic",
           "records", "is_record", "jsonl_line", "STEP_LOGS", "FIX"]
