"""Anticipatory routing (DeepSeek-V4 report sec. 4.2.3; orchestrator/device/anticipate.py): step t routes with the ids
the parameters of step t-delay chose for its batch, with the current router's gates; the cached ids are state
(snapshots, checkpoints); N devices compute what the reference computes; a rewind while it is on changes nothing;
the alert action `anticipate` rolls back, turns it on, and off again after the calm steps."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from orchestrator.config import ConfigError
from orchestrator.data import load_corpus
from orchestrator.device.anticipate import anticipating
from orchestrator.device.shard import DeviceShard
from tests.conftest import step_records, tiny_config
from tests.test_optimizer_state import _checkpoint   # the manifest and files a checkpoint of snapshots holds


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(tiny_config().data)


def _shard(corpus, *overrides: str) -> DeviceShard:
    cfg = tiny_config(None, "balance.anticipatory_routing=true", "train.steps=8", *overrides)
    return DeviceShard(cfg, 0, 1, corpus.train, corpus.val)


def _routers(model) -> list:
    return [m.router for m in model.moe_layers()]


def test_step_t_routes_with_the_ids_of_the_parameters_of_step_t_minus_1_and_current_gates(corpus):
    """delay 1: the ids step 3 uses are those a copy of the model taken before step 2's update chooses for step 3's
    batch; its gates are the current router's scores at them (sigmoid, renormalised, times route_scale); they differ
    from what the current router would choose (a large learning rate moves the router between steps)."""
    shard = _shard(corpus, "train.lr=0.2", "model.score_func=sigmoid", "balance.bias_update_speed=0.05")
    shard.train_step(1)
    before = copy.deepcopy(shard.model)                      # theta_2: the parameters step 2 computes with
    report = shard.train_step(2)
    assert report.extra == {"anticipatory": True, "anticipated": True}   # step 2 used the ids step 1 cached
    inputs_BT, _, _, _ = shard._batch(3)
    with torch.no_grad():
        before.eval()
        before(inputs_BT)
    expected = [ids.clone() for ids in before.routing()]
    with torch.no_grad():                                   # what theta_3 would choose itself
        now = copy.deepcopy(shard.model).eval()
        now(inputs_BT)
    own = [ids.clone() for ids in now.routing()]
    seen: list = []
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out[0].detach(),
                                                                          out[1].detach())))
             for r in _routers(shard.model)]
    current = copy.deepcopy(_routers(shard.model))           # the router of step 3, before its update
    try:
        report = shard.train_step(3)
    finally:
        for h in hooks:
            h.remove()
    assert report.extra["anticipated"]
    assert len(seen) == 2 * len(expected)   # the forward for step 4 (routing ahead), then step 3's own
    for (x_ND, gates_NK, used_NK), ids_NK, router in zip(seen[len(expected):], expected, current):
        assert torch.equal(used_NK, ids_NK)
        scores_NE = router.gate(x_ND).float().sigmoid()
        want = scores_NE.gather(-1, ids_NK)
        want = want / (want.sum(-1, keepdim=True) + 1e-20) * router.route_scale
        torch.testing.assert_close(gates_NK, want)
    assert any(not torch.equal(a, b) for a, b in zip(expected, own)), "the router did not move: nothing is shown"


def test_first_delay_steps_route_normally_and_the_mode_follows_its_windows(corpus):
    shard = _shard(corpus, "balance.anticipatory_delay=2")
    reports = [shard.train_step(s) for s in range(1, 5)]
    assert [r.extra["anticipated"] for r in reports] == [False, False, True, True]
    assert anticipating(5, [(3, 5)], False) and not anticipating(6, [(3, 5)], False)
    assert not anticipating(2, [(3, 5)], False) and anticipating(99, [], True)


def test_cached_ids_travel_with_snapshots_and_checkpoints(corpus):
    """delay 2, two micro-batches: the snapshot after step 3 holds the ids of steps 4 and 5; restored from it (in
    memory, or written as a checkpoint and read back), steps 4 and 5 replay the restored cache and are
    bit-identical to going straight on."""
    over = ("balance.anticipatory_delay=2", "train.micro_batches=2", "train.lr=0.2")
    run = _shard(corpus, *over)
    for s in range(1, 4):
        run.train_step(s)
    snap = run.snapshot(3)
    assert sorted(k for k in snap.files["experts-00000.safetensors"] if k.startswith("extra/anticipate/ids/")) == [
        f"extra/anticipate/ids/{s}/{j}" for s in (4, 5) for j in range(2)]

    def rest(shard: DeviceShard) -> tuple[list[float], dict[str, torch.Tensor]]:
        reports = [shard.train_step(s) for s in range(4, 6)]
        assert all(r.extra["anticipated"] for r in reports)
        return [r.loss for r in reports], shard.global_parameters()

    straight = rest(run)
    healed = _shard(corpus, *over)
    healed.restore_snapshots([snap])
    manifest, blobs = _checkpoint([snap])
    resumed = _shard(corpus, *over)
    resumed.restore(manifest, blobs.__getitem__, "test checkpoint")
    for other in (rest(healed), rest(resumed)):
        assert other[0] == straight[0]
        for name, value in straight[1].items():
            assert torch.equal(other[1][name], value), name


def test_config_refusals():
    with pytest.raises(ConfigError, match="data.task=pretrain or sft"):
        tiny_config(None, "balance.anticipatory_routing=true", "data.task=rl")
    with pytest.raises(ConfigError, match="action=anticipate answers a spike"):
        tiny_config(None, "monitor.alerts=[{rule: maxvio, action: anticipate}]")
    with pytest.raises(ConfigError, match="balance.anticipatory_delay"):
        tiny_config(None, "balance.anticipatory_routing=true", "balance.anticipatory_delay=0")
    with pytest.raises(ConfigError, match="anticipatory_calm_steps"):
        tiny_config(None, "balance.anticipatory_calm_steps=5")   # no rule with action=anticipate reads it


# ----------------------------------------------------------------------------- Ray runs (3 of them, short)
def _ckpt(run_dir, step: int):
    from orchestrator.checkpoint.storage import Storage

    return Storage(str(run_dir / "checkpoints" / f"step_{step:08d}"))


def test_devices_match_the_reference_and_a_rewind_while_anticipating_changes_nothing(ray_session, tmp_path, corpus):
    """float64, 2 devices (expert parallel), two micro-batches, delay 2: the losses and parameters of the reference
    (one process, whole batches); a crash at step 5 rewinds to the snapshot of step 4, whose cached ids of steps 5
    and 6 replay them exactly: the run ends bit-identical to the fault-free one."""
    from orchestrator.checkpoint.tools import read_parameters
    from orchestrator.driver import Driver
    from orchestrator.reference import reference_run

    common = ["train.steps=6", "train.dtype=float64", "balance.anticipatory_routing=true",
              "balance.anticipatory_delay=2", "train.eval_batches=0"]
    ref_reports, ref_params = reference_run(tiny_config(None, *common), corpus=corpus)
    assert [r.extra["anticipated"] for r in ref_reports] == [False, False, True, True, True, True]
    runs = {}
    for name, extra in (("straight", []), ("crash", ["faults.plan=[{step: 5, kind: crash, rank: 1}]"])):
        run_dir = tmp_path / name
        summary = Driver(tiny_config(run_dir, *common, "cluster.num_devices=2", "train.micro_batches=2", *extra),
                         run_dir).run()
        runs[name] = (step_records(run_dir), read_parameters(_ckpt(run_dir, 6))[0], summary)
    recs, params, _ = runs["straight"]
    assert [r["loss"] for r in recs] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
    assert [(r["anticipatory"], r["anticipated"]) for r in recs] == [(True, r.extra["anticipated"])
                                                                     for r in ref_reports]
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    crashed, crashed_params, summary = runs["crash"]
    assert [(i["kind"], i["rewound_to"]) for i in summary.incidents] == [("crash", 4)]
    assert [r["loss"] for r in crashed] == [r["loss"] for r in recs]
    assert crashed_params.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(crashed_params[name], value), name


def test_the_anticipate_action_rolls_back_turns_it_on_and_off_and_resumes(ray_session, tmp_path):
    """A crafted spike (threshold 0 over a window of 1: the loss of step 2 "spikes" against step 1's) fires
    action=anticipate once: the run rewinds to step 0 (at most step 2 - 1 - delay, so that the spike's step itself
    routes with older parameters) and routes anticipatorily for steps 1..5 (2 + calm 3; step 1, the first of the
    stretch, with its own routing, and caching step 2's); from step 6 on it routes normally. The checkpoint of step 4
    keeps the window and the ids of step 5: a run resumed from it continues bit-identically (its rule's threshold
    raised: a resumed run's alert rules start afresh, and the crafted condition, true at every step, would fire
    again at its first step with history)."""
    from orchestrator.driver import Driver

    common = ["train.steps=8", "train.eval_batches=0", "balance.anticipatory_calm_steps=3"]
    rule = "monitor.alerts=[{rule: loss_spike, threshold: %s, window: 1, action: anticipate}]"
    run_dir = tmp_path / "spike"
    summary = Driver(tiny_config(run_dir, *common, rule % 0.0, "checkpoint.every_steps=4"), run_dir).run()
    recs = step_records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["anticipatory"] for r in recs] == [True, True, True, True, True, False, False, False]
    assert [r["anticipated"] for r in recs] == [False, True, True, True, True, False, False, False]
    assert [(i["step"], i["kind"], i["rewound_to"], i["action"]) for i in summary.incidents] == [
        (2, "alert:loss_spike", 0, "rolled back, anticipatory routing on")]
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [(a["step"], a["rule"], a["action"]) for a in alerts] == [(2, "loss_spike", "anticipate")]

    resumed_dir = tmp_path / "resumed"
    resumed = Driver(tiny_config(resumed_dir, *common, rule % 100.0, f"train.resume={run_dir / 'checkpoints' / 'step_00000004'}"),
                     resumed_dir).run()
    assert resumed.resumed_from_step == 4
    again = step_records(resumed_dir)
    assert [(r["step"], r["loss"], r["anticipatory"], r["anticipated"]) for r in again] == [
        (r["step"], r["loss"], r["anticipatory"], r["anticipated"]) for r in recs[4:]]


def test_anticipatory_routing_replays_the_mtp_modules_routing_too(corpus):
    """With multi-token prediction the MTP module's MoE layer is one of the model's MoE layers: the look-ahead
    forward runs it (its rows are T - 1 long), and the step replays its ids like the others'."""
    shard = _shard(corpus, "model.mtp_depth=1", "train.micro_batches=2")
    shard.train_step(1)
    cached = shard.anticipator.ids[2]
    assert len(cached) == len(shard.model.moe_layers())
    T = shard.cfg.data.seq_len
    assert [tuple(ids.shape[1:2]) for ids in cached] == [(T,)] * (len(cached) - 1) + [(T - 1,)]
    report = shard.train_step(2)
    assert report.extra == {"anticipatory": True, "anticipated": True} and report.mtp_losses
    assert all(m.replay_NK is None for m in shard.model.moe_layers())   # cleared after the step
