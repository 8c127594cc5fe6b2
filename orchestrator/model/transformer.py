"""A small decoder-only MoE transformer in the DeepSeek style.

tokens -> embedding -> [RMSNorm -> attention (RoPE) -> + -> RMSNorm -> FFN -> +] x L -> RMSNorm -> head
where FFN is a dense SwiGLU for the first `first_k_dense` layers and an MoE block after that. With
`model.norm=sandwich` each sub-layer's output is normalised too before its residual add (see Block).

`expert_ids` chooses which routed experts this instance holds (all of them by default); expert
parallelism builds each device's model with its own subset. `init_weights` draws every tensor from
a generator seeded by (seed, parameter name, expert id), so a device's experts equal the same
experts of the full single-process model, whatever the number of devices.

Shape legend: B batch, T sequence, D model dim, V vocab.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from orchestrator.config import BalanceConfig, ModelConfig
from orchestrator.model.checkpointing import checkpointed
from orchestrator.model.layers import Attention, KVCache, RMSNorm, SwiGLU
from orchestrator.model.mla import mla_from_config
from orchestrator.model.moe import MoE, GroupedExperts
from orchestrator.model.mtp import MTPModule, mtp_logits


class Block(nn.Module):
    """One decoder layer. Pre-norm (`model.norm=pre`):

        h = x + Attn(Norm(x));  out = h + FFN(Norm(h))

    Depth-scaled sandwich-norm (`model.norm=sandwich`, DSSN: Pangu Ultra, arXiv 2504.07866 §2.2) also normalises
    each sub-layer's output before the residual add:

        h = x + Norm_γa(Attn(Norm(x)));  out = h + Norm_γf(FFN(Norm(h)))

    with the output norms' scales γa, γf initialised to c_attn / sqrt(L) and c_ffn / sqrt(L) (`init_weights`; L the
    number of layers, c = model.sandwich_attn_scale / sandwich_ffn_scale, Pangu Ultra's 0.283 / 0.432 by default)
    and the input norms' to 1. Placement as openPangu-Ultra-MoE's decoder layer (post_attention_layernorm,
    post_mlp_layernorm)."""

    def __init__(self, cfg: ModelConfig, layer: int, expert_ids: Sequence[int], balance: BalanceConfig | None = None):
        super().__init__()
        sandwich = cfg.norm == "sandwich"
        self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if sandwich else None
        self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if sandwich else None
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = mla_from_config(cfg, layer) if cfg.attention == "mla" else \
            Attention(cfg.dim, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if layer < cfg.first_k_dense:
            self.ffn: nn.Module = SwiGLU(cfg.dim, cfg.dense_dim)
        else:
            self.ffn = MoE(cfg.dim, cfg.num_experts, cfg.top_k, cfg.expert_dim, cfg.num_shared_experts,
                           cfg.score_func, cfg.norm_topk_prob, cfg.route_scale, expert_ids, balance,
                           cfg.swiglu_limit)

        self.recompute = "none"  # activation checkpointing: none | selective | full (model/checkpointing.py)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:  # generation: no activation checkpointing (nothing is kept for a backward)
            x_BTD = x_BTD + self._out(self.attn_out_norm, self.attn(self.attn_norm(x_BTD), cache))
            return x_BTD + self._out(self.ffn_out_norm, self.ffn(self.ffn_norm(x_BTD)))
        if self.recompute == "full":
            return checkpointed(self._forward, x_BTD, keep=[self.ffn])
        return self._forward(x_BTD)

    def _forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        selective = self.recompute == "selective"
        x_BTD = x_BTD + (checkpointed(self._attention, x_BTD) if selective else self._attention(x_BTD))
        h_BTD = self.ffn_norm(x_BTD)
        dense = isinstance(self.ffn, SwiGLU)
        return x_BTD + self._out(self.ffn_out_norm,
                                 checkpointed(self.ffn, h_BTD) if selective and dense else self.ffn(h_BTD))

    def _attention(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._out(self.attn_out_norm, self.attn(self.attn_norm(x_BTD)))

    @staticmethod
    def _out(norm: RMSNorm | None, y_BTD: torch.Tensor) -> torch.Tensor:
        """A sub-layer's output as the residual gets it: normalised under the sandwich norm, as it is otherwise."""
        return y_BTD if norm is None else norm(y_BTD)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int] | None = None, balance: BalanceConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.expert_ids = list(range(cfg.num_experts) if expert_ids is None else expert_ids)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, self.expert_ids, balance) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # multi-token prediction (model/mtp.py): model.mtp_depth modules, run only by forward(..., mtp=True)
        self.mtp = nn.ModuleList(MTPModule(cfg, k, self.expert_ids, balance, Block)
                                 for k in range(1, cfg.mtp_depth + 1))

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None,
                mtp: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, T, V]. With a cache (generation): tokens_BT continue the cached ones (positions from
        cache.position on) and their keys and values join the cache. mtp=True (training): (logits, each MTP
        depth's logits [B, T-k, V], model/mtp.py)."""
        emb_BTD = self.tok_emb(tokens_BT)
        x_BTD = emb_BTD
        for layer in self.layers:
            x_BTD = layer(x_BTD) if cache is None else layer(x_BTD, cache)
        x_BTD = self.norm(x_BTD)
        logits_BTV = self._head(x_BTD)
        return (logits_BTV, mtp_logits(self.mtp, emb_BTD, x_BTD, self._head)) if mtp else logits_BTV

    def _head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        weight_VD = self.tok_emb.weight if self.head is None else self.head.weight
        return x_BTD @ weight_VD.t()

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def set_routing_replay(self, ids: list[torch.Tensor] | None) -> None:
        """Rollout Routing Replay (R3): the next forwards (and their backward recomputations) use these logical
        expert ids, one [B, T, K] or [N, K] tensor per MoE layer in moe_layers() order, instead of the routers'
        choice. Set before the forward, clear (None) after the backward. See MoE.replay_NK."""
        moes = self.moe_layers()
        if ids is None:
            for m in moes:
                m.replay_NK = None
            return
        if len(ids) != len(moes):
            raise ValueError(f"routing replay gives {len(ids)} layers; the model has {len(moes)} MoE layers")
        for i, (m, t) in enumerate(zip(moes, ids)):
            t_NK = t.reshape(-1, t.shape[-1]).long()
            if t_NK.shape[-1] != m.top_k:
                raise ValueError(f"routing replay of MoE layer {i} has {t_NK.shape[-1]} experts per token, "
                                 f"the layer routes to {m.top_k}")
            if t_NK.numel() and (int(t_NK.min()) < 0 or int(t_NK.max()) >= m.experts_total):
                raise ValueError(f"routing replay of MoE layer {i} names an expert outside 0..{m.experts_total - 1}")
            m.replay_NK = t_NK

    def set_valid(self, valid_BT: torch.Tensor | None) -> None:
        """The tokens the balancing losses and the load statistics count (bool [B, T]; None: all). See MoE.valid_N."""
        for m in self.moe_layers():
            m.valid_N = None if valid_BT is None else valid_BT.reshape(-1).bool()

    def routing(self) -> list[torch.Tensor]:
        """Each MoE layer's chosen logical expert ids of the last forward ([B*T, K] int64, moe_layers() order)."""
        return [m.last_experts_NK for m in self.moe_layers()]

    def blocks(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """(block, its routed experts or None), in order: the units FSDP2 wraps (parallel/sharding.py)."""
        return [(layer, layer.ffn.experts if isinstance(layer.ffn, MoE) else None) for layer in self.all_layers()]

    def all_layers(self) -> list[Block]:
        """The main blocks, then the MTP modules' blocks (model/mtp.py)."""
        return [*self.layers, *(m.block for m in self.mtp)]

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, the MTP blocks' last: placement, loads, balancing losses and routing cover them all."""
        return [layer.ffn for layer in self.all_layers() if isinstance(layer.ffn, MoE)]

    def expert_ids_of(self, param_name: str) -> list[int]:
        """Global expert ids held by the module of an expert parameter (`layers.3.ffn.experts.w1_EFD`), in slot order."""
        return self.get_submodule(param_name.rsplit(".", 1)[0]).expert_ids

    def primary_of(self, param_name: str) -> list[bool]:
        """Per slot of an expert parameter's module: the copy checkpoints save (see GroupedExperts)."""
        return self.get_submodule(param_name.rsplit(".", 1)[0]).primary

    def placement(self) -> list[list[list[int]]]:
        """The expert placement of every MoE layer: [layer][device] -> expert ids in slot order."""
        return [[list(ids) for ids in m.placement] for m in self.moe_layers()]

    def aux_loss(self) -> torch.Tensor | None:
        """The balancing losses of the last training forward, summed over MoE layers (None when off)."""
        parts = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(parts).sum() if parts else None

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of routed experts: sharded across devices, never all-reduced."""
        for name, p in self.named_parameters():
            if ".experts." in name:
                yield name, p

    def dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Everything else: replicated on every device, gradients all-reduced."""
        for name, p in self.named_parameters():
            if ".experts." not in name:
                yield name, p


def _generator(seed: int, *key: object) -> torch.Generator:
    digest = hashlib.blake2b("/".join(map(str, (seed, *key))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def init_stds(cfg: ModelConfig) -> dict[str, float]:
    """The std of each kind of matrix under `model.init` (`matrix`, `output`: attention wo, FFN and expert w2,
    `embedding`):

      gpt2  Normal(0, init_std); output projections init_std / sqrt(2 L) (GPT-2, Radford et al. 2019 §2.3);
            the embedding init_std.
      tiny  TinyInit (Pangu Ultra, arXiv 2504.07866 §2.3): every matrix Normal(0, sqrt(1 / (2 d L))), scaled by
            both width d (model.dim) and depth L (model.n_layers); the embedding std tiny_init_embed_std (0.5 in
            the paper; the constants were read from a summary of the paper, so they are config values). With
            tied embeddings (model.tie_embeddings) the head is that embedding.
    """
    if cfg.init == "tiny":
        std = math.sqrt(1.0 / (2 * cfg.dim * cfg.n_layers))
        return {"matrix": std, "output": std, "embedding": cfg.tiny_init_embed_std}
    return {"matrix": cfg.init_std, "output": cfg.init_std / math.sqrt(2 * cfg.n_layers), "embedding": cfg.init_std}


@torch.no_grad()
def init_weights(model: MoETransformer, seed: int) -> None:
    """Deterministic init keyed by (seed, parameter name[, expert id]).

    Matrices Normal(0, std) with the stds of `init_stds` (model.init); norms start at 1, except the sandwich
    norm's output norms (Block), which start at c / sqrt(n_layers).
    """
    cfg = model.cfg
    stds = init_stds(cfg)
    out_scale = {"attn_out_norm.weight": cfg.sandwich_attn_scale / math.sqrt(cfg.n_layers),
                 "ffn_out_norm.weight": cfg.sandwich_ffn_scale / math.sqrt(cfg.n_layers)}
    experts_of = {id(p): m for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(next((v for k, v in out_scale.items() if name.endswith(k)), 1.0))
            continue
        if name == "tok_emb.weight":
            std = stds["embedding"]
        else:
            std = stds["output"] if name.endswith(("wo.weight", "w2.weight", "w2_EDF")) else stds["matrix"]
        owner = experts_of.get(id(p))
        if owner is None:
            p.copy_(torch.randn(p.shape, generator=_generator(seed, name)) * std)
        else:
            for j, gid in enumerate(owner.expert_ids):
                p[j].copy_(torch.randn(p[j].shape, generator=_generator(seed, name, gid)) * std)


def build_model(cfg: ModelConfig, seed: int, expert_ids: Sequence[int] | None = None,
                balance: BalanceConfig | None = None) -> MoETransformer:
    model = MoETransformer(cfg, expert_ids, balance)
    init_weights(model, seed)
    return model


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated (per token) parameter counts of the full model (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for _, p in model.expert_parameters())
    per_expert = expert // max(1, cfg.num_experts)
    activated = total - expert + per_expert * cfg.top_k
    return {"total": total, "experts": expert, "activated": activated}
