"""One way to build a device's model, whichever it is: the native MoETransformer or a transformers MoE model
(`model.hf_path` / `model.hf_config`). The device shard, the RL reference policy and the rollout engines all build
theirs here, so they hold the same model."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from orchestrator.config import BalanceConfig, ModelConfig, ParallelConfig
from orchestrator.model.transformer import build_model


def build_any_model(m: ModelConfig, seed: int, expert_ids: Sequence[int] | None, balance: BalanceConfig | None,
                    device: torch.device, dtype: str, stats: dict | None = None,
                    parallel: ParallelConfig | None = None) -> nn.Module:
    """The model holding `expert_ids` (None: every expert) of each MoE layer, its initial weights (the seed's, or
    the checkpoint of model.hf_path), on `device` in `dtype` (a torch dtype's name). `stats` receives what a
    transformers checkpoint read (model/hf_load.py). `parallel`: its grouped_gemm and router_dtype are applied
    (apply_parallel_options; None: the modules' defaults, which are the config's defaults)."""
    if m.hf_path or m.hf_config:
        from orchestrator.model.hf import build_hf_model

        model = build_hf_model(m, seed, expert_ids, balance, stats).to(device, getattr(torch, dtype))
        if dtype == "float64":
            model.hf_config._experts_implementation = "eager"   # torch's grouped_mm has no float64 kernel
    else:
        model = build_model(m, seed, expert_ids, balance).to(device, getattr(torch, dtype))
    if parallel is not None:
        apply_parallel_options(model, parallel.grouped_gemm, parallel.router_dtype)
    return model


def apply_parallel_options(model: nn.Module, grouped_gemm: bool, router_dtype: str) -> None:
    """parallel.grouped_gemm and parallel.router_dtype on a built model: the native MoE layers' GroupedExperts.grouped
    and Router.dtype (model/moe.py), a transformers model's experts implementation and routers (model/hf.py)."""
    if hasattr(model, "hf_config"):
        from orchestrator.model.hf import use_grouped_mm, use_router_dtype

        use_grouped_mm(model, grouped_gemm)
        use_router_dtype(model, router_dtype)
        return
    for layer in model.moe_layers():
        layer.experts.grouped = grouped_gemm
        layer.router.dtype = router_dtype
