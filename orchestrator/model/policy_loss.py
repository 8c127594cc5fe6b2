"""The policy loss of the GRPO family (GRPO, DAPO, Dr. GRPO, GSPO) as small pure functions, formula and source in
each docstring. TRL's `GRPOTrainer` (trl 1.16, `trl/trainer/grpo_trainer.py`, `_compute_loss`) is the oracle the
tests hold them to.

Data parallelism as everywhere in this project: each device's loss is a sum over ITS rows divided by a GLOBAL count,
so the shares summed over devices are the loss of the whole global batch computed in one process (and so are their
gradients). `LossStats` are sums for the same reason: add them over devices, then divide.

Shape suffixes:
    P  prompts                       G  completions per prompt (the group)
    B  rows (completions) on this device, B = P * G for the whole batch
    T  completion positions (right-padded)
    V  vocabulary
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")


def group_advantages(rewards_PG: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: A_pg = r_pg - mean_g(r_p), divided by (std_g(r_p) + eps) when `scale`.

    std is torch.std (unbiased), as TRL's GRPOTrainer with scale_rewards='group' (its `nanstd`, eps 1e-4); GRPO
    (arXiv 2402.03300, section 4.1.2) scales, Dr. GRPO (arXiv 2503.20783) does not (scale=False). A group whose
    rewards are all equal gets advantage 0 either way."""
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if not scale:
        return centred_PG
    return centred_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logp_BT[b, t] = log softmax(logits_BTV[b, t] / temperature)[targets_BT[b, t]], 0 where the target is -100.

    The logits at t are the ones that predict targets_BT[b, t] (the caller shifts). Half precision is upcast to
    float32; float32 and float64 keep their dtype. Dividing by the sampling temperature is what TRL does
    (`add_fused_lm_head(temperature=...)`), so the log-probabilities are those of the distribution sampled from."""
    if logits_BTV.dtype in (torch.float16, torch.bfloat16):
        logits_BTV = logits_BTV.float()
    logp_BTV = torch.log_softmax(logits_BTV / temperature, dim=-1)
    ignored_BT = targets_BT == -100
    logp_BT = logp_BTV.gather(-1, targets_BT.masked_fill(ignored_BT, 0).unsqueeze(-1)).squeeze(-1)
    return logp_BT.masked_fill(ignored_BT, 0.0)


@dataclass
class LossStats:
    """This device's sums (float64, 0-dim, detached); sum them over devices, then divide by `tokens`.

    Clipping is counted as TRL counts it (`clip_ratio/low_mean`, `high_mean`): a token is clipped below when
    r < 1 - clip_low and A < 0, above when r > 1 + clip_high and A > 0 (where the clip changes the gradient).
    Unlike TRL at ratio_level 'sequence', which counts sequences, these count masked tokens at every level."""
    clip_low_sum: torch.Tensor
    clip_high_sum: torch.Tensor
    kl_sum: torch.Tensor      # of the k3 estimator over masked tokens; 0 without a reference policy
    ratio_sum: torch.Tensor   # of the importance ratio over masked tokens (the sequence ratio at 'sequence' level)
    tokens: torch.Tensor      # masked tokens


def policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, mask_BT: torch.Tensor, *,
                clip_low: float, clip_high: float, ratio_level: str = "token", agg: str = "token_mean",
                ref_logp_BT: torch.Tensor | None = None, kl_coeff: float = 0.0, global_tokens: int,
                global_sequences: int, max_completion_len: int) -> tuple[torch.Tensor, LossStats]:
    """This device's share of the clipped surrogate loss of the global batch, and its `LossStats`.

    Ratio, at ratio_level
      'token' (GRPO, arXiv 2402.03300):     r_t = exp(logp_t - old_t)
      'sequence' (GSPO, arXiv 2507.18071):  r_t = s = exp(mean over the row's masked tokens of (logp - old)),
                                            the same for every token of the row (TRL importance_sampling_level=
                                            'sequence')
    Per-token loss, with DAPO's decoupled clip-higher (arXiv 2503.14476):
      l_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A) + kl_coeff * k3_t,
      k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (Schulman's k3 estimator of KL(pi || ref), as TRL)
    Aggregation `agg` (m = mask; a row's count is clamped at 1, so an empty row contributes 0):
      'token_mean'     sum_bt m l / global_tokens                                 (DAPO; TRL loss_type 'dapo')
      'sequence_mean'  sum_b (sum_t m l / count_b) / global_sequences             (GRPO; TRL loss_type 'grpo')
      'dr_grpo'        sum_bt m l / (global_sequences * max_completion_len)       (Dr. GRPO; TRL 'dr_grpo')
    global_tokens / global_sequences are the counts of the whole global batch (all devices); with them equal to this
    device's own counts the result is the one-process loss."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}: expected one of {', '.join(RATIO_LEVELS)}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}: expected one of {', '.join(AGGREGATIONS)}")
    if kl_coeff != 0.0 and ref_logp_BT is None:
        raise ValueError(f"kl_coeff={kl_coeff} needs ref_logp_BT (the reference policy's log-probabilities)")

    keep_BT = mask_BT.bool()
    m_BT = mask_BT.to(logp_BT.dtype)
    count_B = m_BT.sum(-1)
    # masked positions may hold anything (padding): zero them before exp, so no inf * 0 reaches the sums
    log_ratio_BT = torch.where(keep_BT, logp_BT - old_logp_BT, torch.zeros_like(logp_BT))
    if ratio_level == "token":
        ratio_BT = torch.exp(log_ratio_BT)
    else:
        ratio_B = torch.exp(log_ratio_BT.sum(-1) / count_B.clamp(min=1.0))
        ratio_BT = ratio_B.unsqueeze(-1).expand_as(logp_BT)

    adv_B1 = adv_B.to(logp_BT.dtype).unsqueeze(-1)
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = -torch.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    kl_BT = None
    if ref_logp_BT is not None:
        d_BT = torch.where(keep_BT, ref_logp_BT - logp_BT, torch.zeros_like(logp_BT))
        kl_BT = torch.exp(d_BT) - d_BT - 1.0
        loss_BT = loss_BT + kl_coeff * kl_BT

    if agg == "token_mean":
        loss = (loss_BT * m_BT).sum() / max(global_tokens, 1)
    elif agg == "sequence_mean":
        loss = ((loss_BT * m_BT).sum(-1) / count_B.clamp(min=1.0)).sum() / max(global_sequences, 1)
    else:
        loss = (loss_BT * m_BT).sum() / max(global_sequences * max_completion_len, 1)

    with torch.no_grad():
        m64_BT = m_BT.double()
        low_BT = (ratio_BT < 1.0 - clip_low) & (adv_B1 < 0)
        high_BT = (ratio_BT > 1.0 + clip_high) & (adv_B1 > 0)
        zero = torch.zeros((), dtype=torch.float64, device=logp_BT.device)
        stats = LossStats(
            clip_low_sum=(low_BT.double() * m64_BT).sum(),
            clip_high_sum=(high_BT.double() * m64_BT).sum(),
            kl_sum=zero if kl_BT is None else (kl_BT.double() * m64_BT).sum(),
            ratio_sum=(ratio_BT.double() * m64_BT).sum(),
            tokens=m64_BT.sum())
    return loss, stats
