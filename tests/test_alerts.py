"""Alert rules on crafted metric sequences: each fires where it should and not on a normal run; notify posts to
a webhook (a local HTTP server) with retries; the driver hands rollback, skip and stop to the healer."""
from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from orchestrator.monitoring.alerts import AlertEngine, Context
from orchestrator.config import AlertRule, ConfigError
from tests.conftest import step_records, tiny_config


def normal(n: int = 40) -> list[dict]:
    """A healthy run: loss slowly down with a little noise, steady throughput, balanced devices."""
    return [{"step": s, "loss": 3.0 - 0.01 * s + 0.02 * (s % 3), "grad_norm": 1.0 + 0.05 * (s % 4),
             "tokens_per_s": 10_000 + 100 * (s % 5), "maxvio": 0.3, "device_step_time_s": [0.10, 0.11, 0.10]}
            for s in range(1, n + 1)]


def run(rules: list[AlertRule], records: list[dict], ctx: Context | None = None, **kw) -> list:
    engine = AlertEngine(rules, None, stream=io.StringIO(), **kw)
    fired = []
    for i, rec in enumerate(records):
        fired += engine.evaluate(rec, records[:i], ctx or Context())
    return fired


ALL = [AlertRule(rule=r, action="record") for r in ("nonfinite", "loss_spike", "grad_spike", "maxvio", "straggler",
                                                     "throughput_drop", "restarts", "checkpoint_age",
                                                     "checkpoint_failed")]


def test_no_rule_fires_on_a_normal_run():
    assert run(ALL, normal(), Context(recovery_steps=[], last_checkpoint_step=30)) == []


@pytest.mark.parametrize("rule,change,value", [
    ("loss_spike", {"loss": 9.0}, pytest.approx(9.0 / 2.79, rel=0.02)),
    ("grad_spike", {"grad_norm": 40.0}, pytest.approx(40 / 1.05, rel=0.05)),
    ("throughput_drop", {"tokens_per_s": 3000}, pytest.approx(0.3, rel=0.02)),
    ("straggler", {"device_step_time_s": [0.1, 0.3, 0.1]}, pytest.approx(3.0)),
    ("maxvio", {"maxvio": 1.7}, 1.7),
    ("nonfinite", {"loss": float("nan"), "skipped": "nonfinite"}, None),
])
def test_each_rule_fires_at_the_bad_step_only(rule, change, value):
    records = normal()
    records[29] = {**records[29], **change}
    fired = run([AlertRule(rule=rule, action="record")], records)
    assert [(a.step, a.rule) for a in fired] == [(30, rule)]
    if value is not None:
        assert fired[0].value == value


def test_streaks_fire_once_and_again_after_clearing():
    records = normal(60)
    for s in list(range(10, 20)) + list(range(40, 45)):
        records[s - 1]["maxvio"] = 2.0
    fired = run([AlertRule(rule="maxvio", threshold=1.0, steps=5)], records)
    assert [a.step for a in fired] == [14, 44]   # after 5 steps over, once per streak; a 4-step streak is not enough
    assert "for 5 steps" in fired[0].detail


def test_restarts_and_checkpoint_age_use_the_context():
    records = normal(50)
    fired = run([AlertRule(rule="restarts", threshold=2, window=20)], records, Context(recovery_steps=[31, 35, 40]))
    assert [a.step for a in fired] == [40] and fired[0].value == 3
    fired = run([AlertRule(rule="checkpoint_age", threshold=25)], records, Context(last_checkpoint_step=10))
    assert [a.step for a in fired] == [36]


