"""The run report: one self-contained HTML page (plots embedded as PNG) from a run directory.

    python -m orchestrator report RUN_DIR [--out FILE]      (also written at the end of every run)

Reads metrics.jsonl, summary.json, incidents.jsonl, alerts.jsonl, goodput.json, memory_plan.json and
config.yaml, whichever exist, so it works on a finished, stopped, failed or still running run. Plots: loss
(train, validation), throughput and MFU, per-device step time, MaxVio and device imbalance, the expert-load
heatmap of every MoE layer, the incident and alert timeline with recovery durations, the goodput breakdown,
and "the jigsaw": each device's memory by category, measured (the last record's `device_memory`) beside
planned (memory_plan.json, orchestrator/memory/plan.py), with tables of the bytes (<table id="jigsaw-bytes">,
every cell's exact bytes in `data-bytes`) and of which slice of which tensor each device holds
(<table id="jigsaw-holdings">). A run whose records have no `device_memory` (older runs) has no jigsaw. Each
figure is an HTML <figure id=...> so tools (and the tests' headless browser) can find it.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from orchestrator.config import redact_text, redacted_yaml
from orchestrator.monitoring.rl_plots import rl_figure
from orchestrator.monitoring.rundir import read_jsonl, records as step_records, write_atomic

FIGURES = ("loss", "throughput", "device-step-time", "balance", "expert-load", "timeline", "goodput", "jigsaw")
MEASURED = ("params", "grads", "optimizer", "activations_peak")   # what a device measures (device/shard.py, memory/measure.py)
PLANNED = MEASURED + ("comm_buffers",)                             # what the planner adds: collective buffers
COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green", "activations_peak": "tab:red",
          "comm_buffers": "tab:gray"}
MIB = float(2 ** 20)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a .jsonl file; a last line still being written (a running run) is left out."""
    return list(read_jsonl(path))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing, unreadable or not an object (the report never fails
    for an optional file)."""
    try:
        data = _json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def _int(v: Any) -> int | None:
    """Bytes as an int, or None for anything that is not a number (a key absent, a null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v)


def measured_memory(records: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, int]]]:
    """The newest record's `device_memory`: (its step, per device {category: bytes}); (None, []) when no record
    has one (a run from before memory was measured)."""
    for r in reversed(records):
        mem = r.get("device_memory")
        if isinstance(mem, list) and any(isinstance(m, dict) and m for m in mem):
            return r.get("step"), [{k: b for k, v in m.items() if (b := _int(v)) is not None}
                                   if isinstance(m, dict) else {} for m in mem]
    return None, []


