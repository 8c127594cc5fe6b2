"""The model section: the native MoE transformer's architecture, or a Hugging Face MoE model whose own config
gives it. The facts of a transformers model (its config.json and a meta-device build: orchestrator/model/hf.py
`hf_summary`) come from the model layer, which sits above config and is not imported here: a describer is bound
into `describe_hf_model` by orchestrator/__init__.py (the composition root), or handed to `validate`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from orchestrator.config.balance import BalanceConfig
from orchestrator.config.base import ConfigError, Root, _Keys, _default_of


# ModelConfig -> what the rest of a run reads of a transformers model (keys: those of model/hf.py hf_summary).
Describer = Callable[["ModelConfig"], dict[str, Any]]
_describer: Describer | None = None


def describe_hf_models_with(describer: Describer) -> None:
    """Bind the function that describes a transformers model (orchestrator/__init__.py binds model/hf.py's)."""
    global _describer
    _describer = describer


def describe_hf_model(m: "ModelConfig", describer: Describer | None = None) -> dict[str, Any]:
    describer = describer or _describer
    if describer is None:
        raise RuntimeError("no describer of transformers models is bound (orchestrator/__init__.py binds "
                           "orchestrator.model.hf.hf_summary); pass validate(..., describe=hf_summary)")
    return describer(m)


@dataclass
class ModelConfig:
    vocab_size: int = 256          # byte-level tokens by default
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256         # RoPE table length; data.seq_len must fit
    num_experts: int = 8           # routed experts per MoE layer
    top_k: int = 2
    expert_dim: int = 128          # hidden size of one routed SwiGLU expert
    num_shared_experts: int = 1    # 0 disables the shared expert; n>0 gives hidden n*expert_dim
    score_func: str = "softmax"    # softmax | sigmoid | sqrtsoftplus (DeepSeek-V4: sqrt(softplus(logit)))
    norm_topk_prob: bool = True    # renormalise the k gate values to sum to 1
    route_scale: float = 1.0
    first_k_dense: int = 1         # the first k layers use a dense SwiGLU instead of MoE
    dense_dim: int = 256           # hidden size of those dense layers
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Stable-training options (model/transformer.py; formulas and sources in its docstrings):
    norm: str = "pre"              # pre (pre-norm) | sandwich (Pangu Ultra's depth-scaled sandwich-norm, DSSN: each
                                   # sub-layer's output is normalised too before the residual add)
    sandwich_attn_scale: float = 0.283  # DSSN: the attention output norm's scale starts at this / sqrt(n_layers)
    sandwich_ffn_scale: float = 0.432   # DSSN: the FFN output norm's scale starts at this / sqrt(n_layers) (Pangu
                                        # Ultra's values, read from a summary of the paper, not the paper: a config value)
    init: str = "gpt2"             # gpt2 (Normal(0, init_std), output projections / sqrt(2 n_layers)) | tiny (Pangu
                                   # Ultra's TinyInit: every matrix Normal(0, sqrt(1 / (2 dim n_layers))))
    tiny_init_embed_std: float = 0.5  # TinyInit: the embedding's std (Pangu Ultra: 0.5; also the head when tied)
    swiglu_limit: float = 0.0      # 0: off; else the experts' (routed and shared) SwiGLU clamps its gate
                                   # pre-activation to <= limit and its linear part to [-limit, limit] (DeepSeek-V4: 10)
    # Attention: mha (multi-head, q/k/v/o of dim x dim) | mla (multi-head latent attention, DeepSeek-V2/V3:
    # model/mla.py; the keys below shape it, n_heads heads; plain RoPE with rope_theta, no YaRN)
    attention: str = "mha"
    q_lora_rank: int = 0           # mla: rank of the query compression; 0 = one query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64         # mla: rank of the compressed key/value latent (RMSNorm, eps 1e-6, on it)
    qk_nope_head_dim: int = 32     # mla: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 16     # mla: per-head query/key dims with RoPE (the key part shared by all heads); even
    v_head_dim: int = 32           # mla: per-head value dim (wo reads n_heads * v_head_dim)
    # Multi-token prediction (DeepSeek-V3 §2.2, model/mtp.py): D extra modules after the main model, module k
    # predicting the token k+1 ahead from module k-1's hidden state and the embedding of token i+k (one MoE block
    # each, or a dense one when the model has no MoE layer; embedding and head shared). Pretraining only.
    mtp_depth: int = 0             # D: the number of MTP modules; 0 turns MTP off
    mtp_weight: float = 0.3        # lambda: the training loss adds lambda/D times the sum of the depths' mean CE
                                   # (DeepSeek-V3 §4.2: 0.3 for the first 10T tokens, then 0.1)
    # A Hugging Face MoE model instead of the native one (model/hf.py): a local directory with config.json and
    # *.safetensors, or a config.json file (fresh weights from the seed). The model's own config then gives
    # vocab_size, dim, n_layers, max_seq_len, num_experts, top_k and first_k_dense (its dense layers' count)
    # (filled in by validate); the native architecture keys above do nothing.
    hf_path: Optional[str] = None
    hf_config: Optional[str] = None


# Native architecture keys a Hugging Face model's own config replaces (model/hf.py reads none of them).
_NATIVE_ONLY = ("n_heads", "expert_dim", "num_shared_experts", "score_func", "norm_topk_prob", "route_scale",
                "dense_dim", "tie_embeddings", "rope_theta", "norm_eps", "init_std", "norm", "sandwich_attn_scale",
                "sandwich_ffn_scale", "init", "tiny_init_embed_std", "swiglu_limit", "attention",
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _validate_attention(cfg: Root, keys: _Keys) -> None:
    """model.attention and its MLA keys (model/mla.py): the MLA keys are refused with attention=mha (no code
    reads them), and must give non-empty heads with an even RoPE part under attention=mla."""
    m = cfg.model
    if m.attention not in ("mha", "mla"):
        raise ConfigError(f"model.attention={m.attention!r} is not one of mha, mla")
    if m.attention == "mha":
        keys.section(cfg, "model", _MLA_KEYS, "with model.attention='mha' (only multi-head latent attention reads "
                                             "it): remove it, or set model.attention=mla")
        return
    for name in _MLA_KEYS:   # q_lora_rank 0: no query compression; qk_nope_head_dim 0: RoPE-only heads
        value, zero_ok = getattr(m, name), name in ("q_lora_rank", "qk_nope_head_dim")
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"model.{name}={value} must be {'zero or more' if zero_ok else 'positive'} with "
                              f"model.attention=mla")
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (RoPE rotates pairs)")


def mtp_moe_layers(m: ModelConfig) -> int:
    """How many MoE layers the MTP modules add (model/mtp.py): one each, unless the main model has no MoE layer
    (then their blocks are dense)."""
    return m.mtp_depth if m.n_layers > m.first_k_dense else 0


# first_k_dense: how many of its layers are dense (n_layers minus its MoE layers: what the balancer counts)
_FROM_HF = ("vocab_size", "dim", "n_layers", "max_seq_len", "num_experts", "top_k", "first_k_dense")


def _resolve_hf_model(cfg: Root, keys: _Keys, describe: Describer | None = None) -> None:
    """model.hf_path / model.hf_config: read the model's config (transformers, locally), check that its experts
    can be sharded, and fill the model keys the rest of the run reads from it. Refuses what does not apply to
    a transformers model yet, naming the key."""
    m, b = cfg.model, cfg.balance
    if m.hf_path and m.hf_config:
        raise ConfigError(f"model.hf_path={m.hf_path!r} and model.hf_config={m.hf_config!r} are both set: hf_path "
                          f"loads a checkpoint (its config.json included), hf_config starts fresh weights; set one")
    key = "model.hf_path" if m.hf_path else "model.hf_config"
    info = describe_hf_model(m, describe)
    for name in _NATIVE_ONLY + _FROM_HF:   # (a value equal to the model's own passes: validate runs again on it)
        if getattr(m, name) != info.get(name, _default_of(ModelConfig, name)):
            keys.check(m, name, f"model.{name}", _default_of(ModelConfig, name),
                       f"model.{name}={getattr(m, name)!r} has no effect with {key}: the Hugging Face config defines "
                       f"the architecture ({info['class']}); remove it (or change its config.json)",
                       f"{info['class']}'s config.json defines the architecture")
    for name in _FROM_HF:
        setattr(m, name, info[name])
    # What the transformers path does not do (yet): the model's router is its own; recomputation is the native
    # block's. The project's balancing losses are computed from each router's logits (model/hf.py ROUTER_SCORES).
    for name, why in (("routing", "the model's own router picks experts (group-limited top-k, hash routing: as "
                                  "its config says)"),
                      ("capacity_factor", "a transformers model routes dropless")):
        keys.check(b, name, f"balance.{name}", _default_of(BalanceConfig, name),
                   f"balance.{name}={getattr(b, name)!r} does not apply with {key}: {why}; remove it",
                   f"with {key}: {why}")
    unscored = [r for r in info.get("routers", []) if r not in info.get("scored", [])]
    if unscored and (b.aux_loss_coeff or b.seq_aux_loss_coeff or b.z_loss_coeff):
        raise ConfigError(f"balance.aux_loss_coeff / seq_aux_loss_coeff / z_loss_coeff with {key}: this project does "
                          f"not know how {', '.join(unscored)} scores its experts (model/hf.py ROUTER_SCORES); set "
                          f"them to 0 (balance.router_aux_loss_coeff is the model's own loss)")
    if not info["router_aux_loss"]:
        keys.check(b, "router_aux_loss_coeff", "balance.router_aux_loss_coeff", 0.0,
                   f"balance.router_aux_loss_coeff={b.router_aux_loss_coeff}: {info['class']} computes no router "
                   f"auxiliary loss (its transformers module has no load_balancing_loss_func): remove it",
                   f"{info['class']} computes no router auxiliary loss")
    if b.router_aux_loss_coeff and cfg.train.micro_batches > 1:
        raise ConfigError(f"balance.router_aux_loss_coeff with train.micro_batches={cfg.train.micro_batches}: the loss "
                          f"weighs each expert by its share of the whole step's routed copies, known only after the "
                          f"last micro-batch's forward; set train.micro_batches=1 (or use balance.bias_update_speed)")
    if not info["correction_bias"]:
        keys.check(b, "bias_update_speed", "balance.bias_update_speed", 0.0,
                   f"balance.bias_update_speed={b.bias_update_speed} needs routers with a correction bias "
                   f"(e_score_correction_bias, as DeepSeek-V3/V4 have); {info['class']} has none: remove it",
                   f"{info['class']}'s routers have no correction bias to move")
    if cfg.data.pack and info["packing_leaks"]:
        raise ConfigError(f"data.pack=true with {info['class']}: packed samples would see each other, "
                          f"{info['packing_leaks']}; set data.pack=false (one sample per row)")
    if cfg.memory.activation_checkpointing == "selective":
        raise ConfigError(f"memory.activation_checkpointing='selective' is the native block's (its regions cut "
                          f"inside the block); with {key} each decoder layer is recomputed whole: set full or none")
