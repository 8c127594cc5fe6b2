"""Which Hugging Face transformers model the native MoE transformer is, and its state under that model's names.
(hf_export.py writes it as a transformers model folder: `python -m orchestrator export CHECKPOINT --hf OUT`.)

Which transformers class the native model *is* depends on its settings (every one checked against the
transformers 5 source: modeling_mixtral.py, modeling_ernie4_5_moe.py, modeling_glm4_moe.py, modeling_qwen2_moe.py):

  score_func  shared experts / dense layers / router bias   routing           gate                     class
  softmax     none / first_k_dense=0 / none                 topk              renormalised, top_k > 1   Mixtral
  softmax     any  / any / expert_bias (aux-loss-free)      topk              renormalised, top_k > 1   ERNIE-4.5-MoE
  softmax     none / any / none                             topk              raw softmax (top_k = 1 or Qwen2-MoE
                                                                              norm_topk_prob=false)
  sigmoid     any  / any / expert_bias                      topk or           either, x route_scale     GLM-4-MoE
                                                            group_limited

What is the same everywhere: pre-norm blocks with RMSNorm (eps inside the square root, weight after), bias-free
q/k/v/o with as many key/value heads as query heads, scaled dot-product attention with 1/sqrt(head_dim), SwiGLU
experts (silu(x W1^T) * (x W3^T)) W2^T, the shared expert added to the routed sum, a final RMSNorm and a bias-free
head (tied or not).

RoPE. The native attention rotates the interleaved pairs (x[2i], x[2i+1]) by position * theta^(-2i/Dh). ERNIE-4.5
rotates the same pairs (its rotate_half is the interleaved one): its q/k weights are copied as they are. Mixtral,
Qwen2-MoE and GLM-4-MoE rotate (x[i], x[i + Dh/2]) ("rotate half") by the same frequency: the export permutes the
rows of each head of wq and wk, head dim [0, 2, 4, ..., 1, 3, 5, ...], so that HF's pair i is the native pair i.
Attention scores are dot products over the head dim, which one permutation applied to q and k leaves unchanged; v
and o are untouched. The logits are then the native logits.

The native settings with no transformers equivalent are refused with a ConfigError naming the key (`hf_config_for`):
softmax scores with model.route_scale != 1 or with group-limited routing, MoGE routing (balance.routing=grouped),
softmax with unnormalised gates and shared experts or a router bias, model.attention=mla (not mapped to
DeepseekV3's names yet), balance.capacity_factor (no transformers MoE
drops token copies; `dropless=True` / --dropless exports the dropless forward on purpose). DeepSeek-V3 (and V2) in
transformers uses multi-head latent attention (a low-rank kv projection with an RMSNorm on the latent, and one RoPE
key shared by all heads): no setting turns it into plain multi-head attention, so DeepseekV3Config is never the
target; GLM-4-MoE has DeepSeek-V3's router (sigmoid, e_score_correction_bias, n_group/topk_group, top-2 group score,
routed_scaling_factor, first_k_dense_replace) with plain attention, which is the native model's.

Numerics: the HF classes compute RMSNorm, the RoPE tables and the router's scores in float32 whatever the model
dtype; the native model keeps float64 in float64. In float32 the two agree to rounding (logits ~1e-6 apart); a
float64 model agrees to float32 rounding only (~3e-7), and loads with experts_implementation="eager" (transformers'
default grouped_mm experts call torch's grouped_mm, which has no float64).

Multi-token prediction (model.mtp_depth, model/mtp.py): none of these classes has MTP modules, and they are a
training aid of the main model (DeepSeek-V3 §2.2: "can be discarded" at inference); the export leaves the `mtp.*`
tensors out, with a logged note. The exported model is the main model exactly.

A Hugging Face model trained here (model.hf_path / model.hf_config) is not the native model (`is_hf_model`): its
parameters already have the transformers names (hf_export.py's `export_hf_checkpoint`).

transformers is imported lazily: this module imports without it; the functions that need it say how to install it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch

from orchestrator.config import BalanceConfig, ConfigError, ModelConfig
from orchestrator.errors import RunError

MIXTRAL, ERNIE, QWEN2_MOE, GLM4_MOE = "mixtral", "ernie4_5_moe", "qwen2_moe", "glm4_moe"
CLASS_NAMES = {MIXTRAL: "MixtralForCausalLM", ERNIE: "Ernie4_5_MoeForCausalLM", QWEN2_MOE: "Qwen2MoeForCausalLM",
               GLM4_MOE: "Glm4MoeForCausalLM"}
CONFIG_NAMES = {MIXTRAL: "MixtralConfig", ERNIE: "Ernie4_5_MoeConfig", QWEN2_MOE: "Qwen2MoeConfig",
                GLM4_MOE: "Glm4MoeConfig"}
ROTATE_HALF = {MIXTRAL, QWEN2_MOE, GLM4_MOE}   # HF RoPE on (x[i], x[i + Dh/2]): q/k rows permuted on export

# The ModelConfig keys this module maps. A key added to ModelConfig later and set away from its default is refused
# (its effect on the forward is unknown here) instead of being silently dropped.
_MAPPED_MODEL_KEYS = {"vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "num_experts", "top_k", "expert_dim",
                      "num_shared_experts", "score_func", "norm_topk_prob", "route_scale", "first_k_dense",
                      "dense_dim", "tie_embeddings", "rope_theta", "norm_eps", "init_std",
                      "init", "tiny_init_embed_std"}   # (how weights start: not the function the export maps)
_MAPPED_MODEL_KEYS |= {"mtp_depth", "mtp_weight"}   # the MTP modules are left out (module docstring)
HF_MODEL_KEYS = ("hf_path", "hf_config")   # a Hugging Face model trained here (not native): export_hf_checkpoint
log = logging.getLogger(__name__)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RunError("exporting to Hugging Face needs the transformers package: pip install 'transformers>=5'") from None
    return transformers


def is_hf_model(model_cfg: Any) -> bool:
    """Does the model config describe a Hugging Face model trained here (model.hf_path / model.hf_config set)?"""
    get = model_cfg.get if isinstance(model_cfg, Mapping) else (lambda k, d=None: getattr(model_cfg, k, d))
    return any(get(k) not in (None, "", {}) for k in HF_MODEL_KEYS)


# --------------------------------------------------------------------------- which architecture
def hf_architecture(model_cfg: ModelConfig, balance_cfg: BalanceConfig | None = None, dropless: bool = False) -> str:
    """The transformers model_type the native settings equal (see the module docstring), or a ConfigError naming
    the setting that has no equivalent and the settings that export."""
    m, b = model_cfg, balance_cfg or BalanceConfig()
    routing = _exportable_routing(m, b, dropless)
    if m.score_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"model.score_func={m.score_func!r}: none of the transformers classes with this attention "
                          f"(Mixtral, ERNIE-4.5-MoE, Qwen2-MoE, GLM-4-MoE) scores experts this way (DeepSeek-V4 does, "
                          f"with its own attention); models trained with softmax or sigmoid scores export")
    gates_normalised = m.norm_topk_prob and m.top_k > 1   # the native router renormalises only for top_k > 1
    if m.score_func == "sigmoid":
        if m.num_experts < 2:
            raise ConfigError(f"model.num_experts={m.num_experts}: GLM-4-MoE (the transformers class for sigmoid "
                              f"routing) scores its expert group(s) by their two best experts: it needs at least 2")
        if routing == "group_limited" and m.num_experts // b.num_groups < 2:
            raise ConfigError(f"balance.num_groups={b.num_groups} with model.num_experts={m.num_experts}: one expert "
                              f"per group; GLM-4-MoE scores a group by its two best experts, so it needs at least 2 "
                              f"experts per group (the native router then uses the single score)")
        return GLM4_MOE
    if m.route_scale != 1.0:
        raise ConfigError(f"model.route_scale={m.route_scale} with model.score_func='softmax': none of the transformers "
                          f"classes with softmax scores and this attention (Mixtral, ERNIE-4.5-MoE, Qwen2-MoE) scales "
                          f"its gates; set model.route_scale=1 (Mixtral / ERNIE-4.5-MoE / "
                          f"Qwen2-MoE), or model.score_func=sigmoid (GLM-4-MoE has routed_scaling_factor)")
    if routing == "group_limited":
        raise ConfigError(f"balance.routing='group_limited' (balance.num_groups={b.num_groups}) with "
                          f"model.score_func='softmax': with plain multi-head attention, transformers has group-limited "
                          f"routing only for sigmoid scores (GLM-4-MoE); set balance.routing=topk, or "
                          f"model.score_func=sigmoid")
    if not gates_normalised:
        why = "top_k=1" if m.top_k == 1 else "norm_topk_prob=false"
        if m.num_shared_experts:
            raise ConfigError(f"model.num_shared_experts={m.num_shared_experts} with softmax gates that are not "
                              f"renormalised (model.{why}): the only transformers MoE with such gates, Qwen2-MoE, "
                              f"scales its shared expert by a learned sigmoid gate; set model.num_shared_experts=0 "
                              f"(Qwen2-MoE), or model.norm_topk_prob=true with model.top_k>1 (ERNIE-4.5-MoE)")
        if b.bias_update_speed:
            raise ConfigError(f"balance.bias_update_speed={b.bias_update_speed} (a router bias) with softmax gates "
                              f"that are not renormalised (model.{why}): Qwen2-MoE has no router bias; set "
                              f"balance.bias_update_speed=0, or model.norm_topk_prob=true with model.top_k>1 "
                              f"(ERNIE-4.5-MoE)")
        return QWEN2_MOE
    if m.num_shared_experts == 0 and m.first_k_dense == 0 and not b.bias_update_speed:
        return MIXTRAL
    return ERNIE


def _exportable_routing(m: ModelConfig, b: BalanceConfig, dropless: bool) -> str:
    """The routing the export sees (one group: plain top-k), after the refusals every class shares: a Hugging Face
    model, a model setting the export does not map, dropping by capacity (unless `dropless`), grouped routing."""
    if is_hf_model(m):
        raise ConfigError("model.hf_path/model.hf_config: this is a Hugging Face model, not the native one; its "
                          "parameters already have the transformers names (export_hf_checkpoint)")
    if m.attention != "mha":
        raise ConfigError(f"model.attention={m.attention!r}: the Hugging Face export maps plain multi-head attention "
                          f"only; multi-head latent attention (DeepseekV3's) is not mapped yet (its weights keep the "
                          f"native names: model/mla.py lists transformers' for each)")
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MAPPED_MODEL_KEYS and f.name not in HF_MODEL_KEYS \
                and getattr(m, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"model.{f.name}={getattr(m, f.name)!r}: the Hugging Face export does not know this "
                              f"setting (orchestrator/checkpoint/hf_mapping.py maps {', '.join(sorted(_MAPPED_MODEL_KEYS))})"
                              f"; leave it at its default {getattr(defaults, f.name)!r} to export")
    if b.capacity_factor and not dropless:
        raise ConfigError(f"balance.capacity_factor={b.capacity_factor}: the native forward drops routed token copies "
                          f"over an expert's capacity and no transformers MoE does; export the dropless model on "
                          f"purpose with --dropless (export_native(..., dropless=True)): it then equals the native "
                          f"model with balance.capacity_factor=0")
    routing = "topk" if b.num_groups == 1 else b.routing   # one group: grouped and group_limited are plain top-k
    if routing == "grouped":
        raise ConfigError(f"balance.routing='grouped' (MoGE: top_k/num_groups experts from each of "
                          f"balance.num_groups={b.num_groups} groups) has no transformers equivalent; models trained "
                          f"with balance.routing=topk (or group_limited with model.score_func=sigmoid) export")
    return routing


def hf_config_for(model_cfg: ModelConfig, balance_cfg: BalanceConfig | None = None, *, dropless: bool = False,
                  dtype: str | torch.dtype | None = None):
    """The transformers config (MixtralConfig, Ernie4_5_MoeConfig, Qwen2MoeConfig or Glm4MoeConfig) whose model
    computes the native model's function; ConfigError for settings without an equivalent (see hf_architecture)."""
    arch = hf_architecture(model_cfg, balance_cfg, dropless)
    tf = _transformers()
    m, b = model_cfg, balance_cfg or BalanceConfig()
    common: dict[str, Any] = dict(
        vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads, hidden_act="silu", max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # byte-level: no special tokens; a pad id would
        attention_dropout=0.0)                                    # also zero that row's embedding gradient
    gates_normalised = m.norm_topk_prob and m.top_k > 1
    if arch == MIXTRAL:
        cfg = tf.MixtralConfig(**common, intermediate_size=m.expert_dim, num_local_experts=m.num_experts,
                               num_experts_per_tok=m.top_k, sliding_window=None, router_jitter_noise=0.0)
    elif arch == ERNIE:
        cfg = tf.Ernie4_5_MoeConfig(**common, intermediate_size=m.dense_dim, moe_intermediate_size=m.expert_dim,
                                    moe_num_experts=m.num_experts, moe_k=m.top_k,
                                    moe_num_shared_experts=m.num_shared_experts, moe_layer_start_index=m.first_k_dense,
                                    moe_layer_end_index=m.n_layers - 1, moe_layer_interval=1, use_bias=False,
                                    moe_norm_min=1e-20)  # max(sum, 1e-20) vs native sum + 1e-20: equal for sums > 1e-13
    elif arch == QWEN2_MOE:
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=m.dense_dim, moe_intermediate_size=m.expert_dim,
                                num_experts=m.num_experts, num_experts_per_tok=m.top_k, norm_topk_prob=gates_normalised,
                                shared_expert_intermediate_size=0,   # no shared expert: it and its gate give 0
                                decoder_sparse_step=1, mlp_only_layers=list(range(m.first_k_dense)), qkv_bias=False,
                                use_sliding_window=False)
    else:
        grouped = b.num_groups > 1 and b.routing == "group_limited"
        cfg = tf.Glm4MoeConfig(**{**common, "rope_parameters": {**common["rope_parameters"],
                                                                "partial_rotary_factor": 1.0}},
                               partial_rotary_factor=1.0, intermediate_size=m.dense_dim,
                               moe_intermediate_size=m.expert_dim, n_routed_experts=m.num_experts,
                               num_experts_per_tok=m.top_k, n_shared_experts=m.num_shared_experts,
                               first_k_dense_replace=m.first_k_dense, routed_scaling_factor=float(m.route_scale),
                               n_group=b.num_groups if grouped else 1, topk_group=b.topk_groups if grouped else 1,
                               norm_topk_prob=gates_normalised, use_qk_norm=False, attention_bias=False,
                               num_mtp_layers=0)
    cfg.architectures = [CLASS_NAMES[arch]]
    if dtype is not None:
        cfg.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    return cfg


