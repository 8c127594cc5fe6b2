"""The MoE transformer in pure torch: no distribution, no Ray."""
from orchestrator.model.moe import MoE, Router, GroupedExperts, LocalTokenDispatcher, DispatchMeta
from orchestrator.model.transformer import MoETransformer, build_model, init_weights, count_parameters

__all__ = ["MoE", "Router", "GroupedExperts", "LocalTokenDispatcher", "DispatchMeta", "MoETransformer",
           "build_model", "init_weights", "count_parameters"]
