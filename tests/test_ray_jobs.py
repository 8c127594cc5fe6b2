"""Ray Jobs end to end, as a cluster user runs it: a real `ray start --head` on 127.0.0.1 with token
authentication, the real `ray job submit` CLI uploading this repository as the working dir with the documented
runtime_env (cluster_configs/runtime_env.yaml); a train job runs to SUCCEEDED, the chaos job (a device killed and
healed, then the fault-free twin) to SUCCEEDED, a third is stopped with `ray job stop` and leaves a final committed
checkpoint. The head listens on loopback only, the token appears in no run directory, log or CLI output, and every
process the test starts is gone at the end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.checkpoint import verify
from orchestrator.checkpoint.storage import Storage
from tests.conftest import step_records
from tests.test_train_job import REPO, assert_only_loopback, job_servers, local_head

RAY = str(Path(sys.executable).parent / "ray")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _job(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([RAY, "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out.stdout, out.stderr = ANSI.sub("", out.stdout), ANSI.sub("", out.stderr)   # the CLI colours its output
    return out


def _submit(env: dict, address: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (the job server answers first)."""
    deadline = time.monotonic() + 120
    while True:
        out = _job(env, "submit", "--address", address, "--working-dir", ".",
                   "--runtime-env", "cluster_configs/runtime_env.yaml", *args)
        if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
            return out
        time.sleep(2)


def _job_id(out: subprocess.CompletedProcess) -> str:
    return next(w for line in (out.stdout + out.stderr).splitlines() for w in line.replace("'", " ").split()
                if w.startswith("raysubmit_"))


# The submissions are about Ray's job server, not the model: tiny.yaml's model and corpus shrunk to the suite's size.
SMALLER = ["model.dim=32", "model.expert_dim=32", "model.dense_dim=64", "data.seq_len=32", "data.max_bytes=300000"]


def test_ray_job_submit_succeeds_and_ray_job_stop_leaves_a_final_checkpoint(tmp_path):
    from orchestrator.parallel.groups import free_port

    port, dash, agent, agent_grpc, metrics, runtime_env = (free_port("127.0.0.1") for _ in range(6))
    # The head's workers and the job entrypoint use this venv's python; a graceful stop gets 30 s before SIGKILL.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    address = f"http://127.0.0.1:{dash}"
    # the test session's own Ray holds the default agent ports: this head's job agent must not collide with them
    # (else submissions fail with "No available agent")
    with local_head(env, port, "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}") as head:
        deadline = time.monotonic() + 120
        while _job(env, "list", "--address", address, timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the head's job server did not come up"
            time.sleep(1)
        # 1. submit, wait, SUCCEEDED; the run directory as the job wrote it
        done = tmp_path / "done"
        t0 = time.time()
        sub = _submit(env, address, "--", "python", "-m", "jobs.train", "--config", "jobs/configs/tiny.yaml",
                      f"run.dir={done}", "train.steps=6", "train.eval_batches=0", *SMALLER)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "succeeded" in _job(env, "status", "--address", address, _job_id(sub)).stdout
        records = step_records(done)
        assert [r["step"] for r in records] == list(range(1, 7))
        assert json.loads((done / "status.json").read_text())["state"] == "finished"
        first_step_s = records[0]["time"] - t0
        outputs = [sub.stdout + sub.stderr]
        # 1b. the chaos job: a device killed at step 4 heals; the state ends as the fault-free twin's
        chaos = tmp_path / "chaos"
        sub = _submit(env, address, "--", "python", "-m", "jobs.chaos", "--config", "jobs/configs/tiny.yaml",
                      f"run.dir={chaos}", "train.steps=6", "train.eval_batches=0", "run.progress=lines",
                      "faults.plan=[{step: 4, kind: kill, rank: 1}]", *SMALLER)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        outputs.append(sub.stdout + sub.stderr)
        assert "succeeded" in _job(env, "status", "--address", address, _job_id(sub)).stdout
        report = json.loads((chaos / "chaos_report.json").read_text())
        assert report["identical_losses"] and report["identical_state"] and report["recoveries"] == 1, report
        # 2. submit without waiting, stop it once it trains: graceful stop, final checkpoint committed
        stopped = tmp_path / "stopped"
        sub = _submit(env, address, "--no-wait", "--", "python", "-m", "jobs.train", "--config",
                      "jobs/configs/tiny.yaml", f"run.dir={stopped}", "train.steps=100000", "train.eval_batches=0",
                      "run.progress=lines", *SMALLER)
        assert sub.returncode == 0, sub.stderr[-3000:]
        job_id = _job_id(sub)
        deadline = time.monotonic() + 180
        while not (stopped / "metrics.jsonl").exists() or len((stopped / "metrics.jsonl").read_text().splitlines()) < 10:
            assert time.monotonic() < deadline, _job(env, "logs", "--address", address, job_id).stdout[-3000:]
            time.sleep(0.5)
        t_stop = time.monotonic()
        assert _job(env, "stop", "--address", address, job_id).returncode == 0
        stop_s = time.monotonic() - t_stop
        status = _job(env, "status", "--address", address, job_id).stdout
        assert "stopped" in status, status
        logs = _job(env, "logs", "--address", address, job_id).stdout
        assert "stopping after step" in logs and "step " in logs   # readable progress in `ray job logs`
        summary = json.loads((stopped / "summary.json").read_text())
        assert summary["stopped_by_signal"] == "SIGTERM"
        last = summary["checkpoints_committed"][-1]
        assert last == summary["steps_done"] and last >= 10
        manifest, problem = verify(Storage(str(stopped / "checkpoints")).child(f"step_{last:08d}"))
        assert problem is None and manifest.step == last
        assert json.loads((stopped / "status.json").read_text())["state"] == "stopped"
        outputs += [sub.stdout + sub.stderr, logs, status]
        # security: the job server and everything else of the head listen on loopback; the token leaks nowhere
        token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 16
        sockets = assert_only_loopback(head.pid)
        assert job_servers(sockets, token) == [dash]   # the job server is where we put it (and the check sees one)
        assert job_servers([("127.0.0.1", dash)]) == []  # ... and wants the token
        leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
        assert not leaks and not [o for o in outputs if token in o], f"the auth token was written to {leaks}"
        (tmp_path / "timings.json").write_text(json.dumps({"submit_to_first_step_s": first_step_s,
                                                           "stop_to_exit_s": stop_s}))
        print(f"submit -> first step {first_step_s:.1f}s, ray job stop -> stopped {stop_s:.1f}s")
