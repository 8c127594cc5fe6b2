"""The learning-rate schedule (pure arithmetic: the driver checks it on resume without torch)."""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to base_lr over `warmup` steps, then cosine decay to base_lr*min_ratio at step `total` (the
    horizon), flat after it. As in GPT-3 (Brown et al. 2020, appendix B) and nanoGPT's get_lr."""
    if warmup and step <= warmup:
        return base_lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_of(train, step: int) -> float:
    """lr_at for a TrainConfig, over its horizon (`lr_horizon`, else `steps`)."""
    return lr_at(step, train.lr, train.warmup_steps, train.lr_horizon or train.steps, train.min_lr_ratio)


__all__ = ["lr_at", "lr_of"]