def test_nonfinite_from_records_and_incidents_once_each():
    records = normal()
    for s in (10, 20):   # skipped non-finite steps have a record
        records[s - 1] = {**records[s - 1], "loss": float("nan"), "skipped": "nonfinite"}
    assert [a.step for a in run([AlertRule(rule="nonfinite", action="record")], records)] == [10, 20]
    engine = AlertEngine([AlertRule(rule="nonfinite", action="rollback")], None, stream=io.StringIO())
    fired = engine.incident({"kind": "nan", "step": 7, "detail": "non-finite loss", "action": "rolled back"})
    assert [(a.step, a.rule, a.action) for a in fired] == [(7, "nonfinite", "notify")]   # the healer acted already
    assert engine.incident({"kind": "nan", "step": 7, "action": "rolled back"}) == []  # once per step
    assert engine.incident({"kind": "nan", "step": 9, "action": "skipped"}) == []      # its record reports it
    assert engine.incident({"kind": "dead", "step": 8}) == [] and engine.stop is None
    stopper = AlertEngine([AlertRule(rule="nonfinite", action="stop")], None, stream=io.StringIO())
    stopper.incident({"kind": "nan", "step": 3, "action": "rolled back"})
    assert stopper.stop is not None and stopper.stop.step == 3


def test_a_rewind_puts_the_rules_back_and_a_replay_does_not_fire_again():
    records = normal(10)
    for s in range(3, 11):
        records[s - 1]["maxvio"] = 2.0
    engine = AlertEngine([AlertRule(rule="maxvio", threshold=1.0, steps=2)], None, stream=io.StringIO())
    first = [a.step for i, rec in enumerate(records[:6]) for a in engine.evaluate(rec, records[:i], Context())]
    assert first == [4]
    engine.rewind(3)            # back to after step 3: one bad step in the streak
    assert engine.streak == [1] and engine.firing == [False]
    replay = [a.step for i, rec in enumerate(records[3:6], start=3) for a in engine.evaluate(rec, records[:i], Context())]
    assert replay == []         # step 4 fires again on the replay: not a second alert
    assert engine.streak == [4] and engine.firing == [True]


def test_threshold_zero_is_a_threshold():
    records = normal(10)
    fired = run([AlertRule(rule="restarts", threshold=0, window=5)], records, Context(recovery_steps=[7]))
    assert [a.step for a in fired] == [7]


