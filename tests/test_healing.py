"""Faults healed without a full restart: the run ends bit-identical to the fault-free run, with one
metrics record per step; a fault repeating past its budget stops the run with a clear report."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.driver import Driver
from orchestrator.errors import RunError
from tests.conftest import tiny_config

STEPS = 8
FILES = ("dense.safetensors", "experts-00000.safetensors", "experts-00001.safetensors")


def config(run_dir: Path, *overrides: str):
    return tiny_config(run_dir, f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=0", *overrides)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    return {f"{name}:{k}": v for name in FILES for k, v in load_file(ckpt / name).items()}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def fault_free(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("twin")
    Driver(config(run_dir), run_dir).run()
    return losses(run_dir), final_state(run_dir)


def assert_same_as(twin, run_dir: Path) -> None:
    twin_losses, twin_state = twin
    assert losses(run_dir) == twin_losses  # every step once, bit-identical losses
    state = final_state(run_dir)
    assert state.keys() == twin_state.keys()
    for key, value in twin_state.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("kind,rank", [("kill", 1), ("crash", 0)])
def test_planned_fault_is_healed_and_changes_nothing(fault_free, tmp_path, kind, rank):
    summary = Driver(config(tmp_path, f"faults.plan=[{{step: 5, kind: {kind}, rank: {rank}}}]"), tmp_path).run()
    assert summary.steps_done == STEPS and summary.recoveries == 1
    (incident,) = summary.incidents
    assert (incident["step"], incident["rank"], incident["kind"]) == (5, rank, "dead" if kind == "kill" else "crash")
    assert_same_as(fault_free, tmp_path)


class KillFromOutside(Driver):
    """Before step 5, another program sends SIGKILL to device 1's process (as an operator or the OOM killer would)."""

    def step(self, step):
        if step == 5 and not getattr(self, "killed", False):
            self.killed = True
            subprocess.run(["kill", "-9", str(self.device_info[1]["pid"])], check=True)
        return super().step(step)


def test_external_kill_9_is_healed(fault_free, tmp_path):
    summary = KillFromOutside(config(tmp_path), tmp_path).run()
    assert summary.recoveries == 1 and summary.incidents[0]["kind"] == "dead" and summary.incidents[0]["rank"] == 1
    assert_same_as(fault_free, tmp_path)


def test_fault_repeating_past_its_budget_stops_the_run(ray_session, tmp_path):
    plan = "faults.plan=[{step: 3, kind: kill, rank: 1}, {step: 4, kind: kill, rank: 1}]"
    with pytest.raises(RunError, match=r"1 recoveries already, the budget \(faults.max_recoveries=1\) is spent.*"
                                       r"step 3 device 1 dead; step 4 device 1 dead"):
        Driver(config(tmp_path, plan, "faults.max_recoveries=1"), tmp_path).run()
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]  # what was done is recorded once; nothing after the stop
