"""The train job end to end, as a user runs it: its own local Ray, real actors, the run directory."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.runtime import cluster
from orchestrator.checkpoint import verify
from orchestrator.checkpoint.storage import Storage
from orchestrator.config import load_config
from tests.conftest import step_records

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _ip(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (host byte order per 32-bit word)."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening_sockets(sid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listening in a process of session `sid`."""
    listen: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                ip = _ip(addr)
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                listen[inode] = (str(ip), int(port, 16))
    found = []
    for pid in session_processes(sid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listen:
                found.append(listen[target[8:-1]])
    return found


def assert_only_loopback(sid: int) -> list[tuple[str, int]]:
    """Every listening socket of the session's processes is on loopback (and there are some)."""
    sockets = listening_sockets(sid)
    assert sockets, "found no listening socket: the check would prove nothing"
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    return sockets


def job_servers(sockets: list[tuple[str, int]], token: str | None = None) -> list[int]:
    """Ports among `sockets` that serve Ray's job API: GET /api/jobs/ (with the token, if any) answers a JSON list."""
    found = []
    for host, port in sockets:
        request = urllib.request.Request(f"http://{host}:{port}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if isinstance(json.loads(r.read()), list):
                    found.append(port)
        except Exception:  # not HTTP (gRPC, gloo, the store), another HTTP server, or nothing there
            pass
    return found


def wait_gone(sid: int, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_train_job_runs_on_its_own_ray_and_loss_goes_down(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                             "train.steps=40", "cluster.num_devices=2"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "started a local Ray instance" in err and "done: 40 steps" in out
    records = step_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    cfg = load_config(None, [])
    for r in records:
        assert {"step", "loss", "tokens_per_s", "step_time_s", "expert_load"} <= r.keys()
        assert len(r["expert_load"]) == 1 and len(r["expert_load"][0]) == 4       # 1 MoE layer, 4 experts
        assert sum(r["expert_load"][0]) == 8 * 64 * 2                            # every token, top-2
    first, last5 = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last5 < first - 1.0, f"loss did not go down: {first:.3f} -> {last5:.3f}"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.train.steps == 40 and saved.cluster.num_devices == 2 and saved.model.num_experts == 4
    assert cfg.seed == saved.seed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 40 and summary["val_loss"] < first
    assert wait_gone(proc.pid) == []  # its Ray instance and actors went with it


def test_sigterm_stops_cleanly_after_the_step_in_flight(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                             "train.steps=100000"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    # the job's own Ray (GCS, raylet, workers, dashboard and agents, the rendezvous store, gloo) listens on
    # loopback only: nothing of it, job APIs included, can be reached from the network
    assert_only_loopback(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping after step" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM"
    steps = [r["step"] for r in step_records(run_dir)]
    assert steps == list(range(1, summary["steps_done"] + 1))  # every finished step recorded, once
    # Graceful stop: a final checkpoint of the last finished step, committed and verified.
    assert summary["checkpoints_committed"] == [summary["steps_done"]]
    final = Storage(str(run_dir / "checkpoints" / f"step_{summary['steps_done']:08d}"))
    manifest, problem = verify(final)
    assert problem is None and manifest.step == summary["steps_done"]
    assert wait_gone(proc.pid) == []


def test_stale_cluster_file_is_not_joined(tmp_path, monkeypatch):
    stale = tmp_path / "ray_current_cluster"
    stale.write_text(f"127.0.0.1:{_dead_port()}")
    monkeypatch.setattr(cluster, "CURRENT_CLUSTER_FILE", stale)
    assert cluster.live_local_cluster() is None
    monkeypatch.setattr(cluster, "CURRENT_CLUSTER_FILE", tmp_path / "absent")
    assert cluster.live_local_cluster() is None


def _dead_port() -> int:
    from orchestrator.parallel.groups import free_port
    return free_port("127.0.0.1")


@contextmanager
def local_head(env: dict, port: int, *options: str):
    """A `ray start --head --block` on 127.0.0.1 (its own process session) for the `with` block; then SIGTERM, which
    stops everything it started, the cluster file put back as it was, and no process of it left."""
    previous = cluster.CURRENT_CLUSTER_FILE.read_text() if cluster.CURRENT_CLUSTER_FILE.exists() else None
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", f"--port={port}", "--num-cpus=2", *options],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield head
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops everything it started on SIGTERM
        head.wait(timeout=60)
        if previous is None:
            cluster.CURRENT_CLUSTER_FILE.unlink(missing_ok=True)
        else:
            cluster.CURRENT_CLUSTER_FILE.write_text(previous)
    assert wait_gone(head.pid) == []


def test_train_job_joins_a_running_local_cluster_with_token_auth(tmp_path):
    """`ray start --head` (token auth on) is running: the job joins it instead of starting its own."""
    from orchestrator.parallel.groups import free_port

    port = free_port("127.0.0.1")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}
    with local_head({**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, port, "--include-dashboard=false") as head:
        deadline = time.monotonic() + 90
        while cluster.live_local_cluster() != f"127.0.0.1:{port}":
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the job must find its own way to loopback
        run_dir = tmp_path / "run"
        job = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                              "train.steps=5", "train.eval_batches=0"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert job.returncode == 0, job.stderr[-3000:]
        assert f"joined the local cluster at 127.0.0.1:{port}" in job.stderr
        assert len(step_records(run_dir)) == 5
