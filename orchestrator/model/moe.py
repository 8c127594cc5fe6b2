"""Mixture-of-Experts feed-forward: top-k router, grouped SwiGLU experts, token dispatch.

Shape legend: N tokens (B*T flattened), D model dim, F expert hidden dim, E experts in the layer,
El expert slots held by this module (El == E in one process; E / devices under expert parallelism,
more with replicas), R replicas of an expert at most, K top-k, M routed token copies (N*K in one
process; whatever arrives under expert parallelism).

Experts are logical (the ids the router picks); the layer's placement says which device slot holds
each, so the router's choice is mapped to a slot before dispatch (`MoE.slots_of`); an expert held in
several slots (replicas) has its copies split between them.

The MoE block does not know about distribution. It asks its `dispatcher` to bring the routed token
copies to the experts it holds and to bring results back; `LocalTokenDispatcher` (here) does that
in one process, `orchestrator.parallel.AllToAllTokenDispatcher` does it across devices. Both
present tokens to the experts grouped by expert, so the expert math is the same code either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import BalanceConfig
from orchestrator.model.balancing import (drop_over_capacity, ep_group_aux_loss, router_z_loss, select_experts,
                                          sequence_aux_loss, switch_aux_loss)
from orchestrator.model.checkpointing import checkpointed
from orchestrator.model.layers import (SwiGLU, grouped_linear, grouped_mm_aligned, grouped_mm_supported, swiglu,
                                      upcast)


def router_scores(logits_NE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Each expert's affinity score s_{t,i} from the router logits, [N, E] -> [N, E]:

      softmax       exp(z_i) / sum_j exp(z_j)        (Switch, Mixtral, DeepSeek-V2)
      sigmoid       1 / (1 + exp(-z_i))              (DeepSeek-V3 §2.1.2)
      sqrtsoftplus  sqrt(log(1 + exp(z_i)))          (DeepSeek-V4 technical report §2.1: "we change the activation
                                                      function that computes the affinity scores from Sigmoid(·) into
                                                      Sqrt(Softplus(·))"; transformers' SqrtSoftplusActivation)
    torch's softplus (beta 1, linear above 20), as transformers computes it."""
    if score_func == "softmax":
        return logits_NE.softmax(-1)
    if score_func == "sigmoid":
        return logits_NE.sigmoid()
    if score_func == "sqrtsoftplus":
        return F.softplus(logits_NE).sqrt()
    raise ValueError(f"unknown score_func {score_func!r}")


class Router(nn.Module):
    """Scores every expert for every token and picks the top k.

    scores_NE = softmax(x W^T), sigmoid(x W^T) or sqrt(softplus(x W^T)) (`router_scores`). Selection uses scores + expert_bias (the bias is a
    buffer, zero unless a balancing strategy moves it; it never enters the gate values) and the
    routing mode of `balance` (plain, grouped or group-limited top-k). Gates are the selected
    scores, renormalised to sum to 1 when `norm_topk_prob`, times `route_scale`.

    `replay_NK` (routing replay): selection is skipped and these logical ids are taken as chosen; the gates are
    this router's live scores at them (so the router still learns), never masked (group limits and the bias only
    steer selection).

    `dtype` (parallel.router_dtype): "float32": the logits' matmul runs with autocast off on float32 (float64 stays)
    input and weight, so logits, scores and top-k are float32 under bf16/fp16 autocast (Megatron-Core's
    moe_router_dtype=fp32); "auto": the gate as any Linear (in the autocast dtype, upcast after).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str, norm_topk_prob: bool,
                 route_scale: float, balance: BalanceConfig | None = None):
        super().__init__()
        self.top_k, self.score_func = top_k, score_func
        self.balance = balance or BalanceConfig()
        self.norm_topk_prob, self.route_scale = norm_topk_prob, route_scale
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.dtype = "float32"   # parallel.router_dtype: float32 | auto

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """logits_NE = x W^T, in float32 at least (router_dtype float32: the matmul too, autocast off)."""
        if self.dtype == "auto":
            return upcast(self.gate(x_ND))
        with torch.autocast(x_ND.device.type, enabled=False):
            return F.linear(upcast(x_ND), upcast(self.gate.weight))

    def forward(self, x_ND: torch.Tensor, replay_NK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns gates_NK (float), experts_NK (int64), scores_NE, logits_NE."""
        logits_NE = self.logits(x_ND)
        scores_NE = router_scores(logits_NE, self.score_func)
        b = self.balance
        if replay_NK is not None:
            experts_NK = replay_NK.to(device=scores_NE.device, dtype=torch.long)
        else:
            experts_NK = select_experts(scores_NE.detach() + self.expert_bias, self.top_k, b.routing, b.num_groups,
                                        b.topk_groups)
        gates_NK = scores_NE.gather(-1, experts_NK)
        if self.norm_topk_prob and self.top_k > 1:
            gates_NK = gates_NK / (gates_NK.sum(-1, keepdim=True) + 1e-20)
        return gates_NK * self.route_scale, experts_NK, scores_NE, logits_NE


