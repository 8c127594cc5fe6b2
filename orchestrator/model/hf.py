"""Hugging Face MoE models (transformers' own classes) trained with this project's expert parallelism.

`model.hf_path=DIR` (config.json + *.safetensors) or `model.hf_config=FILE` (a config.json: fresh weights)
builds transformers' class for that config on the meta device. Every MoE block of transformers 5 holds its
routed experts in one module with the shared layout

    experts.gate_up_proj  [E, 2F, D]   (gate rows, then up rows)
    experts.down_proj     [E, D, F]
    experts(hidden_ND, top_k_index_NK, top_k_weights_NK) -> out_ND

and is called by the block with its own router's choice (top-k, group-limited top-k with a correction bias,
hash routing: whatever the model defines; the router is left as it is). Each such module becomes an
expert-parallel one (`ExpertParallelExperts`): it keeps only this device's El expert slots ([El, 2F, D] and
[El, D, F], same parameter names), sends each routed token copy to the device holding its expert through the
project's dispatcher (all_to_all over the mesh's "ep" dimension), runs transformers' own expert math on the
copies that arrived (the class's forward, so its activation, clamps and grouped matmul are the model's), and
sends the results back, weighted by the router's gates. Every row that reaches the grouped matmul belongs to a
local expert, so no output row is left uninitialised, and the dispatch's all_to_all carries gradients back to
every token copy (the two bugs reported of transformers' own expert-parallel plan).

The model's parameter and buffer names are transformers' (`model.layers.1.mlp.experts.gate_up_proj`), so
checkpoints, snapshots and export speak the model's own names; expert tensors are stored per expert id as
for the native model.

Shape legend: N tokens (B*T), K top-k, E experts of the layer, El expert slots on this device, M token copies
received by this device, D hidden size, F expert intermediate size, V vocabulary.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from orchestrator.config import BalanceConfig, ConfigError, ModelConfig
from orchestrator.model.layers import grouped_mm_supported, upcast
from orchestrator.model.moe import ExpertSlots, LocalTokenDispatcher, TokenDispatcher, balance_losses, count_ids

EXPERT_LAYOUT = ("gate_up_proj", "down_proj")


def load_hf_config(m: ModelConfig) -> Any:
    """transformers' config of `model.hf_path` (its config.json) or `model.hf_config` (a config.json file), read
    locally (no hub). Raises ConfigError naming the key and the file."""
    from transformers import AutoConfig

    key, value = ("model.hf_path", m.hf_path) if m.hf_path else ("model.hf_config", m.hf_config)
    path = Path(value).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{key}={value!r}: no config.json there" + (
            "; give a directory holding config.json and *.safetensors" if key == "model.hf_path"
            else "; give a transformers config.json file"))
    try:
        data = json.loads(file.read_text())
        model_type = data.pop("model_type")
        if data.get("quantization_config") is not None:   # FP8 weights, dequantized on read: the model is not
            from orchestrator.model.fp8 import check_quantization_config   # quantized (model/fp8.py)

            check_quantization_config(data.pop("quantization_config"), f"{key}={value!r}: {file}")
        return AutoConfig.for_model(model_type, **data)
    except ConfigError:
        raise
    except KeyError:
        raise ConfigError(f"{key}={value!r}: {file} has no model_type, so transformers cannot tell the model "
                          f"class; is it a transformers config.json?") from None
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}={value!r}: transformers cannot read {file}: {e}") from None


def build_meta_model(hf_config: Any) -> nn.Module:
    """transformers' causal-LM class for `hf_config`, on the meta device (no memory), float32."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        except ValueError as e:
            raise ConfigError(f"transformers has no causal-LM class for model_type={hf_config.model_type!r}: {e}") from None


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every module with an `experts` child, in model order. Raises ConfigError naming the class
    of an experts module that does not follow the shared layout (then this project cannot shard it)."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "_modules", {}).get("experts")
        if experts is None or isinstance(experts, ExpertParallelExperts):
            if isinstance(experts, ExpertParallelExperts):
                found.append((name, module))
            continue
        params = dict(experts.named_parameters(recurse=False))
        E = getattr(experts, "num_experts", None)
        ok = (all(k in params and params[k].ndim == 3 for k in EXPERT_LAYOUT)
              and all(p.shape[0] == E for p in params.values())          # every tensor's first dim: the expert
              and "top_k_index" in inspect.signature(type(experts).forward).parameters)
        if not ok:
            raise ConfigError(
                f"{type(experts).__name__} (at {name}.experts) does not hold its experts in the layout this project "
                f"shards (gate_up_proj [E, 2F, D] and down_proj [E, D, F], called with the router's top-k indices and "
                f"weights); models with this experts class cannot be trained expert-parallel here")
        if not hasattr(module, "gate"):
            raise ConfigError(f"{type(module).__name__} (at {name}) has experts but no `gate` router this project "
                              f"knows how to read")
        found.append((name, module))
    return found


