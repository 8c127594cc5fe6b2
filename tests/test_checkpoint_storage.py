"""Checkpoints on S3: a real S3-compatible server (moto's) on 127.0.0.1, the real job, save and resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from orchestrator.checkpoint.tools import describe
from orchestrator.parallel.groups import free_port
from tests.conftest import step_records

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port("127.0.0.1"), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", **{k.lower(): v for k, v in CREDENTIALS.items()
                                                               if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket="ckpt")
    yield f"{host}:{port}"
    server.stop()


def train(run_dir: Path, *overrides: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", **CREDENTIALS, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(TINY), f"run.dir={run_dir}",
                           "run.progress=lines", "train.eval_batches=0", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_s3_round_trip_save_and_resume(s3_endpoint, tmp_path, monkeypatch):
    """A run's checkpoints go to <checkpoint.dir>/<run.id>; another machine (another run directory) continues the
    run by naming it (train.resume=latest picks the newest checkpoint of that run only)."""
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    uri, run = f"s3://ckpt/runs{query}", f"s3://ckpt/runs/r1{query}"
    first = train(tmp_path / "a", f"checkpoint.dir={uri}", "run.id=r1", "checkpoint.every_steps=3", "train.steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    rows = describe(run)
    assert [(r["step"], r["status"], r["world_size"]) for r in rows] == [(3, "verified", 2), (6, "verified", 2)]

    second = train(tmp_path / "b", f"checkpoint.dir={uri}", "run.id=r1", "train.steps=9", "train.resume=latest",
                   "cluster.num_devices=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from s3://ckpt/runs/r1/step_00000006" in second.stderr
    resumed = step_records(tmp_path / "b")
    assert [r["step"] for r in resumed] == [7, 8, 9]
    assert [r["step"] for r in describe(run)] == [3, 6, 9]


def test_unreachable_storage_is_a_clear_error_before_training(tmp_path):
    dead = f"s3://ckpt/x?endpoint_override=127.0.0.1:{free_port('127.0.0.1')}&scheme=http&region=us-east-1"
    proc = train(tmp_path / "run", f"checkpoint.dir={dead}", "train.steps=2",
                 env_extra={"AWS_EC2_METADATA_DISABLED": "true"})
    assert proc.returncode == 1
    # the run's folder under checkpoint.dir: s3://ckpt/x/<run id>?endpoint_override=...
    assert "run failed: could not reach or create . under s3://ckpt/x/tiny-" in proc.stderr
    assert "?endpoint_override=127.0.0.1" in proc.stderr and "HeadBucket" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or (tmp_path / "run" / "metrics.jsonl").read_text() == ""
