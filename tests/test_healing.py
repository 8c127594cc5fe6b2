"""Faults healed without a full restart: the run ends bit-identical to the fault-free run, with one
metrics record per step; a fault repeating past its budget stops the run with a clear report."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import to_yaml
from orchestrator.driver import Driver
from orchestrator.errors import RunError
from tests.conftest import step_records, tiny_config

STEPS = 8
FILES = ("dense.safetensors", "experts-00000.safetensors", "experts-00001.safetensors")


# hang_floor_s: a tiny model's steps take milliseconds, so a step deadline of 1 s is ten times too long already.
# The router bias and a balancing loss are on, so that the state healed back includes the bias too.
_CONFIG_ARGS = (f"train.steps={STEPS}", "cluster.num_devices=2", "train.eval_batches=0", "faults.hang_floor_s=1",
                "balance.bias_update_speed=0.01", "balance.aux_loss_coeff=0.01")


def config(run_dir: Path, *overrides: str):
    return tiny_config(run_dir, *_CONFIG_ARGS, *overrides)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    return {f"{name}:{k}": v for name in FILES for k, v in load_file(ckpt / name).items()}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in step_records(run_dir)]


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


def incidents_file(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "incidents.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fault,kind,action,rewound_to", [
    ("{step: 5, kind: kill, rank: 1}", "dead", "replaced", 4),
    ("{step: 5, kind: crash, rank: 0}", "crash", "replaced", 4),
    # stops between forward and backward; its peer waits inside all_to_all until the learned deadline
    ("{step: 5, kind: hang, rank: 1}", "hang", "replaced", 4),
    # 0.4 s more each step from step 3: a straggler after 3 steps (faults.straggler_patience); on one node there
    # is no standby elsewhere to replace it with (a replacement in its own bundle would land on the same slow
    # node), so it is recorded and alerted, not replaced (issue 13 item 13; it used to be replaced in place)
    ("{step: 3, kind: slow, rank: 0, steps: 4, delay_s: 0.4}", "slow", "recorded", -1),
    ("{step: 5, kind: nan, rank: 1}", "nan", "rolled back", 4),
    # the checkpoint taken after step 5 fails writing device 1's shard; retried (and committed) at step 7
    ("{step: 5, kind: checkpoint, rank: 1}", "checkpoint", "retried", -1),
])
def test_planned_fault_is_healed_and_changes_nothing(fault_free, tmp_path, fault, kind, action, rewound_to):
    summary = Driver(config(tmp_path, f"faults.plan=[{fault}]"), tmp_path).run()
    assert summary.steps_done == STEPS
    assert summary.recoveries == (0 if kind in ("checkpoint", "slow") else 1)
    (incident,) = summary.incidents
    rank = int(fault.split("rank: ")[1][0])
    assert (incident["kind"], incident["rank"], incident["action"], incident["rewound_to"]) == (kind, rank, action,
                                                                                                rewound_to)
    assert incidents_file(tmp_path) == summary.incidents  # written as they happened
    assert len(summary.faults_injected) == 1
    if kind == "checkpoint":
        assert summary.checkpoints_failed == [5] and summary.checkpoints_committed == [7, 8]
    assert_same_as(fault_free, tmp_path)
    goodput = json.loads((tmp_path / "goodput.json").read_text())
    assert 0 < goodput["goodput"] < 1 and goodput["steps_done"] == STEPS


def test_hang_inside_a_collective_replaces_every_device_stuck_in_the_step(fault_free, tmp_path):
    """A device stuck inside a collective looks like its peers waiting in one: no device can be told
    apart, so every device still in the step is replaced (from the snapshot, which the driver owns)."""
    summary = Driver(config(tmp_path, "faults.plan=[{step: 5, kind: hang, rank: 1, in_collective: true}]"),
                     tmp_path).run()
    assert summary.recoveries == 1
    assert sorted((i["rank"], i["kind"], i["action"], i["rewound_to"]) for i in summary.incidents) == [
        (0, "hang", "replaced", 4), (1, "hang", "replaced", 4)]
    assert "every device waits inside a collective" in summary.incidents[0]["detail"]
    assert_same_as(fault_free, tmp_path)


def test_nonfinite_step_skipped_by_policy(fault_free, tmp_path):
    """faults.on_nonfinite=skip: the NaN step's update is not applied on any device; the run goes on, finite."""
    summary = Driver(config(tmp_path, "faults.plan=[{step: 5, kind: nan, rank: 1}]", "faults.on_nonfinite=skip"),
                     tmp_path).run()
    assert summary.recoveries == 0 and summary.incidents[0]["action"] == "skipped"
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[4].get("skipped") == "nonfinite" and all("skipped" not in r for r in records if r["step"] != 5)
    assert losses(tmp_path)[:4] == fault_free[0][:4]
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path).values())


