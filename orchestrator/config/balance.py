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
    anticipatory_routing: bool = False  # DeepSeek-V4 anticipatory routing (report sec. 4.2.3) on every step: step t's
                                        # routing indices come from the parameters of step t-delay (a no-grad forward
                                        # of step t's batch at step t-delay), its gates from the current router; native
                                        # model, pretrain or SFT. The alert action `anticipate` turns it on after a spike
    anticipatory_delay: int = 1       # Delta t in steps: not published in the report, 1 is our choice; the first
                                      # `delay` steps of a stretch of anticipatory routing route normally
    anticipatory_calm_steps: int = 100  # an alert with action=anticipate keeps anticipatory routing on until this many
                                        # steps after its spike (a new spike's alert extends it); the report's length of
                                        # the mode is not published either


def _validate_balance(cfg: Root) -> None:
    b, m = cfg.balance, cfg.model
    _positive(cfg, ["balance.aux_loss_coeff", "balance.seq_aux_loss_coeff", "balance.z_loss_coeff",
                    "balance.router_aux_loss_coeff", "balance.bias_update_speed", "balance.capacity_factor"],
              allow_zero=True)
    _positive(cfg, ["balance.num_groups", "balance.topk_groups", "balance.replace_window"])
    _positive(cfg, ["balance.replace_every", "balance.replace_min_gain", "balance.replace_on_imbalance"],
              allow_zero=True)
    _positive(cfg, ["balance.redundant_experts"], allow_zero=True)
    _validate_anticipation(cfg)
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


def anticipates(cfg: Root) -> bool:
    """Can this run route anticipatorily: always (balance.anticipatory_routing) or after an alert (action=anticipate)?"""
    return cfg.balance.anticipatory_routing or any(a.action == "anticipate" for a in cfg.monitor.alerts)


def _validate_anticipation(cfg: Root) -> None:
    """Anticipatory routing replays the native MoE layers' routing (model/moe.py replay_NK) on a step's own batch."""
    _positive(cfg, ["balance.anticipatory_delay", "balance.anticipatory_calm_steps"])
    if not anticipates(cfg):
        return
    what = ("balance.anticipatory_routing=true" if cfg.balance.anticipatory_routing
            else "an alert rule with action=anticipate")
    if cfg.model.hf_path or cfg.model.hf_config:
        raise ConfigError(f"{what} replays the native model's routing; a transformers model (model.hf_path / "
                          f"model.hf_config) has no anticipatory routing")
    if cfg.data.task == "rl":
        raise ConfigError(f"{what} needs data.task=pretrain or sft: an RL step's batch is sampled at that step, not "
                          f"known {cfg.balance.anticipatory_delay} step(s) ahead")
