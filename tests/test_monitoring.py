"""The watchtower's first part: one metrics stream to metrics.jsonl, TensorBoard and Prometheus (read back from
the event files and from the node's Prometheus endpoint: the same values), status.json with each device's
health, periodic validation, MFU, and the progress line."""
from __future__ import annotations

import io
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.driver import Driver
from orchestrator.monitoring.metrics import flops_per_token
from orchestrator.monitoring.status import Progress
from tests.conftest import step_records, tiny_config


def records(run_dir: Path) -> list[dict]:
    return step_records(run_dir)


def prometheus_samples(run: str, done, timeout_s: float = 60.0) -> dict:
    """`name{labels}` -> value of this run's series on the node's metrics endpoint, read again until `done(samples)`:
    Ray's metrics agent exports every few seconds, so a first read may still hold an earlier step's gauges."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples = {}
        for line in body.splitlines():
            if line.startswith("ray_orchestrator_") and f'run="{run}"' in line:
                name, labels = line.split("{", 1)[0], line.split("{", 1)[1].rsplit("}", 1)[0]
                keep = ",".join(p for p in labels.split(",")
                                if p.split("=")[0] in ("layer", "expert", "rank", "kind", "outcome"))
                samples[f"{name}{{{keep}}}"] = float(line.rsplit(" ", 1)[1])
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(2)


def test_every_sink_gets_the_same_values(ray_session, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "watched"
    # snapshots every 3 steps: the kill in step 6 rewinds to step 3, so steps 4 and 5 are written twice
    cfg = tiny_config(run, "cluster.num_devices=2", "train.steps=8", "train.eval_every=4", "faults.snapshot_every=3",
                      "faults.plan=[{step: 6, kind: kill, rank: 1}]", "monitor.histogram_every=2")
    summary = Driver(cfg, run).run()
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 9)) and summary.recoveries == 1
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    assert all(0 < r["mfu"] < 1 for r in recs)
    assert summary.incidents[0]["rewound_to"] == 3
    # TensorBoard: every scalar of every step once (the replayed steps 4 and 5 too), as in metrics.jsonl
    tb = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    tb.Reload()
    for tag, key in (("train/loss", "loss"), ("throughput/mfu", "mfu"), ("balance/maxvio", "maxvio"),
                     ("train/grad_norm", "grad_norm")):
        events = tb.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in recs], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in recs], rel=1e-6), tag
    assert {e.step: e.value for e in tb.Scalars("validation/loss")} == pytest.approx(
        {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}, rel=1e-6)
    assert {e.step: e.value for e in tb.Scalars("device/step_time_s/rank_1")} == pytest.approx(
        {r["step"]: r["device_step_time_s"][1] for r in recs}, rel=1e-6)
    assert [e.value for e in tb.Scalars("incidents/total")] == [1.0]
    # the final checkpoint: begun after the last record, committed; an event line each, and in every sink
    events = [(e["event"], e["step"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "event" in e]
    assert events == [("checkpoint_started", 8), ("checkpoint_committed", 8)]
    assert [(e.step, e.value) for e in tb.Scalars("checkpoints/committed")] == [(8, 1.0)]
    assert {e.step for e in tb.Histograms("balance/expert_load_layer_0")} >= {2, 4, 8}
    # Prometheus, through Ray's metrics agent: the last step's values, the incident counted
    prom = prometheus_samples(run.name, lambda p: p.get("ray_orchestrator_checkpoint_committed_step{}") == 8
                              and p.get("ray_orchestrator_step{}") == 8 and 'ray_orchestrator_incidents_total{kind="dead"}' in p)
    last = recs[-1]
    assert prom["ray_orchestrator_loss{}"] == pytest.approx(last["loss"], rel=1e-6)
    assert prom["ray_orchestrator_step{}"] == 8
    assert prom["ray_orchestrator_mfu{}"] == pytest.approx(last["mfu"], rel=1e-6)
    assert prom['ray_orchestrator_expert_load{expert="3",layer="1"}'] == last["expert_load"][1][3]
    assert prom['ray_orchestrator_incidents_total{kind="dead"}'] == 1
    assert prom['ray_orchestrator_checkpoints_total{outcome="committed"}'] == 1
    assert prom["ray_orchestrator_checkpoint_committed_step{}"] == 8
    # status.json: the run and each device's health, the killed device restarted once
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8 and status["val_loss"] == summary.val_loss
    assert [d["restarts"] for d in status["devices"]] == [0, 1]
    assert all(d["pid"] and d["rss_mb"] > 50 and d["step_time_s"] > 0 for d in status["devices"])
    # cluster.bind_cores=auto: two CPU devices on one host, each bound to half its cores (read back from the OS in
    # the actor), the replacement of device 1 too; unbound where the host has fewer cores than devices
    from orchestrator.device.cores import cores_of, physical_cores

    cores = physical_cores(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else []
    assert [d["cores"] for d in status["devices"]] == (
        [cores_of(r, 2, cores) for r in range(2)] if len(cores) >= 2 else [None, None])
    assert status["incidents"] == 1 and status["last_checkpoint_step"] == 8 and status["checkpoint_age_steps"] == 0


def test_sinks_can_be_turned_off_and_bad_settings_are_named(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "monitor.tensorboard=false", "monitor.prometheus=false", "train.steps=2")
    Driver(cfg, tmp_path).run()
    assert not (tmp_path / "tensorboard").exists() and len(records(tmp_path)) == 2
    with pytest.raises(ConfigError, match="train.eval_every=5 needs train.eval_batches"):
        tiny_config(None, "train.eval_every=5", "train.eval_batches=0")
    with pytest.raises(ConfigError, match="monitor.peak_tflops"):
        tiny_config(None, "monitor.peak_tflops=-1")


def test_mfu_uses_the_configured_peak(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "monitor.peak_tflops=0.001", "train.steps=3")
    Driver(cfg, tmp_path).run()
    recs = records(tmp_path)
    r = recs[-1]
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token(cfg) / 1e9, rel=1e-9)
    # issue 23: the device timed its steps (the first after its build waited for nothing), and summary.json's
    # steps_per_s is the loop's wall-clock rate between the first and the last record, below the devices' own rate
    assert recs[0]["idle_s"] == 0.0 and all(0 < x["idle_share"] < 1 and x["idle_s"] > 0 for x in recs[1:])
    assert all(0 < x["other_calls_s"] <= x["idle_s"] for x in recs[1:])   # a snapshot after every step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_per_s"] == pytest.approx(2 / (recs[-1]["time"] - recs[0]["time"]), rel=1e-9)
    assert summary["device_steps_per_s"] == pytest.approx(2 / sum(x["step_time_s"] for x in recs[1:]), rel=1e-9)
    # with the pipelined driver a record's step_time_s is the loop's clock too, so the two rates agree up to when each
    # record was made (not "below": CI once found the loop rate 0.02% above)
    assert summary["steps_per_s"] == pytest.approx(summary["device_steps_per_s"], rel=0.25)
    assert summary["idle_share"] == pytest.approx((recs[1]["idle_share"] + recs[2]["idle_share"]) / 2, rel=1e-9)


def test_step_times_count_the_wait_between_train_steps(monkeypatch):
    """device/steptimes.py: idle_s is the gap since the previous train_step ended (0 for a new shard's first),
    other_calls_s the part of it inside other calls; the record's means and idle share over the devices."""
    from types import SimpleNamespace

    from orchestrator.device import steptimes
    from orchestrator.device.steptimes import StepTimes
    from orchestrator.monitoring.metrics import idle_stats

    now = [100.0]
    monkeypatch.setattr(steptimes.time, "time", lambda: now[0])
    clock = StepTimes()
    began = clock.begin()
    now[0] += 0.5   # the step
    first = clock.end(SimpleNamespace(), began)
    assert (first.started_at, first.ended_at, first.idle_s, first.other_calls_s) == (100.0, 100.5, 0.0, 0.0)
    clock.other_s = 0.01   # as other_call() counts a snapshot's 10 ms
    now[0] += 0.05         # the driver's turn and the snapshot: 50 ms
    began = clock.begin()
    now[0] += 0.45
    second = clock.end(SimpleNamespace(), began)
    assert second.idle_s == pytest.approx(0.05) and second.other_calls_s == pytest.approx(0.01)
    assert clock.other_s == 0.0
    with clock.other_call():
        pass
    assert clock.other_s > 0
    clock.reset()   # a new shard: its first step waited for nothing
    now[0] += 10.0
    assert clock.end(SimpleNamespace(), clock.begin()).idle_s == 0.0

    def report(idle, busy, other=0.0):
        return SimpleNamespace(started_at=10.0, ended_at=10.0 + busy, idle_s=idle, other_calls_s=other)
    stats = idle_stats([report(0.01, 0.09, 0.004), report(0.03, 0.07)])
    assert stats == pytest.approx({"idle_s": 0.02, "idle_share": 0.2, "other_calls_s": 0.002})
    assert idle_stats([SimpleNamespace(ended_at=0.0)]) == {}   # a DeviceShard stepped directly: nothing timed


def test_summary_steps_per_s_is_the_loop_rate():
    """summary.Totals: steps_per_s counts the wall time between records (the driver's work between steps), the old
    device-only rate is device_steps_per_s; one step (or records without a time) falls back to the device rate."""
    from orchestrator.monitoring.summary import Totals

    t = Totals()
    for step, at in enumerate([10.0, 10.3, 10.6, 10.9], 1):   # 0.3 s apart, of which the devices took 0.2 s
        t = t.add({"step": step, "step_time_s": 0.5 if step == 1 else 0.2, "tokens": 100, "time": at,
                   "idle_share": 0.0 if step == 1 else 0.25, "idle_s": 0.0 if step == 1 else 0.05})
    assert t.steps_per_s == pytest.approx(3 / 0.9) and t.device_steps_per_s == pytest.approx(5.0)
    assert t.tokens_per_s == pytest.approx(500.0)   # (still the devices' rate)
    assert t.mean_after_first("idle_share") == pytest.approx(0.25) and t.mean_after_first("idle_s") == pytest.approx(0.05)
    one = Totals().add({"step": 1, "step_time_s": 0.5, "tokens": 100, "time": 3.0})
    assert one.steps_per_s == one.device_steps_per_s == pytest.approx(2.0) and one.mean_after_first("idle_s") == 0.0
    assert Totals().steps_per_s == 0.0


def test_flops_per_token_by_hand():
    cfg = tiny_config(None)   # dim 32, 3 layers (1 dense), 4 experts top-2, seq 32, vocab 256, tied
    m = cfg.model
    attn = 4 * m.dim * m.dim
    norms = 2 * m.dim
    dense_ffn = 3 * m.dim * m.dense_dim
    expert = 3 * m.dim * m.expert_dim
    moe = m.num_experts * m.dim + m.top_k * expert + m.num_shared_experts * expert  # router, chosen, shared
    active = m.vocab_size * m.dim + m.dim + 3 * (attn + norms) + dense_ffn + 2 * moe
    assert flops_per_token(cfg) == 6 * active + 12 * m.n_layers * m.dim * cfg.data.seq_len


def test_progress_line_shows_mfu_and_incidents():
    out = io.StringIO()
    p = Progress(10, "lines", stream=out)
    p.update(1, 2.5, 12_000, 0.1, maxvio=0.5, mfu=0.123, incidents=2)
    line = out.getvalue()
    assert "loss 2.5000" in line and "MaxVio 0.50" in line and "MFU 12.3%" in line and "incidents 2" in line


def test_grafana_dashboard_queries_only_metrics_we_export():
    import re

    from orchestrator.monitoring.metrics import SCALARS

    dashboard = json.loads((Path(__file__).parent.parent / "cluster_configs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_orchestrator_\w+", e)}
    ours = {f"ray_orchestrator_{name}" for _, name, _ in SCALARS.values()} | {
        "ray_orchestrator_step", "ray_orchestrator_maxvio_layer", "ray_orchestrator_expert_load",
        "ray_orchestrator_device_step_time_s", "ray_orchestrator_incidents_total",
        "ray_orchestrator_device_memory_bytes"}
    assert used and used <= ours, used - ours
    assert {"ray_orchestrator_loss", "ray_orchestrator_mfu", "ray_orchestrator_expert_load",
            "ray_orchestrator_device_memory_bytes"} <= used


def test_mlflow_gets_the_same_values(ray_session, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow (pip install -e '.[dev]' brings mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # a file store for the test; use a server or sqlite for real
    run = tmp_path / "tracked"
    Driver(tiny_config(run, "monitor.mlflow=true", "train.steps=4", "train.eval_every=2"), run).run()
    client = MlflowClient()
    [found] = client.search_runs(experiment_ids=["0"])
    assert found.info.run_name == "tracked" and found.data.params["train.steps"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in records(run)}, rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "val_loss")) == [2, 4]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "checkpoint_committed")] == [4]