class _RouterView:
    """What the balancer needs of a router: `expert_bias`, the bias added to scores for selection only (DeepSeek's
    `e_score_correction_bias`, which the aux-loss-free strategy moves)."""

    def __init__(self, gate: nn.Module):
        self.gate = gate

    @property
    def expert_bias(self) -> torch.Tensor | None:
        """None for a router without one (DeepSeek-V4's hash-routed layers): the bias update leaves it alone."""
        return getattr(self.gate, "e_score_correction_bias", None)


def _weights_softmax_renormalised(gate: nn.Module, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """Mixtral: softmax over every expert (float32), the k chosen renormalised to sum 1."""
    w_NK = torch.nn.functional.softmax(logits_NE.float(), dim=-1).gather(1, ids_NK)
    return w_NK / w_NK.sum(dim=-1, keepdim=True)


def _weights_softmax(gate: nn.Module, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """Qwen2/Qwen3-MoE, OLMoE: softmax (float32), renormalised when `norm_topk_prob`, in the logits' dtype."""
    w_NK = torch.nn.functional.softmax(logits_NE, dtype=torch.float, dim=-1).gather(1, ids_NK)
    if gate.norm_topk_prob:
        w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
    return w_NK.to(logits_NE.dtype)


def _weights_sigmoid(gate: nn.Module, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3, GLM-4-MoE: sigmoid scores (the correction bias only selects), renormalised when
    `norm_topk_prob` (+1e-20), times `routed_scaling_factor`."""
    w_NK = logits_NE.sigmoid().gather(1, ids_NK)
    if gate.norm_topk_prob:
        w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return w_NK * gate.routed_scaling_factor


def _weights_score_fn(gate: nn.Module, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4 (learned and hash-routed layers): the router's `score_fn` (sqrt-softplus), renormalised (+1e-20),
    times `routed_scaling_factor`."""
    w_NK = gate.score_fn(logits_NE).gather(1, ids_NK)
    return w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20) * gate.routed_scaling_factor


# Routing replay's gates, per router class: each family's own formula from the router's full scores, applied to
# the replayed ids. Each is its class's forward with the selection taken out (test_routing_replay holds them to
# transformers': replaying a router's own choice gives its weights bit for bit).
REPLAY_WEIGHTS = {
    "MixtralTopKRouter": _weights_softmax_renormalised,
    "Qwen2MoeTopKRouter": _weights_softmax, "Qwen3MoeTopKRouter": _weights_softmax, "OlmoeTopKRouter": _weights_softmax,
    "DeepseekV3TopkRouter": _weights_sigmoid, "Glm4MoeTopkRouter": _weights_sigmoid,
    "DeepseekV4TopKRouter": _weights_score_fn, "DeepseekV4HashRouter": _weights_score_fn,
}


# The balancing losses' router scores s_{t,i} from the router's logits, per router class: each family's own score
# function over every expert (what its router selects and weighs from), in at least float32. DeepSeek-V4's hash-routed
# layers (DeepseekV4HashRouter) are left out: their choice is a fixed token-id table, not learned, so no loss can
# balance it; the balancing losses skip those layers.
ROUTER_SCORES = {
    "MixtralTopKRouter": lambda gate, logits_NE: upcast(logits_NE).softmax(-1),
    "Qwen2MoeTopKRouter": lambda gate, logits_NE: upcast(logits_NE).softmax(-1),
    "Qwen3MoeTopKRouter": lambda gate, logits_NE: upcast(logits_NE).softmax(-1),
    "OlmoeTopKRouter": lambda gate, logits_NE: upcast(logits_NE).softmax(-1),
    "DeepseekV3TopkRouter": lambda gate, logits_NE: upcast(logits_NE).sigmoid(),
    "Glm4MoeTopkRouter": lambda gate, logits_NE: upcast(logits_NE).sigmoid(),
    "DeepseekV4TopKRouter": lambda gate, logits_NE: gate.score_fn(upcast(logits_NE)),   # sqrt(softplus)
}
UNBALANCED_ROUTERS = ("DeepseekV4HashRouter",)   # no learned choice: no balancing loss


def _logits_hook(experts: "ExpertParallelExperts", gate: nn.Module, args: Any, output: Any) -> None:
    """A forward hook on the router (after the replay hook): keeps its logits [N, E] for the layer's balancing losses,
    in a training forward with gradients and the losses on."""
    on = experts.balance is not None and experts.training and torch.is_grad_enabled()
    experts.router_logits_NE = output[0] if on else None


def _replay_hook(experts: "ExpertParallelExperts", gate: nn.Module, args: Any, output: Any) -> Any:
    """A forward hook on the router: with `experts.replay_NK` set, its output becomes (logits, gates of the replayed
    ids from the live logits, the replayed ids), so the router still gets gradients through its logits."""
    replay_NK = experts.replay_NK
    if replay_NK is None:
        return None
    logits_NE, _, ids_NK = output
    if tuple(replay_NK.shape) != tuple(ids_NK.shape):
        raise ValueError(f"routing replay of shape {tuple(replay_NK.shape)} for a router choosing "
                         f"{tuple(ids_NK.shape)}")
    weights = REPLAY_WEIGHTS.get(type(gate).__name__)
    if weights is None:
        raise ValueError(f"routing replay does not know how {type(gate).__name__} weighs its experts")
    replay_NK = replay_NK.to(device=ids_NK.device, dtype=torch.long)
    return logits_NE, weights(gate, logits_NE, replay_NK), replay_NK


# MoE blocks that call their shared expert right after their routed experts, on the same hidden states (the
# experts get a [N, D] view of them): the experts' forward runs the shared expert while its dispatch is in flight
# (SharedOverlap). Qwen2-MoE calls its shared expert first (and Mixtral has none): no overlap there.
SHARED_AFTER_EXPERTS = {"DeepseekV3MoE": "shared_experts", "DeepseekV4SparseMoeBlock": "shared_experts"}


class SharedOverlap:
    """A block's shared expert computed inside its experts' forward (`compute`, while the dispatch's all_to_all is in
    flight), its result kept (`keep`) and handed to the block's own call of the shared expert right after, which
    then computes nothing. The module's `forward` becomes an instance attribute checking for a kept result of the
    very hidden states it is called with (same storage, as many tokens); anything else is computed as before."""

    def __init__(self, module: nn.Module):
        self.module, self.kept, self.computing = module, None, False
        module.forward = self._forward

    def compute(self, hidden: torch.Tensor) -> torch.Tensor:
        self.computing = True
        try:
            return self.module(hidden)   # through __call__: the module's hooks run as usual
        finally:
            self.computing = False

    def keep(self, hidden: torch.Tensor, out: torch.Tensor | None) -> None:
        self.kept = None if out is None else (hidden.data_ptr(), hidden.shape, out)

    def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kept, self.kept = self.kept, None
        if (kept is not None and not self.computing and not args and not kwargs and x.data_ptr() == kept[0]
                and x.shape[-1] == kept[1][-1] and x.numel() == kept[1].numel()):
            out = kept[2]
            return out if out.shape[:-1] == x.shape[:-1] else out.view(*x.shape[:-1], out.shape[-1])
        return type(self.module).forward(self.module, x, *args, **kwargs)


def _unflattened(hidden_ND: torch.Tensor) -> torch.Tensor:
    """The tensor the block flattened into `hidden_ND` (its [B, T, D] hidden states: what the block hands its shared
    expert), where hidden_ND is a plain view of it; else hidden_ND. The shared expert's gradient then reaches the
    hidden states as in the block's own call (same autograd path, same float32 summation order)."""
    base = hidden_ND._base
    if (base is not None and base.numel() == hidden_ND.numel() and base.shape[-1] == hidden_ND.shape[-1]
            and base.data_ptr() == hidden_ND.data_ptr() and base.is_contiguous()):
        return base
    return hidden_ND


def overlap_shared_expert(block: nn.Module) -> bool:
    """Let `block`'s experts (an ExpertParallelExperts) run its shared expert while dispatching, where the block's
    class is one of SHARED_AFTER_EXPERTS; whether it did."""
    name = SHARED_AFTER_EXPERTS.get(type(block).__name__)
    shared = getattr(block, name, None) if name else None
    if shared is None or not isinstance(block.experts, ExpertParallelExperts):
        return False
    block.experts.__dict__["_shared"] = SharedOverlap(shared)
    return True


class ExpertParallelExperts(ExpertSlots):
    """Mixed into a transformers experts module (its class is swapped for a subclass of both): the module holds
    this device's El slots, `num_experts` = El (what the class's own forward indexes), `experts_total` = E.

    forward(hidden_ND, top_k_index_NK, top_k_weights_NK) -> out_ND: out[t] = sum_k w[t,k] * expert_{i[t,k]}(h[t]),
    the experts wherever they live."""

    _ep_classes: dict[type, type] = {}

    @property
    def experts(self) -> nn.Module:      # ExpertSlots' module of slots (the native MoE keeps them in a child)
        return self

    @property
    def router(self) -> _RouterView:
        return _RouterView(self.__dict__["_gate"])

    @classmethod
    def adopt(cls, experts: nn.Module, gate: nn.Module, expert_ids: Sequence[int]) -> "ExpertParallelExperts":
        """Turn transformers' experts module (still on the meta device) into the expert-parallel one holding
        `expert_ids` (global ids, in slot order)."""
        base = type(experts)
        if base not in cls._ep_classes:
            cls._ep_classes[base] = type(f"ExpertParallel{base.__name__}", (cls, base), {})
        E = experts.num_experts
        experts.__class__ = cls._ep_classes[base]
        for name in list(experts._parameters):
            p = experts._parameters[name]
            if p is not None and p.ndim >= 1 and p.shape[0] == E:
                experts._parameters[name] = nn.Parameter(p.new_empty(len(expert_ids), *p.shape[1:]))
        experts.num_experts = len(expert_ids)
        experts.expert_ids, experts.primary = list(expert_ids), [True] * len(expert_ids)
        experts.__dict__["_gate"] = gate  # not a child: the block holds it
        experts.dispatcher = LocalTokenDispatcher()
        experts.global_tokens, experts.aux_loss = None, None
        experts.global_sequences = None   # with valid_N: the global batch's sequences (None: tokens // T)
        experts.ep_groups = experts.local_ep_groups = 1   # balance.aux_loss_scope=ep_group (see moe.balance_losses)
        experts.balance = None        # the balancing losses (HFMoEModel.use_balance_losses); None: off
        experts.seq_len = None        # T of the forward (set by HFMoEModel): the rows are sequences of T tokens
        experts.router_logits_NE = None   # the router's logits of this forward (_logits_hook)
        experts.valid_N = None   # set per forward by HFMoEModel: the tokens that are not padding
        experts.replay_NK = None   # routing replay: logical ids [N, K] the router's output is replaced with
        experts.last_experts_NK = torch.zeros(0, 0, dtype=torch.long)   # the ids of the last forward
        gate.register_forward_hook(functools.partial(_replay_hook, experts))
        gate.register_forward_hook(functools.partial(_logits_hook, experts))
        experts._init_slots(E)
        return experts  # type: ignore[return-value]

    dispatcher: TokenDispatcher

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        experts_NK = top_k_index.long()
        self.last_experts_NK = experts_NK.detach()
        valid = None if self.valid_N is None else self.valid_N.to(experts_NK.device).unsqueeze(1).expand_as(experts_NK)
        self.last_tokens_per_expert = count_ids(experts_NK, self.experts_total, valid)
        self.aux_loss = self._balance_losses(experts_NK) if self.training else None
        slots_NK = self.slots_of(experts_NK)
        shared = self.__dict__.get("_shared")   # the block's shared expert, overlapped with the dispatch
        shared_fn = None if shared is None else functools.partial(shared.compute, _unflattened(hidden_states))
        r = self.dispatcher.routed(hidden_states, slots_NK, top_k_weights, self.num_slots, self._local_experts,
                                   shared_fn)
        self.last_received = r.received
        if shared is not None:
            shared.keep(hidden_states, r.shared_ND)
        return r.out_ND

    def _local_experts(self, x_MD: torch.Tensor, per_slot: list[int]) -> torch.Tensor:
        """transformers' expert math on copies grouped by local slot (`per_slot[j]` rows for slot j), gate 1."""
        M = x_MD.shape[0]
        local_M1 = torch.repeat_interleave(torch.arange(len(per_slot), device=x_MD.device),
                                           torch.tensor(per_slot, device=x_MD.device), output_size=M).unsqueeze(1)
        ones_M1 = torch.ones(local_M1.shape, dtype=x_MD.dtype, device=x_MD.device)
        y_MD = super().forward(x_MD, local_M1, ones_M1)   # transformers' expert math on the local slots
        if not M:
            # transformers' loop runs only the experts that got rows: none here, so nothing would reach the weights
            # and their gradient would be None, where one device holding every expert always has one (zeros for
            # the experts without tokens). AdamW would then skip them here only (no weight decay, a step count
            # behind the other devices'), and FSDP2's reduce-scatter would not match its peers'. The copies that
            # arrived (none) join too, so the all_to_all's backward runs here as on every other device.
            y_MD = y_MD + (sum(p.sum() for p in self.parameters() if p.requires_grad) + x_MD.sum()) * 0
        return y_MD

    def _balance_losses(self, experts_NK: torch.Tensor) -> torch.Tensor | None:
        """This layer's share of the project's balancing losses (moe.balance_losses: the same functions and scopes
        as the native MoE) from its router's logits, scored by the family's own function (ROUTER_SCORES), and the
        ids the experts got (the router's, or a routing replay's). None: off, no logits recorded (evaluation, no
        gradient) or a hash-routed layer."""
        logits_NE, self.router_logits_NE = self.router_logits_NE, None
        gate = self.__dict__["_gate"]
        score = ROUTER_SCORES.get(type(gate).__name__)
        if logits_NE is None or score is None:
            return None
        N = experts_NK.shape[0]
        T = self.seq_len or N
        return balance_losses(self.balance, self.dispatcher, score(gate, logits_NE), upcast(logits_NE), experts_NK,
                              N // T, T, self.valid_N, self.global_tokens, self.global_sequences, self.ep_groups,
                              self.local_ep_groups)


def use_grouped_mm(model: "HFMoEModel", grouped_gemm: bool) -> str:
    """parallel.grouped_gemm for a transformers model: its experts' own implementation (transformers 5's
    `config._experts_implementation`, integrations/moe.py) is "grouped_mm" (grouped_mm_experts_forward: one sort of
    the copies, torch's grouped_mm per projection) when on and torch's grouped_mm supports the experts' device and
    dtype (`layers.grouped_mm_supported`: not float64), else "eager" (transformers' loop over the experts that got
    rows). ExpertParallelExperts calls that forward on its local slots either way. Returns the implementation set.
    transformers casts the rows to the weights' dtype before grouped_mm (it is not autocast-aware), so under bf16
    autocast with float32 weights its grouped path computes in float32, the eager one in bf16."""
    p = next(model._moe[0].parameters())
    impl = "grouped_mm" if grouped_gemm and grouped_mm_supported(p.device.type, p.dtype) else "eager"
    model.hf_config._experts_implementation = impl
    return impl


def _float32_gate_forward(gate: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A transformers router's forward with autocast off and its floating inputs in its weight's dtype, when autocast
    is on and that weight is float32 or float64 (else its forward as it is): the logits' matmul, scores and top-k in
    float32 (parallel.router_dtype=float32)."""
    forward = type(gate).forward
    w = getattr(gate, "weight", None)
    if w is None or w.dtype not in (torch.float32, torch.float64) or not torch.is_autocast_enabled(w.device.type):
        return forward(gate, *args, **kwargs)

    def cast(a: Any) -> Any:
        return a.to(w.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    with torch.autocast(w.device.type, enabled=False):
        return forward(gate, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})


def use_router_dtype(model: "HFMoEModel", router_dtype: str) -> None:
    """parallel.router_dtype for a transformers model: "float32" routes every MoE block's router (the `gate` its
    experts were adopted with) through `_float32_gate_forward` (an instance attribute `forward`, so the class, its
    name and its hooks stay); "auto" puts the class's forward back."""
    for m in model._moe:
        gate = m.__dict__["_gate"]
        if router_dtype == "float32":
            gate.forward = functools.partial(_float32_gate_forward, gate)
        else:
            gate.__dict__.pop("forward", None)


class HFCache:
    """A generation cache of an HFMoEModel: transformers' cache object, replaced by the one each forward returns."""

    def __init__(self, cache: Any):
        self.cache = cache


class HFMoEModel(nn.Module):
    """A transformers causal LM whose experts are expert-parallel, with the interface the device shard uses
    (the native MoETransformer's): forward(tokens_BT) -> logits_BTV, moe_layers(), expert_ids_of(name), ...

    The transformers model's children are this module's children, so parameter names are the model's own."""

    def __init__(self, hf_model: nn.Module, hf_config: Any):
        super().__init__()
        self.__dict__["hf"] = hf_model
        self.hf_config = hf_config
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self._moe = [block.experts for _, block in moe_blocks(hf_model)]
        self.router_aux_loss_coeff = 0.0
        self._router_logits: list[torch.Tensor] = []
        self._recording = False
        self._valid_N: torch.Tensor | None = None
        self._valid_BT: torch.Tensor | None = None   # set_valid's
        # transformers 5.25 names the generation cache `cache` (5.23: `past_key_values`), in and out
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def forward(self, tokens_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, cache: "HFCache | None" = None) -> torch.Tensor:
        """Logits [B, T, V]. position_ids: packed rows' per-document positions (None: 0..T-1). valid: which
        positions hold a sample's token (False: padding; None: what set_valid left, else all). Padding still runs
        through the model (its loss is masked) but counts in no expert load and no router loss, as transformers'
        attention_mask keeps it out of load_balancing_loss_func. With a cache (generation, new_cache()): tokens_BT
        continue the cached ones, through transformers' own cache of the model (its positions follow on)."""
        self._router_logits.clear()
        self._recording = True   # the router loss's logits: this forward's, not a recomputation's in backward
        if valid_BT is None:
            valid_BT = self._valid_BT
        valid_N = None if valid_BT is None else valid_BT.reshape(-1).bool()
        for m in self._moe:
            m.valid_N, m.seq_len = valid_N, tokens_BT.shape[1]
        self._valid_N = valid_N
        if cache is not None:
            key = self._cache_arg
            out = self.hf(input_ids=tokens_BT, use_cache=True, **{key: cache.cache})
            cache.cache = out[key]
            return out.logits
        return self.hf(input_ids=tokens_BT, position_ids=position_ids_BT, use_cache=False).logits

    def new_cache(self) -> "HFCache":
        """An empty generation cache: transformers' DynamicCache for this model's config (its layer kinds: sliding
        window, DeepSeek-V4's compressed attention)."""
        from transformers import DynamicCache

        return HFCache(DynamicCache(config=self.hf_config))

    def set_valid(self, valid_BT: torch.Tensor | None) -> None:
        """The tokens the next forwards count in expert loads and router losses (bool [B, T]; None: all) when the
        forward is not given its own `valid_BT`."""
        self._valid_BT = valid_BT

    def set_routing_replay(self, ids: list[torch.Tensor] | None) -> None:
        """Rollout Routing Replay (R3): the next forwards (and their backward recomputations) use these logical expert
        ids, one [B, T, K] or [N, K] tensor per MoE layer in moe_layers() order, instead of the routers' choice; the
        gates are recomputed from the live router's logits by the router family's own formula (REPLAY_WEIGHTS).
        Raises ValueError for a wrong layer count, width, an id outside 0..E-1, or a router class without a formula."""
        if ids is None:
            for m in self._moe:
                m.replay_NK = None
            return
        if len(ids) != len(self._moe):
            raise ValueError(f"routing replay gives {len(ids)} layers; the model has {len(self._moe)} MoE layers")
        K = self.hf_config.num_experts_per_tok
        for i, (m, t) in enumerate(zip(self._moe, ids)):
            t_NK = t.reshape(-1, t.shape[-1]).long()
            if t_NK.shape[-1] != K:
                raise ValueError(f"routing replay of MoE layer {i} has {t_NK.shape[-1]} experts per token, "
                                 f"the layer routes to {K}")
            if t_NK.numel() and (int(t_NK.min()) < 0 or int(t_NK.max()) >= m.experts_total):
                raise ValueError(f"routing replay of MoE layer {i} names an expert outside 0..{m.experts_total - 1}")
            gate = type(m.__dict__["_gate"]).__name__
            if gate not in REPLAY_WEIGHTS:
                raise ValueError(f"routing replay does not know how {gate} weighs its experts")
            m.replay_NK = t_NK

    def routing(self) -> list[torch.Tensor]:
        """Each MoE layer's chosen logical expert ids of the last forward ([B*T, K] int64, moe_layers() order)."""
        return [m.last_experts_NK for m in self._moe]

    def use_router_aux_loss(self, coeff: float) -> None:
        """Train with the model's own router auxiliary loss (its transformers class's `load_balancing_loss_func`,
        the Switch Transformer loss over the router logits its `_can_record_outputs["router_logits"]` names),
        times `coeff`, as this device's share of the loss over the global batch (see aux_loss)."""
        recorder = router_logits_recorder(self.hf)
        if recorder is None:
            raise ConfigError(f"{type(self.hf).__name__} has no router auxiliary loss (no load_balancing_loss_func)")
        cls, index = recorder
        self.router_aux_loss_coeff = coeff
        for module in self.hf.modules():
            if isinstance(module, cls):
                module.register_forward_hook(lambda mod, args, out: self._router_logits.append(out[index])
                                             if self._recording and self.training and torch.is_grad_enabled()
                                             else None)

    def use_balance_losses(self, balance: BalanceConfig) -> None:
        """Train with the project's balancing losses (balance.aux_loss_coeff with its scope, seq_aux_loss_coeff,
        z_loss_coeff) computed from every learned router's logits (hash-routed layers have none). Raises ConfigError
        for a router class whose score function this project does not know."""
        if not (balance.aux_loss_coeff or balance.seq_aux_loss_coeff or balance.z_loss_coeff):
            return
        for m in self._moe:
            gate = type(m.__dict__["_gate"]).__name__
            if gate not in ROUTER_SCORES and gate not in UNBALANCED_ROUTERS:
                raise ConfigError(f"balance.aux_loss_coeff / seq_aux_loss_coeff / z_loss_coeff: this project does not "
                                  f"know how {gate} scores its experts; set them to 0")
            m.balance = balance

    def moe_layers(self) -> list[ExpertParallelExperts]:
        return list(self._moe)

    def blocks(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """(decoder layer, its expert-parallel experts or None): the units FSDP wraps."""
        layers = self.hf.model.layers
        return [(layer, next((m for m in layer.modules() if isinstance(m, ExpertParallelExperts)), None))
                for layer in layers]

    def expert_ids_of(self, param_name: str) -> list[int]:
        return self.get_submodule(param_name.rsplit(".", 1)[0]).expert_ids

    def primary_of(self, param_name: str) -> list[bool]:
        return self.get_submodule(param_name.rsplit(".", 1)[0]).primary

    def placement(self) -> list[list[list[int]]]:
        return [[list(ids) for ids in m.placement] for m in self._moe]

    def aux_loss(self) -> torch.Tensor | None:
        """This device's share of the balancing losses of the last forward (None when all are off): the project's
        (use_balance_losses: each MoE layer's, summed over the layers as the native model does) plus the model's own
        router auxiliary loss (use_router_aux_loss)."""
        parts = [m.aux_loss for m in self._moe if m.aux_loss is not None]
        own = self._router_aux_loss()
        if own is not None:
            parts.append(own)
        return torch.stack([p.to(parts[0].dtype) for p in parts]).sum() if parts else None

    def _router_aux_loss(self) -> torch.Tensor | None:
        """This device's share of the model's router auxiliary loss over the global batch (None when off).

        transformers' load_balancing_loss_func pools every recorded layer's N router rows: with p = softmax(logits)
        and the top-k (k = num_experts_per_tok) of p one-hot, L = E * sum_e (c_e / R) * (P_e / R), c_e the copies
        to e and P_e the summed probabilities over all R = layers x tokens rows (Switch Transformer, Fedus et al.
        2021, eq. 4-6). Over the global batch R = layers x global tokens and c is summed over every device (no
        gradient); this device contributes its rows' P. The shares add up to the loss of one process on the whole
        batch, and so do their gradients."""
        self._recording = False
        if not self.router_aux_loss_coeff or not self._router_logits:
            return None
        E, k = self._moe[0].experts_total, self.hf_config.num_experts_per_tok
        counts = torch.zeros(E, dtype=torch.float32, device=self._router_logits[0].device)
        probs = torch.zeros(E, dtype=torch.float32, device=counts.device)
        for logits in self._router_logits:
            if self._valid_N is not None:   # padding is no row of the loss
                logits = logits[self._valid_N.to(logits.device)]
            p = torch.softmax(logits.float(), dim=-1)
            counts += torch.bincount(torch.topk(p, k, dim=-1).indices.reshape(-1), minlength=E).float()
            probs = probs + p.sum(0)
        rows = len(self._router_logits) * (self._moe[0].global_tokens or self._router_logits[0].shape[0])
        counts = self._moe[0].dispatcher.global_counts(counts)
        self._router_logits.clear()
        return self.router_aux_loss_coeff * E * ((counts / rows) * (probs / rows)).sum()

    def _expert_param_ids(self) -> set[int]:
        return {id(p) for m in self._moe for p in m.parameters(recurse=False)}

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        ids = self._expert_param_ids()
        return ((n, p) for n, p in self.named_parameters() if id(p) in ids)

    def dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        ids = self._expert_param_ids()
        return ((n, p) for n, p in self.named_parameters() if id(p) not in ids)


def _materialize_the_rest(hf_model: nn.Module) -> None:
    """What no checkpoint holds is still on the meta device: buffers such as the rotary tables (non-persistent),
    and an untied head's missing weight is an error before this. They are allocated and computed by
    transformers' own initialiser (called only on modules without parameters, which it would re-draw)."""
    for module in hf_model.modules():
        meta = [name for name, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)):   # its initialiser would re-draw loaded weights
            raise ConfigError(f"{type(module).__name__}: buffers {meta} are in no checkpoint file and transformers "
                              f"computes them together with the module's weights")
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        hf_model._init_weights(module)


def fresh_hf_state(hf_config: Any, seed: int) -> dict[str, torch.Tensor]:
    """Weights of a fresh model, drawn by transformers' own initialiser from `seed` alone (so every device, and
    a single process, draws the same): the whole model on this host, once."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():   # the process's own RNG (seeded per rank) stays as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, table in state.items():
        # DeepSeek-V4's hash routers start all-zero (transformers: "real values come from the checkpoint"): every
        # token would go to expert 0. A fresh model gets a fixed random table instead, k distinct experts per token.
        if name.endswith("tid2eid") and not table.any():
            V, K = table.shape
            E = model.config.num_local_experts
            table.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]))
    return state


def _meta_moe(m: ModelConfig) -> tuple[Any, nn.Module, list[tuple[str, nn.Module]]]:
    """(config, the model on the meta device, its MoE blocks); ConfigError for a model without any."""
    hf_config = load_hf_config(m)
    hf = build_meta_model(hf_config)
    blocks = moe_blocks(hf)
    if not blocks:
        raise ConfigError(f"{type(hf).__name__} ({m.hf_path or m.hf_config}) has no MoE block (no module with an "
                          f"`experts` child): this project trains Mixture-of-Experts models")
    return hf_config, hf, blocks


def _meta_expert_parallel(m: ModelConfig, expert_ids: Sequence[int] | None
                          ) -> tuple[Any, nn.Module, HFMoEModel]:
    """(config, transformers' model, the project's wrapper) on the meta device, every experts module holding
    `expert_ids` (None: all of them)."""
    hf_config, hf, blocks = _meta_moe(m)
    ids = list(range(blocks[0][1].experts.num_experts)) if expert_ids is None else list(expert_ids)
    for _, block in blocks:
        ExpertParallelExperts.adopt(block.experts, block.gate, ids)
        overlap_shared_expert(block)
    return hf_config, hf, HFMoEModel(hf, hf_config)


def build_hf_model(m: ModelConfig, seed: int, expert_ids: Sequence[int] | None = None,
                   balance: BalanceConfig | None = None, stats: dict | None = None) -> HFMoEModel:
    """The model of `model.hf_path` / `model.hf_config` holding `expert_ids` (None: all) of every MoE layer.

    hf_path: each tensor read from the safetensors files is a dense one or one of this device's experts
    (orchestrator.model.hf_load; `stats`, when given, receives what was read). hf_config: fresh weights from the
    seed (fresh_hf_state), then this device's slice."""
    hf_config, hf, model = _meta_expert_parallel(m, expert_ids)
    experts_of = {f"{name}.{k}": mod.expert_ids for name, mod in hf.named_modules()
                  if isinstance(mod, ExpertParallelExperts) for k in mod._parameters}
    if m.hf_path:
        from orchestrator.model.hf_load import read_hf_state

        state, read = read_hf_state(m.hf_path, build_meta_model(hf_config), lambda name: experts_of.get(name))
        if stats is not None:
            stats.update(vars(read))
    else:
        full = fresh_hf_state(hf_config, seed)
        state = {k: (v[list(experts_of[k])] if k in experts_of else v) for k, v in full.items()}
    # The read tensors become the parameters (assign: no second copy of the weights at the peak).
    missing, _ = hf.load_state_dict(state, strict=False, assign=True)
    del state
    tied = set(getattr(hf, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing:
        raise ConfigError(f"{m.hf_path or m.hf_config}: no weights for {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} tensors of the model)")
    if getattr(hf_config, "tie_word_embeddings", False):
        hf.tie_weights()
    _materialize_the_rest(hf)
    if balance is not None:
        model.use_balance_losses(balance)
    return model


def hf_summary(m: ModelConfig) -> dict[str, Any]:
    """What the rest of a run reads of the model, from its transformers config and its meta-device build (no
    weights): vocab_size, dim, n_layers, max_seq_len, num_experts, top_k, the class name, whether any of its
    routers has a correction bias. Raises ConfigError for a model this project cannot shard (see moe_blocks)."""
    hf_config, hf, blocks = _meta_moe(m)
    experts = {b.experts.num_experts for _, b in blocks}
    if len(experts) > 1:
        raise ConfigError(f"{type(hf).__name__}: MoE layers with different expert counts {sorted(experts)} are not "
                          f"supported")
    return {"vocab_size": hf_config.vocab_size, "dim": hf_config.hidden_size,
            "n_layers": hf_config.num_hidden_layers,
            "max_seq_len": getattr(hf_config, "max_position_embeddings", None) or 1 << 20,
            "num_experts": experts.pop(), "top_k": hf_config.num_experts_per_tok, "class": type(hf).__name__,
            "first_k_dense": hf_config.num_hidden_layers - len(blocks),
            "correction_bias": any(hasattr(b.gate, "e_score_correction_bias") for _, b in blocks),
            "router_aux_loss": router_logits_recorder(hf) is not None,
            "packing_leaks": packing_leaks(hf_config),
            "routers": sorted({type(b.gate).__name__ for _, b in blocks}), "replayable": sorted(REPLAY_WEIGHTS),
            "scored": sorted(ROUTER_SCORES) + list(UNBALANCED_ROUTERS)}


def packing_leaks(hf_config: Any) -> str | None:
    """Why packed samples would see each other in this model, or None. transformers isolates packed documents
    by a block-diagonal mask built from position ids; DeepSeek-V4's compressed attention (CSA / HCA) ignores it:
    its compressor pools windows counted from the start of the row, so a packed document attends to compressed
    windows of the one before it (measured: logits of a document moved by 0.1 when packed after another)."""
    types = set(getattr(hf_config, "layer_types", None) or [])
    compressed = types & {"compressed_sparse_attention", "heavily_compressed_attention"}
    if hf_config.model_type == "deepseek_v4" and compressed:
        return (f"its {' and '.join(sorted(compressed))} layers compress windows counted from the start of a row, "
                f"across the packed documents' boundaries")
    return None


@functools.lru_cache(maxsize=16)
def _meta_model(hf_path: str | None, hf_config: str | None, slots: int | None) -> HFMoEModel:
    """The model on the meta device, `slots` expert slots per layer (None: every expert)."""
    m = ModelConfig(hf_path=hf_path, hf_config=hf_config)
    return _meta_expert_parallel(m, None if slots is None else range(slots))[2]


def hf_shapes(m: ModelConfig, slots: int) -> tuple[list, list]:
    """(dense, expert) parameters of one device's model, (name, shape), as planner._shapes gives the native
    model's: experts [El, 2F, D] / [El, D, F]."""
    model = _meta_model(m.hf_path, m.hf_config, slots)
    return ([(n, tuple(p.shape)) for n, p in model.dense_parameters()],
            [(n, tuple(p.shape)) for n, p in model.expert_parameters()])


def hf_counts(m: ModelConfig) -> dict[str, int]:
    """Total, routed-expert and activated (per token: dense + top_k experts per layer) parameter counts, and
    whether the head is tied to the embedding (counted once)."""
    model = _meta_model(m.hf_path, m.hf_config, None)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for _, p in model.expert_parameters())
    E = max(1, m.num_experts)
    return {"total": total, "experts": experts, "activated": total - experts + experts // E * m.top_k,
            "tied": bool(getattr(model.hf_config, "tie_word_embeddings", False))}


def router_logits_recorder(hf: nn.Module) -> tuple[type, int] | None:
    """(router class, index of the logits in its output) when the model's class computes a router auxiliary loss
    (its module defines load_balancing_loss_func and it records router logits), else None."""
    import sys

    recorder = (getattr(hf, "_can_record_outputs", None) or {}).get("router_logits")
    module = sys.modules.get(type(hf).__module__)
    if recorder is None or not hasattr(module, "load_balancing_loss_func"):
        return None
    return recorder.target_class, recorder.index or 0
