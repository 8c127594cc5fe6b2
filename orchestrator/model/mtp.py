"""Multi-token prediction (MTP), DeepSeek-V3 §2.2 (arXiv 2412.19437, eqs. 21-25), for the native model.

D modules after the main model; module k (1..D) predicts, at position i, the token k+1 ahead (t_{i+k+1}):

    h^0      = the main model's hidden state after its final norm (transformers' MtpLayer convention: it feeds
               `last_hidden_state`, the normed one, to hnorm)
    x^k_i    = eh_proj_k( cat[ enorm_k(Emb(t_{i+k})), hnorm_k(h^{k-1}_i) ] )       i = 0 .. T-k-1   (eq. 21)
    h^k      = Block_k(x^k)             causal over the T-k positions, RoPE positions 0..T-k-1     (eq. 22)
    logits^k = head( norm_k(h^k) )      the main model's (tied) head                              (eq. 23)

Concatenation order: embedding first, then the hidden state, as the released checkpoint's `eh_proj` expects
(transformers' MtpLayer; the paper writes the other order). Emb and the head are the main model's, shared.
Block_k is the native `Block`: an MoE block (so its experts are expert-parallel like every MoE layer's, and the
model's `moe_layers()`, `blocks()`, placement, loads and balancing losses include it, after the main layers), or a
dense block when the main model has no MoE layer.

The loss (device/shard.py): depth k's targets are the main targets shifted by k (targets_BT[:, k:], which already
hold the next token of each input), so no target reaches past the row. Training adds (lambda / D) * sum_k L_k,
L_k the mean cross-entropy over depth k's B*(T-k) targets of the global batch (eq. 25; eq. 24 divides by T
instead of T-k, a factor (T-k)/T from this).

Shape legend: B batch, T sequence, D model dim, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from orchestrator.config import BalanceConfig, ModelConfig
from orchestrator.model.layers import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth: enorm, hnorm (RMSNorm), eh_proj (Linear 2*dim -> dim), a transformer block, a final norm."""

    def __init__(self, cfg: ModelConfig, depth: int, expert_ids: Sequence[int], balance: BalanceConfig | None,
                 block: Callable[..., nn.Module]):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        # The block's layer index follows the main layers'; its FFN is MoE unless the main model has none.
        has_moe = cfg.n_layers > cfg.first_k_dense
        block_cfg = dataclasses.replace(cfg, first_k_dense=0 if has_moe else cfg.n_layers + cfg.mtp_depth)
        self.block = block(block_cfg, cfg.n_layers + depth - 1, expert_ids, balance)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, emb_BTD: torch.Tensor, h_BTD: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens i+k and the previous depth's hidden states, both [B, T-k, D] -> h^k [B, T-k, D]
        (before the final norm: the next depth's input)."""
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        return self.block(x_BTD)


def mtp_logits(modules: nn.ModuleList, emb_BTD: torch.Tensor, h0_BTD: torch.Tensor,
               head: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Each depth's logits, [B, T-k, V] for k = 1..D: position i of depth k predicts token i+k+1.

    emb_BTD: the embeddings of the input tokens [B, T, D]; h0_BTD: the main model's final-normed hidden state;
    head: hidden [.., D] -> logits [.., V] (the main model's)."""
    out, h_BTD = [], h0_BTD
    T = emb_BTD.shape[1]
    for k, module in enumerate(modules, 1):
        h_BTD = module(emb_BTD[:, k:], h_BTD[:, :T - k])
        out.append(head(module.norm(h_BTD)))
    return out


def mtp_loss_sums(logits: list[torch.Tensor], targets_BT: torch.Tensor,
                  cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Summed cross-entropy of each depth: depth k's logits [B, T-k, V] against targets_BT[:, k:] (targets_BT are
    the main model's, the next token of each input, so depth k's are the token k+1 ahead)."""
    return [cross_entropy(l_BTV.flatten(0, 1), targets_BT[:, k:].flatten()) for k, l_BTV in enumerate(logits, 1)]


def mtp_targets(batch_rows: int, seq_len: int, depth: int) -> list[int]:
    """How many targets depth k = 1..depth has in `batch_rows` rows of `seq_len` tokens: rows * (seq_len - k)."""
    return [batch_rows * (seq_len - k) for k in range(1, depth + 1)]