def test_chaos_plan_is_seeded_and_every_fault_healed(fault_free, tmp_path):
    overrides = ["faults.chaos.mean_steps_between=2", "faults.chaos.first_step=2", "faults.chaos.seed=3",
                 "faults.chaos.kinds=[kill,crash,nan]"]
    from orchestrator.healing import plan_faults

    plan = plan_faults(config(tmp_path, *overrides))
    assert plan == plan_faults(config(tmp_path, *overrides)) and len(plan) >= 2
    summary = Driver(config(tmp_path, *overrides), tmp_path).run()
    assert len(summary.faults_injected) == len(plan) == summary.recoveries
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
    with pytest.raises(RunError, match=r"1 recoveries already in the last 3600s, the budget \(faults.max_recoveries=1 "
                                       r"per faults.recovery_window_s=3600\) is spent.*"
                                       r"step 3 device 1 dead; step 4 device 1 dead"):
        Driver(config(tmp_path, plan, "faults.max_recoveries=1"), tmp_path).run()
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]  # what was done is recorded once; nothing after the stop


class SpoiledSnapshot(Driver):
    """The in-memory snapshot of step 2 loses rank 0's `param/tok_emb.weight` (as a snapshot writer that left out a
    tensor would): recovery from it must stop the run with an incident and an alert naming the tensor."""

    def after_step(self, step: int) -> bool:
        saved = super().after_step(step)
        if step == 2:
            import ray

            snap = self.checkpoints.snapshots.items[-1]
            bad = ray.get(snap.refs[0])
            del bad.files["dense.safetensors"]["param/tok_emb.weight"]
            del bad.index["param/tok_emb.weight"]
            snap.refs[0] = ray.put(bad)
        return saved


def test_a_snapshot_that_cannot_be_restored_stops_the_run_with_an_incident_and_an_alert(ray_session, tmp_path):
    """Not a silent replay from step 0 (what a snapshot missing a tensor used to cause): the recovery stops, its
    incident and the restore_failed alert name the tensor, and no step is recorded twice."""
    with pytest.raises(RunError, match=r"recovery cannot restore the run's state .*'param/tok_emb.weight'"):
        SpoiledSnapshot(config(tmp_path, "faults.plan=[{step: 3, kind: kill, rank: 1}]"), tmp_path).run()
    dead, restore = incidents_file(tmp_path)
    assert (dead["kind"], restore["kind"], restore["action"]) == ("dead", "restore", "stopped")
    assert "in-memory snapshot of step 2" in restore["detail"] and "'param/tok_emb.weight'" in restore["detail"]
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    (alert,) = [a for a in alerts if a["rule"] == "restore_failed"]
    assert alert["step"] == restore["step"] and "'param/tok_emb.weight'" in alert["detail"]
    assert [s for s, _ in losses(tmp_path)] == [1, 2]   # kept steps once; nothing replayed from step 0
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_node_loss_on_a_multi_node_cluster_heals_from_the_checkpoint(fault_free, tmp_path):
    """Three worker nodes, two devices (one per node); before step 6 the raylet of device 1's node is
    SIGKILLed: the node dies with its actor and the in-memory snapshots stored there. The placement group
    moves that bundle to the spare node, a new actor starts there, and everyone restores the checkpoint of
    step 4 (the newest one committed): steps 5 and 6 are recomputed, and the run ends as the fault-free one."""
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(to_yaml(config(tmp_path, "cluster.cpus_per_device=1", "checkpoint.every_steps=2",
                                       "faults.plan=[{step: 6, kind: node, rank: 1}]")))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "multinode.py"), "3", "--config", str(cfg_file)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    dead = [i for i in summary["incidents"] if i["rank"] == 1]
    assert summary["recoveries"] == 1 and dead and dead[0]["kind"] in ("dead", "hang")
    assert {i["source"] for i in summary["incidents"]} == {"checkpoint"}
    assert {i["rewound_to"] for i in summary["incidents"]} == {4}
    assert_same_as(fault_free, tmp_path)


