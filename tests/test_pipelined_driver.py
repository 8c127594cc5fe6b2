"""The pipelined driver (parallel.pipelined_driver, on by default): step n+1 is submitted before the driver builds
step n's record and checks its alerts, so a fault an alert finds is found one step late; the rewind still goes to
a state before the faulty step and the run ends as its fault-free twin does, and as the lock-step driver does."""
from __future__ import annotations

from tests.conftest import assert_same_checkpoint, step_records, tiny_config


class LateSpy:
    """Records, for every decision about step n taken after step n+1 was submitted, (n, the step in flight)."""

    def _late(self, decision, step):
        self.late.append((step, self.inflight.step if self.inflight is not None else None))
        return super()._late(decision, step)


def _driver(cfg, run_dir):
    from orchestrator.driver import Driver

    spy = type("Spy", (LateSpy, Driver), {})(cfg, run_dir)
    spy.late = []
    return spy


def test_an_alert_found_one_step_late_rewinds_before_the_faulty_step(ray_session, tmp_path):
    """maxvio over a tiny threshold fires at step 3 while step 4 is in flight: step 4 is drained and thrown away, the
    snapshot of step 3 (taken before step 4 was submitted) is not restored, the rewind goes to step 2, and the
    replay ends bit for bit where the fault-free twin and the lock-step run end."""
    base = ["cluster.num_devices=2", "train.steps=6", "train.eval_batches=0", "checkpoint.every_steps=0"]
    rule = "monitor.alerts=[{rule: maxvio, threshold: 0.0001, steps: 3, action: rollback}]"
    twin = _driver(tiny_config(tmp_path / "twin", *base, "monitor.alerts=[]"), tmp_path / "twin")
    twin_summary = twin.run()
    late = _driver(tiny_config(tmp_path / "late", *base, rule), tmp_path / "late")
    summary = late.run()
    assert late.late == [(3, 4)]   # the decision about step 3 found step 4 in flight
    assert [(i["step"], i["kind"], i["rewound_to"]) for i in summary.incidents] == [(3, "alert:maxvio", 2)]
    lock = _driver(tiny_config(tmp_path / "lock", *base, rule, "parallel.pipelined_driver=false"), tmp_path / "lock")
    lock_summary = lock.run()
    assert lock.late == [(3, None)]   # lock-step: nothing was in flight
    assert [(i["step"], i["rewound_to"]) for i in lock_summary.incidents] == [(3, 2)]
    recs = {name: step_records(tmp_path / name) for name in ("twin", "late", "lock")}
    for name in ("late", "lock"):
        assert [r["step"] for r in recs[name]] == [1, 2, 3, 4, 5, 6]
        assert [(r["loss"], r["grad_norm"]) for r in recs[name]] == [(r["loss"], r["grad_norm"]) for r in recs["twin"]]
    assert summary.final_loss == lock_summary.final_loss == twin_summary.final_loss


def test_pipelined_and_lock_step_runs_train_alike_and_checkpoint_alike(ray_session, tmp_path):
    """Every step's loss, the checkpoints and the final state are the same with the driver pipelined or not (a run
    with a checkpoint and validation every 2 steps: those steps stay lock-step, the others are pipelined)."""
    base = ["cluster.num_devices=2", "train.steps=5", "checkpoint.every_steps=2", "train.eval_every=2",
            "train.eval_batches=1"]
    from orchestrator.driver import Driver

    for name, flag in (("on", "true"), ("off", "false")):
        Driver(tiny_config(tmp_path / name, *base, f"parallel.pipelined_driver={flag}"), tmp_path / name).run()
    on, off = step_records(tmp_path / "on"), step_records(tmp_path / "off")
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in on] == [(r["step"], r["loss"], r.get("val_loss"))
                                                                       for r in off]
    assert_same_checkpoint(tmp_path / "on", tmp_path / "off", 5)


def test_snapshots_serialized_from_the_device_thread_heal_and_checkpoint_alike(ray_session, tmp_path):
    """parallel.snapshot_serialize=thread (the GPU default): each snapshot is copied in the step loop and serialized
    from the device's snapshot thread while the next step runs. A device killed at step 3 is healed from such a
    snapshot, a checkpoint is written from one, and the run ends as its inline, fault-free twin does, record for
    record and tensor for tensor."""
    from orchestrator.driver import Driver

    base = ["cluster.num_devices=2", "train.steps=5", "checkpoint.every_steps=4", "train.eval_batches=0"]
    Driver(tiny_config(tmp_path / "inline", *base, "parallel.snapshot_serialize=inline"), tmp_path / "inline").run()
    summary = Driver(tiny_config(tmp_path / "thread", *base, "parallel.snapshot_serialize=thread",
                                 "faults.plan=[{step: 3, kind: kill, rank: 1}]"), tmp_path / "thread").run()
    assert [(i["step"], i["kind"], i["rewound_to"]) for i in summary.incidents] == [(3, "dead", 2)]
    inline, thread = step_records(tmp_path / "inline"), step_records(tmp_path / "thread")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in thread] == [(r["step"], r["loss"], r["grad_norm"])
                                                                        for r in inline]
    assert_same_checkpoint(tmp_path / "inline", tmp_path / "thread", 4)


def test_the_snapshot_hand_over_keeps_order_and_raises_what_staging_raised():
    """SnapshotHandOver (device/actor.py): copies of one step come out in the order they went in (a step snapshotted
    again after a rewind), a failure to stage is raised by the taker, and a copy that never comes times out."""
    import threading

    import pytest

    from orchestrator.device.actor import SnapshotHandOver

    h = SnapshotHandOver()
    h.put(3, "first", 0.1)
    h.put(3, "second", 0.2)
    assert h.take(3, 1.0) == ("first", 0.1)
    assert h.take(3, 1.0) == ("second", 0.2)
    threading.Timer(0.05, lambda: h.put(4, "late", 0.3)).start()
    assert h.take(4, 5.0) == ("late", 0.3)   # the taker waits for the step loop's copy
    h.put(5, OSError("no memory"), 0.0)
    with pytest.raises(OSError, match="no memory"):
        h.take(5, 1.0)
    with pytest.raises(TimeoutError, match="no snapshot of step 6 was staged within 0s"):
        h.take(6, 0.01)
    assert h.ready == {}
