"""The pipelined driver (parallel.pipelined_driver, on by default): step n+1 is submitted before the driver builds
step n's record and checks its alerts, and on a plain step even before step n comes back (queued behind it), so a
fault is found one step late; the rewind still goes to a state before the faulty step and the run ends as its
fault-free twin does, and as the lock-step driver does."""
from __future__ import annotations

from tests.conftest import assert_same_checkpoint, step_records, tiny_config


class LateSpy:
    """Records, for every decision about step n taken after step n+1 was submitted, (n, the step in flight)."""

    def _late(self, decision, step, failed_step=False):
        self.late.append((step, self.inflight.step if self.inflight is not None else None))
        return super()._late(decision, step, failed_step)


class QueueSpy(LateSpy):
    """... and every step queued behind the one running (submitted before that one came back)."""

    def _queue_next(self, step):
        super()._queue_next(step)
        if self.queued is not None and self.queued.step == step + 1:
            self.queued_steps.append(step + 1)


class KeepSpy(QueueSpy):
    """... and every in-memory snapshot the store keeps, as (its step, the recoveries so far)."""

    def prepare(self):
        plan = super().prepare()
        store = self.checkpoints.snapshots
        if not hasattr(store, "spied"):
            keep = store.keep

            def spied(step, *args, **kwargs):
                self.kept.append((step, self.healer.recoveries))
                return keep(step, *args, **kwargs)
            store.keep, store.spied = spied, True
        return plan


def _driver(cfg, run_dir):
    from orchestrator.driver import Driver

    spy = type("Spy", (KeepSpy, Driver), {})(cfg, run_dir)
    spy.late, spy.queued_steps, spy.kept = [], [], []
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


def test_a_device_lost_with_the_next_step_queued_behind_it_heals_once_and_exactly(ray_session, tmp_path):
    """The pipelined driver queues step n+1 behind step n (submitted before step n came back), so a device lost in
    step n is found with step n+1 in flight: a kill at step 4 (the process gone) and a crash at step 7 (an exception
    in the step; the device is stopped). The queued step is drained and thrown away, the device is replaced once,
    with one incident and one recovery (the queued step failing with it is the same fault), the rewind goes to a
    state before the faulty step (step 4 took a snapshot, queued between it and step 5: it is thrown away, not
    kept), and the run ends bit for bit as its fault-free twin, which queued every step after the first."""
    # a snapshot every 2 steps: step 4's is queued behind it with step 5, and must not be restored
    base = ["cluster.num_devices=2", "train.steps=8", "train.eval_batches=0", "checkpoint.every_steps=0",
            "faults.snapshot_every=2"]
    twin = _driver(tiny_config(tmp_path / "twin", *base), tmp_path / "twin")
    twin_summary = twin.run()
    assert twin.queued_steps == [2, 3, 4, 5, 6, 7, 8] and twin.late == []
    plan = "faults.plan=[{step: 4, kind: kill, rank: 1}, {step: 7, kind: crash, rank: 0}]"
    lost = _driver(tiny_config(tmp_path / "lost", *base, plan, "faults.max_recoveries=2"), tmp_path / "lost")
    summary = lost.run()
    assert lost.late == [(4, 5), (7, 8)]   # each failure found with the next step queued behind it
    assert [(i["step"], i["kind"], i["rank"], i["rewound_to"]) for i in summary.incidents] == [
        (4, "dead", 1, 2), (7, "crash", 0, 6)]
    assert lost.healer.recoveries == 2
    # step 4's snapshot, queued behind it, was never kept; after the recovery the replayed step 4's was, then step 6's
    assert (4, 0) not in lost.kept and (4, 1) in lost.kept and (6, 1) in lost.kept
    recs, twin_recs = step_records(tmp_path / "lost"), step_records(tmp_path / "twin")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [(r["loss"], r["grad_norm"]) for r in recs] == [(r["loss"], r["grad_norm"]) for r in twin_recs]
    assert summary.final_loss == twin_summary.final_loss


