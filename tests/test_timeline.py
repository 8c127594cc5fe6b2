"""Issue 13's faults, each as the input that showed it and the right value asserted: checkpoint commits that
survive faults (1), one timeline per run directory and per run (2), exact resumes (3), a resume with nothing to
do (4), a torn metrics line (5), bounded driver state (8)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from orchestrator.checkpoint import list_checkpoints, read_manifest
from orchestrator.checkpoint.tools import differences, read_state
from orchestrator.driver import Driver
from orchestrator.errors import RunError
from orchestrator.monitoring.rundir import read_jsonl
from orchestrator.device.schedule import lr_at
from orchestrator.checkpoint.storage import Storage
from tests.conftest import step_records, tiny_config

REPO = Path(__file__).resolve().parent.parent
TWO = ("cluster.num_devices=2", "train.eval_batches=0")


def steps_of(run_dir: Path, name: str = "metrics.jsonl") -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / name) if "event" not in r]


def committed(root: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(Storage(str(root)))]


def manifest(root: Path, step: int):
    return read_manifest(Storage(str(root / f"step_{step:08d}")), str(root))


# ----------------------------------------------------------------- 1: commits that survive faults
@pytest.mark.parametrize("async_save", ["true", "false"])
def test_checkpoint_commits_although_the_next_step_fails(ray_session, tmp_path, async_save):
    """A kill in step 11 used to leave checkpoint 10 uncommitted forever (its commit rode on step 11's reports)."""
    run_dir = tmp_path / "run"
    summary = Driver(tiny_config(run_dir, *TWO, "train.steps=30", "checkpoint.every_steps=10", "checkpoint.keep_last=0",
                                 f"checkpoint.async_save={async_save}", "faults.plan=[{step: 11, kind: kill, rank: 1}]"),
                     run_dir).run()
    assert summary.checkpoints_committed == [10, 20, 30] and summary.checkpoints_failed == []
    assert committed(run_dir / "checkpoints") == [10, 20, 30]


def test_a_run_stopped_by_its_budget_resumes_from_the_checkpoint_before_the_fault(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    plan = "faults.plan=[{step: 11, kind: kill, rank: 1}, {step: 15, kind: kill, rank: 0}]"
    with pytest.raises(RunError, match="budget"):
        Driver(tiny_config(run_dir, *TWO, "train.steps=30", "checkpoint.every_steps=10", "checkpoint.keep_last=0",
                           plan, "faults.max_recoveries=1"), run_dir).run()
    assert committed(run_dir / "checkpoints") == [10]
    summary = Driver(tiny_config(run_dir, *TWO, "train.steps=16", "checkpoint.every_steps=10", "train.resume=latest"),
                     run_dir).run()
    assert summary.resumed_from_step == 10 and steps_of(run_dir) == list(range(1, 17))


class LoseDeviceAtTheEnd(Driver):
    """Device 1 dies just before the final checkpoint is taken: its snapshot is never taken."""

    def save_checkpoint(self, step):
        if step == self.cfg.train.steps and not getattr(self, "killed", False):
            self.killed = True
            ray.kill(self.actors[1], no_restart=True)
        super().save_checkpoint(step)


def test_a_device_lost_during_the_final_checkpoint_is_healed_and_the_checkpoint_retaken(ray_session, tmp_path):
    twin = tmp_path / "twin"
    Driver(tiny_config(twin, *TWO, "train.steps=6"), twin).run()
    run_dir = tmp_path / "run"
    summary = LoseDeviceAtTheEnd(tiny_config(run_dir, *TWO, "train.steps=6"), run_dir).run()
    assert summary.checkpoints_failed == [6] and summary.checkpoints_committed == [6]
    assert summary.recoveries == 1 and [i["kind"] for i in summary.incidents] == ["checkpoint", "dead"]
    assert steps_of(run_dir) == list(range(1, 7))
    final = lambda d: read_state(Storage(str(d / "checkpoints" / "step_00000006")))  # noqa: E731
    assert differences(final(run_dir), final(twin)) == []


class LoseDeviceAfterTheFinalCommit(Driver):
    """Device 1 dies after the final checkpoint committed, before the final validation."""

    def finish_checkpoints(self):
        failed = super().finish_checkpoints()
        if self.last_step == self.cfg.train.steps and not getattr(self, "killed", False):
            self.killed = True
            ray.kill(self.actors[1], no_restart=True)
        return failed


def test_a_device_lost_after_the_final_checkpoint_is_healed_before_validation(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    summary = LoseDeviceAfterTheFinalCommit(tiny_config(run_dir, "cluster.num_devices=2", "train.steps=4",
                                                        "train.eval_batches=1"), run_dir).run()
    assert summary.checkpoints_committed == [4] and summary.recoveries == 1 and summary.val_loss is not None
    assert steps_of(run_dir) == [1, 2, 3, 4]


# ----------------------------------------------------------------- 2: one timeline
def test_resuming_from_an_older_checkpoint_starts_a_new_timeline(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = (*TWO, "checkpoint.every_steps=4", "faults.plan=[{step: 6, kind: nan, rank: 1}]")
    first = Driver(tiny_config(run_dir, *args, "train.steps=12"), run_dir).run()
    assert first.checkpoints_committed == [4, 8, 12]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    second = Driver(tiny_config(run_dir, *args, "train.steps=10", "train.lr=1e-3",
                                f"train.resume={ckpts / 'step_00000004'}"), run_dir).run()
    assert second.resumed_from_step == 4 and second.run_id == run_id
    assert committed(ckpts) == [4, 8, 10]                                    # 4 kept, 8 and 12 of the old timeline gone
    (retired,) = (ckpts / "retired").iterdir()
    assert sorted(p.name for p in retired.iterdir()) == ["step_00000008", "step_00000012"]
    assert steps_of(run_dir) == list(range(1, 11))
    assert [i["step"] for i in read_jsonl(run_dir / "incidents.jsonl")] == [6]     # once, from the live timeline
    assert [(a["step"], a["rule"]) for a in read_jsonl(run_dir / "alerts.jsonl")] == [(6, "nonfinite")]
    assert manifest(ckpts, 8).parent == {"run_id": run_id, "step": 4}
    assert manifest(ckpts, 10).parent == {"run_id": run_id, "step": 8}
    assert manifest(ckpts, 4).parent is None

    third = Driver(tiny_config(run_dir, *args, "train.steps=14", "train.lr=1e-3", "train.resume=latest"), run_dir).run()
    assert third.resumed_from_step == 10                                          # not the abandoned 12
    assert steps_of(run_dir) == list(range(1, 15))                                # no hole


def test_runs_sharing_a_checkpoint_dir_keep_their_own_checkpoints(ray_session, tmp_path):
    root = tmp_path / "shared"
    a, b = tmp_path / "a", tmp_path / "b"
    Driver(tiny_config(a, *TWO, f"checkpoint.dir={root}", "checkpoint.every_steps=4", "train.steps=12"), a).run()
    id_a = json.loads((a / "run.json").read_text())["run_id"]
    before = {p: p.read_bytes() for p in (root / id_a).rglob("*") if p.is_file()}
    Driver(tiny_config(b, *TWO, f"checkpoint.dir={root}", "checkpoint.every_steps=4", "train.steps=8", "seed=5"), b).run()
    id_b = json.loads((b / "run.json").read_text())["run_id"]
    assert id_a != id_b and committed(root / id_a) == [4, 8, 12] and committed(root / id_b) == [4, 8]
    assert {p: p.read_bytes() for p in (root / id_a).rglob("*") if p.is_file()} == before   # A untouched
    resumed = Driver(tiny_config(b, *TWO, f"checkpoint.dir={root}", "train.steps=10", "seed=5", "train.resume=latest"),
                     b).run()
    assert resumed.resumed_from_step == 8                                          # B's own, not A's step 12
    assert manifest(root / id_b, 10).run_id == id_b


def test_a_run_continuing_another_runs_checkpoint_starts_its_own_timeline(ray_session, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    Driver(tiny_config(a, *TWO, "checkpoint.every_steps=4", "train.steps=8"), a).run()
    Driver(tiny_config(b, *TWO, "checkpoint.every_steps=4", "train.steps=8", "seed=3"), b).run()
    summary = Driver(tiny_config(b, *TWO, "train.steps=6", f"train.resume={a / 'checkpoints' / 'step_00000004'}"),
                     b).run()
    assert summary.resumed_from_step == 4
    assert steps_of(b) == [5, 6]                                   # b's own earlier steps were another timeline
    assert committed(b / "checkpoints") == [6] and committed(a / "checkpoints") == [4, 8]
    id_a = json.loads((a / "run.json").read_text())["run_id"]
    assert manifest(b / "checkpoints", 6).parent == {"run_id": id_a, "step": 4}


def test_latest_refuses_checkpoints_written_before_run_ids(tmp_path):
    from orchestrator.checkpoint.timeline import plan_resume
    from orchestrator.config import ConfigError

    root = tmp_path / "root"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds checkpoints directly \(steps 10\).*train.resume=.*step_00000010"):
        plan_resume(tiny_config(tmp_path / "run", f"checkpoint.dir={root}", "train.resume=latest"), tmp_path / "run")


# ----------------------------------------------------------------- 3: exact or refused
def test_resume_keeps_the_lr_schedule_of_the_checkpoint(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    common = (*TWO, "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr_ratio=0.1")
    Driver(tiny_config(run_dir, *common, "train.steps=6"), run_dir).run()
    Driver(tiny_config(run_dir, *common, "train.steps=10", "train.resume=latest"), run_dir).run()
    lrs = {r["step"]: r["lr"] for r in step_records(run_dir)}
    assert lrs[6] == pytest.approx(1e-3) and lrs[7] == pytest.approx(1e-3)        # the horizon stayed 6: no jump
    assert manifest(run_dir / "checkpoints", 10).lr_horizon == 6
    Driver(tiny_config(run_dir, *common, "train.steps=12", "train.lr_horizon=12", "train.resume=latest"), run_dir).run()
    lrs = {r["step"]: r["lr"] for r in step_records(run_dir)}
    assert lrs[11] == pytest.approx(lr_at(11, 1e-2, 2, 12, 0.1))                   # an explicit horizon changes it


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY_CLI = ("model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.num_experts=4", "model.expert_dim=32",
            "model.dense_dim=64", "model.max_seq_len=64", "data.seq_len=32", "data.max_bytes=300000",
            "train.global_batch_size=8", "train.eval_batches=0", "cluster.num_devices=2", "run.progress=quiet",
            "monitor.report=false")


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = [*TINY_CLI, "train.steps=8", f"run.dir={run_dir}"]
    from orchestrator.config import load_config

    Driver(load_config(None, overrides), run_dir).run()
    return run_dir, overrides


def test_resume_refuses_settings_that_break_continuation_before_anything_starts(finished):
    run_dir, overrides = finished
    proc = _cli(*overrides, "train.steps=12", "train.resume=latest", "seed=7", "data.seq_len=16",
                "train.global_batch_size=16")
    assert proc.returncode == 2, proc.stderr[-2000:]
    for key in ("seed: checkpoint 0, this run 7", "data.seq_len: checkpoint 32, this run 16",
                "train.global_batch_size: checkpoint 8, this run 16",
                "train.resume_accept_changes=[seed, data.seq_len, train.global_batch_size]"):
        assert key in proc.stderr
    assert "run directory:" not in proc.stderr   # refused before the run directory was touched or Ray started


def test_resume_with_nothing_to_do_touches_nothing(finished):
    run_dir, overrides = finished
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir() if p.is_file()}
    fewer = _cli(*overrides, "train.steps=4", "train.resume=latest")
    assert fewer.returncode == 2 and "train.steps=4 is below step 8 of the checkpoint" in fewer.stderr
    equal = _cli(*overrides, "train.resume=latest")
    assert equal.returncode == 0 and "run complete: the checkpoint of step 8" in equal.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir() if p.is_file()} == files


# ----------------------------------------------------------------- 5: a torn line
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(ray_session, tmp_path, caplog):
    run_dir = tmp_path / "run"
    Driver(tiny_config(run_dir, *TWO, "train.steps=4"), run_dir).run()
    torn = len((run_dir / "metrics.jsonl").read_text().splitlines()) + 1
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')   # a driver killed mid-write
    summary = Driver(tiny_config(run_dir, *TWO, "train.steps=6", "train.resume=latest"), run_dir).run()
    assert summary.resumed_from_step == 4 and steps_of(run_dir) == [1, 2, 3, 4, 5, 6]
    assert any(f"metrics.jsonl line {torn} is not a JSON object (torn" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------- 8: bounded driver state
def test_driver_state_is_bounded_in_the_step_count(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    driver = Driver(tiny_config(run_dir, "train.steps=150", "train.eval_batches=0", "monitor.tensorboard=false",
                                "monitor.prometheus=false", "checkpoint.every_steps=50"), run_dir)
    summary = driver.run()
    assert summary.steps_done == 150 and len(steps_of(run_dir)) == 150
    assert len(driver.history) == driver.history.maxlen < 150
    # kept for the steps a rewind can reach: the start, the two in-memory snapshots, the step just done
    assert len(driver.history.totals_at) <= 4 and len(driver.alerts.states) <= 4
    assert summary.tokens_per_s > 0 and summary.final_loss == step_records(run_dir)[-1]["loss"]
