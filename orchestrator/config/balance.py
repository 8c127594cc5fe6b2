"""The balance section: expert load balancing (losses, routing, capacity) and live expert re-placement."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config.base import ConfigError, Root, _choice, _positive
from orchestrator.config.mesh import expert_slots, mesh_shape


@dataclass
class BalanceConfig:
    """Expert load balancing strategies; combinable (formulas in orchestrator/model/balancing.py)."""
    aux_loss_coeff: float = 0.0       # Switch/GShard auxiliary loss E*sum f_i P_i (typical 0.01), over aux_loss_scope
    aux_loss_scope: str = "global"    # the tokens f_i and P_i of aux_loss_coeff's loss are taken over: global (the
                                      # global batch) | ep_group (each expert-parallel group's tokens, the groups'
                                      # losses averaged: Pangu Ultra MoE's EP-group loss) | sequence (each sequence's,
                                      # averaged; with softmax scores the same as seq_aux_loss_coeff's loss)
    seq_aux_loss_coeff: float = 0.0   # DeepSeek-V3 sequence-wise balance loss (DeepSeek-V3: 0.0001)
    z_loss_coeff: float = 0.0         # router z-loss (ST-MoE: 0.001)
    bias_update_speed: float = 0.0    # aux-loss-free router bias: +-speed toward the mean load after each step (DeepSeek-V3: 0.001)
    router_aux_loss_coeff: float = 0.0  # a transformers model's own router auxiliary loss (its load_balancing_loss_func,
                                        # over the global batch) times this (Mixtral's router_aux_loss_coef: 0.02)
    routing: str = "topk"             # topk | grouped (MoGE: top_k/num_groups experts from every group) | group_limited
                                      # (DeepSeek-V3: top_k among the experts of the topk_groups best groups)
    num_groups: int = 1               # expert groups (consecutive experts); one per device balances devices exactly
    topk_groups: int = 1              # group_limited: groups a token may use
    capacity_factor: float = 0.0      # 0: dropless; else each expert takes at most ceil(cf * T * top_k / E) copies
                                      # per sequence, its first ones in token order; the rest are dropped (and counted)
    replace_every: int = 0            # live expert re-placement: re-plan every R steps (0: off; experts stay contiguous)
    replace_window: int = 50          # ... from the mean load of the last this-many steps ...
    replace_min_gain: float = 0.02    # ... and migrate when the planned device max/mean load beats the current by this
    replace_on_imbalance: float = 0.0 # also re-plan when the device max/mean load of recent steps exceeds this (0: off),
                                      # at most once per replace_window steps
    redundant_experts: int = 0        # extra expert slots over all devices (a multiple of num_devices; as DeepSeek's
                                      # EPLB): re-placement fills them with replicas of hot experts, whose tokens are
                                      # split between the replicas and whose gradients are summed


def _validate_balance(cfg: Root) -> None:
    b, m = cfg.balance, cfg.model
    _positive(cfg, ["balance.aux_loss_coeff", "balance.seq_aux_loss_coeff", "balance.z_loss_coeff",
                    "balance.router_aux_loss_coeff", "balance.bias_update_speed", "balance.capacity_factor"],
              allow_zero=True)
    _positive(cfg, ["balance.num_groups", "balance.topk_groups", "balance.replace_window"])
    _positive(cfg, ["balance.replace_every", "balance.replace_min_gain", "balance.replace_on_imbalance"],
              allow_zero=True)
    _positive(cfg, ["balance.redundant_experts"], allow_zero=True)
    world = cfg.cluster.num_devices
    if b.redundant_experts and world == 1:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} needs cluster.num_devices > 1: replicas "
                          f"spread an expert's tokens over devices")
    if b.redundant_experts % world:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} is not a multiple of cluster.num_devices="
                          f"{world}: every device has the same number of expert slots")
    if b.redundant_experts and mesh_shape(cfg)[1] > 1:
        return  # refused by _validate_mesh, with the reason
    if expert_slots(cfg) > m.num_experts:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} gives every device {expert_slots(cfg)} "
                          f"expert slots, more than model.num_experts={m.num_experts}: at most "
                          f"{m.num_experts * world - m.num_experts}")
    _choice("balance.aux_loss_scope", b.aux_loss_scope, ("global", "ep_group", "sequence"))
    _choice("balance.routing", b.routing, ("topk", "grouped", "group_limited"))
    if b.routing == "topk":
        return
    if m.num_experts % b.num_groups:
        raise ConfigError(f"balance.num_groups={b.num_groups} does not divide model.num_experts={m.num_experts}; "
                          f"groups are equal runs of consecutive experts")
    per_group = m.num_experts // b.num_groups
    if b.routing == "grouped" and (m.top_k % b.num_groups or m.top_k // b.num_groups > per_group):
        raise ConfigError(f"balance.routing=grouped takes top_k/num_groups experts from each group: model.top_k="
                          f"{m.top_k} must be a multiple of balance.num_groups={b.num_groups}")
    if b.routing == "group_limited" and (b.topk_groups > b.num_groups or m.top_k > b.topk_groups * per_group):
        raise ConfigError(f"balance.routing=group_limited: balance.topk_groups={b.topk_groups} must be at most "
                          f"num_groups={b.num_groups} and hold at least model.top_k={m.top_k} experts "
                          f"({per_group} per group)")
