"""The default snapshot cadence (faults.snapshot_every=5): a snapshot after every 5th step (and of the starting
point), so a fault rewinds to the newest one and recomputes the steps since; the run still ends bit for bit as its
fault-free twin does. The other healing tests take a snapshot after every step (tests/conftest.py tiny_config)."""
from __future__ import annotations

from orchestrator.config import load_config
from tests.conftest import assert_same_checkpoint, step_records, tiny_config


def test_the_default_cadence_is_a_snapshot_every_five_steps():
    assert load_config(None, []).faults.snapshot_every == 5


def test_a_fault_between_snapshots_rewinds_to_the_newest_and_recomputes_the_steps_since(ray_session, tmp_path):
    """Snapshots of steps 0 and 5: a device killed in step 8 rewinds every device to step 5, steps 6 and 7 are
    recomputed (goodput counts them) and step 8 replayed; an alert about step 9 found while step 10 is in flight
    (the pipelined driver) rewinds to step 5 again, not to a snapshot of step 9 or later. Every step is recorded
    once, and losses, gradient norms and the final checkpoint equal the fault-free twin's."""
    from orchestrator.driver import Driver

    base = ["cluster.num_devices=2", "train.steps=11", "train.eval_batches=0", "checkpoint.every_steps=0"]
    twin = tiny_config(tmp_path / "twin", *base, snapshot_every_step=False)
    assert twin.faults.snapshot_every == 5
    Driver(twin, tmp_path / "twin").run()
    rule = "monitor.alerts=[{rule: maxvio, threshold: 0.0001, steps: 9, action: rollback}]"
    cfg = tiny_config(tmp_path / "healed", *base, "faults.plan=[{step: 8, kind: kill, rank: 1}]", rule,
                      snapshot_every_step=False)
    summary = Driver(cfg, tmp_path / "healed").run()
    assert [(i["step"], i["kind"], i["rewound_to"]) for i in summary.incidents] == [
        (8, "dead", 5), (9, "alert:maxvio", 5)]
    healed, fault_free = step_records(tmp_path / "healed"), step_records(tmp_path / "twin")
    assert [r["step"] for r in healed] == list(range(1, 12))
    assert [(r["loss"], r["grad_norm"]) for r in healed] == [(r["loss"], r["grad_norm"]) for r in fault_free]
    assert summary.goodput["steps_recomputed"] == 2 + 3   # 6, 7 after the kill; 6, 7, 8 after the alert
    assert_same_checkpoint(tmp_path / "twin", tmp_path / "healed", 11)
