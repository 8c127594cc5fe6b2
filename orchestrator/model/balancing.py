"""Expert load balancing: each strategy a small pure function with its formula.

Shape legend: N tokens (B*T flattened), B sequences, T tokens per sequence, E experts, K top-k.
s_{t,i}: router score of expert i for token t (softmax or sigmoid); c_i: routed copies to expert i.

Every loss is written as this device's share of a loss over the *global* batch (all devices): the
shares sum to the global loss, and the gradient of each share is exactly the global loss's gradient
with respect to this device's tokens. So N devices compute what one device computes (the
single-process oracle), whatever the strategy. `global_tokens` is the global batch's token count.

The Switch loss (`balance.aux_loss_coeff`) has three scopes (`balance.aux_loss_scope`), the statistics f_i and P_i
taken over:
  global     the global batch (every device): `switch_aux_loss` with counts summed over all devices.
  ep_group   each expert-parallel group's tokens (the devices of one all_to_all), the groups' losses averaged:
             `ep_group_aux_loss` (Pangu Ultra MoE's EP-group balancing loss, reconstructed).
  sequence   each sequence's tokens, the sequences' losses averaged: `sequence_aux_loss(..., normalise=False)`.
"""
from __future__ import annotations

import torch


def switch_aux_loss(scores_NE: torch.Tensor, global_counts_E: torch.Tensor, global_tokens: int, top_k: int
                    ) -> torch.Tensor:
    """Switch Transformer / GShard auxiliary loss, share of this device.

        L = E * sum_i f_i * P_i,  f_i = c_i / (N_g K)  (fraction of routed copies to expert i, global batch)
                                  P_i = (1/N_g) sum_t s_{t,i}  (mean score of expert i over the global batch)

    f is a count (no gradient); this device contributes the sum over its own tokens to P_i.
    The minimum, 1, is reached at uniform routing (for softmax scores).
    """
    E = scores_NE.shape[-1]
    f_E = global_counts_E.to(scores_NE.dtype) / (global_tokens * top_k)
    p_share_E = scores_NE.sum(0) / global_tokens
    return E * (f_E * p_share_E).sum()


def ep_group_aux_loss(scores_NE: torch.Tensor, group_counts_E: torch.Tensor, top_k: int, num_groups: int
                      ) -> torch.Tensor:
    """The Switch loss per expert-parallel group, averaged over the groups; share of this device (its tokens).

        L = (1/G) sum_g E * sum_i f_i^g P_i^g,  f_i^g = c_i^g / (N_g K)   (copies to expert i from group g's tokens)
                                                P_i^g = (1/N_g) sum_{t in g} s_{t,i}

    G groups (the data-parallel degree: the mesh's "ep" groups, each the devices exchanging tokens in one
    all_to_all), N_g the (counted) tokens of group g = sum_i c_i^g / K. group_counts_E: c^g of this device's group,
    summed over the group's devices (no gradient); this device contributes its tokens' sum to P^g. With one group
    this is `switch_aux_loss` exactly.

    Source: Pangu Ultra MoE (arXiv 2505.04519), "EP-group load balancing loss": the statistics over the tokens of an
    EP group instead of the global batch, so that each group balances its own devices' experts while sequences
    within it may specialise. The paper gives no formula; this is the reconstruction (the Switch form per group,
    the mean over groups), a loss between the per-sequence and the global one.
    """
    E = scores_NE.shape[-1]
    counts_E = group_counts_E.to(scores_NE.dtype)
    n_g = (counts_E.sum() / top_k).clamp(min=1.0)      # a group with no counted token: its loss is 0
    return E * (counts_E / (n_g * top_k) * (scores_NE.sum(0) / n_g)).sum() / num_groups


