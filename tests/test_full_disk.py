"""A full disk, on the real CLI: under checkpoint.dir (a failed save removes its partial folder, the alert
fires and is posted, the failed run still writes its end files) and under run.dir (one line naming the file
and the bytes, nothing torn or half-written left, the run stopped at a committed checkpoint it resumes from).

The disks are small tmpfs mounts where this process may mount (root, as CI runs); elsewhere the storage and
run-directory writers' test hook (orchestrator/runtime/disk.py, ORCHESTRATOR_TEST_DISK_LIMIT) plays the same disk.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path

import pytest

from orchestrator.checkpoint import verify
from orchestrator.runtime.disk import HOOK, DiskFull
from orchestrator.monitoring.rundir import append_line, read_jsonl, write_atomic
from orchestrator.checkpoint.storage import Storage
from tests.test_alerts import Hook

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
ONE = ["cluster.num_devices=1", "data.max_bytes=300000", "run.progress=quiet", "train.eval_batches=1"]


class SmallDisk:
    """A folder of `size` bytes: a tmpfs when mount works, else the test hook (in `env` and this process's)."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        path.mkdir(parents=True)
        try:
            self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                          capture_output=True).returncode == 0
        except OSError:   # no mount command
            self.mounted = False
        self.env = {} if self.mounted else {HOOK: f"{path}={size}"}

    def grow(self, size: int) -> None:
        """Room again: as a user frees space (the next run's env says the hook's new size)."""
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)
        else:
            self.env = {HOOK: f"{self.path}={size}"}

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)


@contextmanager
def small_disk(path: Path, size: int, monkeypatch=None):
    disk = SmallDisk(path, size)
    if monkeypatch is not None:
        for k, v in disk.env.items():
            monkeypatch.setenv(k, v)
    try:
        yield disk
    finally:
        disk.unmount()


