"""The memory plan: what every device will hold, computed from the config alone, before anything starts.

`plan_memory(cfg)` gives, per device, bytes of parameters, gradients, optimizer states, the activation peak of
one micro-batch, and communication buffers, plus which slice of which tensor the device holds. `check_fits`
refuses a config whose plan exceeds `cluster.device_memory_gb` and names the knob that would make it fit;
`plan_table` lays every ZeRO stage x checkpointing mode side by side; `render` draws it.

Units: bytes. Shapes come from the model built on the meta device (no memory). The sharding mirrors
orchestrator/parallel/sharding.py (device rank r = dp_index * ep + ep_index; the experts of ep index e are
slots [e*El, (e+1)*El), held alike by the dp replicas):

  stage 0  every device: dense parameters, gradients, AdamW exp_avg + exp_avg_sq, and its El experts' same.
  stage 1  ZeRO-1 (torch ZeroRedundancyOptimizer): AdamW states of whole parameters, partitioned by torch's
           greedy rule (`_partition_parameters`: per param group, largest first, each to the rank with the
           smallest total so far, totals carried across groups): dense over all W devices, experts over the
           dp devices of their ep index (dp == 1: experts keep a plain AdamW).
  stage 2  FSDP2 fully_shard(reshard_after_forward=False): dense parameters on dim 0 over W, experts on dim 1
  stage 3  over dp (dp == 1: experts are left out of FSDP, whole); reshard_after_forward=True.
           A shard is torch.chunk's: ceil(n0 / W) rows, fewer or none on the last ranks. FSDP2 allocates
           every parameter shard and the reduce-scatter output padded to ceil(n0 / W) rows; AdamW's moments
           (zeros_like of the DTensor) hold the unpadded rows.

Model states follow DeepSpeed's ZeRO accounting (Rajbhandari et al., arXiv 1910.02054, section 3; DeepSpeed
`estimate_zero2_model_states_mem_needs`: params + grads + 2 moments, divided by the degree a stage shards
over), with AdamW's `step` scalar (4 bytes) per parameter tensor it updates. Activations are derived op by op
from what this model's forward saves for backward (`activation_bytes`; the layout of Megatron-Core's
`theoretical_memory_usage.py`, where sbh terms add up per op, with our ops) and validated against
`memory.ActivationMeter` in tests/test_planner.py.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from orchestrator.config import Config, ConfigError, effective_zero_stage, expert_slots, is_frozen, mesh_shape, validate

CATEGORIES = ("params", "grads", "optimizer", "activations_peak", "comm_buffers")
MODES = ("none", "selective", "full")
GiB = 1 << 30
STEP_BYTES = 4  # AdamW's `step`: a float32 scalar per parameter (torch.optim._get_scalar_dtype)


class MemoryPlanError(ConfigError):
    """The plan does not fit the device memory budget; the message gives the numbers and the knob to turn."""


@dataclass
class DevicePlan:
    rank: int
    dp_index: int
    ep_index: int
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations_peak: int = 0
    comm_buffers: int = 0
    holdings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every category at once: an upper bound (gradients grow while activations are freed)."""
        return self.params + self.grads + self.optimizer + self.activations_peak + self.comm_buffers


@dataclass
class MemoryPlan:
    zero_stage: int
    activation_checkpointing: str
    micro_batches: int
    ep: int
    dp: int
    dtype_bytes: int
    micro_batch_sequences: int
    seq_len: int
    devices: list[DevicePlan]
    budget_bytes: int = 0

    def peak(self) -> DevicePlan:
        return max(self.devices, key=lambda d: d.total)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "devices"}
        out["devices"] = [{**asdict(d), "total": d.total} for d in self.devices]
        out["max_total"] = self.peak().total
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# --------------------------------------------------------------------------- shapes
def _shapes(cfg: Config) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, tuple[int, ...]]]]:
    """(dense, expert) parameters of one device's model, (name, shape), in named_parameters order; experts
    [El, F, D] / [El, D, F]."""
    if cfg.model.hf_path or cfg.model.hf_config:
        from orchestrator.model.hf import hf_shapes

        return hf_shapes(cfg.model, expert_slots(cfg))
    return _shapes_of(tuple(sorted(asdict(cfg.model).items())), expert_slots(cfg))


