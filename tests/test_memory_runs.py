"""Sharded state through the rest of the system (Ray, the driver, checkpoints, healing): a checkpoint saved under
one layout and ZeRO stage resumes under another on the reference math, exactly on the same layout; a device
killed under stage 3 heals to the fault-free run's bits."""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator.checkpoint.tools import read_parameters
from orchestrator.data import load_corpus
from orchestrator.driver import Driver
from orchestrator.reference import reference_run
from orchestrator.checkpoint.storage import Storage
from tests.conftest import tiny_config
from tests.test_checkpoint import StopAfter, ckpt, metrics

COMMON = ["train.steps=6", "train.dtype=float64", "train.eval_batches=0", "balance.bias_update_speed=0.01",
          "balance.seq_aux_loss_coeff=0.001"]
EP2_DP2_STAGE3 = ["cluster.num_devices=4", "parallel.expert_parallel=2", "memory.zero_stage=3",
                  "cluster.cpus_per_device=0.25"]


@pytest.fixture(scope="module")
def reference():
    """The single-device reference run on COMMON: the same for every stage and layout, so run once."""
    return reference_run(tiny_config(None, *COMMON), corpus=load_corpus(tiny_config().data))


@pytest.mark.parametrize("before,after", [
    (EP2_DP2_STAGE3, ["cluster.num_devices=2", "memory.zero_stage=0"]),
    # an evaluation at the stop step: stage 2 then holds unsharded parameters until resharded (the checkpoint must
    # still hold every moment)
    (["train.eval_every=3", "train.eval_batches=1", "cluster.num_devices=2", "memory.zero_stage=2",
      "memory.activation_checkpointing=full"],
     ["cluster.num_devices=4", "parallel.expert_parallel=2", "memory.zero_stage=1", "cluster.cpus_per_device=0.25",
      "train.micro_batches=2"]),
], ids=["stage3-ep2xdp2-to-stage0-2dev", "stage2-2dev-to-stage1-ep2xdp2"])
def test_checkpoint_resumes_under_another_stage_and_layout(ray_session, tmp_path, reference, before, after):
    ref_reports, ref_params = reference
    run_dir = tmp_path / "run"
    StopAfter(tiny_config(run_dir, *COMMON, *before), run_dir, 3).run()
    manifest = json.loads((ckpt(run_dir, 3) / "manifest.json").read_text())
    summary = Driver(tiny_config(run_dir, *COMMON, *after, "train.resume=latest"), run_dir).run()
    assert summary.resumed_from_step == 3
    saved = dict(o.split("=") for o in before)
    assert manifest["layout"]["zero_stage"] == int(saved["memory.zero_stage"])
    assert manifest["layout"]["world"] == int(saved["cluster.num_devices"])
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
    params, _ = read_parameters(Storage(str(ckpt(run_dir, 6))))
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _final_state(run_dir):
    params, manifest = read_parameters(Storage(str(ckpt(run_dir, 6))))
    return params, [r["loss"] for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def stage3_straight(ray_session, tmp_path_factory):
    """The fault-free 6-step run on ep2 x dp2 under stage 3: the twin that the resume and the kill tests compare
    against (they only read it)."""
    straight = tmp_path_factory.mktemp("stage3") / "straight"
    Driver(tiny_config(straight, *COMMON, *EP2_DP2_STAGE3), straight).run()
    return straight


def test_stage3_resume_on_the_same_layout_is_exact(ray_session, tmp_path, stage3_straight):
    straight, split = stage3_straight, tmp_path / "split"
    StopAfter(tiny_config(split, *COMMON, *EP2_DP2_STAGE3), split, 3).run()
    Driver(tiny_config(split, *COMMON, *EP2_DP2_STAGE3, "train.resume=latest"), split).run()
    (a, losses_a), (b, losses_b) = _final_state(straight), _final_state(split)
    assert losses_a == losses_b                      # bit-identical at every step
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    index = json.loads((ckpt(split, 6) / "manifest.json").read_text())["index"]
    dense = index["param/layers.0.attn.wq.weight"]
    assert len(dense) == 4 and all(piece[1] == 0 for piece in dense)   # 4 row-shards, one per device


def test_kill_under_stage3_heals_to_the_fault_free_bits(ray_session, tmp_path, stage3_straight):
    clean, faulty = stage3_straight, tmp_path / "faulty"
    summary = Driver(tiny_config(faulty, *COMMON, *EP2_DP2_STAGE3, "faults.plan=[{step: 4, kind: kill, rank: 3}]"),
                     faulty).run()
    assert summary.recoveries >= 1
    incidents = [json.loads(line) for line in (faulty / "incidents.jsonl").read_text().splitlines()]
    assert {i["source"] for i in incidents if i.get("source")} == {"snapshot"}   # its own shard: no replay
    (a, losses_a), (b, losses_b) = _final_state(clean), _final_state(faulty)
    assert losses_a == losses_b
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_hang_under_stage3_heals_to_the_fault_free_bits(ray_session, tmp_path):
    """A device stuck under stage 3: its peers wait inside FSDP2's collectives, which the step clock does not see
    (it wraps this project's own collectives only), so the watch may take them for stuck too and replace more
    devices than the culprit; the state it ends in must still be the fault-free run's."""
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    common = [*COMMON, "train.steps=5", "cluster.num_devices=2", "memory.zero_stage=3"]
    Driver(tiny_config(clean, *common), clean).run()
    summary = Driver(tiny_config(faulty, *common, "faults.hang_floor_s=1",
                                 "faults.plan=[{step: 3, kind: hang, rank: 1}]"), faulty).run()
    assert summary.recoveries >= 1
    a, _ = read_parameters(Storage(str(ckpt(clean, 5))))
    b, _ = read_parameters(Storage(str(ckpt(faulty, 5))))
    assert [r["loss"] for r in metrics(clean)] == [r["loss"] for r in metrics(faulty)]
    assert all(torch.equal(a[k], b[k]) for k in a)
