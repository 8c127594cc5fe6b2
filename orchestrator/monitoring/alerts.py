"""Alert rules: conditions on the metrics stream, each with a threshold and an action.

A rule looks at every completed step's record (and `nonfinite` also at the non-finite steps the healer
rolled back, which leave no record). It fires when its condition has held for `steps` consecutive
steps, and fires again only after the condition has cleared (no alert storm from one long imbalance).
When the driver rewinds, the rules' state goes back with it, and a replayed step never fires the same
rule twice. Conditions:

    nonfinite        a non-finite loss or gradient norm (an incident of kind nan, or a skipped step)
    loss_spike       loss > threshold x median of the previous `window` losses            (default 3)
    grad_spike       grad_norm > threshold x median of the previous `window` norms        (default 10)
    maxvio           MaxVio > threshold                                                   (default 1.0)
    straggler        slowest device's own work (step time - collectives) / the others' median (default 1.5)
    throughput_drop  tokens/s < threshold x median of the previous `window` steps'        (default 0.5)
    restarts         recoveries within the last `window` steps > threshold                (default 3)
    checkpoint_age   steps since the last committed checkpoint > threshold                (default 1000)
    checkpoint_failed  a checkpoint that did not commit (an incident of kind checkpoint): every failed save
                     fires it, as it is decided, with the reason (the healer retakes it or stops the run)
    restore_failed     recovery found a snapshot or checkpoint it cannot restore (a tensor missing, the wrong shape):
                       an incident of kind restore; the run stops there instead of replaying from an older state

Actions: record (alerts.jsonl only), notify (also a warning on stderr and in the log, and a POST of
the alert as JSON to `monitor.webhook_url` with retries and a timeout), and rollback | skip | stop | anticipate,
handed to the Healer (rewind to the newest snapshot; rewind and skip this step's batch; stop the run; rewind and
route anticipatorily from the replayed steps on until balance.anticipatory_calm_steps after the spike: DeepSeek-V4's
answer to a loss spike, driver/anticipate.py).
Every alert goes to `alerts.jsonl` as it fires, with the step, rule, value, threshold and action (and
`webhook: pending` when one is posted; a second line with the same step and rule and the webhook's
outcome, delivered or failed, follows when it is known).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.config import redact_text, redact_url
from orchestrator.healing.detectors import against_others, own_work, recent_median
from orchestrator.monitoring.listeners import RunListener
from orchestrator.monitoring.rundir import append_jsonl

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = {"nonfinite": 0.0, "loss_spike": 3.0, "grad_spike": 10.0, "maxvio": 1.0, "straggler": 1.5,
                     "throughput_drop": 0.5, "restarts": 3.0, "checkpoint_age": 1000.0, "checkpoint_failed": 0.0,
                     "restore_failed": 0.0}
INCIDENT_RULES = ("checkpoint_failed", "restore_failed")   # fired by incidents only: a step's record never shows them
RULES = tuple(DEFAULT_THRESHOLD)
ACTIONS = ("record", "notify", "rollback", "skip", "stop", "anticipate")


@dataclass
class Alert:
    step: int
    rule: str
    value: float | None
    threshold: float
    action: str
    detail: str
    time: float = field(default_factory=time.time)
    webhook: str | None = None   # delivered | failed: <why> (notify with a webhook)


@dataclass
class Context:
    """What the rules need besides the records: recoveries so far (their steps) and the last checkpoint."""
    recovery_steps: list[int] = field(default_factory=list)
    last_checkpoint_step: int | None = None


def _median_before(history: list[dict[str, Any]], key: str, window: int) -> float | None:
    return recent_median((r.get(key) for r in history[-window:]), min(window, 5))


def measure(rule: str, threshold: float, window: int, rec: dict[str, Any], history: list[dict[str, Any]],
            ctx: Context) -> tuple[float | None, bool, str]:
    """(the value the rule watches, does it break the threshold, a sentence saying so) for one record."""
    if rule == "nonfinite":
        bad = rec.get("skipped") == "nonfinite" or not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]))
        return rec["loss"], bad, f"non-finite loss {rec['loss']} or gradient norm {rec['grad_norm']}"
    if rule == "loss_spike" and rec.get("phase") == "rl":
        return None, False, ""   # a policy-gradient loss is centred on 0 (either sign): a ratio to its median says nothing
    if rule in ("loss_spike", "grad_spike"):
        key = "loss" if rule == "loss_spike" else "grad_norm"
        median = _median_before(history, key, window)
        if median is None or not median:
            return rec[key], False, ""
        ratio = rec[key] / median
        return ratio, ratio > threshold, f"{key} {rec[key]:.4g} is {ratio:.2f}x the median {median:.4g} of the last {window} steps"
    if rule == "maxvio":
        value = rec.get("maxvio")
        return value, value is not None and value > threshold, f"MaxVio {value:.3f} above {threshold}" if value else ""
    if rule == "straggler":
        # peers wait for a straggler inside collectives: its own work shows it (detectors.py, as the Watch judges)
        pairs = against_others(own_work(rec.get("device_step_time_s") or [], rec.get("device_collective_s")))
        ratios = [mine / others if others > 0 else 0.0 for mine, others in pairs]
        if not any(ratios):
            return None, False, ""
        ratio = max(ratios)
        slow = ratios.index(ratio)
        return ratio, ratio > threshold, f"device {slow}'s own work took {ratio:.2f}x the median of the others'"
    if rule == "throughput_drop":   # against steps of the same kind (an RL run's warm-up steps are cheaper)
        median = _median_before([r for r in history if r.get("phase") == rec.get("phase")], "tokens_per_s", window)
        if median is None or not median:
            return rec["tokens_per_s"], False, ""
        ratio = rec["tokens_per_s"] / median
        return ratio, ratio < threshold, f"{rec['tokens_per_s']:.0f} tokens/s is {ratio:.2f}x the median of the last {window} steps"
    if rule == "restarts":
        recent = sum(1 for s in ctx.recovery_steps if 0 <= rec["step"] - s < window)
        return float(recent), recent > threshold, f"{recent} recoveries in the last {window} steps"
    if rule == "checkpoint_age":
        age = rec["step"] - (ctx.last_checkpoint_step or 0)
        return float(age), age > threshold, f"last committed checkpoint {age} steps ago"
    if rule in INCIDENT_RULES:
        return None, False, ""
    raise ValueError(f"unknown alert rule {rule!r}")


class Webhook:
    """POST alerts as JSON to a URL, each in its own thread (training never waits): `retries` more tries with
    doubling waits, each with `timeout_s`. `on_result(alert, outcome)` is called when one is done."""

    def __init__(self, url: str, timeout_s: float, retries: int, on_result: Callable[[Alert, str], None]):
        self.url, self.timeout_s, self.retries, self.on_result = url, timeout_s, retries, on_result
        self.shown = redact_url(url, keep_path=False)   # the URL is a credential (Slack, PagerDuty: the key is its path)
        self.threads: list[threading.Thread] = []

    def send(self, alert: Alert) -> None:
        t = threading.Thread(target=self._post, args=(alert,), name=f"webhook-{alert.rule}", daemon=True)
        self.threads.append(t)
        t.start()

    def _post(self, alert: Alert) -> None:
        from tenacity import RetryError, Retrying, stop_after_attempt, wait_exponential

        body = json.dumps({k: v for k, v in asdict(alert).items() if k != "webhook"}).encode()

        def once() -> None:
            try:
                req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if not 200 <= resp.status < 300:
                        raise OSError(f"HTTP {resp.status}")
            except Exception as e:  # the URL is a credential: never in a message
                raise OSError(redact_text(f"{type(e).__name__}: {e}".replace(self.url, self.shown))) from None

        try:
            Retrying(stop=stop_after_attempt(self.retries + 1), wait=wait_exponential(multiplier=0.5, min=0.5))(once)
        except RetryError as e:
            error = str(e.last_attempt.exception())
            log.warning("alert webhook %s failed after %d tries: %s", self.shown, self.retries + 1, error)
            self.on_result(alert, f"failed: {error}")
            return
        self.on_result(alert, "delivered")

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


class AlertEngine(RunListener):
    """Evaluates `monitor.alerts` on each record; writes alerts.jsonl; notifies. Returns the alerts whose action
    the Healer must take (rollback, skip, stop). A run's listener of incidents (listeners.py); `on_fire`, when
    set, hears every alert fired (the driver hands it its listeners' `alert`)."""

    def __init__(self, rules: list[Any], path: Path | None, webhook_url: str | None = None,
                 webhook_timeout_s: float = 5.0, webhook_retries: int = 3, stream=None):
        self.rules = rules
        self.path = path
        self.stream = stream or sys.stderr
        self.streak = [0] * len(rules)
        self.firing = [False] * len(rules)
        self.states: dict[int, tuple[list[int], list[bool]]] = {}   # step -> (streak, firing) after it
        self.fired: set[tuple[str, int]] = set()                    # (rule, step): a replay never fires it again
        self.stop: Alert | None = None   # a stop alert from an incident, for the driver to act on
        self.alerts: list[Alert] = []
        self.webhook = Webhook(webhook_url, webhook_timeout_s, webhook_retries, self._delivered) if webhook_url else None
        self._lock = threading.Lock()
        self.on_fire: Callable[[Alert], None] | None = None

    def evaluate(self, rec: dict[str, Any], history: list[dict[str, Any]], ctx: Context) -> list[Alert]:
        """Alerts fired by this step's record (`history`: the records before it)."""
        fired = []
        step = rec["step"]
        for i, r in enumerate(self.rules):
            threshold = DEFAULT_THRESHOLD[r.rule] if r.threshold is None else r.threshold
            value, bad, detail = measure(r.rule, threshold, r.window, rec, history, ctx)
            self.streak[i] = self.streak[i] + 1 if bad else 0
            if not bad:
                self.firing[i] = False
            elif self.streak[i] >= r.steps and not self.firing[i]:
                self.firing[i] = True
                if (r.rule, step) not in self.fired:
                    fired.append(self._fire(step, r.rule, value, threshold, r.action,
                                            detail + (f" for {r.steps} steps" if r.steps > 1 else "")))
        self.states[step] = (list(self.streak), list(self.firing))
        return fired

    def check(self, rec: dict[str, Any], history: list[dict[str, Any]], ctx: Context) -> tuple[str, str, str] | None:
        """The rules evaluated on a step's record (the rules fired noted in it, `alerts`); what they ask of the run
        (acting)."""
        fired = self.evaluate(rec, history, ctx)
        if fired:
            rec["alerts"] = [a.rule for a in fired]
        return acting(fired, bool(rec.get("skipped")))

    def rewind(self, back: int) -> None:
        """The driver went back to after step `back`: the rules' state is what it was then."""
        self.states = {s: v for s, v in self.states.items() if s <= back}
        streak, firing = self.states.get(back, ([0] * len(self.rules), [False] * len(self.rules)))
        self.streak, self.firing = list(streak), list(firing)

    on_rewind = rewind

    def forget(self, before: int, keep: set[int], fired_before: int) -> None:
        """Bounded memory however long the run: drop the rule states of steps before `before` (the oldest step a
        rewind to an in-memory snapshot reaches) but those in `keep`, and the record of alerts fired before
        `fired_before` (the oldest step any rewind reaches: a replay never fires one of those again)."""
        self.states = {s: v for s, v in self.states.items() if s >= before or s in keep}
        self.fired = {(rule, s) for rule, s in self.fired if s >= fired_before}

    def incident(self, incident: dict[str, Any]) -> list[Alert]:
        """Alerts from an incident the healer decided: non-finite values it rolled back (a skipped step has a
        record, which `evaluate` sees), a straggler left in place, a checkpoint that did not commit (each one: a
        retake of the same step that fails again fires again), a state recovery could not restore. The healer has
        acted already: an alert can record, notify or stop."""
        kind, step, detail = incident.get("kind"), int(incident.get("step") or 0), incident.get("detail")
        if kind == "checkpoint":   # every failed save fires, a retake of the same step too
            outcome = "retaken later" if incident.get("action") == "retried" else "the run stops"
            return self._on_incident("checkpoint_failed", step, f"checkpoint of step {step} not committed: {detail} "
                                     f"({outcome})", ("record", "notify", "stop"), once=False)
        if kind == "slow" and incident.get("action") == "recorded":  # a straggler left in place
            return self._on_incident("straggler", step, f"device {incident.get('rank')}: {detail}",
                                     ("record", "notify"))
        if kind == "nan" and incident.get("action") != "skipped":
            return self._on_incident("nonfinite", step, f"{detail or 'non-finite values'} ({incident.get('action')})",
                                     ("record", "notify", "stop"))
        if kind == "restore":   # the run stops on it: an alert says why, naming the tensor
            return self._on_incident("restore_failed", step, str(detail), ("record", "notify"))
        return []

    def on_incident(self, incident: dict[str, Any]) -> None:
        self.incident(incident)

    def _on_incident(self, rule: str, step: int, detail: str, actions: tuple[str, ...], once: bool = True
                     ) -> list[Alert]:
        """Fire every configured `rule` for an incident at `step` (`once`: not again for a step it fired at); an
        action outside `actions` (the healer has acted already) becomes notify; `stop` stops the run."""
        fired = []
        for r in self.rules:
            if r.rule != rule or (once and (rule, step) in self.fired):
                continue
            action = r.action if r.action in actions else "notify"
            alert = self._fire(step, rule, None, 0.0, action, detail)
            fired.append(alert)
            if action == "stop":
                self.stop = alert
        return fired

    def _fire(self, step: int, rule: str, value: float | None, threshold: float, action: str, detail: str) -> Alert:
        alert = Alert(step, rule, value, threshold, action, detail)
        self.alerts.append(alert)
        self.fired.add((rule, step))
        if action != "record":
            line = f"ALERT step {step} {rule}: {detail} (action: {action})"
            log.warning(line)
            self.stream.write(line + "\n")
            self.stream.flush()
        posted = bool(self.webhook) and action != "record"
        if posted:
            alert.webhook = "pending"
        try:
            self._append(asdict(alert))
        finally:  # a full run directory (DiskFull, raised on) must not keep the alert from its webhook
            if posted:
                self.webhook.send(alert)
        if self.on_fire is not None:
            self.on_fire(alert)
        return alert

    def _delivered(self, alert: Alert, outcome: str) -> None:
        alert.webhook = outcome
        try:
            self._append({"step": alert.step, "rule": alert.rule, "webhook": outcome, "time": time.time()})
        except Exception as e:  # a webhook thread: a full run directory is the driver's to report, not this thread's
            log.warning("alert webhook outcome for step %d %s not recorded: %s", alert.step, alert.rule, e)

    def _append(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self._lock:  # webhook threads append their outcome lines too
            append_jsonl(self.path, line)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.webhook:
            self.webhook.wait(timeout_s)


def acting(fired: list[Alert], skipped: bool) -> tuple[str, str, str] | None:
    """What the alerts fired on a step ask of the run, by their actions: (the rules, "stop", "skip", "anticipate" or
    "rollback", the details) for the Healer to decide on, the strongest action first; None when only to record or
    notify. A step whose update was skipped anyway has nothing to rewind: only a stop acts on it."""
    acts = [a for a in fired if a.action in (("stop",) if skipped else ("rollback", "skip", "stop", "anticipate"))]
    if not acts:
        return None
    action = next(x for x in ("stop", "skip", "anticipate", "rollback") if any(a.action == x for a in acts))
    return "+".join(a.rule for a in acts), action, "; ".join(a.detail for a in acts)


__all__ = ["Alert", "acting", "AlertEngine", "Context", "Webhook", "measure", "RULES", "ACTIONS", "DEFAULT_THRESHOLD",
           "INCIDENT_RULES"]