@pytest.mark.parametrize("every, slow_from, found", [(1, 3, 5), (5, 4, 6)])
def test_straggler_is_replaced_by_a_standby_on_another_node(fault_free, tmp_path, every, slow_from, found):
    """Three worker nodes, two devices and a warm standby, one per node (SPREAD). Device 0 turns slow from step
    `slow_from`: a straggler after 3 steps, at step `found`. A standby waits on another node, so device 0 is replaced
    by it there, from the state of step `found` (nothing is recomputed), and the run ends as the fault-free one.
    With a snapshot every 5 steps, step 6 has none of its own: it is taken before anything runs after step 6 (the
    step with the straggler stays lock-step; pipelined, step 7 would have run first)."""
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(to_yaml(config(tmp_path, "cluster.cpus_per_device=1", "cluster.placement_strategy=SPREAD",
                                       "faults.standby=1", f"faults.snapshot_every={every}",
                                       f"faults.plan=[{{step: {slow_from}, kind: slow, rank: 0, steps: 4, "
                                       f"delay_s: 0.4}}]")))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "multinode.py"), "3", "--config", str(cfg_file)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    (slow,) = summary["incidents"]
    assert (slow["kind"], slow["rank"], slow["action"], slow["rewound_to"]) == ("slow", 0, "replaced", found)
    device0 = json.loads((tmp_path / "status.json").read_text())["devices"][0]
    assert device0["restarts"] == 1 and device0["node_id"] != slow["node"]   # it moved off the slow node
    assert_same_as(fault_free, tmp_path)


def test_same_step_failing_max_repeats_times_stops_the_run(ray_session, tmp_path):
    plan = "faults.plan=[{step: 4, kind: crash, rank: 0, repeat: 5}]"  # comes back every time step 4 runs
    with pytest.raises(RunError, match=r"step 4 failed 2 times \(faults.max_repeats=2\)"):
        Driver(config(tmp_path, plan, "faults.max_repeats=2"), tmp_path).run()
    assert [i["action"] for i in incidents_file(tmp_path)] == ["replaced", "stopped"]


class ReplacementFailsOnce(Driver):
    """The first recovery attempt fails (as when a replacement actor cannot start); the Healer retries."""

    def recover(self, replace, reform, timeout_s):
        if not getattr(self, "failed_once", False):
            self.failed_once = True
            raise RunError("injected: the replacement actor failed to start")
        return super().recover(replace, reform, timeout_s)


def test_recovery_is_retried_with_backoff(fault_free, tmp_path):
    driver = ReplacementFailsOnce(config(tmp_path, "faults.plan=[{step: 5, kind: kill, rank: 1}]",
                                         "faults.retry_backoff_s=0.2"), tmp_path)
    summary = driver.run()
    assert summary.recoveries == 1 and summary.goodput["backoff"] == pytest.approx(0.2)
    assert_same_as(fault_free, tmp_path)


