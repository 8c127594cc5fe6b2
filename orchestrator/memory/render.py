"""The memory plan as text: a table per device, the ASCII jigsaw (per device a bar stacked by category and the
slices of tensors it holds), and every ZeRO stage x checkpointing mode side by side (`python -m orchestrator
plan`). The plan itself: orchestrator/memory/plan.py."""
from __future__ import annotations

from typing import Any

from orchestrator.memory.plan import CATEGORIES, MemoryPlan

_MARKS = {"params": "P", "grads": "G", "optimizer": "O", "activations_peak": "A", "comm_buffers": "C"}
_HEAD = ("params", "grads", "optimizer", "activations", "comm", "total")


def _holding_lines(h: dict[str, Any]) -> list[str]:
    """A device's holdings in a few lines: slices grouped by kind, a count and the first name of each group."""
    def slices(kind: dict[str, Any]) -> str:
        return ", ".join(f"{k} ({len(v)}: {v[0]}{', ...' if len(v) > 1 else ''})" if k != "whole"
                         else f"whole ({len(v)} tensors)" for k, v in kind.items() if isinstance(v, list) and v)

    def states(s: Any, n: int) -> str:
        return s if isinstance(s, str) else f"{len(s)} of {n} tensors" + (f" ({s[0]}, ...)" if s else "")

    d, e, r = h["dense"], h["experts"], h["replicas"]
    n_dense = sum(len(v) for v in d.values())
    n_exp = sum(len(v) for v in e.values() if isinstance(v, list))
    lines = [f"dense: {slices(d)}; AdamW states: {states(h['dense_optimizer'], n_dense)}; replicas: {r['dense']}"]
    if n_exp:
        lines.append(f"experts {e['ids']} of each of {e['moe_layers']} MoE layers: {slices(e)}; AdamW states: "
                     f"{states(h['experts_optimizer'], n_exp)}; same slices on devices: "
                     f"{', '.join(map(str, r['experts'])) or 'none'}")
    return lines


def render(plan: MemoryPlan, table: list[dict[str, Any]] | None = None, width: int = 56) -> str:
    """The plan as text: a table per device (MiB), an ASCII jigsaw (per device a bar stacked by category,
    scaled to the fullest device or the budget, and the slices it holds), and `table` (plan_table) if given."""
    mib = 2.0 ** 20
    out = [f"memory plan: {len(plan.devices)} devices = ep {plan.ep} x dp {plan.dp}, memory.zero_stage="
           f"{plan.zero_stage}, memory.activation_checkpointing={plan.activation_checkpointing}, "
           f"{plan.micro_batches} micro-batch(es) of {plan.micro_batch_sequences} x {plan.seq_len} tokens, "
           f"{plan.dtype_bytes}-byte values",
           f"{'device':>6} {'dp':>3} {'ep':>3} " + " ".join(f"{h:>11}" for h in _HEAD) + "   (MiB)"]
    for d in plan.devices:
        vals = [getattr(d, c) for c in CATEGORIES] + [d.total]
        out.append(f"{d.rank:>6} {d.dp_index:>3} {d.ep_index:>3} " + " ".join(f"{v / mib:>11.2f}" for v in vals))
    if plan.budget_bytes:
        out.append(f"budget: {plan.budget_bytes / mib:,.1f} MiB per device (cluster.device_memory_gb)")
    scale = max(plan.peak().total, plan.budget_bytes)
    out.append(f"\njigsaw: one column = {scale / width / mib:.2f} MiB; " +
               ", ".join(f"{m} {c}" for c, m in _MARKS.items()) + ("; | the budget" if plan.budget_bytes else ""))
    for d in plan.devices:
        bar = "".join(m * round(getattr(d, c) / scale * width) for c, m in _MARKS.items())
        edge = round(plan.budget_bytes / scale * width) if plan.budget_bytes else width
        bar = (bar + " " * width)[:max(width, len(bar))]
        bar = bar[:edge] + "|" + bar[edge:] if plan.budget_bytes else bar
        out.append(f"device {d.rank:>3} [{bar}] {d.total / mib:,.2f} MiB")
        out += [f"           {line}" for line in _holding_lines(d.holdings)]
    if table:
        out += ["", "every ZeRO stage x checkpointing mode (the fullest device, MiB):",
                f"{'stage':>5} {'checkpointing':>13} " + " ".join(f"{h:>11}" for h in _HEAD)]
        for row in table:
            vals = [row[c] for c in CATEGORIES] + [row["total"]]
            out.append(f"{row['zero_stage']:>5} {row['activation_checkpointing']:>13} " +
                       " ".join(f"{v / mib:>11.2f}" for v in vals))
    return "\n".join(out)