class GroupedExperts(nn.Module):
    """El SwiGLU experts stored as stacked weights; `expert_ids` are their global ids in the layer (one id twice
    or on several devices: replicas); `primary[j]`: slot j holds the copy that checkpoints save and the gradient
    norm counts (the first replica in device order).

    `grouped` (parallel.grouped_gemm): the El experts' matmuls as three grouped matmuls (torch's grouped_mm, one
    call for every expert's rows: `layers.grouped_linear`) where the device and the compute dtype support it
    (`layers.grouped_mm_supported`, probed once per device type and dtype); the loop over experts elsewhere (float64,
    or False). Both compute y_j = w2_j (silu(w1_j x) * w3_j x) for the rows of expert j."""

    def __init__(self, dim: int, hidden: int, expert_ids: Sequence[int], swiglu_limit: float = 0.0):
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.swiglu_limit = swiglu_limit   # DeepSeek-V4's clamp (see `swiglu`); 0: off
        self.primary = [True] * len(self.expert_ids)
        El = len(self.expert_ids)
        self.w1_EFD = nn.Parameter(torch.empty(El, hidden, dim))
        self.w3_EFD = nn.Parameter(torch.empty(El, hidden, dim))
        self.w2_EDF = nn.Parameter(torch.empty(El, dim, hidden))
        self.recompute = False  # selective activation checkpointing: the SwiGLU math recomputed in backward
        self.grouped = True     # parallel.grouped_gemm: grouped_mm where supported, else the loop

    def forward(self, x_MD: torch.Tensor, tokens_per_expert: list[int] | torch.Tensor) -> torch.Tensor:
        """x_MD holds token copies grouped by local expert, `tokens_per_expert[j]` rows for expert j: a list, or a
        counts tensor [El] (integer, any device), which the grouped path reads on the device (no host sync; the
        loop reads it on the host)."""
        if self.recompute:
            return checkpointed(self._forward, x_MD, tokens_per_expert)
        return self._forward(x_MD, tokens_per_expert)

    def compute_dtype(self, x_MD: torch.Tensor) -> torch.dtype:
        """The dtype the expert matmuls run in: autocast's when it is on for x's device, else the weights'."""
        t = x_MD.device.type
        return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else self.w1_EFD.dtype

    def uses_grouped_mm(self, x_MD: torch.Tensor) -> bool:
        """Whether this forward takes the grouped path (`grouped`, and grouped_mm supports the device type, the
        compute dtype and the widths)."""
        dtype, t = self.compute_dtype(x_MD), x_MD.device.type
        return (self.grouped and grouped_mm_supported(t, dtype)
                and grouped_mm_aligned(t, dtype, self.w1_EFD.shape[1], self.w1_EFD.shape[2]))

    def _forward(self, x_MD: torch.Tensor, tokens_per_expert: list[int] | torch.Tensor) -> torch.Tensor:
        if self.uses_grouped_mm(x_MD):
            return self._grouped(x_MD, tokens_per_expert)
        if isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = tokens_per_expert.tolist()   # the loop splits on the host: one sync
        return self._loop(x_MD, tokens_per_expert)

    def _grouped(self, x_MD: torch.Tensor, tokens_per_expert: list[int] | torch.Tensor) -> torch.Tensor:
        """Three grouped matmuls; offs = cumsum(counts) (int32) built where x lives. grouped_mm does not follow
        autocast, so x and the weights are cast to the compute dtype here (what autocast does for `@`)."""
        counts_E = (tokens_per_expert.to(x_MD.device) if isinstance(tokens_per_expert, torch.Tensor)
                    else torch.tensor(tokens_per_expert, device=x_MD.device))
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        dtype = self.compute_dtype(x_MD)
        x = x_MD.to(dtype)
        w1, w3, w2 = self.w1_EFD.to(dtype), self.w3_EFD.to(dtype), self.w2_EDF.to(dtype)
        h_MF = swiglu(grouped_linear(x, w1, offs_E), grouped_linear(x, w3, offs_E), self.swiglu_limit)
        return grouped_linear(h_MF, w2, offs_E)

    def _loop(self, x_MD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        outs = []
        for j, x in enumerate(torch.split(x_MD, tokens_per_expert)):
            h = swiglu(x @ self.w1_EFD[j].t(), x @ self.w3_EFD[j].t(), self.swiglu_limit)
            outs.append(h @ self.w2_EDF[j].t())
        return torch.cat(outs) if outs else x_MD.new_zeros(0, x_MD.shape[-1])


@dataclass
class DispatchMeta:
    """What combine needs to undo dispatch. Stateless dispatchers return it; nothing else keeps it."""
    token_idx_M: torch.Tensor        # source token of each sorted copy
    order_M: torch.Tensor            # position of each sorted copy in the flat (token, k) list
    extra: object = None             # dispatcher-specific (the all-to-all keeps its splits here)


class TokenDispatcher(Protocol):
    def routed(self, x_ND: torch.Tensor, slots_NK: torch.Tensor, gates_NK: torch.Tensor, num_slots: int,
               experts_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
               shared_fn: Callable[[], torch.Tensor] | None = None) -> "Routed": ...

    def dispatch(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, list[int], torch.Tensor, DispatchMeta]: ...

    def combine(self, y_MD: torch.Tensor, gates_NK: torch.Tensor, meta: DispatchMeta, num_tokens: int
                ) -> torch.Tensor: ...

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor: ...

    def group_counts(self, counts_E: torch.Tensor) -> torch.Tensor: ...


def permute_by_expert(x_ND: torch.Tensor, experts_NK: torch.Tensor, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of each token, one per chosen expert, sorted by expert (stable, so ties keep token order);
    copies whose expert is `num_experts` (dropped by capacity) are left out.

    Returns x_sorted_MD, tokens_per_expert_E (global counts of this batch), token_idx_M, order_M.
    """
    flat_M = experts_NK.reshape(-1)
    order_M = torch.argsort(flat_M, stable=True)
    tokens_per_expert_E = torch.bincount(flat_M, minlength=num_experts + 1)[:num_experts]
    order_M = order_M[: int(tokens_per_expert_E.sum())]  # copies marked `num_experts` (dropped) sort last: cut
    token_idx_M = order_M // experts_NK.shape[-1]
    return x_ND[token_idx_M], tokens_per_expert_E, token_idx_M, order_M


def unpermute_and_combine(y_MD: torch.Tensor, gates_NK: torch.Tensor, meta: DispatchMeta, num_tokens: int
                          ) -> torch.Tensor:
    """out_ND[t] = sum over t's copies of gate * expert output."""
    weights_M = gates_NK.reshape(-1)[meta.order_M].unsqueeze(-1)
    out_ND = y_MD.new_zeros(num_tokens, y_MD.shape[-1])
    return out_ND.index_add(0, meta.token_idx_M, (upcast(y_MD) * weights_M).type_as(y_MD))


def count_ids(ids: torch.Tensor, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """How many of `ids` (int64, values 0..n-1, any shape) are each id: int64 [n]. With `weight` (same shape; bool or
    int), each id counts that much. torch.bincount without its host sync (on a GPU bincount reads the ids' maximum
    back to size its output)."""
    flat = ids.reshape(-1)
    w = torch.ones_like(flat) if weight is None else weight.reshape(-1).to(flat.dtype)
    return torch.zeros(n, dtype=torch.long, device=flat.device).scatter_add_(0, flat, w)


def wire_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype token copies cross the wire in: under bf16/fp16 autocast the autocast dtype (the expert matmuls cast
    to it anyway, so their result is the same, at half the bytes of float32); otherwise x's own dtype."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        low = torch.get_autocast_dtype(x.device.type)
        if low in (torch.bfloat16, torch.float16) and x.dtype in (torch.float32, torch.float64):
            return low
    return x.dtype


def combine_copies(y_MD: torch.Tensor, weights_M: torch.Tensor, token_idx_M: torch.Tensor, num_tokens: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """out_ND[t] = sum over t's copies of weight * expert output, summed in float32 (float64 stays) whatever dtype
    the expert outputs came back in, then cast to `out_dtype` (the layer input's). Copies are added in the order
    given (for one token: its copies' slot order, as `unpermute_and_combine`)."""
    acc_MD = upcast(y_MD) * upcast(weights_M).unsqueeze(-1)
    out_ND = acc_MD.new_zeros(num_tokens, y_MD.shape[-1])
    return out_ND.index_add(0, token_idx_M, acc_MD).to(out_dtype)


@dataclass
class Routed:
    """What `dispatcher.routed` returns: the routed experts' combined output and the shared expert's."""
    out_ND: torch.Tensor                 # sum over each token's copies of gate * expert output (the input's dtype)
    shared_ND: torch.Tensor | None       # shared_fn() (None: no shared_fn)
    received: int                        # token copies this device's experts processed
    sent: int                            # token copies this device sent (capacity-dropped ones left out)


class LocalTokenDispatcher:
    """All experts live in this process: dispatch is a sort by expert, combine its inverse."""

    def routed(self, x_ND: torch.Tensor, slots_NK: torch.Tensor, gates_NK: torch.Tensor, num_slots: int,
               experts_fn, shared_fn=None) -> Routed:
        """The whole routed path of an MoE layer, serially: copies sorted by slot, `experts_fn(x_MD,
        tokens_per_slot: list[int]) -> y_MD` on them, combined with the gates; `shared_fn()` (the shared expert on
        every token) run too. Copies whose slot is `num_slots` are dropped (capacity). One host sync (the counts)."""
        flat_M = slots_NK.reshape(-1)
        counts = count_ids(flat_M, num_slots + 1).tolist()
        kept = sum(counts[:num_slots])
        order_M = torch.argsort(flat_M, stable=True)[:kept]
        token_idx_M = order_M // slots_NK.shape[-1]
        shared_ND = shared_fn() if shared_fn is not None else None
        y_MD = experts_fn(x_ND[token_idx_M], counts[:num_slots])
        out_ND = combine_copies(y_MD, gates_NK.reshape(-1)[order_M], token_idx_M, x_ND.shape[0], x_ND.dtype)
        return Routed(out_ND, shared_ND, kept, kept)

    def dispatch(self, x_ND, experts_NK, num_experts):
        x_MD, counts_E, token_idx_M, order_M = permute_by_expert(x_ND, experts_NK, num_experts)
        return x_MD, counts_E.tolist(), counts_E, DispatchMeta(token_idx_M, order_M)

    def combine(self, y_MD, gates_NK, meta, num_tokens):
        return unpermute_and_combine(y_MD, gates_NK, meta, num_tokens)

    def global_counts(self, counts_E):
        return counts_E

    def group_counts(self, counts_E):
        """Counts summed over this device's expert-parallel group: here the group is this process."""
        return counts_E


class ExpertSlots:
    """The placement of one MoE layer's experts over the expert-parallel devices, and the map from the router's
    choice (an expert id) to a physical slot (device * slots per device + local index). Shared by the native
    `MoE` and the expert-parallel experts of a Hugging Face model (model/hf.py): a subclass has `experts` (the
    module holding this device's slots, with `expert_ids` and `primary`) and calls `_init_slots(E)`.

    Expert placement (set_placement): slot_ER[e, r] is the physical slot of replica r of expert e, copies_E[e]
    its number of replicas; row E (copies dropped by capacity) maps to num_slots, which dispatch leaves out. One
    replica per expert, in id order, until set otherwise."""

    experts: nn.Module

    def _init_slots(self, num_experts: int) -> None:
        self.experts_total = E = num_experts   # the layer's experts (the router's ids); `num_experts` may be local
        self.num_slots, self.rank = E, 0
        self.copies: list[int] = [1] * E   # replicas of each expert (copies_E on the host)
        self.register_buffer("slot_ER", torch.arange(E + 1).unsqueeze(1), persistent=False)
        self.register_buffer("copies_E", torch.ones(E + 1, dtype=torch.long), persistent=False)
        self.placement: list[list[int]] = [list(range(E))]
        self.primary_mask = torch.ones(len(self.experts.expert_ids), dtype=torch.bool)
        # Token copies this device's router sent to each expert in the last forward (before any capacity drop;
        # summed over devices for the load statistics), how many copies capacity dropped, how many this device's
        # experts processed.
        self.last_tokens_per_expert: torch.Tensor = torch.zeros(E, dtype=torch.long)
        self.last_dropped: int = 0
        self.last_received: int = 0

    def slots_of(self, experts_NK: torch.Tensor) -> torch.Tensor:
        """The slot each routed copy goes to. An expert with r replicas: this device's i-th copy for it (in token
        order) goes to replica (i + rank) mod r, so each replica gets 1/r of the copies give or take one per device."""
        flat_M = experts_NK.reshape(-1)
        if max(self.copies) == 1:
            return self.slot_ER[flat_M, 0].view_as(experts_NK)
        copies_M = self.copies_E[flat_M]
        order_M = torch.argsort(flat_M, stable=True)
        counts_E = torch.bincount(flat_M, minlength=self.experts_total + 1)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        ordinal_M = torch.empty_like(flat_M)
        ordinal_M[order_M] = torch.arange(flat_M.numel(), device=flat_M.device) - starts_E[flat_M[order_M]]
        return self.slot_ER[flat_M, (ordinal_M + self.rank) % copies_M].view_as(experts_NK)

    def set_placement(self, slots: Sequence[Sequence[int]], rank: int) -> None:
        """Adopt a placement of this layer: slots[d] = the expert ids device d holds, in slot order (an expert may
        sit on several devices: replicas). This module then holds slots[rank] (its weights must be loaded by the
        caller: see DeviceShard.set_placement)."""
        per, E = len(slots[rank]), self.experts_total
        if per != len(self.experts.expert_ids) or any(len(ids) != per for ids in slots):
            raise ValueError(f"placement {slots} does not give every device {len(self.experts.expert_ids)} expert "
                             f"slots (the number this model was built with)")
        replicas: list[list[int]] = [[] for _ in range(E)]
        for d, ids in enumerate(slots):
            for j, e in enumerate(ids):
                replicas[e].append(d * per + j)
        if any(not r for r in replicas):
            raise ValueError(f"placement {slots} leaves expert {[e for e in range(E) if not replicas[e]][0]} out")
        self.num_slots, self.rank = len(slots) * per, rank
        width = max(len(r) for r in replicas)
        table = [r + r[:1] * (width - len(r)) for r in replicas] + [[self.num_slots] * width]
        self.slot_ER = torch.tensor(table, device=self.slot_ER.device)
        self.copies = [len(r) for r in replicas]
        self.copies_E = torch.tensor(self.copies + [1], device=self.copies_E.device)
        self.placement = [list(ids) for ids in slots]
        self.experts.expert_ids = list(slots[rank])
        seen: set[int] = set()
        primary = []
        for d, ids in enumerate(slots):
            for e in ids:
                if d == rank:
                    primary.append(e not in seen)
                seen.add(e)
        self.experts.primary = primary
        self.primary_mask = torch.tensor(primary, device=self.slot_ER.device)


class MoE(ExpertSlots, nn.Module):
    """Routed experts plus an optional shared expert that sees every token.

    With balancing losses on, `aux_loss` holds this layer's share of them after each forward (see
    balancing.py); `global_tokens` is the global batch's token count (None: this batch is the global one).

    For RL post-training (the caller sets these before a forward; None: off, and the forward is as without them):
      last_experts_NK  after every forward: the router's chosen logical expert ids (int64, detached; before
                       capacity drops and the slot/replica mapping), N = B*T of that forward.
      replay_NK        Rollout Routing Replay (R3): logical ids [N, K] (int64) used instead of the router's choice;
                       gates from the live router's scores at them (see Router). Balancing losses, the loads
                       (`last_tokens_per_expert`) and capacity drops follow the replayed ids. Read by every run
                       of the forward, so under full activation checkpointing also by the backward's
                       recomputation: set it before the forward and clear it only after the backward.
      valid_N          bool [N]: only these tokens count in `last_tokens_per_expert` and the balancing losses
                       (RL trains completion tokens only); `global_tokens` is then the global count of valid tokens
                       (None: this batch's). Dispatch, capacity and the output are unchanged: every token is
                       still routed.
    A recomputation (checkpointing) sets `last_experts_NK` again to the same ids (same input and weights, or the
    same replay); the counted statistics are put back by model/checkpointing.py, so nothing counts twice.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, expert_dim: int, num_shared_experts: int,
                 score_func: str, norm_topk_prob: bool, route_scale: float, expert_ids: Sequence[int],
                 balance: BalanceConfig | None = None, swiglu_limit: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.balance = balance or BalanceConfig()
        self.global_tokens: int | None = None
        self.global_sequences: int | None = None   # with valid_N: the global batch's sequences (None: tokens // T)
        self.ep_groups = self.local_ep_groups = 1   # aux_loss_scope=ep_group: groups of the global batch, held here
        self.aux_loss: torch.Tensor | None = None
        self.last_experts_NK: torch.Tensor = torch.zeros(0, top_k, dtype=torch.long)
        self.replay_NK: torch.Tensor | None = None
        self.valid_N: torch.Tensor | None = None
        self.router = Router(dim, num_experts, top_k, score_func, norm_topk_prob, route_scale, self.balance)
        self.experts = GroupedExperts(dim, expert_dim, expert_ids, swiglu_limit)
        self.shared = (SwiGLU(dim, expert_dim * num_shared_experts, swiglu_limit) if num_shared_experts > 0
                       else None)
        self.dispatcher: TokenDispatcher = LocalTokenDispatcher()
        self._init_slots(num_experts)
        self.recompute = False  # selective activation checkpointing: the shared expert recomputed in backward

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        replay_NK, valid_N = self.replay_NK, self.valid_N
        if replay_NK is not None and tuple(replay_NK.shape) != (x_ND.shape[0], self.top_k):
            raise ValueError(f"routing replay of shape {tuple(replay_NK.shape)} for {x_ND.shape[0]} tokens and "
                             f"top_k {self.top_k}")
        if valid_N is not None and tuple(valid_N.shape) != (x_ND.shape[0],):
            raise ValueError(f"valid_N of shape {tuple(valid_N.shape)} for {x_ND.shape[0]} tokens")
        gates_NK, experts_NK, scores_NE, logits_NE = (self.router(x_ND) if replay_NK is None
                                                      else self.router(x_ND, replay_NK))
        self.last_experts_NK = experts_NK.detach()
        if valid_N is not None:
            valid_N = valid_N.to(experts_NK.device)
        # counted without a host sync (count_ids, not bincount); copies of tokens outside valid_N weigh 0
        routed_E = count_ids(experts_NK, self.num_experts,
                             None if valid_N is None else valid_N.unsqueeze(1).expand_as(experts_NK))
        self.last_tokens_per_expert = routed_E
        send_NK = experts_NK
        if self.balance.capacity_factor:
            capacity = math.ceil(self.balance.capacity_factor * T * self.top_k / self.num_experts)
            send_NK = drop_over_capacity(experts_NK, T, self.num_experts, capacity)
        slots_NK = self.slots_of(send_NK)  # expert ids -> physical slots (sorted by slot = grouped by device)
        if self.training:
            self.aux_loss = (self._balance_losses(scores_NE, logits_NE, experts_NK, routed_E, B, T) if valid_N is None
                             else self._valid_balance_losses(scores_NE, logits_NE, experts_NK, routed_E, valid_N, B, T))
        shared_fn = None
        if self.shared is not None:
            shared_fn = (lambda: checkpointed(self.shared, x_ND)) if self.recompute else (lambda: self.shared(x_ND))
        # the dispatcher runs the routed path (all_to_all, experts, combine) and the shared expert, overlapped
        # where it can (orchestrator/parallel/dispatch.py)
        r = self.dispatcher.routed(x_ND, slots_NK, gates_NK, self.num_slots, self.experts, shared_fn)
        self.last_received = r.received
        if self.balance.capacity_factor:
            self.last_dropped = experts_NK.numel() - r.sent
        out_ND = r.out_ND if r.shared_ND is None else r.out_ND + r.shared_ND
        return out_ND.view(B, T, D)

    def _balance_losses(self, scores_NE, logits_NE, experts_NK, counts_E, B: int, T: int) -> torch.Tensor | None:
        return balance_losses(self.balance, self.dispatcher, scores_NE, logits_NE, experts_NK, B, T,
                              global_tokens=self.global_tokens, ep_groups=self.ep_groups,
                              local_ep_groups=self.local_ep_groups)

    def _valid_balance_losses(self, scores_NE, logits_NE, experts_NK, counts_E, valid_N, B: int, T: int
                              ) -> torch.Tensor | None:
        return balance_losses(self.balance, self.dispatcher, scores_NE, logits_NE, experts_NK, B, T, valid_N,
                              self.global_tokens, self.global_sequences, self.ep_groups, self.local_ep_groups)


def balance_losses(b: BalanceConfig, dispatcher: TokenDispatcher, scores_NE: torch.Tensor, logits_NE: torch.Tensor,
                   experts_NK: torch.Tensor, B: int, T: int, valid_N: torch.Tensor | None = None,
                   global_tokens: int | None = None, global_sequences: int | None = None, ep_groups: int = 1,
                   local_ep_groups: int = 1) -> torch.Tensor | None:
    """This device's share of one MoE layer's balancing losses (balancing.py), times their coefficients; None when
    all are off. scores_NE / logits_NE: the router's scores and logits of the N = B*T tokens (sequence-major),
    experts_NK its choice. valid_N (bool): only these tokens count (sums, loads, each sequence's f and P), and
    `global_tokens` counts valid tokens (None: this batch's). global_sequences: with valid_N, the global batch's
    sequences (None: this batch's sequences with a valid token when global_tokens is None too, else
    global_tokens // T).

    balance.aux_loss_scope: global: counts summed over every device (dispatcher.global_counts); ep_group: counts
    summed over this device's expert-parallel group (dispatcher.group_counts), the loss averaged over the
    `ep_groups` groups of the global batch; a process holding `local_ep_groups` of them (the single-process
    reference stands for all dp groups) splits its rows into that many equal blocks in order, as the devices' rows
    are laid out (rank r = dp_index * ep + ep_index takes the r-th slice of the batch, so group g the g-th block);
    sequence: per sequence (sequence_aux_loss without the per-token normalisation)."""
    if not (b.aux_loss_coeff or b.seq_aux_loss_coeff or b.z_loss_coeff):
        return None
    K, E = experts_NK.shape[-1], scores_NE.shape[-1]
    if valid_N is None:
        n_global = global_tokens or B * T
        sequences = n_global // T
    else:
        valid_N = valid_N.to(experts_NK.device)
        n_global = max(1, global_tokens or int(valid_N.sum()))
        sequences = global_sequences or (max(1, int(valid_N.view(B, T).any(1).sum())) if global_tokens is None
                                         else max(1, n_global // T))
    valid_BT = None if valid_N is None else valid_N.view(B, T)
    loss = scores_NE.new_zeros(())
    if b.aux_loss_coeff and b.aux_loss_scope == "sequence":
        loss = loss + b.aux_loss_coeff * sequence_aux_loss(scores_NE.view(B, T, -1), experts_NK.view(B, T, -1),
                                                           sequences, valid_BT, normalise=False)
    elif b.aux_loss_coeff and b.aux_loss_scope == "ep_group":
        blocks = zip(scores_NE.chunk(local_ep_groups), experts_NK.chunk(local_ep_groups),
                     valid_N.chunk(local_ep_groups) if valid_N is not None else [None] * local_ep_groups)
        for scores_ME, experts_MK, valid_M in blocks:
            if valid_M is not None:
                scores_ME, experts_MK = scores_ME[valid_M], experts_MK[valid_M]
            counts_E = torch.bincount(experts_MK.reshape(-1), minlength=E)
            if local_ep_groups == 1:
                counts_E = dispatcher.group_counts(counts_E)
            loss = loss + b.aux_loss_coeff * ep_group_aux_loss(scores_ME, counts_E, K, ep_groups)
    elif b.aux_loss_coeff:
        counted_NK, scores_VE = (experts_NK, scores_NE) if valid_N is None else (experts_NK[valid_N], scores_NE[valid_N])
        counts = dispatcher.global_counts(torch.bincount(counted_NK.reshape(-1), minlength=E))
        loss = loss + b.aux_loss_coeff * switch_aux_loss(scores_VE, counts, n_global, K)
    if b.seq_aux_loss_coeff:
        loss = loss + b.seq_aux_loss_coeff * sequence_aux_loss(
            scores_NE.view(B, T, -1), experts_NK.view(B, T, -1), sequences, valid_BT)
    if b.z_loss_coeff:
        logits_VE = logits_NE if valid_N is None else logits_NE[valid_N]
        loss = loss + b.z_loss_coeff * router_z_loss(logits_VE, n_global)
    return loss
