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
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

STEP_LOGS = ("metrics.jsonl", "incidents.jsonl", "alerts.jsonl")


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


def tail_jsonl(path: Path | str, n: int) -> list[dict[str, Any]]:
    """The last `n` objects of a .jsonl file (read in one pass, holding at most n)."""
    from collections import deque

    return list(deque(read_jsonl(path), maxlen=n)) if n > 0 else []


def truncate_jsonl(path: Path | str, keep_through_step: int) -> int:
    """Keep the lines of steps <= keep_through_step (none for 0), dropping torn lines; atomically (a temporary
    file and a rename). The number of lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    tmp = path.with_name(path.name + ".tmp")
    dropped = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for obj in read_jsonl(path):
            if int(obj.get("step") or 0) <= keep_through_step:
                out.write(jsonl_line(obj))
            else:
                dropped += 1
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
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


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(obj))


__all__ = ["read_jsonl", "tail_jsonl", "truncate_jsonl", "rewind_logs", "append_jsonl", "jsonl_line", "STEP_LOGS"]
