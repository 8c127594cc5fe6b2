"""The run report's RL figure (data.task=rl): what the rollouts earned and how far rollout and trainer agreed, per
step, from metrics.jsonl's records (keys written by rl/service.py and device/rl.py)."""
from __future__ import annotations

from typing import Any, Callable

PANELS = (("reward and accuracy", ("reward_mean", "accuracy")), ("completion length (tokens)", ("response_len",)),
          ("clipping and staleness", ("clip_frac", "staleness")),
          ("rollout vs trainer", ("routing_mismatch", "replay_mismatch", "logprob_gap")))


def rl_figure(records: list[dict[str, Any]], png: Callable[[Any], str]) -> tuple[str, str] | None:
    """(caption, base64 PNG) of the RL steps' numbers; None for a run with no RL step."""
    rl = [r for r in records if r.get("phase") == "rl"]
    if not rl:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 5.5))
    steps = [r["step"] for r in rl]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            values = [r.get(key) for r in rl]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], lw=0.8, label=key)
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    before = next((r["accuracy_before"] for r in rl if "accuracy_before" in r), None)
    start = f" (held-out accuracy before RL: {before:.3f})" if before is not None else ""
    return (f"RL steps: the completions' reward and exact-answer share, their length, the share of clipped ratios and "
            f"the samples' staleness, and the rollout/trainer routing mismatch and log-prob gap{start}", png(fig))
