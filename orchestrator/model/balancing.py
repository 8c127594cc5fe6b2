"""Expert load balancing: each strategy a small pure function with its formula.

Shape legend: N tokens (B*T flattened), B sequences, T tokens per sequence, E experts, K top-k.
s_{t,i}: router score of expert i for token t (softmax or sigmoid); c_i: routed copies to expert i.

Every loss is written as this device's share of a loss over the *global* batch (all devices): the
shares sum to the global loss, and the gradient of each share is exactly the global loss's gradient
with respect to this device's tokens. So N devices compute what one device computes (the
single-process oracle), whatever the strategy. `global_tokens` is the global batch's token count.
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


def sequence_aux_loss(scores_BTE: torch.Tensor, experts_BTK: torch.Tensor, global_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, share of this device (its sequences).

        L = (1/B_g) sum_seq sum_i f_i P_i,  f_i = E/(K T) sum_t 1[i in topk(t)],
                                            P_i = (1/T) sum_t s'_{t,i},  s'_{t,i} = s_{t,i} / sum_j s_{t,j}

    (DeepSeek-V3 multiplies by a small alpha, 1e-4; the caller does.) Balanced routing gives 1.
    """
    B, T, E = scores_BTE.shape
    K = experts_BTK.shape[-1]
    norm_BTE = scores_BTE / scores_BTE.sum(-1, keepdim=True)
    counts_BE = torch.zeros(B, E, dtype=scores_BTE.dtype, device=scores_BTE.device)
    counts_BE.scatter_add_(1, experts_BTK.reshape(B, -1), torch.ones_like(experts_BTK.reshape(B, -1), dtype=scores_BTE.dtype))
    f_BE = counts_BE * E / (K * T)
    p_BE = norm_BTE.mean(1)
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


__all__ = ["switch_aux_loss", "sequence_aux_loss", "router_z_loss", "update_expert_bias"]
