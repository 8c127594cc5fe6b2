"""Multi-head latent attention (MLA, DeepSeek-V2/V3): `model.attention=mla`.

Source of the math: transformers' `DeepseekV3Attention` (models/deepseek_v3/modeling_deepseek_v3.py, 5.x) and
DeepSeek-V3's inference/model.py `MLA` (naive attn_impl). Per token x (after the block's attn_norm):

  q      = wq(x)                          (q_lora_rank = 0: one projection, as DeepSeek-V2-Lite)
         | wq_b(q_norm(wq_a(x)))          (q_lora_rank > 0: a low-rank query, RMSNorm on the rank)
  q      -> H heads of [q_nope (qk_nope_head_dim) | q_rot (qk_rope_head_dim)]       nope first, rope last
  c, k_r = split(wkv_a(x), [kv_lora_rank, qk_rope_head_dim])                        latent first, rope last
  c      = kv_norm(c)                     (k_r is not normalised)
  k_r    = RoPE(k_r): ONE rotary key shared by all heads (MQA style); q_rot = RoPE(q_rot) per head
  k, v   = per head split(wkv_b(c), [qk_nope_head_dim, v_head_dim]); key = [k_nope | k_r], query = [q_nope | q_rot]
  out    = wo(causal softmax(query key^T * qk_head_dim^-0.5) v)   with qk_head_dim = nope + rope, wo: H*v_head_dim -> D

Parameter names are DeepSeek's own (inference/model.py, what its convert.py maps to); transformers' names:
  wq -> q_proj, wq_a -> q_a_proj, q_norm -> q_a_layernorm, wq_b -> q_b_proj, wkv_a -> kv_a_proj_with_mqa,
  kv_norm -> kv_a_layernorm, wkv_b -> kv_b_proj, wo -> o_proj (same shapes, [out, in]; no bias).

Choices, and where they differ from DeepSeek-V3:
  - The two inner RMSNorms use eps = 1e-6 (MLA_NORM_EPS), not model.norm_eps: transformers builds them with its
    RMSNorm default (they do not read config.rms_norm_eps) and DeepSeek's reference with RMSNorm(dim)'s default
    1e-6, so a checkpoint of either behaves the same here.
  - Plain RoPE with model.rope_theta over qk_rope_head_dim (no YaRN: no mscale on the softmax scale, no
    frequency interpolation). DeepSeek-V3's long-context YaRN is not implemented.
  - RoPE rotates the interleaved pairs (x[2i], x[2i+1]) and keeps them interleaved (layers.apply_rope), as
    DeepSeek's reference does. transformers' default rope_interleave=True rotates the same pairs but writes them
    de-interleaved (evens, then odds); q and k get the same permutation, so q.k, the attention and the output are
    the same, and the weights copy over unchanged.
  - Generation caches the full per-head key [B, H, S, qk_head_dim] and value [B, H, S, v_head_dim] in the
    ordinary KVCache (simple, not memory-lean): transformers caches the compressed latent c and k_r instead and
    expands them every step; neither absorbs wkv_b into q and wo (DeepSeek's attn_impl="absorb").

Shape legend: B batch, T sequence (this forward's chunk), S keys (cached + chunk), D model dim, H heads,
C kv_lora_rank, Q q_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, K = N + R, V v_head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.model.layers import KVCache, RMSNorm, apply_rope, rope_tables

MLA_NORM_EPS = 1e-6   # transformers' DeepseekV3RMSNorm default and DeepSeek's RMSNorm default (see above)


class MLAttention(nn.Module):
    """Causal multi-head latent attention with RoPE on a decoupled slice of each head (see the module docstring).
    `layer` is its index in the model: the slot of a KVCache it uses."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, max_seq_len: int, rope_theta: float, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = n_heads, q_lora_rank, kv_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_dim ** -0.5
        if q_lora_rank:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, MLA_NORM_EPS)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, n_heads * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, MLA_NORM_EPS)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        cos, sin = rope_tables(max_seq_len, qk_rope_head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]. With a cache (generation): x_BTD continues the cached tokens (positions from
        cache.seen(layer) on) and its keys and values join the cache."""
        B, T, _ = x_BTD.shape
        offset = 0 if cache is None else cache.seen(self.layer)
        if offset + T > self.rope_cos.shape[0]:
            raise ValueError(f"{offset + T} positions do not fit max_seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[offset:], self.rope_sin[offset:]
        q_BTHK = (self.wq_b(self.q_norm(self.wq_a(x_BTD))) if self.q_lora_rank else self.wq(x_BTD)) \
            .view(B, T, self.n_heads, self.qk_dim)
        q_nope_BHTN, q_rot_BHTR = q_BTHK.transpose(1, 2).split([self.nope, self.rope], dim=-1)
        c_BTC, k_rot_BTR = self.wkv_a(x_BTD).split([self.kv_lora_rank, self.rope], dim=-1)
        k_rot_B1TR = apply_rope(k_rot_BTR.unsqueeze(1), cos, sin)
        kv_BHT_NV = self.wkv_b(self.kv_norm(c_BTC)).view(B, T, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope_BHTN, v_BHTV = kv_BHT_NV.split([self.nope, self.v_dim], dim=-1)
        q_BHTK = torch.cat((q_nope_BHTN, apply_rope(q_rot_BHTR, cos, sin)), dim=-1)
        k_BHTK = torch.cat((k_nope_BHTN, k_rot_B1TR.expand(B, self.n_heads, T, self.rope)), dim=-1)
        if cache is None or offset == 0:
            if cache is not None:
                cache.append(self.layer, k_BHTK, v_BHTV)
            y_BHTV = _attention(q_BHTK, k_BHTK, v_BHTV, self.scale, None)
        else:   # key j visible to query i when j <= offset + i (is_causal would align the corner top-left)
            k_BHSK, v_BHSV = cache.append(self.layer, k_BHTK, v_BHTV)
            S = offset + T
            mask_TS = (torch.arange(S, device=x_BTD.device).unsqueeze(0)
                       <= torch.arange(offset, S, device=x_BTD.device).unsqueeze(1))
            y_BHTV = _attention(q_BHTK, k_BHSK, v_BHSV, self.scale, mask_TS)
        return self.wo(y_BHTV.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))


def _attention(q_BHTK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSV: torch.Tensor, scale: float,
               mask_TS: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v -> [B, H, T, V]; causal when mask_TS is None.

    The fused SDPA kernels (flash on CPU and GPU) want one head dim for q, k and v; with V != K torch falls back
    to its math path, which keeps the [B, H, T, S] probabilities for backward. So the narrower side is padded with
    zeros to max(K, V), as vLLM does for MLA prefill: zero value columns give zero output columns (sliced off),
    zero q/k columns add nothing to q.k (the scale is passed explicitly, not taken from the padded width)."""
    K, V = q_BHTK.shape[-1], v_BHSV.shape[-1]
    if V < K:
        v_BHSV = F.pad(v_BHSV, (0, K - V))
    elif K < V:
        q_BHTK, k_BHSK = F.pad(q_BHTK, (0, V - K)), F.pad(k_BHSK, (0, V - K))
    y = F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSV, attn_mask=mask_TS, is_causal=mask_TS is None,
                                       scale=scale)
    return y[..., :V]


def mla_from_config(cfg, layer: int) -> MLAttention:
    """The MLA of layer `layer` of the native model (cfg: ModelConfig with attention='mla')."""
    return MLAttention(cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                       cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.max_seq_len, cfg.rope_theta, layer)
