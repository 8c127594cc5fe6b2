"""Dense building blocks: RMSNorm, rotary embeddings, causal self-attention (with an optional KV cache), SwiGLU.

Shape legend: B batch, T sequence (the chunk of this forward), S keys (cached + chunk), D model dim, H heads,
Dh head dim, F hidden (ffn) dim.
"""
from __future__ import annotations

import concurrent.futures
import functools

import torch
import torch.nn.functional as F
from torch import nn


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32 and float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = upcast(x_BTD)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x_BTD) * self.weight


def rope_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_TDh2, sin_TDh2 for rotating pairs (x[2i], x[2i+1]) by position * theta^(-2i/Dh)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHTDh: torch.Tensor, cos_TDh2: torch.Tensor, sin_TDh2: torch.Tensor) -> torch.Tensor:
    T = x_BHTDh.shape[-2]
    x = upcast(x_BHTDh).unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos_TDh2[:T].to(x.dtype), sin_TDh2[:T].to(x.dtype)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x_BHTDh)


class KVCache:
    """Keys and values of the tokens read so far, per attention layer: k[layer], v[layer] of shape [B, H, S, Dh]
    (after RoPE for keys). Inference only (generation, model/generate.py): a forward with a cache appends its
    chunk of T tokens at positions `position` .. `position` + T - 1 of every layer; the next forward continues
    from there (prefill the prompt, then one token at a time)."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def seen(self, layer: int) -> int:
        """Tokens layer `layer` has cached: the absolute position of the next token it reads."""
        k = self.k[layer]
        return 0 if k is None else k.shape[-2]

    @property
    def position(self) -> int:
        """Tokens cached (by the first layer: after a whole forward every layer has the same)."""
        return self.seen(0) if self.k else 0

    def append(self, layer: int, k_BHTDh: torch.Tensor, v_BHTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds a chunk's keys and values to layer `layer`; returns all of them so far ([B, H, S, Dh] each)."""
        k, v = self.k[layer], self.v[layer]
        self.k[layer] = k_BHTDh if k is None else torch.cat((k, k_BHTDh), dim=-2)
        self.v[layer] = v_BHTDh if v is None else torch.cat((v, v_BHTDh), dim=-2)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE (no bias, as in Llama/DeepSeek). `layer` is its index in the
    model: the slot of a KVCache it uses."""

    def __init__(self, dim: int, n_heads: int, max_seq_len: int, rope_theta: float, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        cos, sin = rope_tables(max_seq_len, self.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        if cache is not None:
            return self._cached(x_BTD, heads, cache)
        q_BHTDh = apply_rope(heads(self.wq(x_BTD)), self.rope_cos, self.rope_sin)
        k_BHTDh = apply_rope(heads(self.wk(x_BTD)), self.rope_cos, self.rope_sin)
        v_BHTDh = heads(self.wv(x_BTD))
        y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHTDh, v_BHTDh, is_causal=True)
        return self.wo(y_BHTDh.transpose(1, 2).reshape(B, T, D))

    def _cached(self, x_BTD: torch.Tensor, heads, cache: KVCache) -> torch.Tensor:
        """The chunk x_BTD at absolute positions offset .. offset + T - 1 (offset: tokens already cached): RoPE at
        those positions; query i sees every cached key and the chunk's keys up to its own position."""
        B, T, D = x_BTD.shape
        offset = cache.seen(self.layer)
        if offset + T > self.rope_cos.shape[0]:
            raise ValueError(f"{offset + T} positions do not fit max_seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[offset:], self.rope_sin[offset:]
        q_BHTDh = apply_rope(heads(self.wq(x_BTD)), cos, sin)
        k_BHSDh, v_BHSDh = cache.append(self.layer, apply_rope(heads(self.wk(x_BTD)), cos, sin), heads(self.wv(x_BTD)))
        if offset == 0:
            y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHSDh, v_BHSDh, is_causal=True)
        elif T == 1:   # the newest token sees everything
            y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHSDh, v_BHSDh)
        else:          # key j visible to query i when j <= offset + i (is_causal would align the corner top-left)
            S = offset + T
            mask_TS = (torch.arange(S, device=x_BTD.device).unsqueeze(0)
                       <= torch.arange(offset, S, device=x_BTD.device).unsqueeze(1))
            y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHSDh, v_BHSDh, attn_mask=mask_TS)
        return self.wo(y_BHTDh.transpose(1, 2).reshape(B, T, D))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; with `limit` > 0, DeepSeek-V4's clamp first (technical report §4.2.3: "we clamped the linear
    component of SwiGLU to the range of [-10, 10], while capping the upper bound of the gate component at 10"):
    gate <= limit (pre-activation, upper bound only), up in [-limit, limit]. As transformers' DeepseekV4Experts
    `_apply_gate` (and its DeepseekV4MLP, which DeepSeek-V4 uses for the shared expert)."""
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense feed-forward and the shared expert. `limit` > 0: DeepSeek-V4's clamp of
    the gate and linear pre-activations (`swiglu`; set for the MoE's shared expert only)."""

    def __init__(self, dim: int, hidden: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class _ContiguousGrad(torch.autograd.Function):
    """The identity whose backward makes the incoming gradient contiguous: torch's grouped_mm backward refuses an
    expanded one (stride 0, as `.sum()` gives: "Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y_MO: rows offs_E[j-1] .. offs_E[j] - 1 of x_MI times w_EOI[j]^T (nn.Linear's layout, weight [out, in]), all
    groups in one call of torch.nn.functional.grouped_mm. offs_E: int32 cumulative row counts on x's device, its
    last entry M (rows past it would be left uninitialised). x and w in one dtype; grouped_mm is not autocast-aware,
    the caller casts (see GroupedExperts)."""
    return _ContiguousGrad.apply(F.grouped_mm(x_MI, w_EOI.transpose(-2, -1), offs=offs_E))


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped_mm runs on this device type in this dtype, forward and backward, and agrees with a
    loop of matmuls (a zero-row group included). Probed once per (device type, dtype) on a 16 x 16 problem and
    cached: on this machine's torch 2.13 CPU build float32, bfloat16 and float16 pass, float64 has no kernel
    ("Expected mat_a to be Float32, BFloat16 or Float16"); CUDA needs sm80+. The probe runs in a thread of its own,
    so the caller's grad mode, autocast and saved-tensor hooks (a checkpointed region's) do not reach it."""
    if not hasattr(F, "grouped_mm"):
        return False
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_probe_grouped_mm, device_type, dtype).result()


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 16, generator=g).to(device_type, dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=g).to(device_type, dtype).requires_grad_()
        offs = torch.tensor([2, 2, 5], dtype=torch.int32, device=device_type)
        with torch.autocast(device_type, enabled=False):
            y = grouped_linear(x, w, offs)
            y.sum().backward()
            ref = torch.cat([x[:2] @ w[0].t(), x[2:] @ w[2].t()])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return (bool(torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol))
                and w.grad is not None and not bool(w.grad[1].any()))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_mm_aligned(device_type: str, dtype: torch.dtype, *dims: int) -> bool:
    """Whether rows of these widths meet grouped_mm's alignment: every row stride a multiple of 16 bytes (CUDA's
    kernels, and torch 2.13's CPU one too: "strides should be multiple of 16 bytes", e.g. bf16 rows of 12)."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(d * size % 16 == 0 for d in dims)
