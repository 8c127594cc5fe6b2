"""What a person and other tools see of a run: metrics.jsonl, status.json, and the progress display."""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from orchestrator.config import Config, redacted_yaml
from orchestrator.monitoring.rundir import append_line, is_record, jsonl_line, tail_jsonl, truncate_jsonl, write_atomic


def run_dir_path(cfg: Config) -> Path:
    """`run.dir`, else a new runs/<date>-<time>-<name>."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser()
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.run.name}"


def make_run_dir(cfg: Config) -> Path:
    """The run directory (`run.dir`, else runs/<date>-<time>-<name>) with the resolved config.yaml in it, its
    secrets redacted (credentials in URIs, the webhook URL): a run directory is shared, a credential is not."""
    path = run_dir_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "config.yaml", redacted_yaml(cfg))
    return path


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace status.json atomically (a reader never sees half a file); on a full disk DiskFull, and no
    status.json.tmp left behind."""
    write_atomic(path, json.dumps(status, indent=1) + "\n")


class StatusFile:
    """status.json: the run and each device's health now (rewritten every step; read it while the job runs).
    `seconds`: the time spent writing it; `reports`: the newest step's StepReports (kept for the devices' rows)."""

    def __init__(self, run_dir: Path, steps: int):
        self.path, self.steps = Path(run_dir) / "status.json", steps
        self.seconds = 0.0
        self.reports: list[Any] = []

    def write(self, state: str, reason: str | None, last: dict[str, Any], val_loss: float | None,
              checkpoint: int | None, step_time_ema: float | None, healer: Any, devices: Any,
              reports: list[Any] | None = None) -> None:
        """`last`: the newest record; `checkpoint`: the newest committed checkpoint's step; `healer` its incidents
        and recoveries, `devices` (a DeviceGroup) its info and restarts; `reason`: why a run that ended did not
        finish. A full run directory: DiskFull."""
        t0 = time.perf_counter()
        self.reports = reports or self.reports
        step = last.get("step", 0)
        eta = (step_time_ema or 0) * (self.steps - step) if state == "running" else 0
        write_status(self.path, {
            "state": state, "reason": reason, "step": step, "steps": self.steps, "updated": time.time(),
            "loss": last.get("loss"), "val_loss": val_loss, "tokens_per_s": last.get("tokens_per_s"),
            "mfu": last.get("mfu"), "maxvio": last.get("maxvio"), "eta_s": eta,
            "incidents": len(healer.incidents), "recoveries": healer.recoveries,
            "last_checkpoint_step": checkpoint,
            "checkpoint_age_steps": step - checkpoint if checkpoint is not None else None,
            "devices": device_status(devices.info, devices.restarts, self.reports)})
        self.seconds += time.perf_counter() - t0


def write_memory_plan(run_dir: Path, cfg: Config) -> None:
    """memory_plan.json: the planner's bytes per device and category for this run (orchestrator/memory/plan.py), beside
    the measured ones (metrics.jsonl `device_memory`)."""
    from orchestrator.memory.plan import plan_memory

    write_atomic(Path(run_dir) / "memory_plan.json", plan_memory(cfg).to_json() + "\n")


def device_status(info: list[dict[str, Any]], restarts: list[int], reports: list[Any]) -> list[dict[str, Any]]:
    """status.json's `devices`: each device's process and its last step (reports: the last StepReports), with
    `cores`: the cores it is bound to (cluster.bind_cores; None: unbound), and `memory`: its last measured bytes per
    category (params, grads, optimizer, activations_peak, rss; None before a first step or from a report without
    them)."""
    by_rank = {r.rank: r for r in reports}
    out = []
    for rank, i in enumerate(info):
        r = by_rank.get(rank)
        memory = getattr(r, "memory", None) if r else None
        out.append({"rank": rank, "pid": i.get("pid"), "node_id": i.get("node_id"), "ip": i.get("ip"),
                    "gpu": i.get("gpu_name"), "cores": i.get("cores"), "restarts": restarts[rank],
                    "step_time_s": r.compute_time_s if r else None, "collective_s": r.collective_s if r else None,
                    "rss_mb": r.rss_bytes / 2**20 if r else None,
                    "device_mem_mb": r.device_mem_bytes / 2**20 if r else None,
                    "memory": {k: int(v) for k, v in memory.items()} if memory else None})
    return out


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line (step records and event lines), each written whole with one
    unbuffered write so readers see it live, or not at all (a full disk: DiskFull, no torn line). The run
    directory is rewound before the log opens (orchestrator.monitoring.rundir.rewind_logs): it appends after what was kept."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "ab", buffering=0)

    def truncate(self, keep_through_step: int) -> None:
        """Keep the lines of steps <= keep_through_step and append after them (a rewind inside the run)."""
        self._f.close()
        try:
            truncate_jsonl(self.path, keep_through_step)
        finally:
            self._f = open(self.path, "ab", buffering=0)

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last `n` step records, event lines left out (a resumed run's recent history; the driver never
        holds the whole log)."""
        return tail_jsonl(self.path, n, is_record)

    def write(self, record: dict[str, Any]) -> None:
        append_line(self._f, self.path, jsonl_line(record))

    def close(self) -> None:
        self._f.close()


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _si(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Progress:
    """Step, loss, MaxVio, tokens/s, MFU, incidents so far and ETA: a redrawn bar on a terminal, plain log lines
    elsewhere (CI, ray job logs).

    mode: auto | bar | lines | quiet. In lines mode a line is printed about every 5% of the run.
    """

    def __init__(self, total_steps: int, mode: str = "auto", stream: IO[str] | None = None, first_step: int = 1):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.total, self.first = mode, total_steps, first_step
        self.every = max(1, total_steps // 20)
        self.start = time.monotonic()
        self.step_time_ema: float | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, step_time_s: float, maxvio: float | None = None,
               mfu: float | None = None, incidents: int = 0) -> None:
        ema = self.step_time_ema
        self.step_time_ema = step_time_s if ema is None else 0.9 * ema + 0.1 * step_time_s
        if self.mode == "quiet":
            return
        elapsed = time.monotonic() - self.start
        eta = self.step_time_ema * (self.total - step)
        balance = f"  MaxVio {maxvio:.2f}" if maxvio is not None else ""
        util = f"  MFU {mfu:.1%}" if mfu is not None else ""
        trouble = f"  incidents {incidents}" if incidents else ""
        text = (f"step {step:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}{balance}  "
                f"{_si(tokens_per_s)} tok/s{util}{trouble}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}")
        if self.mode == "bar":
            width = 24
            filled = int(width * step / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            self.stream.flush()
        elif step % self.every == 0 or step in (self.first, self.total):
            self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self.stream.write("\r\x1b[K")
        if self.mode != "quiet":
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()
