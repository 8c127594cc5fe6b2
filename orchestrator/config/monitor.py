"""The monitor section: where the metrics stream goes, MFU's reference, and the alert rules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from orchestrator.config.base import ConfigError, Root, _choice, _positive
from orchestrator.config.redact import redact_url


@dataclass
class AlertRule:
    """One alert rule (conditions and actions: orchestrator/monitoring/alerts.py)."""
    rule: str = "loss_spike"   # nonfinite | loss_spike | grad_spike | maxvio | straggler | throughput_drop | restarts
                               # | checkpoint_age | checkpoint_failed | restore_failed
    threshold: Optional[float] = None  # None: the rule's default (see alerts.py)
    steps: int = 1             # consecutive steps the condition must hold before the alert fires
    window: int = 20           # steps of history: the moving median (spikes, throughput), recoveries counted (restarts)
    action: str = "notify"     # record | notify | rollback | skip | stop | anticipate (loss_spike, grad_spike: rollback,
                               # then anticipatory routing on: balance.anticipatory_calm_steps)


def _default_alerts() -> list[AlertRule]:
    return [AlertRule("nonfinite"), AlertRule("loss_spike", 3.0), AlertRule("grad_spike", 10.0),
            AlertRule("straggler", 1.5, steps=5), AlertRule("throughput_drop", 0.5, steps=5),
            AlertRule("restarts", 3.0, window=100), AlertRule("maxvio", 1.0, steps=50, action="record"),
            AlertRule("checkpoint_age", 1000.0, action="record"), AlertRule("checkpoint_failed"),
            AlertRule("restore_failed")]


@dataclass
class MonitorConfig:
    """Where the metrics stream goes besides metrics.jsonl (always), and what MFU is measured against."""
    tensorboard: bool = True          # TensorBoard event files in <run dir>/tensorboard
    prometheus: bool = True           # Ray's metrics API (ray.util.metrics): Prometheus endpoint, Ray dashboard, Grafana
    mlflow: bool = False              # also log to MLflow (needs `pip install mlflow`; where: MLFLOW_TRACKING_URI)
    histogram_every: int = 10         # TensorBoard histograms (expert load per layer) every this many steps (0: none)
    report: bool = True               # write <run dir>/report.html (plots; `python -m orchestrator report`) at the end
    peak_tflops: float = 0.0          # peak TFLOP/s of one device for MFU; 0: a table of known GPUs, on CPU measured
                                      # at start (a float32 matmul on the threads one device uses)
    alerts: list[AlertRule] = field(default_factory=_default_alerts)  # rules checked after every step
    webhook_url: Optional[str] = None # notify alerts are also POSTed here as JSON (Slack-style hooks, PagerDuty, ...)
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 3


def _validate_monitor(cfg: Root) -> None:
    _positive(cfg, ["monitor.histogram_every", "monitor.peak_tflops", "train.eval_every", "monitor.webhook_retries"],
              allow_zero=True)
    _positive(cfg, ["monitor.webhook_timeout_s"])
    for i, a in enumerate(cfg.monitor.alerts):
        _choice(f"monitor.alerts[{i}].rule", a.rule, ("nonfinite", "loss_spike", "grad_spike", "maxvio", "straggler",
                                                      "throughput_drop", "restarts", "checkpoint_age",
                                                      "checkpoint_failed", "restore_failed"))
        _choice(f"monitor.alerts[{i}].action", a.action, ("record", "notify", "rollback", "skip", "stop",
                                                            "anticipate"))
        if a.steps < 1 or a.window < 1 or (a.threshold is not None and a.threshold < 0):
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}): steps and window must be at least 1 and threshold "
                              f"zero or more (got steps={a.steps}, window={a.window}, threshold={a.threshold})")
        if a.rule == "checkpoint_failed" and a.action in ("rollback", "skip"):
            raise ConfigError(f"monitor.alerts[{i}] (checkpoint_failed) action={a.action}: a failed checkpoint is no "
                              f"step to rewind (the healer retakes it); use record, notify or stop")
        if a.action == "anticipate" and a.rule not in ("loss_spike", "grad_spike"):
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}) action=anticipate answers a spike: use it with "
                              f"loss_spike or grad_spike")
        if a.action == "anticipate" and cfg.faults.on_spike != "record":
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}) action=anticipate with faults.on_spike="
                              f"{cfg.faults.on_spike!r}: the healer answers the spike itself first and the alert never "
                              f"acts; set faults.on_spike=record")
        if a.action in ("rollback", "skip", "anticipate") and cfg.faults.snapshot_every == 0:
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}) action={a.action} rewinds to a snapshot, but "
                              f"faults.snapshot_every=0 turns snapshots off")
    url = cfg.monitor.webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"monitor.webhook_url={redact_url(url, keep_path=False)!r} must be an http:// or https:// URL")