def train(run_dir: Path, disk: SmallDisk, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", **disk.env}
    return subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}", *ONE,
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def lines(path: Path) -> list[dict]:
    """Every line of a .jsonl file, parsed: one that does not parse (torn) fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_directory_writes_leave_nothing_torn_on_a_full_disk(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 16 * 1024, monkeypatch) as disk:
        log = disk.path / "metrics.jsonl"
        big = json.dumps({"step": 2, "pad": "x" * 40_000}) + "\n"
        with open(log, "ab", buffering=0) as f:
            append_line(f, log, json.dumps({"step": 1}) + "\n")
            with pytest.raises(DiskFull, match=f"no space left on the disk of {log}: writing it needs {len(big):,} bytes"):
                append_line(f, log, big)
        assert lines(log) == [{"step": 1}]            # what part of the line got written was cut off again
        with pytest.raises(DiskFull, match="status.json: writing it needs 50,000 bytes"):
            write_atomic(disk.path / "status.json", "y" * 50_000)
        assert sorted(p.name for p in disk.path.iterdir()) == ["metrics.jsonl"]   # no status.json.tmp


def test_a_full_checkpoint_disk_fails_saves_cleanly_alerts_and_the_failed_run_writes_its_end_files(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received, Hook.fail_first = [], 0
    run_dir = tmp_path / "run"
    # one checkpoint of this model is 1.6 MB: the first fits the 3 MB disk, the next two do not
    with small_disk(tmp_path / "ckpt", 3 * 2**20) as disk:
        try:
            # saves written before the next step (async_save=false): each outcome is known within its own step
            job = train(run_dir, disk, "train.steps=8", "checkpoint.every_steps=2", "faults.checkpoint_retries=1",
                        "checkpoint.async_save=false", f"checkpoint.dir={disk.path}", "monitor.report=true",
                        f"monitor.webhook_url=http://127.0.0.1:{server.server_port}/hook")
        finally:
            server.shutdown()
        folders = sorted(p.name for run in disk.path.iterdir() for p in run.iterdir() if p.is_dir())   # (run.lock)
    err = job.stderr
    assert job.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(r"run failed: 2 checkpoints in a row failed \(faults.checkpoint_retries=1\).*no space left", err)
    assert folders == ["step_00000002"]   # the failed saves of steps 4 and 5 took their partial folders with them
    # the default checkpoint_failed rule: each failed commit alerts, on stderr, in alerts.jsonl and to the webhook
    assert "ALERT step 4 checkpoint_failed: checkpoint of step 4 not committed" in err
    alerts = [a for a in lines(run_dir / "alerts.jsonl") if "action" in a]
    assert [(a["step"], a["rule"], a["action"]) for a in alerts] == [(4, "checkpoint_failed", "notify"),
                                                                     (5, "checkpoint_failed", "notify")]
    assert sorted((b["step"], b["rule"]) for b in Hook.received) == [(4, "checkpoint_failed"), (5, "checkpoint_failed")]
    # metrics.jsonl: the records say which saves started; commits and failures are events of their own, in order,
    # each after the record of the step it is about
    log = lines(run_dir / "metrics.jsonl")
    records = [r for r in log if "event" not in r]
    assert [r["step"] for r in records if r.get("checkpoint_started")] == [2, 4, 5]
    events = [(e["event"], e["step"]) for e in log if "event" in e]
    assert events == [("checkpoint_committed", 2), ("checkpoint_failed", 4), ("checkpoint_failed", 5)]
    position = {("record", r["step"]): i for i, r in enumerate(log) if "event" not in r}
    assert all(i > position["record", e["step"]] for i, e in enumerate(log) if "event" in e)
    assert "no space left writing" in log[-1]["reason"]
    # the failed run's end files: state and reason in each
    summary = json.loads((run_dir / "summary.json").read_text())
    goodput = json.loads((run_dir / "goodput.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    assert summary["state"] == goodput["state"] == status["state"] == "failed"
    assert "2 checkpoints in a row failed" in summary["reason"] and summary["reason"] == status["reason"]
    assert summary["checkpoints_committed"] == [2] and summary["checkpoints_failed"] == [4, 5]
    assert summary["steps_done"] == 5 and (run_dir / "report.html").is_file()


def test_a_full_run_directory_stops_the_run_at_a_committed_checkpoint_and_it_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    # metrics.jsonl grows by a record a step: this disk is full after a few dozen
    with small_disk(tmp_path / "disk", 48 * 1024) as disk:
        run_dir = disk.path / "run"
        job = train(run_dir, disk, "train.steps=1000", "checkpoint.every_steps=3", f"checkpoint.dir={ckpt}",
                    "monitor.tensorboard=false")
        err = job.stderr
        assert job.returncode == 1 and "Traceback" not in err, err[-3000:]
        failed = err.strip().splitlines()[-1]
        found = re.fullmatch(rf"run failed: no space left on the disk of {run_dir}/(\S+): writing it needs [\d,]+ "
                             rf"bytes, [\d,]+ bytes free there; free space there, or move the run directory to a "
                             rf"disk with room and point run.dir at it; the run stopped, its newest committed "
                             rf"checkpoint is step (\d+): resume with train.resume=latest once there is room", failed)
        assert found, failed
        newest = int(found.group(2))
        assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
        log = lines(run_dir / "metrics.jsonl")       # every line whole
        steps = [r["step"] for r in log if "event" not in r]
        assert steps == list(range(1, len(steps) + 1)) and newest <= steps[-1]
        # the checkpoints on the other disk: committed ones verify, each with its step's record; nothing partial
        [folder] = list(ckpt.iterdir())
        kept = sorted(int(p.name[5:]) for p in folder.iterdir() if p.name.startswith("step_"))
        assert kept and kept[-1] == newest and set(kept) <= set(steps)
        assert all(verify(Storage(str(folder / f"step_{s:08d}")))[1] is None for s in kept)
        # room again: the run goes on from that checkpoint, and every step is recorded once
        disk.grow(2**20)
        resumed = train(run_dir, disk, f"train.steps={newest + 2}", "checkpoint.every_steps=3",
                        f"checkpoint.dir={ckpt}", "monitor.tensorboard=false", "train.resume=latest")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {folder}/step_{newest:08d}" in resumed.stderr
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "event" not in r] == \
            list(range(1, newest + 3))
        assert json.loads((run_dir / "summary.json").read_text())["state"] == "finished"