def test_spikes_and_stragglers_are_detected_from_reports(tmp_path):
    """The Watch's judgement of completed steps, on crafted reports (no cluster needed)."""
    from orchestrator.device.actor import StepReport
    from orchestrator.healing import Watch

    class NoDriver:
        def node_of(self, rank):
            return f"node-{rank}"

    watch = Watch(config(tmp_path, "faults.straggler_patience=2"))

    def report(step, rank, loss=2.0, norm=1.0, own=0.1, waited=0.0):
        return StepReport(step, rank, loss, norm, 1e-3, 100, own + waited, [], collective_s=waited)

    for step in range(1, 26):  # spikes are judged from half a window (25 steps) of history on
        assert watch.inspect(step, [report(step, 0), report(step, 1)], NoDriver()) == []
    assert watch.guard() == {"max_loss": pytest.approx(6.0), "max_grad_norm": pytest.approx(10.0)}
    flagged = report(26, 0, loss=7.0)
    flagged.extra = {"anticipatory": True, "anticipated": True}   # anticipatory routing's flags: still judged
    (spike,) = watch.inspect(26, [flagged, report(26, 1, loss=7.0)], NoDriver())
    assert (spike.kind, spike.rank) == ("loss_spike", -1)
    (spike,) = watch.inspect(27, [report(27, 0, norm=11.0), report(27, 1, norm=11.0)], NoDriver())
    assert spike.kind == "grad_spike"
    slow = [report(28, 0, own=0.5), report(28, 1, waited=0.4)]  # device 1 waits in collectives for device 0
    assert watch.inspect(28, slow, NoDriver()) == []  # patience: 2 steps in a row
    (straggler,) = watch.inspect(29, slow, NoDriver())
    assert (straggler.kind, straggler.rank, straggler.node) == ("slow", 0, "node-0")
    # one incident per episode: a device that stays slow is not reported again every `patience` steps
    assert all(watch.inspect(s, slow, NoDriver()) == [] for s in range(30, 40))
    noisy = [report(40, 0, own=0.13), report(40, 1)]  # 1.3x: noise, not a straggler; the episode ends
    assert watch.inspect(40, noisy, NoDriver()) == [] and watch.inspect(41, noisy, NoDriver()) == []
    watch.inspect(42, slow, NoDriver())
    assert [i.kind for i in watch.inspect(43, slow, NoDriver())] == ["slow"]   # a new episode


