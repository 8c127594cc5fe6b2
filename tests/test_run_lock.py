"""One live run per run directory and per checkpoint folder (orchestrator/runtime/runlock.py), with real jobs.

A second `python -m jobs.train` on a live run's directory, or on its checkpoint folder from another run
directory, exits 2 naming the holder and changes nothing of the live run, which then finishes as if alone; of
two jobs started together one runs and the other is refused; a holder killed with SIGKILL is taken over with a
warning; holds are re-entrant in one process (a job, then its Driver.run) and released at the end.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from orchestrator.errors import RunInUse
from orchestrator.runtime.runlock import HOLDER_FILE, LOCK_FILE, hold, hold_run
from tests.conftest import step_records, tiny_config
from tests.test_train_job import wait_gone

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
SMALL = ["cluster.num_devices=1", "data.max_bytes=300000", "run.progress=lines"]
# step 3 takes 25 s on the device (the watch's hang deadline made longer than that): the run is live, and
# writes nothing of its own, while the second jobs try
SLOW_STEP_3 = ["train.steps=6", "checkpoint.every_steps=1", "faults.hang_floor_s=300", "faults.hang_cap_s=300",
               "faults.plan=[{step: 3, kind: slow, rank: 0, steps: 1, delay_s: 25}]"]


def _job(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The train job as a user runs it, on its own local Ray (RAY_ADDRESS emptied), in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                             *SMALL, *overrides], cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})


def _steps(run_dir: Path) -> list[int]:
    """The steps metrics.jsonl records (its checkpoint event lines left out)."""
    return [r["step"] for r in step_records(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_steps(run_dir)) < n:
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}):\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {n} steps after {timeout_s:.0f}s"
        time.sleep(0.2)


def _committed_files(run_dir: Path, folder: Path) -> dict[Path, bytes]:
    """The bytes of the run directory's files (status.json aside: rewritten after every step) and of the run's
    committed checkpoints and the folder's lock files. Left out: tensorboard/ (flushed by a writer thread) and a
    checkpoint still being written (its shards land during the next step, its manifest after it)."""
    files = {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "status.json"}
    files |= {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for step in folder.glob("step_*"):
        if (step / "manifest.json").exists():
            files |= {p: p.read_bytes() for p in step.iterdir()}
    return files


def _since(holder: dict) -> str:
    return datetime.fromtimestamp(holder["since"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stop(proc: subprocess.Popen) -> None:
    """A job the test gives up on, and its own Ray: gone."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in wait_gone(proc.pid, 30):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_second_job_on_a_live_run_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
    run_dir, root, other = tmp_path / "run", tmp_path / "checkpoints", tmp_path / "other"
    first = _job(run_dir, f"checkpoint.dir={root}", *SLOW_STEP_3)
    try:
        _wait_for_steps(first, run_dir, 2)   # step 3, the slow one, is in flight
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        folder = root / run_id
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
        folder_holder = json.loads((folder / HOLDER_FILE).read_text())
        assert (holder["run_id"], holder["pid"]) == (folder_holder["run_id"], folder_holder["pid"]) == (run_id, first.pid)
        before = _committed_files(run_dir, folder)
        assert {"config.yaml", "run.json", "metrics.jsonl", LOCK_FILE, HOLDER_FILE} <= {p.name for p in before}
        assert folder / HOLDER_FILE in before

        # the same command again; and a run in another directory naming the live run's checkpoint folder
        same = _job(run_dir, f"checkpoint.dir={root}", *SLOW_STEP_3)
        shared = _job(other, f"checkpoint.dir={root}", f"run.id={run_id}", "train.steps=4")
        refusals = [p.communicate(timeout=120) for p in (same, shared)]
        who = f"run {run_id} (pid {first.pid} on host {socket.gethostname()}, since "
        assert same.returncode == 2, refusals[0][1][-3000:]
        assert refusals[0][1].splitlines() == [
            f"run directory {run_dir} is in use by {who}{_since(holder)}); wait for it to finish, stop it, or choose "
            f"another run.dir"]
        assert shared.returncode == 2, refusals[1][1][-3000:]
        assert refusals[1][1].splitlines() == [
            f"checkpoint folder {folder} is in use by {who}{_since(folder_holder)}) of run directory {run_dir}; wait "
            f"for it to finish, stop it, or give this run another run.id"]
        # refused while the first run was live and still in its slow step, they changed none of its bytes and
        # added no file; the refused run's own new directory holds only its lock file
        assert first.poll() is None and _steps(run_dir) == [1, 2], "the first run's slow step ended too soon"
        assert {p: p.read_bytes() for p in before} == before
        assert {p for p in run_dir.iterdir() if p.is_file() and p.name != "status.json"} == \
               {p for p in before if p.parent == run_dir}
        assert sorted(os.listdir(other)) == [LOCK_FILE]

        out, err = first.communicate(timeout=300)
    finally:
        _stop(first)
    # the first run then finished as if alone: every step once, its end files, its id everywhere
    assert first.returncode == 0, err[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["steps_done"] == 6
    assert (run_dir / "report.html").stat().st_size > 0
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run_id
    manifests = sorted(folder.glob("step_*/manifest.json"))
    assert manifests and {json.loads(m.read_text())["run_id"] for m in manifests} == {run_id}
    assert not (run_dir / HOLDER_FILE).exists() and not (folder / HOLDER_FILE).exists()   # released


def test_of_two_jobs_started_together_one_runs_and_once_it_is_killed_the_next_takes_over(tmp_path):
    run_dir = tmp_path / "run"
    both = [_job(run_dir, "train.steps=100000") for _ in range(2)]   # runs until killed
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in both):
            assert time.monotonic() < deadline, "neither job was refused"
            time.sleep(0.1)
        (refused,) = [p for p in both if p.poll() is not None]
        (first,) = [p for p in both if p is not refused]
        err = refused.communicate()[1]
        assert refused.returncode == 2, err[-3000:]
        (line,) = err.splitlines()
        assert line.startswith(f"run directory {run_dir} is in use by ") and f"(pid {first.pid} on host " in line
        _wait_for_steps(first, run_dir, 1)
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
        assert holder["pid"] == first.pid and f"run {holder['run_id']} (pid {first.pid}" in line
        first.kill()   # SIGKILL: no release, its record stays; the OS drops its lock
        first.wait()
        assert json.loads((run_dir / HOLDER_FILE).read_text()) == holder
        second = _job(run_dir, "train.steps=3")
        out, err = second.communicate(timeout=300)
    finally:
        for p in both:
            _stop(p)
    assert second.returncode == 0, err[-3000:]
    assert (f"taking over run directory {run_dir} from run {holder['run_id']} (pid {first.pid} on host "
            f"{socket.gethostname()}, since {_since(holder)}), whose process is gone") in err
    assert "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == holder["run_id"]  # run.json's id, kept
    assert _steps(run_dir) == [1, 2, 3] and not (run_dir / HOLDER_FILE).exists()