def planned_memory(plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """memory_plan.json's devices by rank (a device's position in the list when it has no `rank`)."""
    out: dict[int, dict[str, Any]] = {}
    for i, d in enumerate(plan.get("devices") or [] if isinstance(plan, dict) else []):
        if isinstance(d, dict):
            rank = _int(d.get("rank"))
            out[i if rank is None else rank] = d
    return out


def _planned_total(d: dict[str, Any]) -> int | None:
    total = _int(d.get("total"))
    parts = [b for c in PLANNED if (b := _int(d.get(c))) is not None]
    return total if total is not None else (sum(parts) if parts else None)


def jigsaw_figure(measured: list[dict[str, int]], planned: dict[int, dict[str, Any]], budget: int | None, step: Any):
    """Per device two stacked horizontal bars, by category: measured (solid) and planned (hatched, with the
    collective buffers as their own segment), MiB; the budget as a dashed line when it is in range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(set(range(len(measured))) | set(planned))
    rows: list[tuple[float, str, dict[str, Any], tuple[str, ...], bool]] = []
    for i, rank in enumerate(ranks):
        if rank < len(measured):
            rows.append((i * 2.6, f"device {rank} measured", measured[rank], MEASURED, False))
        if rank in planned:
            rows.append((i * 2.6 + 1, f"device {rank} planned", planned[rank], PLANNED, True))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.45 * len(rows)))
    widest = 0.0
    for y, _, parts, cats, plan in rows:
        left = 0.0
        for c in cats:
            v = (_int(parts.get(c)) or 0) / MIB
            if v > 0:
                ax.barh(y, v, left=left, height=0.9, color=COLORS[c], alpha=0.6 if plan else 1.0,
                        hatch="//" if plan else None, edgecolor="white", linewidth=0.5)
            left += v
        ax.text(left, y, f" {left:,.2f}", va="center", fontsize=7)
        widest = max(widest, left)
    handles = [Patch(color=COLORS[c], label=c) for c in PLANNED]
    if budget and widest and budget / MIB <= 2 * widest:
        ax.axvline(budget / MIB, ls="--", lw=0.9, color="black")
        handles.append(Patch(facecolor="white", edgecolor="black", ls="--", label="budget"))
        widest = max(widest, budget / MIB)
    ax.set_yticks([r[0] for r in rows], [r[1] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(widest, 1e-3) * 1.15)
    ax.set(xlabel="MiB", title=f"The jigsaw: memory per device (measured at step {step}, planned)")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return fig


def _bytes_td(v: int | None) -> str:
    return "<td></td>" if v is None else f'<td data-bytes="{v}">{v / MIB:,.2f}</td>'


def jigsaw_bytes_table(measured: list[dict[str, int]], planned: dict[int, dict[str, Any]]) -> str:
    """Per device a measured and a planned row: MiB by category (the exact bytes in `data-bytes`), the total of
    the categories, host RSS (measured), and the measured total over the planned one of the same categories."""
    cols = PLANNED + ("total", "rss")
    head = ("<tr><th>device</th><th></th>" + "".join(f"<th>{c}</th>" for c in PLANNED) +
            "<th>total</th><th>host RSS</th><th>measured / planned</th></tr>")
    body = []
    for rank in sorted(set(range(len(measured))) | set(planned)):
        p = planned.get(rank)
        if rank < len(measured):
            m = measured[rank]
            parts = [m[c] for c in MEASURED if c in m]
            total = sum(parts) if parts else None
            same = [b for c in MEASURED if (b := _int((p or {}).get(c))) is not None]
            ratio = f"{total / sum(same):.1%}" if total is not None and same and sum(same) else ""
            vals = {**{c: m.get(c) for c in MEASURED}, "comm_buffers": None, "total": total, "rss": m.get("rss")}
            body.append(f'<tr data-device="{rank}" data-source="measured"><td>{rank}</td><td>measured</td>' +
                        "".join(_bytes_td(vals[c]) for c in cols) + f"<td>{ratio}</td></tr>")
        if p is not None:
            vals = {**{c: _int(p.get(c)) for c in PLANNED}, "total": _planned_total(p), "rss": None}
            body.append(f'<tr data-device="{rank}" data-source="planned"><td>{rank}</td><td>planned</td>' +
                        "".join(_bytes_td(vals[c]) for c in cols) + "<td></td></tr>")
    return f'<table id="jigsaw-bytes">{head}{"".join(body)}</table>'


def _names(names: list[Any], show: int = 3) -> str:
    more = f", +{len(names) - show} more" if len(names) > show else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({', '.join(map(str, names[:show]))}{more})"


def _slices(kind: Any) -> str:
    """{"whole": [names]} or {"rows 0:16 of 32": [names], ...} -> 'rows 0:16 of 32: 5 tensors (a, b, c, +2 more)'."""
    if not isinstance(kind, dict):
        return "" if kind is None else str(kind)
    return "; ".join(f"{k}: {_names(v)}" for k, v in kind.items() if isinstance(v, list) and v)


def _states(states: Any, kind: Any) -> str:
    """Whose AdamW states a device holds: 'all', 'its shards', or a list of parameter names."""
    if isinstance(states, list):
        n = sum(len(v) for v in kind.values() if isinstance(v, list)) if isinstance(kind, dict) else None
        return (f"{len(states)} of {n}: " if n is not None else "") + (_names(states) if states else "none")
    return "" if states is None else str(states)


def holdings_row(holdings: Any) -> dict[str, str]:
    """A device's holdings (memory_plan.json, planner._state) as the holdings table's cells; absent keys give
    empty cells."""
    h = holdings if isinstance(holdings, dict) else {}
    experts = h.get("experts") if isinstance(h.get("experts"), dict) else {}
    replicas = h.get("replicas") if isinstance(h.get("replicas"), dict) else {}
    same = replicas.get("experts")
    ids, layers = experts.get("ids"), experts.get("moe_layers")
    return {"dense slices": _slices(h.get("dense")),
            "dense AdamW states": _states(h.get("dense_optimizer"), h.get("dense")),
            "dense replicas": "" if replicas.get("dense") is None else str(replicas.get("dense")),
            "experts": (f"{ids}" if ids not in (None, "") else "") +
                       (f" of each of {layers} MoE layers" if layers is not None and ids not in (None, "") else ""),
            "expert slices": _slices(experts),
            "expert AdamW states": _states(h.get("experts_optimizer"), experts),
            "same expert slices on": (", ".join(f"device {r}" for r in same) or "none") if isinstance(same, list)
            else ("" if same is None else str(same))}


def jigsaw_holdings_table(planned: dict[int, dict[str, Any]]) -> str:
    """Which slice of which tensor each device holds (the plan's holdings): dense shards, expert slots, replicas."""
    rows = [{"device": rank, **holdings_row(planned[rank].get("holdings"))} for rank in sorted(planned)]
    return _table(rows, list(rows[0])).replace("<table>", '<table id="jigsaw-holdings">', 1) if rows else ""


def _plan_line(plan: dict[str, Any]) -> str:
    """The plan's settings in one sentence (whichever keys memory_plan.json has)."""
    parts = []
    if plan.get("zero_stage") is not None:
        parts.append(f"ZeRO stage {plan['zero_stage']}")
    if plan.get("activation_checkpointing") is not None:
        parts.append(f"activation checkpointing {plan['activation_checkpointing']}")
    if plan.get("micro_batches") is not None:
        mb = f"{plan['micro_batches']} micro-batch(es)"
        if plan.get("micro_batch_sequences") is not None and plan.get("seq_len") is not None:
            mb += f" of {plan['micro_batch_sequences']} x {plan['seq_len']} tokens"
        parts.append(mb)
    if plan.get("ep") is not None and plan.get("dp") is not None:
        parts.append(f"ep {plan['ep']} x dp {plan['dp']}")
    if plan.get("dtype_bytes") is not None:
        parts.append(f"{plan['dtype_bytes']}-byte values")
    budget = _int(plan.get("budget_bytes"))
    if budget:
        parts.append(f"budget {budget / MIB:,.1f} MiB per device")
    if _int(plan.get("max_total")) is not None:
        parts.append(f"fullest device planned at {plan['max_total'] / MIB:,.2f} MiB")
    return "Plan (memory_plan.json): " + ", ".join(parts) + "." if parts else ""


def jigsaw(records: list[dict[str, Any]], plan: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """The jigsaw section: (caption, base64 PNG, HTML before the figure, HTML after it), or None when no record
    has `device_memory`. Without memory_plan.json (or its devices) only the measured bars and rows are there."""
    step, measured = measured_memory(records)
    if not measured:
        return None
    planned = planned_memory(plan)
    png = _png(jigsaw_figure(measured, planned, _int(plan.get("budget_bytes")), step))
    line = _plan_line(plan) if planned else "No memory plan (memory_plan.json) in this run directory: measured only."
    before = f'<h2 id="jigsaw-heading">The jigsaw: memory per device</h2><p id="jigsaw-plan">{html.escape(line)}</p>'
    after = (f"<p>Bytes per device and category (MiB; measured at step {html.escape(str(step))}, the last record's "
             f"device_memory):</p>" + jigsaw_bytes_table(measured, planned))
    if planned:
        after += ("<p>Which slice of which tensor each device holds (the plan, at the run's start):</p>" +
                  jigsaw_holdings_table(planned))
    caption = (f"Each device's memory by category at step {step}: measured (solid) beside planned (hatched; "
               f"collective buffers as their own segment)")
    return caption, png, before, after


def _figures(records: list[dict], incidents: list[dict], alerts: list[dict], goodput: dict, val_end: float | None
             ) -> dict[str, tuple[str, str | None]]:
    """figure id -> (caption, base64 PNG or None when the run has nothing to show there), in the report's order."""
    import matplotlib

    matplotlib.use("Agg")
    steps = [r["step"] for r in records]
    last = steps[-1] if steps else 0
    out: dict[str, tuple[str, str | None]] = {
        "loss": _loss_figure(records, steps, last, val_end),
        "throughput": _throughput_figure(records, steps),
        "device-step-time": _device_step_time_figure(records, steps),
    }
    out["balance"], out["expert-load"] = _balance_figures(records, steps)
    rl = rl_figure(records, _png)   # RL post-training's numbers (data.task=rl), after the loss
    if rl is not None:
        out["rl"] = rl
    out["timeline"] = _timeline_figure(incidents, alerts, last)
    out["goodput"] = _goodput_figure(goodput)
    return out


def _loss_figure(records: list[dict], steps: list, last: Any, val_end: float | None) -> tuple[str, str]:
    import matplotlib.pyplot as plt

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
    return "Training loss every step; validation loss where it was scored", _png(fig)


def _throughput_figure(records: list[dict], steps: list) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, [r["tokens_per_s"] for r in records], lw=1.5, color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput and MFU")
    if any(r.get("mfu") is not None for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * (r.get("mfu") or 0) for r in records], lw=0.8, ls="--", color="tab:orange")
        ax2.set_ylabel("MFU %", color="tab:orange")
    ax.grid(alpha=0.3)
    return ("Tokens per second (blue) and model FLOPs utilisation (orange, dashed; proportional to "
            "tokens/s for a fixed model and peak)", _png(fig))


def _device_step_time_figure(records: list[dict], steps: list) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for rank in range(len(records[0].get("device_step_time_s") or []) if records else 0):
        ax.plot(steps, [1000 * r["device_step_time_s"][rank] for r in records], lw=0.8, label=f"device {rank}")
    ax.set(xlabel="step", ylabel="ms", title="Step time per device")
    if ax.get_legend_handles_labels()[0]:   # records without device step times (a run that did no step) draw none
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return "Each device's time in the step (collectives included)", _png(fig)


def _balance_figures(records: list[dict], steps: list) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
    """The "balance" and "expert-load" figures: both only for a model with an MoE layer."""
    import matplotlib.pyplot as plt

    if not any(r.get("maxvio") is not None for r in records):
        return ("No MoE layer in this model", None), ("No MoE layer in this model", None)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, [r["maxvio"] for r in records], lw=0.8, label="MaxVio (mean over layers)")
    ax.plot(steps, [r["device_imbalance"] - 1 for r in records], lw=0.8, label="device max/mean - 1")
    ax.set(xlabel="step", title="Expert and device load imbalance")
    ax.legend()
    ax.grid(alpha=0.3)
    balance = ("MaxVio (max expert load / mean - 1) and the devices' max/mean load", _png(fig))
    return balance, ("Every expert's share of its layer's token copies, over steps",
                     _png(expert_load_heatmaps(records, "Expert load per MoE layer")))


def _timeline_figure(incidents: list[dict], alerts: list[dict], last: Any) -> tuple[str, str]:
    import matplotlib.pyplot as plt

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
    return f"{len(incidents)} incident(s), {len(alerts)} alert(s)", _png(fig)


def _goodput_figure(goodput: dict) -> tuple[str, str | None]:
    import matplotlib.pyplot as plt

    parts = {k: v for k, v in goodput.items() if k not in ("wall", "goodput", "steps_done", "steps_recomputed")
             and isinstance(v, (int, float))}
    if not parts:
        return "No goodput.json yet", None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(parts)
    ax.barh(names, [parts[n] for n in names], color=["tab:green" if n == "productive" else "tab:gray" for n in names])
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"Goodput {goodput.get('goodput', 0):.1%} of {goodput.get('wall', 0):.1f}s")
    fig.tight_layout()
    return "Where the training loop's time went", _png(fig)


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
    records = step_records(_jsonl(run / "metrics.jsonl"))   # checkpoint event lines left out: plots are per step
    if not records:
        raise FileNotFoundError(f"{run}/metrics.jsonl has no steps: nothing to report (is {run} a run directory?)")
    summary, goodput = _json(run / "summary.json"), _json(run / "goodput.json")
    incidents, alerts = _jsonl(run / "incidents.jsonl"), _jsonl(run / "alerts.jsonl")
    figures = _figures(records, incidents, alerts, goodput, summary.get("val_loss"))
    around: dict[str, tuple[str, str]] = {}   # figure id -> HTML before and after it (the jigsaw's heading, tables)
    pieces = jigsaw(records, _json_or_empty(run / "memory_plan.json"))
    if pieces:   # a run from before memory was measured has none
        figures["jigsaw"], around["jigsaw"] = pieces[:2], pieces[2:]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    facts = {"run": run.name, "state": summary.get("state"), "reason": summary.get("reason"),
             "steps done": summary.get("steps_done", len(records)),
             "final loss": records[-1]["loss"], "validation loss": summary.get("val_loss"),
             "tokens/s": summary.get("tokens_per_s"),
             "mean MFU": f"{sum(mfu) / len(mfu):.2%}" if mfu else None,
             "wall time (s)": summary.get("wall_time_s"), "recoveries": summary.get("recoveries", 0),
             "incidents": len(incidents), "alerts": len(alerts),
             "checkpoints committed": len(summary.get("checkpoints_committed", [])),
             "checkpoints failed": len(summary.get("checkpoints_failed", [])),
             "goodput": f"{goodput['goodput']:.1%}" if "goodput" in goodput else None,
             "stopped by": summary.get("stopped_by_signal")}
    sections = []
    for fid in FIGURES[:1] + ("rl",) + FIGURES[1:]:
        if fid not in figures:
            continue
        caption, png = figures[fid]
        body = (f'<img alt="{fid}" src="data:image/png;base64,{png}">' if png
                else '<p class="empty">nothing to plot</p>')
        before, after = around.get(fid, ("", ""))
        sections.append(f'{before}<figure id="{fid}">{body}<figcaption>{html.escape(caption)}</figcaption></figure>'
                        f'{after}')
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
    write_atomic(path, page)   # whole or not at all: a full disk leaves no half page and no .tmp
    return path


__all__ = ["write_report", "expert_load_heatmaps", "jigsaw", "FIGURES"]
