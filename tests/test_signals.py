"""Stop signals and a killed driver: exit codes, the run's end files, nothing of the job's own Ray left behind.

The single SIGTERM (graceful stop with a final checkpoint, exit 143) is test_train_job's
test_sigterm_stops_cleanly_after_the_step_in_flight; here: the gate's rules in-process, a second SIGTERM
on the real CLI, and kill -9 of a driver that started its own Ray.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.runtime import signals
from orchestrator.checkpoint import verify
from orchestrator.errors import Interrupted
from orchestrator.checkpoint.storage import Storage

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
SMALL = ["cluster.num_devices=1", "data.max_bytes=300000", "run.progress=lines", "train.steps=100000"]


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs in this (main) thread at the next bytecode, or interrupts the sleep


def test_first_signal_stops_gracefully_the_second_interrupts_later_ones_wait(capfd):
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    stops = []
    with signals.job_signals() as gate:
        undo = signals.on_stop(stops.append)
        _signal_self(signal.SIGTERM)
        assert stops == ["SIGTERM"]                      # the step loop's graceful stop, nothing raised
        with pytest.raises(Interrupted) as caught:
            _signal_self(signal.SIGTERM)
        e = caught.value
        assert isinstance(e, KeyboardInterrupt)          # what Ray's ray.get/ray.wait give way to
        assert (e.exit_code, e.describe()) == (143, "SIGTERM, then SIGTERM")
        assert signals.interrupted(KeyboardInterrupt()) is e  # as Ray re-raises it: found again
        _signal_self(signal.SIGINT)                      # a third one: noted, nothing raised
        undo()
        assert gate.received == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after the step in flight" in err
    assert "SIGTERM again: interrupting now" in err and "SIGINT: already stopping" in err


def test_a_signal_where_no_step_loop_listens_interrupts_at_once():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    with signals.job_signals():
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(s))  # what ray.init does: exit code 15, no end work
        signals.reinstall()
        with pytest.raises(Interrupted) as caught:
            _signal_self(signal.SIGTERM)
        assert (caught.value.exit_code, caught.value.describe()) == (143, "SIGTERM")
    with signals.job_signals():
        with pytest.raises(Interrupted) as caught:
            _signal_self(signal.SIGINT)
        assert caught.value.exit_code == 130
    # a Driver run outside any job installs the gate for its run() only
    stops = []
    undo = signals.on_stop(stops.append)
    _signal_self(signal.SIGINT)
    undo()
    assert stops == ["SIGINT"]
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before


def test_two_signals_while_the_main_thread_is_blocked_in_c_both_count():
    """Ray's waits block the main thread in C, where CPython cannot run a handler: a signal only trips a flag (one
    per signal number), and two SIGINTs were one. Here two SIGINTs, 50 ms apart, are delivered to another thread
    (as the kernel may deliver them to Ray's) while the main thread is blocked in read(2): the first stops
    gracefully, the second interrupts, as when they come apart."""
    stops: list[str] = []
    r, w = os.pipe()
    main = threading.get_native_id()

    def main_blocked_in_read() -> bool | None:
        try:
            fields = Path(f"/proc/self/task/{main}/syscall").read_text().split()
        except OSError:
            return None   # no /proc: the sender gives the main thread a moment instead
        return len(fields) > 1 and fields[1] == hex(r)

    def sender() -> None:
        deadline = time.monotonic() + 30
        while main_blocked_in_read() is False and time.monotonic() < deadline:
            time.sleep(0.01)
        if main_blocked_in_read() is None:
            time.sleep(0.5)
        me = threading.get_ident()
        signal.pthread_kill(me, signal.SIGINT)
        time.sleep(0.05)
        signal.pthread_kill(me, signal.SIGINT)
        time.sleep(0.05)
        os.write(w, b"x")   # the main thread's read returns: now the handler runs, once

    with signals.job_signals() as gate:
        undo = signals.on_stop(stops.append)
        thread = threading.Thread(target=sender)
        thread.start()
        try:
            with pytest.raises(Interrupted) as caught:
                os.read(r, 1)
                time.sleep(0.5)   # the handler runs at the first bytecode after the read
        finally:
            undo()
            thread.join()
            os.close(r)
            os.close(w)
    assert stops == ["SIGINT"] and gate.received == [signal.SIGINT, signal.SIGINT]
    assert caught.value.describe() == "SIGINT, then SIGINT" and caught.value.exit_code == 130


# ------------------------------------------------------------------------------- the real CLI
def _start(run_dir: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """The train job as a user runs it, on its own local Ray (RAY_ADDRESS emptied: the test session's Ray and
    any other cluster are not joined), in a process session of its own; stderr into a file read while it runs."""
    err = run_dir.parent / f"{run_dir.name}.stderr"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                             *SMALL, *overrides], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), env={**os.environ, "RAY_ADDRESS": ""})
    return proc, err


def _wait_for(proc: subprocess.Popen, err: Path, ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {what}:\n{err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f}s:\n{err.read_text()[-3000:]}"
        time.sleep(0.1)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "event" not in r] if path.exists() else []


def _in_session(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of process session `sid`."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except OSError:
            continue
    return found


def test_second_sigterm_interrupts_the_step_in_flight_and_the_end_files_are_written(tmp_path):
    run_dir = tmp_path / "run"
    # step 3 takes 100 s on the device (the watch's deadline is made longer): both signals come during it
    proc, err = _start(run_dir, "monitor.report=true", "faults.hang_floor_s=300", "faults.hang_cap_s=300",
                       "faults.plan=[{step: 3, kind: slow, rank: 0, steps: 1, delay_s: 100}]")
    try:
        _wait_for(proc, err, lambda: len(_steps(run_dir)) == 2, 180, "two steps")
        proc.send_signal(signal.SIGTERM)
        _wait_for(proc, err, lambda: "SIGTERM: stopping after the step in flight" in err.read_text(), 30,
                  "note of the first SIGTERM")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # a third one once the second is handled (sent sooner, two pending signals are one), during the end work
        _wait_for(proc, err, lambda: "SIGTERM again: interrupting now" in err.read_text(), 30, "the interruption")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert waited < 60, f"the second SIGTERM did not stop the 100 s step at once ({waited:.0f}s)"
    assert "started a local Ray instance" in text and "Traceback" not in text, text[-3000:]
    assert "interrupted (SIGTERM, then SIGTERM)" in text
    assert "SIGTERM: already stopping" in text  # the third: noted, the end work went on
    status = json.loads((run_dir / "status.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 2
    assert _steps(run_dir) == [1, 2] and summary["steps_done"] == 2
    assert summary["stopped_by_signal"] == "SIGTERM"
    assert summary["checkpoints_committed"] == []  # interrupted: no graceful checkpoint after step 2
    assert (run_dir / "report.html").is_file(), text[-3000:]
    assert f"{run_dir}: written status.json, summary.json, goodput.json, report.html" in text
    assert "not written" not in text
    assert _in_session(proc.pid) == []  # its Ray went down with it (the normal way: ray.shutdown)


def test_kill_9_of_the_driver_leaves_nothing_of_its_own_ray(tmp_path):
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir)
    try:
        _wait_for(proc, err, lambda: len(_steps(run_dir)) >= 1, 180, "a step")
        text = err.read_text()
        assert "started a local Ray instance" in text, text[-3000:]
        session_dir, watchdog = re.search(r"ray: session (\S+); watchdog pid (\d+)", text).groups()
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes, workers, the watchdog
        names = {p.name() for p in started}
        assert {"gcs_server", "raylet"} <= names and int(watchdog) in {p.pid for p in started}, names
    finally:
        proc.kill()
        proc.wait()

    def left() -> list[str]:
        alive = {p.pid: p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        alive.update({p.pid: p for p in _in_session(proc.pid)})
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(session_dir in a for a in p.info["cmdline"] or []):
                alive[p.pid] = p
        return [f"{pid} {p.name()}" for pid, p in alive.items() if p.is_running()]

    deadline = time.monotonic() + 30
    while (lingering := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    log = Path(session_dir) / "logs" / "job_watchdog.log"
    assert lingering == [], f"still running: {lingering}; watchdog log:\n{log.read_text() if log.exists() else '-'}"
    assert "is gone without shutting down its Ray session" in log.read_text()


def _events(run_dir: Path) -> list[tuple[str, int]]:
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(r["event"], r["step"]) for r in lines if "event" in r]


# 300 validation batches: the end of a run (final checkpoint, validation, results) lasts while the signals land
LATE = ["train.steps=3", "train.eval_batches=300", "monitor.report=true"]


def test_a_sigint_once_every_step_finished_leaves_the_run_finished(tmp_path):
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, *LATE)
    try:
        _wait_for(proc, err, lambda: 3 in _steps(run_dir), 180, "the last step")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "SIGINT: every step has finished; the run ends as a finished one" in text and "Traceback" not in text
    status = json.loads((run_dir / "status.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert status["state"] == summary["state"] == "finished" and summary["stopped_by_signal"] is None
    assert summary["val_loss"] is not None and status["val_loss"] == summary["val_loss"]   # validated
    assert summary["checkpoints_committed"] == [3] and ("checkpoint_committed", 3) in _events(run_dir)


def test_two_quick_sigints_after_the_final_commit_interrupt_and_status_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, *LATE)
    try:
        _wait_for(proc, err, lambda: ("checkpoint_committed", 3) in _events(run_dir), 180, "the final commit")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)   # the driver is blocked in the validation's ray.get: both must count
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted (SIGINT, then SIGINT)" in text and "Traceback" not in text
    status = json.loads((run_dir / "status.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert status["state"] == summary["state"] == "interrupted"   # as README promises, after the commit too
    assert status["reason"] == summary["reason"] == "SIGINT, then SIGINT: interrupted after step 3"
    assert summary["val_loss"] is None                             # the validation was cut short
    assert summary["checkpoints_committed"] == [3]                 # the committed checkpoint stays
    assert verify(Storage(str(run_dir / "checkpoints" / "step_00000003")))[1] is None