def test_chaos_job_with_warm_standby_verifies_against_its_twin(tmp_path):
    """The chaos job through its entry point: two kills and a hang healed (the first by the warm standby: the
    standby actor, not a new one, became device 1), the final state compared with the fault-free twin, the
    report written."""
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(to_yaml(config(tmp_path / "run", "faults.standby=1")))
    plan = "faults.plan=[{step: 3, kind: kill, rank: 1}, {step: 5, kind: hang, rank: 0}, {step: 7, kind: kill, rank: 0}]"
    proc = subprocess.run([sys.executable, "-m", "jobs.chaos", "--config", str(cfg_file), plan],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "faults injected 3, healed 3, job interruptions 0" in proc.stdout
    assert "final state identical to the fault-free twin: yes" in proc.stdout
    report = json.loads((tmp_path / "run" / "chaos_report.json").read_text())
    assert report["identical_state"] and report["tensors_compared"] > 0
    assert [f["caught_as"] for f in report["faults"]] == ["dead", "hang", "dead"]
    # Which actor took over device 1 after the kill: the warm standby (its pid now device 1's in the chaos run's
    # status), not a new one. What happened, not how long it took: seconds depend on the machine.
    original = int(re.search(r"device 1: node \S+ \(\S+\), pid (\d+)", proc.stderr)[1])
    takeover = re.search(r"device 1: warm standby pid (\d+) takes over", proc.stderr)
    assert takeover and "device 1: no warm standby" not in proc.stderr, proc.stderr[-3000:]
    devices = json.loads((tmp_path / "run" / "chaos" / "status.json").read_text())["devices"]
    assert devices[1]["pid"] == int(takeover[1]) != original and devices[1]["restarts"] == 1


def test_timed_fault_and_failed_final_checkpoint(fault_free, tmp_path):
    """A fault given by time (after_s) strikes in the first step that starts after it; a checkpoint fault
    on the last step fails the final checkpoint, which is taken again before the run ends."""
    plan = "faults.plan=[{kind: crash, after_s: 0.05, rank: 1}, {step: 8, kind: checkpoint, rank: 0}]"
    summary = Driver(config(tmp_path, plan), tmp_path).run()
    crash, ckpt = summary.faults_injected
    assert crash["kind"] == "crash" and crash["step"] >= 1 and ckpt["step"] == 8
    assert summary.checkpoints_failed == [8] and summary.checkpoints_committed[-1] == 8
    assert [i["kind"] for i in summary.incidents] == ["crash", "checkpoint"]
    assert_same_as(fault_free, tmp_path)


def test_recovery_budget_is_counted_over_a_time_window():
    """faults.max_recoveries within faults.recovery_window_s: a restart loop stops, isolated faults far apart do
    not add up to a stop (issue 13 item 13). A clock of our own: no waiting."""
    from orchestrator.healing import Healer, Incident, StepFailure

    now = [0.0]
    healer = Healer(tiny_config(None, "faults.max_recoveries=2", "faults.recovery_window_s=100"), clock=lambda: now[0])

    def failure(step):
        return StepFailure(step, [Incident(step, "dead", 0, None, 0.0, "gone")], 0.0)

    healer.failed_step(failure(1))
    now[0] = 10.0
    healer.failed_step(failure(2))
    now[0] = 50.0
    with pytest.raises(RunError, match=r"2 recoveries already in the last 100s"):
        healer.failed_step(failure(3))
    now[0] = 111.0   # both recoveries are more than 100 s old
    assert healer.failed_step(failure(4)).replace == [0] and healer.recoveries == 3


def test_straggler_is_replaced_only_with_a_standby_on_another_node():
    from orchestrator.monitoring.alerts import AlertEngine
    from orchestrator.config import AlertRule
    from orchestrator.healing import Healer, Incident

    def slow(step):
        return [Incident(step, "slow", 1, "node-a", 0.0, "own work 0.400s vs 0.030s on the others")]

    healer = Healer(tiny_config(None, "cluster.num_devices=2"))
    kept = slow(5)
    assert healer.stragglers(5, kept, spare_elsewhere=set()) is None
    assert kept[0].action == "recorded" and "no warm standby on another node" in kept[0].detail
    moved = slow(6)
    decision = healer.stragglers(6, moved, spare_elsewhere={1})
    assert decision.replace == [1] and decision.reform and decision.wait_snapshot and healer.recoveries == 1
    spent = Healer(tiny_config(None, "cluster.num_devices=2", "faults.max_recoveries=1"))
    spent.stragglers(4, slow(4), spare_elsewhere={1})
    late = slow(8)   # the budget is spent: a slow device is no reason to stop the run
    assert spent.stragglers(8, late, spare_elsewhere={1}) is None and late[0].action == "recorded"
    assert "not replaced" in late[0].detail and spent.recoveries == 1
    record_only = Healer(tiny_config(None, "cluster.num_devices=2", "faults.on_straggler=record"))
    assert record_only.stragglers(7, slow(7), spare_elsewhere={1}) is None and record_only.recoveries == 0
    # a straggler left in place is alerted (the straggler rule's action), once per step
    engine = AlertEngine([AlertRule("straggler", 1.5, steps=5)], None, stream=open(os.devnull, "w"))
    from dataclasses import asdict

    fired = engine.incident(asdict(kept[0])) + engine.incident(asdict(kept[0]))
    assert [(a.step, a.rule, a.action) for a in fired] == [(5, "straggler", "notify")]