def sequence_aux_loss(scores_BTE: torch.Tensor, experts_BTK: torch.Tensor, global_sequences: int,
                      valid_BT: torch.Tensor | None = None, normalise: bool = True) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, share of this device (its sequences).

        L = (1/B_g) sum_seq sum_i f_i P_i,  f_i = E/(K T) sum_t 1[i in topk(t)],
                                            P_i = (1/T) sum_t s'_{t,i},  s'_{t,i} = s_{t,i} / sum_j s_{t,j}

    (DeepSeek-V3 multiplies by a small alpha, 1e-4; the caller does.) Balanced routing gives 1.
    valid_BT (bool): each sequence's sums run over its valid tokens and T is its count of them; a sequence with
    none contributes 0.

    normalise=False: s' = s, the Switch loss E sum_i f_i P_i of each sequence averaged over the sequences
    (`balance.aux_loss_scope=sequence`). For softmax scores (each token's sum to 1) the two are the same; for
    sigmoid or sqrt-softplus scores DeepSeek-V3's normalisation makes P a distribution and they differ.
    """
    if valid_BT is not None:
        return _valid_sequence_aux_loss(scores_BTE, experts_BTK, global_sequences, valid_BT, normalise)
    B, T, E = scores_BTE.shape
    K = experts_BTK.shape[-1]
    norm_BTE = scores_BTE / scores_BTE.sum(-1, keepdim=True) if normalise else scores_BTE
    counts_BE = torch.zeros(B, E, dtype=scores_BTE.dtype, device=scores_BTE.device)
    counts_BE.scatter_add_(1, experts_BTK.reshape(B, -1), torch.ones_like(experts_BTK.reshape(B, -1), dtype=scores_BTE.dtype))
    f_BE = counts_BE * E / (K * T)
    p_BE = norm_BTE.mean(1)
    return (f_BE * p_BE).sum() / global_sequences


def _valid_sequence_aux_loss(scores_BTE: torch.Tensor, experts_BTK: torch.Tensor, global_sequences: int,
                             valid_BT: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    B, T, E = scores_BTE.shape
    K = experts_BTK.shape[-1]
    w_BT = valid_BT.to(scores_BTE.dtype)
    n_B1 = w_BT.sum(1, keepdim=True).clamp(min=1)            # a sequence with no valid token: all sums are 0
    norm_BTE = scores_BTE / scores_BTE.sum(-1, keepdim=True) if normalise else scores_BTE
    counts_BE = torch.zeros(B, E, dtype=scores_BTE.dtype, device=scores_BTE.device)
    counts_BE.scatter_add_(1, experts_BTK.reshape(B, -1), w_BT.unsqueeze(-1).expand(B, T, K).reshape(B, -1))
    f_BE = counts_BE * E / (K * n_B1)
    p_BE = (norm_BTE * w_BT.unsqueeze(-1)).sum(1) / n_B1
    return (f_BE * p_BE).sum() / global_sequences


def router_z_loss(logits_NE: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """ST-MoE router z-loss, share of this device: L = (1/N_g) sum_t (logsumexp_i logit_{t,i})^2.
    Keeps router logits small, which keeps the softmax (and its rounding) well behaved."""
    return torch.logsumexp(logits_NE, dim=-1).pow(2).sum() / global_tokens


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, global_counts_E: torch.Tensor, speed: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, after each step, in place:

        b_i <- b_i + speed * sign(mean_j c_j - c_i)

    An overloaded expert's bias goes down, an underloaded one's up. The bias only enters top-k
    selection, never the gate values, so it steers routing without a gradient term. Computed from the
    global counts, so every device (each holds a copy of the router) applies the same update.
    """
    counts = global_counts_E.to(bias_E.dtype)
    bias_E.add_(speed * torch.sign(counts.mean() - counts))


def select_experts(biased_NE: torch.Tensor, top_k: int, routing: str = "topk", num_groups: int = 1,
                   topk_groups: int = 1) -> torch.Tensor:
    """The top-k experts of each token (experts_NK), from selection scores (scores + bias).

    topk:           the k best experts.
    grouped:        Pangu Pro's MoGE: experts split into `num_groups` groups of consecutive experts; each token
                    takes its k/G best experts *in every group*. Every group gets exactly N*k/G copies, so with
                    one group per device the devices are balanced by construction.
    group_limited:  DeepSeek-V3's node-limited routing: rank groups by the sum of their two best experts' scores,
                    keep the `topk_groups` best groups, take the k best experts among them.
    """
    if routing == "topk":
        return torch.topk(biased_NE, top_k, dim=-1).indices
    N, E = biased_NE.shape
    G, per = num_groups, E // num_groups
    grouped_NGP = biased_NE.view(N, G, per)
    if routing == "grouped":
        idx_NGk = torch.topk(grouped_NGP, top_k // G, dim=-1).indices
        offset_G = torch.arange(G, device=biased_NE.device).view(1, G, 1) * per
        return (idx_NGk + offset_G).reshape(N, top_k)
    group_score_NG = torch.topk(grouped_NGP, min(2, per), dim=-1).values.sum(-1)
    keep_NM = torch.topk(group_score_NG, topk_groups, dim=-1).indices
    mask_NG = torch.zeros(N, G, dtype=torch.bool, device=biased_NE.device).scatter_(1, keep_NM, True)
    masked_NE = grouped_NGP.masked_fill(~mask_NG.unsqueeze(-1), float("-inf")).view(N, E)
    return torch.topk(masked_NE, top_k, dim=-1).indices


def drop_over_capacity(experts_NK: torch.Tensor, seq_len: int, num_experts: int, capacity: int) -> torch.Tensor:
    """Capacity-factor routing: in every sequence, each expert keeps its first `capacity` token copies in token
    order (the order Switch Transformer fills an expert's buffer in); later copies are dropped and get the expert
    id `num_experts` (no expert): the token keeps its other experts, the shared expert and the residual.
    Returns experts_NK with the drops marked.

    The order is discrete on purpose: which copies drop is a function of the routing choices alone, never of a
    comparison of float gates between tokens. Tokens with mathematically equal gates are common (a sequence that
    opens with a run of one byte, indentation say, gives every token of the run the same hidden state), and a
    gate ranking settled those ties by last-bit rounding, which differs with how the batch is split over devices
    (matrix shapes, the order the gradient all-reduce sums in): N devices dropped other copies than one device.
    Token order is also causal: whether token t keeps a copy depends on tokens <= t only, where a gate ranking
    lets later tokens evict it. Per sequence, so the same copies drop however whole sequences are spread over
    devices.
    """
    N, K = experts_NK.shape
    flat_M = experts_NK.reshape(-1)                                  # (token, k) order: token order
    seq_M = torch.arange(N * K, device=experts_NK.device) // (seq_len * K)
    key_M = seq_M * (num_experts + 1) + flat_M
    order_M = torch.argsort(key_M, stable=True)                      # grouped by (sequence, expert), in token order
    sorted_key_M = key_M[order_M]
    first_M = torch.searchsorted(sorted_key_M, sorted_key_M)          # where each key's run starts
    rank_M = torch.empty_like(order_M)
    rank_M[order_M] = torch.arange(order_M.numel(), device=order_M.device) - first_M
    return torch.where(rank_M.view(N, K) < capacity, experts_NK, torch.full_like(experts_NK, num_experts))


__all__ = ["switch_aux_loss", "ep_group_aux_loss", "sequence_aux_loss", "router_z_loss", "update_expert_bias", "select_experts",
           "drop_over_capacity"]
