"""The run report: one self-contained HTML page (plots embedded as PNG) from a run directory.

    python -m orchestrator report RUN_DIR [--out FILE]      (also written at the end of every run)

Reads metrics.jsonl, summary.json, incidents.jsonl, alerts.jsonl, goodput.json and config.yaml, whichever
exist, so it works on a finished, stopped, failed or still running run. Plots: loss (train, validation),
throughput and MFU, per-device step time, MaxVio and device imbalance, the expert-load heatmap of every MoE
layer, the incident and alert timeline with recovery durations, the goodput breakdown. Each figure is an
HTML <figure id=...> so tools (and the tests' headless browser) can find it.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from orchestrator.config import redact_text, redacted_yaml
from orchestrator.rundir import read_jsonl

FIGURES = ("loss", "throughput", "device-step-time", "balance", "expert-load", "timeline", "goodput")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a .jsonl file; a last line still being written (a running run) is left out."""
    return list(read_jsonl(path))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def expert_load_heatmaps(records: list[dict[str, Any]], title: str):
    """One heatmap per MoE layer: each expert's share of the token copies, over steps (a matplotlib figure)."""
    import matplotlib.pyplot as plt
    import numpy as np

    load = np.array([r["expert_load"] for r in records], dtype=float)   # [step, layer, expert]
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    layers = share.shape[1]
    fig, axes = plt.subplots(layers, 1, figsize=(8, 1.6 + 1.4 * layers), squeeze=False)
    for layer in range(layers):
        ax = axes[layer][0]
        im = ax.imshow(share[:, layer, :].T, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(records[0]["step"] - 0.5, records[-1]["step"] + 0.5, share.shape[2] - 0.5, -0.5))
        ax.set(ylabel=f"MoE layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="share of copies")
    axes[-1][0].set(xlabel="step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(records: list[dict], incidents: list[dict], alerts: list[dict], goodput: dict, val_end: float | None
             ) -> dict[str, tuple[str, str | None]]:
    """figure id -> (caption, base64 PNG or None when the run has nothing to show there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, tuple[str, str | None]] = {}
    steps = [r["step"] for r in records]
    last = steps[-1] if steps else 0

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, [r["loss"] for r in records], lw=0.8, label="train")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val_end is not None and (not val or val[-1][0] != last):
        val.append((last, val_end))
    if val:
        ax.plot(*zip(*val), "o-", color="tab:red", label="validation")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out["loss"] = ("Training loss every step; validation loss where it was scored", _png(fig))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, [r["tokens_per_s"] for r in records], lw=1.5, color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput and MFU")
    if any(r.get("mfu") is not None for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * (r.get("mfu") or 0) for r in records], lw=0.8, ls="--", color="tab:orange")
        ax2.set_ylabel("MFU %", color="tab:orange")
    ax.grid(alpha=0.3)
    out["throughput"] = ("Tokens per second (blue) and model FLOPs utilisation (orange, dashed; proportional to "
                         "tokens/s for a fixed model and peak)", _png(fig))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for rank in range(len(records[0].get("device_step_time_s") or []) if records else 0):
        ax.plot(steps, [1000 * r["device_step_time_s"][rank] for r in records], lw=0.8, label=f"device {rank}")
    ax.set(xlabel="step", ylabel="ms", title="Step time per device")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out["device-step-time"] = ("Each device's time in the step (collectives included)", _png(fig))

    has_moe = any(r.get("maxvio") is not None for r in records)
    if has_moe:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.plot(steps, [r["maxvio"] for r in records], lw=0.8, label="MaxVio (mean over layers)")
        ax.plot(steps, [r["device_imbalance"] - 1 for r in records], lw=0.8, label="device max/mean - 1")
        ax.set(xlabel="step", title="Expert and device load imbalance")
        ax.legend()
        ax.grid(alpha=0.3)
        out["balance"] = ("MaxVio (max expert load / mean - 1) and the devices' max/mean load", _png(fig))
        out["expert-load"] = ("Every expert's share of its layer's token copies, over steps",
                              _png(expert_load_heatmaps(records, "Expert load per MoE layer")))
    else:
        out["balance"] = out["expert-load"] = ("No MoE layer in this model", None)

    fig, ax = plt.subplots(figsize=(8, 3.0))
    kinds = sorted({i["kind"] for i in incidents})
    for row, kind in enumerate(kinds):
        mine = [i for i in incidents if i["kind"] == kind]
        ax.scatter([i["step"] for i in mine], [row] * len(mine), marker="x", color="tab:red", zorder=3)
        for i in mine:
            if i.get("recover_s"):
                ax.annotate(f"{i['recover_s']:.1f}s", (i["step"], row), textcoords="offset points", xytext=(3, 5),
                            fontsize=7)
    rules = sorted({a["rule"] for a in alerts})
    for row, rule in enumerate(rules, start=len(kinds)):
        mine = [a for a in alerts if a["rule"] == rule]
        ax.scatter([a["step"] for a in mine], [row] * len(mine), marker="^", color="tab:orange", zorder=3)
    labels = [f"incident: {k}" for k in kinds] + [f"alert: {r}" for r in rules]
    ax.set_yticks(range(max(1, len(labels))), labels or ["(none)"])
    ax.set(xlabel="step", xlim=(0, max(last, 1) + 1), title="Incidents (x, recovery time) and alerts (^)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out["timeline"] = (f"{len(incidents)} incident(s), {len(alerts)} alert(s)", _png(fig))

    parts = {k: v for k, v in goodput.items() if k not in ("wall", "goodput", "steps_done", "steps_recomputed")
             and isinstance(v, (int, float))}
    if parts:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        names = list(parts)
        ax.barh(names, [parts[n] for n in names], color=["tab:green" if n == "productive" else "tab:gray" for n in names])
        ax.invert_yaxis()
        ax.set(xlabel="seconds", title=f"Goodput {goodput.get('goodput', 0):.1%} of {goodput.get('wall', 0):.1f}s")
        fig.tight_layout()
        out["goodput"] = ("Where the training loop's time went", _png(fig))
    else:
        out["goodput"] = ("No goodput.json yet", None)
    return out


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return redact_text(str(v))   # an incident's detail may quote a storage URI


def _config_text(path: Path) -> str:
    """The run's config.yaml for the page, secrets redacted (a run directory written before config.yaml was
    redacted has them in clear); text that does not parse has at least its URLs redacted."""
    if not path.exists():
        return ""
    text = path.read_text()
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(text))
    except Exception:
        return redact_text(text)
    return redacted_yaml(data) if isinstance(data, dict) else redact_text(text)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`); the path written."""
    run = Path(run_dir)
    records = _jsonl(run / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run}/metrics.jsonl has no steps: nothing to report (is {run} a run directory?)")
    summary, goodput = _json(run / "summary.json"), _json(run / "goodput.json")
    incidents, alerts = _jsonl(run / "incidents.jsonl"), _jsonl(run / "alerts.jsonl")
    figures = _figures(records, incidents, alerts, goodput, summary.get("val_loss"))
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    facts = {"run": run.name, "steps done": summary.get("steps_done", len(records)),
             "final loss": records[-1]["loss"], "validation loss": summary.get("val_loss"),
             "tokens/s": summary.get("tokens_per_s"),
             "mean MFU": f"{sum(mfu) / len(mfu):.2%}" if mfu else None,
             "wall time (s)": summary.get("wall_time_s"), "recoveries": summary.get("recoveries", 0),
             "incidents": len(incidents), "alerts": len(alerts),
             "checkpoints committed": len(summary.get("checkpoints_committed", [])),
             "goodput": f"{goodput['goodput']:.1%}" if "goodput" in goodput else None,
             "stopped by": summary.get("stopped_by_signal")}
    sections = []
    for fid in FIGURES:
        caption, png = figures[fid]
        body = (f'<img alt="{fid}" src="data:image/png;base64,{png}">' if png
                else '<p class="empty">nothing to plot</p>')
        sections.append(f'<figure id="{fid}">{body}<figcaption>{html.escape(caption)}</figcaption></figure>')
    config = _config_text(run / "config.yaml")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {html.escape(run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }}
</style></head><body>
<h1>Run report: {html.escape(run.name)}</h1>
<table id="facts">{"".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts.items())}</table>
{"".join(sections)}
<h2>Incidents</h2>
{_table(incidents, ["step", "kind", "rank", "detail", "action", "detect_s", "recover_s", "rewound_to", "source"])}
<h2>Alerts</h2>
{_table(alerts, ["step", "rule", "value", "threshold", "action", "detail", "webhook"])}
<h2>Config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
    path = Path(out) if out else run / "report.html"
    path.write_text(page)
    return path


__all__ = ["write_report", "expert_load_heatmaps", "FIGURES"]
