"""Live expert re-placement changes where experts run, never the result: a run that moves experts between
devices every other step matches the single-process reference (float64), its checkpoints record the
placement, and a fault after a re-placement heals to the same state as the fault-free run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.experts.balancer import placement_from_manifest
from orchestrator.checkpoint.manager import list_checkpoints
from orchestrator.checkpoint.tools import read_parameters, read_state
from orchestrator.driver import Driver
from orchestrator.reference import reference_run
from orchestrator.checkpoint.storage import Storage
from tests.conftest import step_records, tiny_config

STEPS = 6
REPLACE = ["balance.replace_every=2", "balance.replace_window=2", "balance.replace_min_gain=0"]


def records(run_dir: Path) -> list[dict]:
    return step_records(run_dir)


def final_checkpoint(run_dir: Path):
    return list_checkpoints(Storage(str(run_dir / "checkpoints")))[-1][1]


@pytest.mark.parametrize("world", [2, 4])
def test_replacement_keeps_the_reference_math(ray_session, tmp_path, world):
    overrides = ["train.dtype=float64", f"train.steps={STEPS}", "train.eval_batches=0",
                 "model.num_experts=8", "train.global_batch_size=8"]
    ref_reports, ref_params = reference_run(tiny_config(None, *overrides))
    cfg = tiny_config(tmp_path, *overrides, *REPLACE, f"cluster.num_devices={world}")
    Driver(cfg, tmp_path).run()
    recs = records(tmp_path)
    moves = [r["replacement"] for r in recs if r.get("replacement")]
    assert moves, "no re-placement happened"
    assert all(m["device_imbalance_planned"] < m["device_imbalance_before"] for m in moves)
    # device loads are counted in the placement of each step: after a move, by the new one
    from orchestrator.experts.balancer import device_loads
    after = next(r for r in recs if r["step"] > min(r2["step"] for r2 in recs if r2.get("replacement")))
    placement = next(r["replacement"]["placement"] for r in recs if r.get("replacement"))
    assert after["device_tokens"] == [sum(x) for x in zip(*(device_loads(layer, world, placement[i])
                                                            for i, layer in enumerate(after["expert_load"])))]
    assert [r["loss"] for r in recs] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
    assert [r["expert_load"] for r in recs] == [r.expert_load for r in ref_reports]
    params, manifest = read_parameters(final_checkpoint(tmp_path))
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # the checkpoint records where the experts were: the last placement, not the contiguous one
    assert manifest["placement"] == moves[-1]["placement"]
    # (checkpoints from before manifests held the placement: it is read from which device wrote which expert)
    assert placement_from_manifest(manifest["expert_files"], world, 8 // world) == moves[-1]["placement"]


def test_fault_after_a_replacement_heals_to_the_same_state(ray_session, tmp_path):
    base = [f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=0", "model.num_experts=8",
            "faults.hang_floor_s=1", *REPLACE]
    Driver(tiny_config(tmp_path / "twin", *base), tmp_path / "twin").run()
    faulty = tmp_path / "faulty"
    # step 5 fails after the re-placement at step 4; recovery puts the replacement in the placement of step 4
    summary = Driver(tiny_config(faulty, *base, "faults.plan=[{step: 5, kind: kill, rank: 0}]"), faulty).run()
    assert summary.recoveries == 1 and summary.incidents[0]["rewound_to"] == 4
    assert [r["loss"] for r in records(faulty)] == [r["loss"] for r in records(tmp_path / "twin")]
    a, b = read_state(final_checkpoint(faulty)), read_state(final_checkpoint(tmp_path / "twin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_checkpoint_in_a_moved_placement_is_exact(ray_session, tmp_path):
    """The checkpoint of a re-placement step holds the new placement; a run resumed from it takes that
    placement (and the earlier steps' loads for its next plans) and ends bit-identical to the whole run."""
    base = [f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=0", "model.num_experts=8",
            "checkpoint.every_steps=2", "checkpoint.keep_last=0", *REPLACE, "balance.replace_window=3"]
    whole = tmp_path / "whole"
    Driver(tiny_config(whole, *base), whole).run()
    ckpt4 = whole / "checkpoints" / "step_00000004"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (whole / "metrics.jsonl").read_text()
                                                   .splitlines() if json.loads(line)["step"] <= 4))  # its run dir
    # the same run continued in another run directory: its id goes with it (else it is a new run from that
    # checkpoint, and a new run's logs start empty)
    shutil.copy(whole / "run.json", resumed / "run.json")
    summary = Driver(tiny_config(resumed, *base, f"train.resume={ckpt4}"), resumed).run()
    assert summary.resumed_from_step == 4
    assert records(resumed) == records(whole)[:4] + [r for r in records(resumed) if r["step"] > 4]
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(whole)]
    a, b = read_state(final_checkpoint(resumed)), read_state(final_checkpoint(whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imbalance_alert_triggers_a_replacement(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=0",
                      "model.num_experts=8", "balance.replace_on_imbalance=1.01", "balance.replace_window=3",
                      "balance.replace_min_gain=0")
    Driver(cfg, tmp_path).run()
    recs = records(tmp_path)
    alerts = [r["step"] for r in recs if "replacement" in r]
    assert alerts and alerts[0] == 3 and all(b - a >= 3 for a, b in zip(alerts, alerts[1:]))
    assert any(r["replacement"] for r in recs if "replacement" in r)
