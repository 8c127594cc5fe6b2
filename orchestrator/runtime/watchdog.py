"""Takes down a private local Ray instance whose driver died without shutting it down (kill -9, the OOM killer).

    python orchestrator/runtime/watchdog.py DRIVER_PID SESSION_DIR RAY_PACKAGE_DIR   (started by `watch`)

Ray's fate sharing takes the GCS, the raylet and the workers down with a driver that dies, but not all of it:
in Ray 2.60 the dashboard agent and the runtime-env agent (children of the raylet, renamed `ray::DashboardAgent`
and `ray::RuntimeEnvAgent`) outlive a driver killed with SIGKILL: still there 30 s later, unmoved by SIGTERM
(seemingly stuck reporting the raylet's death to the GCS, which died too). This watchdog runs beside the
driver in a process session of its own, with the read end of a pipe from it as stdin, and notes the driver's
descendants every second. The driver says `done` on the pipe once it has shut Ray down itself; the watchdog then
exits without acting. When the pipe closes without it (or the driver is gone), it terminates every Ray process
of that session: noted descendants of the driver and processes naming the session directory (command line or
open files; the renamed agents only have their log files there), and their descendants; SIGTERM, then SIGKILL
after GRACE_S. "Ray process": a `ray::` process title or the Ray package in its command line (gcs_server,
raylet, dashboard, agents, log monitor, workers), so a `tail -f` of a session log is left alone; nothing that is
not the driver's descendant or in its session directory is touched (a cluster the job joined has no watchdog).
Only stdlib and psutil are imported: it is started by file path, with nothing else on sys.path.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

POLL_S = 1.0    # how often the driver's descendants are noted and its life checked
GRACE_S = 5.0   # SIGTERM to SIGKILL


class Watchdog:
    """The driver's end of a running watchdog."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        """Ray is shut down: tell the watchdog to exit without acting (and reap it)."""
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it exits once it reads the line; not worth waiting longer for
            pass


def watch(session_dir: str, ray_package_dir: str) -> Watchdog:
    """Start the watchdog of this process's private Ray session (call right after ray.init)."""
    log = Path(session_dir) / "logs" / "job_watchdog.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), session_dir,
                                 ray_package_dir], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    return Watchdog(proc)


# ------------------------------------------------------------------- the watchdog process
def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} watchdog {os.getpid()}: {text}", flush=True)


def _wait_for_driver(driver: Any, stdin: IO[bytes], known: dict[int, Any]) -> bool:
    """Note the driver's descendants until it goes; True if it said `done` (Ray shut down by the driver)."""
    import psutil

    while True:
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready:
            line = stdin.readline()
            if line.strip() == b"done":
                return True
            if not line:  # EOF: the driver's end of the pipe closed, so the driver is gone
                return False
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                return False
            for p in driver.children(recursive=True):
                known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            return False


def _targets(known: dict[int, Any], session_dir: str, ray_dir: str) -> list[Any]:
    """The live Ray processes of the session: noted descendants and processes naming the session directory,
    with their descendants; never this process."""
    import psutil

    names_session = re.compile(re.escape(session_dir.rstrip("/")) + r"(/|$)")
    ray_dir = ray_dir.rstrip("/") + "/"

    def is_ray(p: Any) -> bool:
        cmd = p.cmdline()
        return bool(cmd) and (cmd[0].startswith("ray::") or any(a.startswith(ray_dir) for a in cmd))

    def in_session(p: Any) -> bool:
        return (any(names_session.search(a) for a in p.cmdline())
                or any(names_session.match(f.path) for f in p.open_files()))

    found: dict[int, Any] = {}
    for p in list(known.values()) + list(psutil.process_iter()):
        if p.pid == os.getpid() or p.pid in found:
            continue
        try:
            if p.is_running() and is_ray(p) and (p.pid in known and known[p.pid] == p or in_session(p)):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found.setdefault(c.pid, c)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _take_down(known: dict[int, Any], session_dir: str, ray_dir: str) -> None:
    import psutil

    for _ in range(3):  # again, for what was started while the first round went down
        targets = _targets(known, session_dir, ray_dir)
        if not targets:
            return
        _say("terminating " + ", ".join(f"{p.pid} ({_name(p)})" for p in targets))
        for p in targets:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(targets, timeout=GRACE_S)
        for p in alive:
            _say(f"killing {p.pid} ({_name(p)}): still there {GRACE_S:g}s after SIGTERM")
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=GRACE_S)


def _name(p: Any) -> str:
    try:
        return p.name()
    except Exception:
        return "?"


def main(argv: list[str]) -> int:
    import psutil

    driver_pid, session_dir, ray_dir = int(argv[0]), argv[1], argv[2]
    known: dict[int, Any] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        done = False
    else:
        done = _wait_for_driver(driver, sys.stdin.buffer, known)
    if done:
        return 0
    _say(f"driver {driver_pid} is gone without shutting down its Ray session {session_dir}")
    _take_down(known, session_dir, ray_dir)
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