@functools.lru_cache(maxsize=64)
def _shapes_of(model_items: tuple, slots: int) -> tuple[list, list]:
    import torch

    from orchestrator.config import ModelConfig
    from orchestrator.model.transformer import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(ModelConfig(**dict(model_items)), list(range(slots)))
    return ([(n, tuple(p.shape)) for n, p in model.dense_parameters()],
            [(n, tuple(p.shape)) for n, p in model.expert_parameters()])


def frozen_names(cfg: Config) -> set[str]:
    """The parameters train.freeze names (their `named_parameters` names; experts: the stacked tensor). ConfigError
    for a pattern that names none (with the names it could have meant) or when nothing would be left to train."""
    if not cfg.train.freeze:
        return set()
    dense, experts = _shapes(cfg)
    names = [n for n, _ in dense + experts]
    out: set[str] = set()
    for i, pattern in enumerate(cfg.train.freeze):
        hit = {n for n in names if is_frozen(n, [pattern])}
        if not hit:
            import re

            shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))   # layers.3.x -> layers.*.x
            raise ConfigError(f"train.freeze[{i}]={pattern!r} names no parameter of this model, whose parameters are "
                              f"{', '.join(shapes)}: fix the pattern, or remove it")
        out |= hit
    if out == set(names):
        raise ConfigError(f"train.freeze={cfg.train.freeze} freezes every parameter: nothing would train; freeze "
                          f"fewer")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def zero1_partition(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """The rank of each parameter under ZeroRedundancyOptimizer's greedy partition (torch
    `ZeroRedundancyOptimizer._partition_parameters`): param groups [ndim >= 2, ndim < 2] in order; in each,
    parameters sorted by numel descending (stable), each to the first rank with the smallest total so far."""
    owner = [0] * len(shapes)
    sizes = [0] * world
    for group in ([i for i, s in enumerate(shapes) if len(s) >= 2], [i for i, s in enumerate(shapes) if len(s) < 2]):
        for i in sorted(group, key=lambda i: _numel(shapes[i]), reverse=True):
            rank = sizes.index(min(sizes))
            owner[i] = rank
            sizes[rank] += _numel(shapes[i])
    return owner


def _rows(n: int, world: int, index: int) -> tuple[int, int, int]:
    """torch.chunk's shard `index` of n rows over `world`: (start, stop, padded rows per shard)."""
    chunk = -(-n // world)
    start = min(n, index * chunk)
    return start, min(n, start + chunk), chunk


def _sharded(shape: tuple[int, ...], dim: int, world: int, index: int) -> tuple[int, int]:
    """(padded, unpadded) elements of a shard of `shape` on `dim` (FSDP2: padded storage, unpadded moments)."""
    start, stop, chunk = _rows(shape[dim], world, index)
    rest = _numel(shape) // shape[dim]
    return chunk * rest, (stop - start) * rest


# --------------------------------------------------------------------------- activations
# Long on purpose (64 lines, 22 of them the docstring): a table of what autograd saves per op, in forward order;
# the docstring's formulas and the code's share one set of symbols (N, R, D, a, f, ...), read side by side.
def activation_items(cfg: Config, sequences: int, mode: str, ep: int) -> list[tuple[str, int, int]]:
    """What one micro-batch of `sequences` sequences keeps for backward, in forward order: (op group, bytes
    held from its forward to its backward, bytes its backward recomputes and holds meanwhile).

    Per op, from what autograd saves (N = sequences * T tokens; R = N*K routed copies an MoE layer's experts
    receive: exact in one process, the balanced-routing mean under expert parallelism; b bytes per value,
    8 per int64 index; under bf16 autocast a = 2 for matmul outputs, f = 4 for the float32 paths, else a = f = b):
      embedding: token ids N*8 | RMSNorm: input N*D*f, rsqrt N*f, normalised N*D*f
      a linear: its input (the norm's output N*D*b, once for all linears reading it; under autocast a bf16 copy
      per linear, rows*D*a, and a bf16 copy of its weight, out*in*a)
      attention: q/k/v linears; SDPA: q, k, v, output 4*N*D*a + logsumexp B*H*T*max(f, 4); wo's input N*D*a
      SwiGLU (dense, shared, each routed expert): w1, w3 linears; w1 out, silu out, w3 out, product 4*rows*hidden*a;
      routed experts with parallel.grouped_gemm (not float64): one grouped_mm copy of the input for w1 and w3 under
      autocast, R*D*a, and the int32 offsets El*4
      with model.swiglu_limit (experts and shared expert) the two clamped pre-activations too, 2*rows*hidden*a
      sandwich norm (model.norm=sandwich): each sub-layer's output norm, an RMSNorm of its output (a matmul's,
      so its normalised rows N*D*a; attention's inside the selective region)
      router: gate linear (parallel.router_dtype=float32 under autocast: its float32 input N*D*f, no bf16 copies),
      scores N*E*f (sqrt-softplus: softplus's input too, N*E*f), expert ids N*K*8, top-k renormalisation N*K*f + N*f; balancing
      losses: sequence-wise N*f + B*E*f, Switch E*f, z-loss N*E*f + N*f
      dispatch: copy indices R*8 (and regroup indices 2*R*8 under expert parallelism); the experts' input R*D*b
      (no autocast: autocast saves its copies instead); combine (summed in float32, the layer's output float32 under
      autocast too): expert outputs R*D*f, gate indices R*8,
      gates R*f, weighted outputs R*D*f (index_add's source, float32)
      head: final norm, its output linear; loss: log_softmax N*V*f, targets N*8, total weight f
      MTP depth k (model.mtp_depth, model/mtp.py): enorm and hnorm, their concatenation 2*N*D*f, eh_proj; a
      block as above; its final norm, the shared head and a loss (counted at T positions, an upper bound of T-k)
    Multi-head latent attention (model.attention=mla): mla_attention_bytes. RoPE's tables are buffers (state,
    not counted). Checkpointing (model/checkpointing.py): a region holds its
    input (what torch.utils.checkpoint saves) and recomputes the rest in backward."""
    m, bal = cfg.model, cfg.balance
    ac = _autocast(cfg)
    b = 8 if cfg.train.dtype == "float64" else 4
    a, f = (2, 4) if ac else (b, b)
    B, T, D, H, K, E, V = sequences, cfg.data.seq_len, m.dim, m.n_heads, m.top_k, m.num_experts, m.vocab_size
    N = B * T
    R = N * K if not bal.capacity_factor else min(N * K, B * E * math.ceil(bal.capacity_factor * T * K / E))
    El = expert_slots(cfg) if ep > 1 else E

    def linears(rows: int, weights: int, n: int, shared_input: bool) -> int:
        """n linears on one input of `rows` rows holding `weights` weight values in all."""
        return n * rows * D * a + weights * a if ac else (0 if shared_input else rows * D * b)

    def swiglu(rows: int, hidden: int, experts: int = 1, shared_input: bool = True, limit: float = 0.0) -> int:
        return linears(rows, 3 * experts * hidden * D, 2, shared_input) + (4 + 2 * bool(limit)) * rows * hidden * a

    sel, norm_inner = mode == "selective", N * f + N * D * f
    # RMSNorm of a sub-layer's output (in the matmul dtype): its float copy N*D*f, rsqrt N*f, normalised N*D*a
    out_norm = N * D * f + N * f + N * D * a if m.norm == "sandwich" else 0
    attn_inner = norm_inner + linears(N, 3 * D * D, 3, False) + 4 * N * D * a + B * H * T * max(f, 4) + \
        linears(N, D * D, 0, True) + N * D * a
    if m.attention == "mla":
        attn_inner = norm_inner + mla_attention_bytes(m, B, T, a, f, ac)
    attn_inner += out_norm
    items: list[tuple[str, int, int]] = [("embedding", N * 8, 0)]
    mtp_dense = m.first_k_dense >= m.n_layers   # the MTP blocks (model/mtp.py) are MoE unless the model has none
    for layer in range(m.n_layers + m.mtp_depth):   # (an MTP block counted at T positions: at most T-k)
        block = [("attention", N * D * f, attn_inner) if sel else ("attention", N * D * f + attn_inner, 0),
                 ("ffn_norm", N * D * f + norm_inner, 0)]
        if layer < m.first_k_dense or (layer >= m.n_layers and mtp_dense):
            block.append(("dense mlp", N * D * f, swiglu(N, m.dense_dim)) if sel else
                         ("dense mlp", swiglu(N, m.dense_dim, shared_input=False), 0))
        else:
            # parallel.router_dtype=float32: the gate's matmul on the float32 input (autocast off), no bf16 copies
            gate = N * D * f if cfg.parallel.router_dtype == "float32" and ac else linears(N, E * D, 1, False)
            router = gate + N * E * f * (2 if m.score_func == "sqrtsoftplus" else 1) + N * K * 8
            router += (N * K * f + N * f) if m.norm_topk_prob and K > 1 else 0
            router += (N * f + B * E * f if bal.seq_aux_loss_coeff else 0) + (E * f if bal.aux_loss_coeff else 0)
            router += N * E * f + N * f if bal.z_loss_coeff else 0
            experts = swiglu(R, m.expert_dim, El, limit=m.swiglu_limit)
            grouped = (cfg.parallel.grouped_gemm and b != 8   # grouped_mm: no float64 kernel, rows of 16-byte strides
                       and D * a % 16 == 0 and m.expert_dim * a % 16 == 0)   # (model/layers.py grouped_mm_aligned)
            if grouped:   # grouped_mm (else the loop): offsets El*4;
                experts += El * 4 - R * D * a * ac     # under autocast one bf16 copy of the input for w1 and w3
            shared = swiglu(N, m.expert_dim * m.num_shared_experts, limit=m.swiglu_limit) if m.num_shared_experts else 0
            # gate * output in float32 (R*D*f, saved for the gates' gradient), summed in float32 (index_add keeps
            # its float32 source, R*D*f: moe.combine_copies); the layer's output is the input's dtype
            combine = R * D * f + R * 8 + R * f + R * D * f
            block += [("router", router, 0), ("dispatch", R * 8 * (3 if ep > 1 else 1), 0),
                      ("experts", R * D * f, experts) if sel else ("experts", R * D * b * (not ac) + experts, 0),
                      ("combine", combine, 0),
                      ("shared expert", N * D * f * ac, shared) if sel else ("shared expert", shared, 0)]
        if out_norm:   # an MoE layer's output is float32 (its combine's), so its normalised rows are too
            moe_layer = not (layer < m.first_k_dense or (layer >= m.n_layers and mtp_dense))
            block.append(("ffn out norm", out_norm + N * D * (f - a) * moe_layer, 0))
        if mode == "full":
            total = sum(h + r for _, h, r in block)
            block = [("block", N * D * f, total - N * D * f)]
        if layer >= m.n_layers:   # MTP depth k: enorm, hnorm, their concatenation and eh_proj before the block,
            k = layer - m.n_layers + 1   # its own final norm, the shared head and a cross-entropy after it
            items += [(f"mtp {k} input", 2 * (N * D * f + norm_inner) + 2 * N * D * f + linears(N, 2 * D * D, 1,
                                                                                                False), 0)]
            items += [(f"mtp {k} {name}", h, r) for name, h, r in block]
            items += [(f"mtp {k} head", N * D * f + norm_inner + linears(N, V * D, 1, False), 0),
                      (f"mtp {k} loss", N * V * f + N * 8 + f, 0)]
            continue
        items += [(f"layer {layer} {name}", h, r) for name, h, r in block]
    return items + [("final norm", N * D * f + norm_inner + linears(N, V * D, 1, False), 0),
                    ("loss", N * V * f + N * 8 + f, 0)]


def mla_attention_bytes(m: Any, B: int, T: int, a: int, f: int, ac: bool) -> int:
    """Bytes multi-head latent attention (model/mla.py, model.attention=mla) saves for backward, attn_norm's
    output on: N = B*T tokens, a/f as in activation_items (under no autocast a = f = the model dtype's bytes);
    under autocast each linear saves a bf16 copy of its input and of its weight.
      linears on attn_norm's output (wq or wq_a, and wkv_a): that output N*D*f, or under autocast two bf16
      copies 2*N*D*a and the weights
      an inner RMSNorm of width W (q_norm, kv_norm): its float input N*W*f (kv_norm without autocast: a view of
      wkv_a's whole output, N*(C+R)*f), rsqrt N*f, the normalised rows in the input's dtype N*W*a; the linear
      after it (wq_b, wkv_b): its input N*W*a (+ weight)
      RoPE saves only its tables (buffers); SDPA (one head dim M = max(K, V): the narrower side is zero-padded)
      saves q, k and the output N*H*M*a each, v (V < K: its padded copy N*H*K*a; else a view of wkv_b's whole
      output, N*H*(qk_nope_head_dim + V)*a), logsumexp B*H*T*max(f, 4); wo: its input N*H*V*a
    with K = qk_nope_head_dim + qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank, R = qk_rope_head_dim,
    Q = q_lora_rank. Matches torch's saved tensors exactly on CPU (tests/test_mla.py)."""
    N, D, H, Q, C, R = B * T, m.dim, m.n_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
    K, V = m.qk_nope_head_dim + R, m.v_head_dim
    M = max(K, V)

    def weights(n: int) -> int:
        return n * a if ac else 0

    total = (2 * N * D * a if ac else N * D * f) + weights(((Q or H * K) + C + R) * D)
    if Q:
        total += N * Q * f + N * f + N * Q * a + N * Q * a + weights(H * K * Q)
    total += (N * C * f if ac else N * (C + R) * f) + N * f + N * C * a + N * C * a + weights(H * (K - R + V) * C)
    v_held = K if V < K else K - R + V   # padded, or a view of wkv_b's whole output [N, H*(nope+V)]
    total += 3 * N * H * M * a + N * H * v_held * a + B * H * T * max(f, 4) + N * H * V * a + weights(D * H * V)
    return total


def activation_bytes(cfg: Config, sequences: int, mode: str, ep: int = 1) -> int:
    """Peak bytes of saved activations over one micro-batch's forward and backward: the larger of the end of
    forward (everything held) and, in backward, the held bytes of the op groups not yet reached plus the one
    recomputed region (backward visits the groups in reverse forward order)."""
    items = activation_items(cfg, sequences, mode, ep)
    held = peak = 0
    for _, h, r in items:
        held += h
        peak = max(peak, held + r)
    return max(peak, held)


def _autocast(cfg: Config) -> bool:
    """Will the forward run under bf16 autocast (device.shard.autocast_dtype; `auto` assumes a GPU with bf16)?"""
    mp = cfg.train.mixed_precision
    return cfg.train.dtype == "float32" and (mp == "bf16" or (mp == "auto" and cfg.cluster.use_gpu))


# --------------------------------------------------------------------------- model states
def _state(cfg: Config, rank: int, dense: list, experts: list, b: int) -> tuple[int, int, int, dict[str, Any]]:
    """(params, grads, optimizer) bytes of device `rank`, and its holdings: per kind (dense, experts) the
    slices it holds ("whole", or "rows a:b of n" -> parameter names), the parameters whose AdamW states it
    holds ("all", "its shards", or names), the expert ids of its slots, and the devices holding the same."""
    from orchestrator.experts.placement import ExpertPlacement

    ep, dp = mesh_shape(cfg)
    W, e_idx, d_idx = cfg.cluster.num_devices, rank % ep, rank // ep
    stage = effective_zero_stage(cfg)
    ids = ExpertPlacement.initial(cfg.model.num_experts, ep, expert_slots(cfg)).slots[e_idx]  # where a run starts
    held: dict[str, Any] = {
        "dense": {"whole": [n for n, _ in dense]}, "dense_optimizer": "all",
        "experts": {"ids": _ranges(list(ids)), "moe_layers": len({n.rsplit(".", 1)[0] for n, _ in experts}), "whole": [n for n, _ in experts]},
        "experts_optimizer": "all",
        "replicas": {"dense": "every device" if stage < 2 else "none",
                     "experts": [d * ep + e_idx for d in range(dp) if d != d_idx] if stage < 2 or dp == 1 else []}}
    elems = [_numel(s) for _, s in dense + experts]
    frozen = frozen_names(cfg)   # no gradient, no AdamW state (ZeRO-1 partitions the others only)
    trains = [n not in frozen for n, _ in dense + experts]
    opt_elems: list[int | None] = [e if t else None for e, t in zip(elems, trains)]  # per tensor: elements of its
    if frozen:                                                                        # AdamW moments here (None: none)
        held["frozen"] = sorted(frozen)
    if stage == 1:
        for kind, params, offset, world, index in (("dense", dense, 0, W, rank), ("experts", experts, len(dense), dp,
                                                                                    d_idx)):
            if kind == "experts" and dp == 1:
                continue
            live = [i for i in range(len(params)) if trains[offset + i]]
            owner = dict(zip(live, zero1_partition([params[i][1] for i in live], world)))
            held[f"{kind}_optimizer"] = [params[i][0] for i in live if owner[i] == index]
            for i in range(len(params)):
                opt_elems[offset + i] = elems[offset + i] if owner.get(i) == index else None
    padded = list(elems)
    if stage >= 2:
        for kind, params, dim, world, index in (("dense", dense, 0, W, rank), ("experts", experts, 1, dp, d_idx)):
            if kind == "experts" and dp == 1:
                continue  # left out of FSDP: nothing to shard them over
            shards: dict[str, list[str]] = {}
            offset = 0 if kind == "dense" else len(dense)
            for i, (name, shape) in enumerate(params):
                padded[offset + i], opt_elems[offset + i] = _sharded(shape, dim, world, index)
                start, stop, _ = _rows(shape[dim], world, index)
                shards.setdefault(f"{'dim 1 ' if dim else ''}rows {start}:{stop} of {shape[dim]}", []).append(name)
            held[kind] = {**({"ids": held[kind]["ids"], "moe_layers": held[kind]["moe_layers"]} if dim else {}),
                          **shards}
            held[f"{kind}_optimizer"] = "its shards"
            for i in range(len(params)):   # a frozen one's shard has no AdamW state
                if not trains[offset + i]:
                    opt_elems[offset + i] = None
    # memory.offload_optimizer: FSDP2's CPUOffloadPolicy keeps the sharded parameters, their gradients and
    # AdamW states in host memory (experts left out of FSDP, dp == 1, stay on the device)
    host = [stage >= 2 and cfg.memory.offload_optimizer and (i < len(dense) or dp > 1) for i in range(len(elems))]
    state = [(padded[i] * b, padded[i] * b if trains[i] else 0, 2 * e * b + STEP_BYTES if e is not None else 0)
             for i, e in enumerate(opt_elems)]
    if any(host):
        held["host_bytes"] = sum(sum(t) for t, h in zip(state, host) if h)
    return tuple(sum(t[k] for t, h in zip(state, host) if not h) for k in range(3)) + (held,)  # type: ignore


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> '0-3,6'."""
    runs = [[v for _, v in g] for _, g in itertools.groupby(enumerate(ids), lambda iv: iv[1] - iv[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _comm_buffers(cfg: Config, dense: list, experts: list, b: int) -> int:
    """Collective buffers at the step's peak (an estimate; state_bytes does not see them).

    stage 0/1: the flat buffer grad_sync all-reduces (dense gradients; with dp > 1 then the experts'), the
    larger of the two. stage 2: FSDP2 all-gather outputs of every unit (a block, its experts, the root) live
    from forward to the end of backward: the unsharded, padded parameters; plus one unit's unsharded
    gradients for its reduce-scatter. stage 3: two block units unsharded at a time (the current one and the
    prefetched next: FSDP2's implicit prefetch) plus the root's, plus one unit's reduce-scatter input."""
    ep, dp = mesh_shape(cfg)
    W, stage = cfg.cluster.num_devices, effective_zero_stage(cfg)
    if W == 1:   # no collective: nothing gathered or reduced
        return 0
    n_exp = sum(_numel(s) for _, s in experts)
    if stage < 2:
        return max(sum(_numel(s) for _, s in dense), n_exp if dp > 1 else 0) * b

    def full(shape: tuple[int, ...], dim: int, world: int) -> int:
        return _rows(shape[dim], world, 0)[2] * world * (_numel(shape) // shape[dim])

    units: dict[str, int] = {}
    for name, shape in dense:
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        units[unit] = units.get(unit, 0) + full(shape, 0, W)
    if dp > 1:
        for name, shape in experts:
            unit = ".".join(name.split(".")[:2])
            units[unit] = units.get(unit, 0) + full(shape, 1, dp)
    blocks = sorted((v for k, v in units.items() if k != "root"), reverse=True)
    grads = max(units.values())
    if stage == 2:
        return (sum(units.values()) + grads) * b
    return (sum(blocks[:2]) + units.get("root", 0) + grads) * b


# --------------------------------------------------------------------------- the plan
def plan_memory(cfg: Config) -> MemoryPlan:
    """The memory plan of `cfg` on every device, from the config alone (the model on the meta device)."""
    ep, dp = mesh_shape(cfg)
    W, t = cfg.cluster.num_devices, cfg.train
    b = 8 if t.dtype == "float64" else 4
    dense, experts = _shapes(cfg)
    sequences = t.global_batch_size // W // t.micro_batches
    # A transformers model's activations follow its own architecture (DeepSeek-V4's compressed attention, mHC):
    # the formula below is the native block's, so they are not planned (0) there; the measurement still reports them.
    hf = bool(cfg.model.hf_path or cfg.model.hf_config)
    acts = 0 if hf else activation_bytes(cfg, sequences, cfg.memory.activation_checkpointing, ep)
    comm = _comm_buffers(cfg, dense, experts, b)
    devices = []
    for rank in range(W):
        p, g, o, held = _state(cfg, rank, dense, experts, b)
        devices.append(DevicePlan(rank, rank // ep, rank % ep, p, g, o, acts, comm, held))
    budget = int(cfg.cluster.device_memory_gb * GiB)
    return MemoryPlan(cfg.memory.zero_stage, cfg.memory.activation_checkpointing, t.micro_batches, ep, dp, b,
                      sequences, cfg.data.seq_len, devices, budget)


def _with(cfg: Config, **overrides: Any) -> Config:
    """A copy of cfg with dotted overrides (`memory__zero_stage=3`), validated (ConfigError if it cannot be)."""
    new = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(new, section), name, value)
    validate(new)
    return new


def plan_table(cfg: Config) -> list[dict[str, Any]]:
    """Every ZeRO stage x checkpointing mode: the bytes of the fullest device, by category."""
    rows = []
    for stage in range(4):
        for mode in MODES:
            try:
                plan = plan_memory(_with(cfg, memory__zero_stage=stage, memory__activation_checkpointing=mode,
                                         memory__offload_optimizer=cfg.memory.offload_optimizer and stage >= 2))
            except ConfigError:
                continue
            d = plan.peak()
            rows.append({"zero_stage": stage, "activation_checkpointing": mode,
                         **{c: getattr(d, c) for c in CATEGORIES}, "total": d.total})
    return rows


def _changes(cfg: Config) -> Iterator[tuple[str, dict[str, Any]]]:
    """Changes that lower memory, smallest first: one knob (ZeRO stage, then checkpointing, then micro-batches,
    each in increasing order), then two knobs together, then all three."""
    local = cfg.train.global_batch_size // cfg.cluster.num_devices
    knobs = [[("memory.zero_stage", s) for s in range(cfg.memory.zero_stage + 1, 4)],
             [("memory.activation_checkpointing", m) for m in MODES[MODES.index(cfg.memory.activation_checkpointing) + 1:]],
             [("train.micro_batches", m) for m in range(cfg.train.micro_batches + 1, local + 1) if local % m == 0]]
    for r in (1, 2, 3):
        for chosen in itertools.combinations(knobs, r):
            for values in itertools.product(*chosen):
                yield " ".join(f"{k}={v}" for k, v in values), {k.replace(".", "__"): v for k, v in values}


def check_fits(cfg: Config, budget_bytes: int | None = None, budget_source: str | None = None) -> MemoryPlan:
    """The plan, if its fullest device fits `budget_bytes` (default: cluster.device_memory_gb GiB; 0: no
    check); else MemoryPlanError with need vs budget by category and the smallest change of `_changes` whose
    re-plan fits, or else the fewest devices that would."""
    plan = plan_memory(cfg)
    budget = plan.budget_bytes if budget_bytes is None else budget_bytes
    worst = plan.peak()
    if not budget or worst.total <= budget:
        return plan
    parts = ", ".join(f"{c} {_mib(getattr(worst, c))}" for c in CATEGORIES)
    msg = (f"the memory plan needs {_mib(worst.total)} on device {worst.rank} ({parts}), over the budget of "
           f"{_mib(budget)} ({budget_source or f'cluster.device_memory_gb={budget / GiB:g}'})")
    for name, change in _changes(cfg):
        try:
            new = plan_memory(_with(cfg, **change)).peak().total
        except ConfigError:
            continue
        if new <= budget:
            alone = "" if len(change) == 1 else ("no single one of memory.zero_stage, memory.activation_checkpointing "
                                                 "and train.micro_batches fits, but together ")
            raise MemoryPlanError(f"{msg}; {alone}{name} would fit ({_mib(new)} per device): set {name}")
    world, gbs = cfg.cluster.num_devices, cfg.train.global_batch_size
    most = {"memory__zero_stage": 3, "memory__activation_checkpointing": "full"}
    for devices in (n for n in range(world + 1, 64 * world + 1) if gbs % n == 0):  # the fewest devices that fit
        for change in ({}, most):
            try:
                more = _with(cfg, cluster__num_devices=devices, parallel__expert_parallel=0, **change)
            except ConfigError:
                continue
            if plan_memory(more).peak().total <= budget:
                ep = {"parallel__expert_parallel": 0} if cfg.parallel.expert_parallel else {}
                names = " ".join(f"{k.replace('__', '.')}={v}" for k, v in
                                 {"cluster__num_devices": devices, **ep, **change}.items())
                raise MemoryPlanError(f"{msg}; no change of memory.zero_stage, memory.activation_checkpointing "
                                      f"or train.micro_batches fits: use more devices: {names} fits "
                                      f"({_mib(plan_memory(more).peak().total)} per device)")
    raise MemoryPlanError(f"{msg}; no change of memory.zero_stage, memory.activation_checkpointing or "
                          f"train.micro_batches fits, nor more devices (up to train.global_batch_size={gbs}, one "
                          f"sequence each): use a smaller model, or a larger train.global_batch_size with more devices")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"