def test_a_stop_signal_after_the_next_step_was_queued_stops_after_that_step(ray_session, tmp_path):
    """A SIGTERM that arrives once step 3 came back finds step 4 queued behind it (submitted while step 3 ran): step 4
    is collected and kept, and the run stops after it with its final checkpoint, which is the state after step 4."""
    from orchestrator.driver import Driver

    class SignalAfter(Driver):
        def step(self, step):
            reports = super().step(step)
            if step == 3:
                assert self.inflight is not None and self.inflight.step == 4   # queued while step 3 ran
                self.stop_signal = "SIGTERM"
            return reports

    base = ["cluster.num_devices=2", "train.steps=8", "train.eval_batches=0", "checkpoint.every_steps=0",
            "faults.snapshot_every=2"]
    summary = SignalAfter(tiny_config(tmp_path / "stop", *base), tmp_path / "stop").run()
    assert summary.steps_done == 4 and summary.checkpoints_committed == [4]
    assert [r["step"] for r in step_records(tmp_path / "stop")] == [1, 2, 3, 4]
    Driver(tiny_config(tmp_path / "twin", *base, "checkpoint.every_steps=4"), tmp_path / "twin").run()
    twin = step_records(tmp_path / "twin")[:4]
    assert [r["loss"] for r in step_records(tmp_path / "stop")] == [r["loss"] for r in twin]
    assert_same_checkpoint(tmp_path / "stop", tmp_path / "twin", 4)


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


def test_what_keeps_a_step_from_being_queued_behind_the_running_one():
    """The next step is not queued behind step n when step n could name a straggler (a device slow
    `straggler_patience - 1` steps in a row, or any step with a patience of 1: its replacement restores the state
    of step n itself), nor when a planned fault may strike in it (one planned for that step and not yet fired its
    `repeat` times, or a timed one not fired yet)."""
    from orchestrator.config.faults import FaultSpec
    from orchestrator.healing.faults import Injector
    from orchestrator.healing.watch import Watch

    w = Watch(tiny_config(None, "cluster.num_devices=2", "faults.straggler_patience=3"))
    due = []
    for counts in ({}, {0: 1, 1: 0}, {0: 2}, {1: 2}, {0: 3}):
        w.slow_count = counts
        due.append(w.straggler_due())
    assert due == [False, False, True, True, False]   # {0: 3}: named already in this episode
    assert Watch(tiny_config(None, "cluster.num_devices=2", "faults.straggler_patience=1")).straggler_due()

    inj = Injector([FaultSpec(kind="kill", step=3, repeat=2)])
    assert inj.quiet(2) and not inj.quiet(3)
    inj.due(3)
    assert not inj.quiet(3)   # it strikes again when step 3 is replayed
    inj.due(3)
    assert inj.quiet(3) and inj.quiet(4)
    timed = Injector([FaultSpec(kind="kill", after_s=3600.0)])
    assert not timed.quiet(2)   # it strikes in whichever step starts after its time


def test_a_device_whose_step_failed_runs_no_step_until_its_state_is_restored():
    """A step queued behind one that failed on the device (the pipelined driver) is refused, not started: its
    collectives would meet the peers' collectives of the failed step (on gloo a size mismatch there aborted a
    peer's process). Once a snapshot is restored the device steps again: a device that ran steps 1 and 2, crashed
    in step 3 and was put back to step 1 then runs steps 2 and 3 as a device that never failed."""
    import pytest

    from orchestrator.data import load_corpus
    from orchestrator.device.actor import DeviceActor, StepNotRun
    from orchestrator.device.shard import DeviceShard, InjectedCrash

    cfg = tiny_config(None)
    corpus = load_corpus(cfg.data)

    def shard() -> DeviceShard:
        return DeviceShard(cfg, rank=0, world=1, train_tokens=corpus.train, val_tokens=corpus.val)

    twin = shard()
    expected = [twin.train_step(step).loss for step in (1, 2, 3)]
    device = DeviceActor(1)
    device.shard = shard()
    device.train_step(1)
    snap = device.shard.snapshot(1)
    assert device.train_step(2).loss == expected[1]   # the state moves on past the snapshot
    device.shard.crash_next_step = True
    with pytest.raises(InjectedCrash):
        device.train_step(3)
    with pytest.raises(StepNotRun, match="step 4 not run: step 3 failed on this device"):
        device.train_step(4)
    device.restore_snapshots(snap)
    assert [device.train_step(step).loss for step in (2, 3)] == expected[1:]