# --------------------------------------------------------------------------- weights
def _rope_perm(head_dim: int) -> torch.Tensor:
    """HF rotate-half position j of a head <- native interleaved position perm[j]."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(w: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    rows = w.unflatten(0, (n_heads, -1))
    return rows[:, perm].flatten(0, 1)


def _name_map(m: ModelConfig, arch: str) -> dict[str, str]:
    """Native parameter/buffer name -> HF name, for every name but the fused experts (see native_to_hf_state)."""
    out = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not m.tie_embeddings:
        out["head.weight"] = "lm_head.weight"
    shared = "shared_experts" if arch in (ERNIE, GLM4_MOE) else None
    for i in range(m.n_layers):
        n, h = f"layers.{i}", f"model.layers.{i}"
        out.update({f"{n}.attn_norm.weight": f"{h}.input_layernorm.weight",
                    f"{n}.ffn_norm.weight": f"{h}.post_attention_layernorm.weight"})
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{n}.attn.{a}.weight"] = f"{h}.self_attn.{b}.weight"
        if i < m.first_k_dense:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{n}.ffn.{a}.weight"] = f"{h}.mlp.{b}.weight"
            continue
        out[f"{n}.ffn.router.gate.weight"] = f"{h}.mlp.gate.weight"
        if arch == ERNIE:
            out[f"{n}.ffn.router.expert_bias"] = f"{h}.mlp.gate.moe_statics.e_score_correction_bias"
        elif arch == GLM4_MOE:
            out[f"{n}.ffn.router.expert_bias"] = f"{h}.mlp.gate.e_score_correction_bias"
        if m.num_shared_experts and shared:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{n}.ffn.shared.{a}.weight"] = f"{h}.mlp.{shared}.{b}.weight"
    return out


def _native_state(model_or_state: Any, m: ModelConfig) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, torch.nn.Module):
        held = getattr(model_or_state, "expert_ids", None)
        if held is not None and sorted(held) != list(range(m.num_experts)):
            raise ValueError(f"the model holds experts {held} of {m.num_experts} (an expert-parallel slice); export "
                             f"the full model (a checkpoint, or MoETransformer(cfg) with every expert)")
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    return dict(model_or_state)


def native_to_hf_state(model_or_state: Any, model_cfg: ModelConfig, balance_cfg: BalanceConfig | None = None, *,
                       dropless: bool = False) -> dict[str, torch.Tensor]:
    """The transformers state_dict (names and layouts of `hf_config_for`'s class) of a native model or its full state
    dict (experts stacked [E, ...]: tools.full_state_dict of a checkpoint's parameters).

    Fused experts: gate_up_proj [E, 2F, D] = cat(w1_EFD, w3_EFD) on dim 1 (HF chunks it into gate, up in that
    order), down_proj [E, D, F] = w2_EDF. q/k rows permuted per head for rotate-half RoPE (module docstring).
    A tied head gives lm_head.weight = the embedding (it is one tensor in the HF model). Every native tensor must be
    used: an unknown or missing name is an error."""
    m = model_cfg
    arch = hf_architecture(m, balance_cfg, dropless)
    state = _without_mtp(_native_state(model_or_state, m))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    _renamed_tensors(state, m, arch, out, used, missing)
    for i in range(m.first_k_dense, m.n_layers):
        _fused_experts(state, m, arch, i, out, used, missing)
    if missing:
        raise ValueError(f"the native state has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
                         f"not a full state of this model config")
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"native tensors the export does not map: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} (a model of another config?)")
    if m.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _without_mtp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state less its multi-token prediction modules (`mtp.*`: no transformers class here has them), noted."""
    dropped = [k for k in state if k.startswith("mtp.")]
    if dropped:
        depths = len({k.split(".")[1] for k in dropped})
        log.info("export: the %d multi-token prediction module(s) (%d tensors, mtp.*) are left out of the transformers "
                 "model (its class has none, and the main model does not use them); export_native writes them beside "
                 "it in mtp.safetensors", depths, len(dropped))
    return {k: v for k, v in state.items() if not k.startswith("mtp.")}


def _renamed_tensors(state: dict[str, torch.Tensor], m: ModelConfig, arch: str, out: dict[str, torch.Tensor],
                     used: set[str], missing: list[str]) -> None:
    """Into `out`: every tensor of `_name_map` under its transformers name (q/k rows permuted for rotate-half RoPE,
    the router bias in the class's shape and float32); `used` and `missing` note the native names."""
    perm = _rope_perm(m.dim // m.n_heads) if arch in ROTATE_HALF else None
    for native, hf in _name_map(m, arch).items():
        if native not in state:
            missing.append(native)
            continue
        t = state[native]
        used.add(native)
        if perm is not None and native.endswith((".attn.wq.weight", ".attn.wk.weight")):
            t = _permute_heads(t, m.n_heads, perm)
        if hf.endswith("moe_statics.e_score_correction_bias"):
            t = t.reshape(1, -1).float()   # ERNIE keeps it [1, E] in float32
        elif hf.endswith("gate.e_score_correction_bias"):
            t = t.float()
        out[hf] = t.contiguous().clone()


def _fused_experts(state: dict[str, torch.Tensor], m: ModelConfig, arch: str, i: int, out: dict[str, torch.Tensor],
                   used: set[str], missing: list[str]) -> None:
    """Into `out`: MoE layer i's experts fused (gate_up_proj, down_proj) and the zero-width shared expert its class
    may need; a router bias a class without one would lose is an error."""
    n, h = f"layers.{i}.ffn", f"model.layers.{i}.mlp"
    bias = state.get(f"{n}.router.expert_bias")
    if arch in (MIXTRAL, QWEN2_MOE):
        if bias is not None and bool(bias.ne(0).any()):
            raise ConfigError(f"{n}.router.expert_bias is not zero (max |b| {float(bias.abs().max()):.3g}) but "
                              f"the balance settings given have balance.bias_update_speed=0, which exports as "
                              f"{CLASS_NAMES[arch]}, a class without a router bias; give the run's own balance "
                              f"settings (--config): with its bias_update_speed > 0 the model exports as a "
                              f"class that has one (ERNIE-4.5-MoE, GLM-4-MoE)")
        if bias is not None:
            used.add(f"{n}.router.expert_bias")
    try:
        w1, w3, w2 = (state[f"{n}.experts.{w}"] for w in ("w1_EFD", "w3_EFD", "w2_EDF"))
    except KeyError as e:
        missing.append(e.args[0])
        return
    for key, t in ((f"{n}.experts.w1_EFD", w1), (f"{n}.experts.w2_EDF", w2)):
        if t.shape[0] != m.num_experts:
            raise ValueError(f"{key} holds {t.shape[0]} experts, the model {m.num_experts}: assemble every expert "
                             f"first (checkpoint.tools.full_state_dict)")
    used.update(f"{n}.experts.{w}" for w in ("w1_EFD", "w3_EFD", "w2_EDF"))
    out[f"{h}.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1).contiguous()
    out[f"{h}.experts.down_proj"] = w2.contiguous().clone()
    if arch == QWEN2_MOE:   # the shared expert of width 0 and its gate: they add 0 (see hf_config_for)
        out[f"{h}.shared_expert.gate_proj.weight"] = w1.new_zeros(0, m.dim)
        out[f"{h}.shared_expert.up_proj.weight"] = w1.new_zeros(0, m.dim)
        out[f"{h}.shared_expert.down_proj.weight"] = w1.new_zeros(m.dim, 0)
        out[f"{h}.shared_expert_gate.weight"] = w1.new_zeros(1, m.dim)
    elif arch == GLM4_MOE and not m.num_shared_experts:   # GLM-4-MoE always has one: width 0, adds 0
        out[f"{h}.shared_experts.gate_proj.weight"] = w1.new_zeros(0, m.dim)
        out[f"{h}.shared_experts.up_proj.weight"] = w1.new_zeros(0, m.dim)
        out[f"{h}.shared_experts.down_proj.weight"] = w1.new_zeros(m.dim, 0)


def hf_to_native_state(hf_state: Mapping[str, torch.Tensor], model_cfg: ModelConfig,
                       balance_cfg: BalanceConfig | None = None, *, dropless: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of native_to_hf_state (the same names, layouts and q/k permutation undone): loads into
    MoETransformer(model_cfg); also maps HF gradients back to native names. Tensors HF has and the native model not
    (Qwen2-MoE's and GLM-4-MoE's zero-width shared expert, a tied lm_head) are left out; missing ones (a gradient
    of a parameter that got none, the frozen ERNIE bias) are left out too."""
    m = model_cfg
    arch = hf_architecture(m, balance_cfg, dropless)
    names = _name_map(m, arch)
    perm = _rope_perm(m.dim // m.n_heads) if arch in ROTATE_HALF else None
    inv = torch.argsort(perm) if perm is not None else None
    out: dict[str, torch.Tensor] = {}
    for native, hf in names.items():
        t = hf_state.get(hf)
        if t is None:
            continue
        if inv is not None and native.endswith((".attn.wq.weight", ".attn.wk.weight")):
            t = _permute_heads(t, m.n_heads, inv)
        if native.endswith("router.expert_bias"):
            t = t.reshape(-1)
        out[native] = t
    F = m.expert_dim
    for i in range(m.first_k_dense, m.n_layers):
        n, h = f"layers.{i}.ffn", f"model.layers.{i}.mlp"
        if f"{h}.experts.gate_up_proj" in hf_state:
            gate_up = hf_state[f"{h}.experts.gate_up_proj"]
            out[f"{n}.experts.w1_EFD"], out[f"{n}.experts.w3_EFD"] = gate_up[:, :F], gate_up[:, F:]
        if f"{h}.experts.down_proj" in hf_state:
            out[f"{n}.experts.w2_EDF"] = hf_state[f"{h}.experts.down_proj"]
    return out
