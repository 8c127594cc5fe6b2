"""One way to build a device's model, whichever it is: the native MoETransformer or a transformers MoE model
(`model.hf_path` / `model.hf_config`). The device shard, the RL reference policy and the rollout engines all build
theirs here, so they hold the same model."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from orchestrator.config import BalanceConfig, ModelConfig
from orchestrator.model.transformer import build_model


def build_any_model(m: ModelConfig, seed: int, expert_ids: Sequence[int] | None, balance: BalanceConfig | None,
                    device: torch.device, dtype: str, stats: dict | None = None) -> nn.Module:
    """The model holding `expert_ids` (None: every expert) of each MoE layer, its initial weights (the seed's, or
    the checkpoint of model.hf_path), on `device` in `dtype` (a torch dtype's name). `stats` receives what a
    transformers checkpoint read (model/hf_load.py)."""
    if m.hf_path or m.hf_config:
        from orchestrator.model.hf import build_hf_model

        model = build_hf_model(m, seed, expert_ids, balance, stats).to(device, getattr(torch, dtype))
        if dtype == "float64":
            model.hf_config._experts_implementation = "eager"   # torch's grouped_mm has no float64 kernel
        return model
    return build_model(m, seed, expert_ids, balance).to(device, getattr(torch, dtype))