def _held_by_someone(directory: Path) -> bool:
    """Whether the OS lock is taken (a lock of its own on another descriptor: flock locks are per open file)."""
    probe = FileLock(str(directory / LOCK_FILE))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def test_holds_are_reentrant_in_a_process_and_released_at_the_end(tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, f"checkpoint.dir={tmp_path / 'checkpoints'}")
    with hold_run(cfg, run_dir) as run_id:            # as jobs.train holds ...
        with hold_run(cfg, run_dir, run_id):          # ... and then its Driver.run
            pass
        assert _held_by_someone(run_dir) and _held_by_someone(tmp_path / "checkpoints" / run_id)
        refused = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}"],
                                 cwd=REPO, capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "RAY_ADDRESS": ""})
        assert refused.returncode == 2
        assert f"is in use by run {run_id} (pid {os.getpid()} on host {socket.gethostname()}" in refused.stderr
    assert not _held_by_someone(run_dir) and not _held_by_someone(tmp_path / "checkpoints" / run_id)
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE]   # the record went with the hold
    with caplog.at_level("WARNING"), hold_run(cfg, run_dir):   # a released hold leaves nothing to take over
        pass
    assert "taking over" not in caplog.text


def test_a_record_naming_a_live_process_refuses_although_the_os_lock_is_free(tmp_path):
    """What a filesystem whose flock is a no-op shows: the lock is free, yet its recorded holder runs."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / HOLDER_FILE).write_text(json.dumps({"run_id": "r-1", "run_dir": str(run_dir), "pid": live.pid,
                                                       "host": socket.gethostname(), "since": time.time() + 1}))
        with pytest.raises(RunInUse, match=f"in use by run r-1 \\(pid {live.pid} .*file locks do not hold"):
            with hold(run_dir):
                pass
        assert not _held_by_someone(run_dir)
    finally:
        live.kill()
        live.wait()


def test_a_run_directory_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={tmp_path}/file/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"config error: run directory {tmp_path}/file/run: cannot create or lock it "
                                        f"(Not a directory); choose a writable local path"]