class Hook(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Hook.fail_first > 0:
            Hook.fail_first -= 1
            self.send_response(503)
        else:
            Hook.received.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_notify_posts_to_the_webhook_with_retries(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received, Hook.fail_first = [], 2   # the first two tries get 503: the third gets through
    try:
        records = normal()
        records[29]["loss"] = 9.0
        out = io.StringIO()
        engine = AlertEngine([AlertRule(rule="loss_spike", action="notify")], tmp_path / "alerts.jsonl",
                             webhook_url=f"http://127.0.0.1:{server.server_port}/hook", webhook_timeout_s=5,
                             webhook_retries=3, stream=out)
        for i, rec in enumerate(records):
            engine.evaluate(rec, records[:i], Context())
        engine.close()
    finally:
        server.shutdown()
    assert [(b["step"], b["rule"], b["action"]) for b in Hook.received] == [(30, "loss_spike", "notify")]
    assert "ALERT step 30 loss_spike" in out.getvalue()
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    # written as it fired, then the webhook's outcome
    assert [(a["step"], a["rule"], a["webhook"]) for a in lines] == [(30, "loss_spike", "pending"),
                                                                     (30, "loss_spike", "delivered")]
    assert lines[0]["action"] == "notify" and lines[0]["value"] > 3


def test_every_failed_checkpoint_alerts_by_default_and_is_posted(tmp_path):
    from orchestrator.config import _default_alerts

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received, Hook.fail_first = [], 0
    out = io.StringIO()
    try:
        engine = AlertEngine(_default_alerts(), tmp_path / "alerts.jsonl",
                             webhook_url=f"http://127.0.0.1:{server.server_port}/hook", stream=out)
        # the healer's incidents: a failed save retaken, its retake failing too (the same step: a second alert),
        # then the one that stops the run
        for step, action in ((10, "retried"), (10, "retried"), (12, "stopped")):
            engine.incident({"kind": "checkpoint", "step": step, "detail": "no space left writing dense.safetensors",
                             "action": action})
        assert engine.incident({"kind": "dead", "step": 13}) == [] and engine.stop is None
        engine.close()
    finally:
        server.shutdown()
    assert [(a.step, a.rule, a.action) for a in engine.alerts] == [(10, "checkpoint_failed", "notify")] * 2 + [
        (12, "checkpoint_failed", "notify")]
    assert "ALERT step 12 checkpoint_failed: checkpoint of step 12 not committed: no space left writing " \
           "dense.safetensors (the run stops) (action: notify)" in out.getvalue()
    assert sorted((b["step"], b["rule"]) for b in Hook.received) == [(10, "checkpoint_failed")] * 2 + [
        (12, "checkpoint_failed")]
    stopper = AlertEngine([AlertRule(rule="checkpoint_failed", action="stop")], None, stream=io.StringIO())
    stopper.incident({"kind": "checkpoint", "step": 4, "detail": "x", "action": "retried"})
    assert stopper.stop is not None and stopper.stop.step == 4
    with pytest.raises(ConfigError, match="checkpoint_failed\\) action=rollback: a failed checkpoint is no step"):
        tiny_config(None, "monitor.alerts=[{rule: checkpoint_failed, action: rollback}]")
    with pytest.raises(ConfigError, match="monitor.alerts\\[0\\].threshold=1.0 has no effect on the checkpoint_failed"):
        tiny_config(None, "monitor.alerts=[{rule: checkpoint_failed, threshold: 1}]")


def test_a_webhook_that_refuses_is_given_up_on(tmp_path):
    engine = AlertEngine([AlertRule(rule="maxvio", action="notify")], tmp_path / "alerts.jsonl",
                         webhook_url="http://127.0.0.1:9/none", webhook_timeout_s=1, webhook_retries=1,
                         stream=io.StringIO())
    engine.evaluate({**normal()[0], "maxvio": 5.0}, [], Context())
    engine.close()
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert lines[0]["webhook"] == "pending" and lines[1]["webhook"].startswith("failed:")


def test_alert_config_errors_name_the_rule():
    with pytest.raises(ConfigError, match="monitor.alerts\\[0\\].rule='loss_spikes' is not one of"):
        tiny_config(None, "monitor.alerts=[{rule: loss_spikes}]")
    with pytest.raises(ConfigError, match="monitor.alerts\\[0\\].action='panic'"):
        tiny_config(None, "monitor.alerts=[{rule: maxvio, action: panic}]")


def _records(run_dir) -> list[dict]:
    return step_records(run_dir)


def test_alert_actions_reach_the_healer(ray_session, tmp_path):
    """maxvio over a tiny threshold for 3 steps fires at step 3: rollback replays it (same result as no alert),
    skip replays it without its update, stop ends the run with the alert named."""
    from orchestrator.driver import Driver
    from orchestrator.errors import RunError

    base = ["cluster.num_devices=2", "train.steps=5", "train.eval_batches=0"]
    rule = "{rule: maxvio, threshold: 0.0001, steps: 3, action: %s}"
    Driver(tiny_config(tmp_path / "twin", *base, "monitor.alerts=[]"), tmp_path / "twin").run()
    twin = _records(tmp_path / "twin")
    for action in ("rollback", "skip"):
        run = tmp_path / action
        summary = Driver(tiny_config(run, *base, f"monitor.alerts=[{rule % action}]"), run).run()
        recs = _records(run)
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
        assert [(i["step"], i["kind"], i["rewound_to"]) for i in summary.incidents] == [(3, "alert:maxvio", 2)]
        alerts = [json.loads(line) for line in (run / "alerts.jsonl").read_text().splitlines()]
        assert [(a["step"], a["rule"], a["action"]) for a in alerts] == [(3, "maxvio", action)]
        assert [r["loss"] for r in recs[:3]] == [r["loss"] for r in twin[:3]]
        if action == "rollback":   # a deterministic replay: the run ends as the twin does
            assert summary.incidents[0]["action"] == "rolled back"
            assert [r["loss"] for r in recs] == [r["loss"] for r in twin]
        else:                      # the batch of step 3 was not learned from: later steps differ
            assert summary.incidents[0]["action"] == "skipped" and recs[2]["skipped"] == "alert"
            assert recs[3]["loss"] != twin[3]["loss"]
    run = tmp_path / "stop"
    with pytest.raises(RunError, match="alert maxvio"):
        Driver(tiny_config(run, *base, f"monitor.alerts=[{rule % 'stop'}]"), run).run()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