def test_overhead_bench_times_the_loop_and_pairs_each_round(monkeypatch):
    """bench/overhead.py (no run): the loop time per step from step 6's end to the last step's, each arm's ratio
    against the plain arm of the same round (plain_before for `before` when it ran), tokens/s and MFU from it."""
    import importlib.util

    bench_dir = Path(__file__).parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("overhead_bench", bench_dir / "overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ends = {s: 100.0 + 0.5 * s for s in range(1, 7)} | {s: 103.0 + 0.2 * (s - 6) for s in range(7, 12)}
    assert bench.loop_s_per_step(ends) == pytest.approx(0.2)   # steps 1..6 (the warm-up) left out
    runs = {"plain": [{"s_per_step": 0.10}, {"s_per_step": 0.20}],
            "default": [{"s_per_step": 0.11, "idle_share": 0.01}, {"s_per_step": 0.21, "idle_share": 0.03}],
            "before": [{"s_per_step": 0.12}, {"s_per_step": 0.26}]}
    baseline = {a: bench.ARMS[a][2] for a in runs}
    table = bench.summarize(runs, baseline, positions=1000, flops=1e6, n=2, peak=1e9)
    assert table["default"]["ratios"] == pytest.approx([1.1, 1.05]) and table["default"]["vs"] == "plain"
    assert table["before"]["vs"] == "plain" and table["before"]["ratio"] == pytest.approx(1.25)  # no plain_before ran
    assert table["plain"]["s_per_step"] == pytest.approx(0.15) and "ratio" not in table["plain"]
    assert table["default"]["tokens_per_s"] == pytest.approx(1000 / 0.16)
    assert table["default"]["mfu"] == pytest.approx(1000 / 0.16 * 1e6 / 2e9) and table["default"]["idle_share"] == 0.02
    runs["plain_before"] = [{"s_per_step": 0.1}, {"s_per_step": 0.2}]
    table = bench.summarize(runs, {a: bench.ARMS[a][2] for a in runs}, 1000, 1e6, 2, None)
    assert table["before"]["vs"] == "plain_before" and table["default"]["mfu"] is None
    # the median of the per-step intervals: one slow interval (a neighbour's burst) does not move it, and each arm
    # gets the ratio of the medians beside the ratio of the means
    assert bench.median_step_s(ends | {12: 110.0}) == pytest.approx(0.2)
    rows = {"plain": [{"s_per_step": 0.1, "median_step_s": 0.1}], "default": [{"s_per_step": 0.12, "median_step_s": 0.105}]}
    assert bench.summarize(rows, {"plain": "plain", "default": "plain"}, 1000, 1e6, 2, None)["default"]["median_ratio"] \
        == pytest.approx(1.05)
