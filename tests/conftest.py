"""One Ray instance per test session, on loopback, with token authentication as Ray sets it up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.config import Config, load_config

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind the local instance to 127.0.0.1


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def step_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's step records, in order (its checkpoint event lines left out)."""
    from orchestrator.monitoring.rundir import read_jsonl, records

    return records(read_jsonl(Path(run_dir) / "metrics.jsonl"))


def assert_same_checkpoint(run_a, run_b, step: int) -> None:
    """The checkpoints of `step` of two runs hold the same keys and every tensor bit for bit."""
    import torch

    from orchestrator.checkpoint.storage import Storage
    from orchestrator.checkpoint.tools import read_state

    a = read_state(Storage(str(run_a / "checkpoints" / f"step_{step:08d}")))
    b = read_state(Storage(str(run_b / "checkpoints" / f"step_{step:08d}")))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def tiny_config(tmp_path: Path | None = None, *overrides: str, snapshot_every_step: bool = True) -> Config:
    """A model small enough for the test suite; still has dense and MoE layers, shared expert, top-2.
    `snapshot_every_step`: an in-memory snapshot after every step (faults.snapshot_every=1), so the healing tests'
    rewinds go to the step before a fault; False leaves the default cadence (tests/test_healing_cadence.py)."""
    base = ["model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.num_experts=4", "model.top_k=2",
            "model.expert_dim=32", "model.dense_dim=64", "model.first_k_dense=1", "model.max_seq_len=64",
            "data.seq_len=32", "data.max_bytes=300000", "train.steps=4", "train.global_batch_size=8",
            "train.lr=1e-2", "train.warmup_steps=1", "train.eval_batches=1", "cluster.cpus_per_device=0.5",
            "cluster.num_devices=1", "run.progress=quiet", "monitor.report=false"]
    if snapshot_every_step:
        base.append("faults.snapshot_every=1")
    if tmp_path is not None:
        base.append(f"run.dir={tmp_path}")
    if any(o.startswith(("model.hf_path=", "model.hf_config=")) for o in overrides):  # its config.json is the model
        base = [b for b in base if not b.startswith("model.")]
    return load_config(None, base + list(overrides))
