"""`validate`: every section's checks, the checks across sections, then the idle-key rules, in that order (the
first bad value is the error; idle keys are all named in one)."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config.balance import _validate_balance
from orchestrator.config.base import ConfigError, _choice, _positive
from orchestrator.config.data import _validate_tokens
from orchestrator.config.faults import _validate_faults
from orchestrator.config.idle import _Keys, _refuse_idle_keys
from orchestrator.config.mesh import _validate_mesh
from orchestrator.config.model import Describer, _resolve_hf_model, _validate_attention
from orchestrator.config.monitor import _validate_monitor
from orchestrator.config.rl import _validate_rl
from orchestrator.config.schema import Config
from orchestrator.config.train import _validate_run


def validate(cfg: Config, user_keys: frozenset[str] | None = None, describe: Describer | None = None) -> list[str]:
    """Check everything that would otherwise fail inside an actor. `user_keys`: the dotted keys the user set
    (None: every key counts as set by the user). `describe`: what a transformers model is (model/hf.py
    hf_summary; None: the one bound by orchestrator/__init__.py). Returns the defaults resolved to what applies,
    one line each (the caller logs them). Raises ConfigError: the first bad value, or every key set by the user
    that has no effect under the chosen options, all in one message."""
    m = cfg.model
    keys = _Keys(user_keys)
    if m.hf_path or m.hf_config:
        _resolve_hf_model(cfg, keys, describe)
    _validate_values(cfg)
    _validate_mesh(cfg)
    _validate_attention(cfg, keys)
    _validate_shapes(cfg)
    _validate_tokens(cfg, keys)
    if cfg.balance.router_aux_loss_coeff and not (m.hf_path or m.hf_config):
        raise ConfigError(f"balance.router_aux_loss_coeff={cfg.balance.router_aux_loss_coeff} is a transformers "
                          f"model's own loss (model.hf_path / model.hf_config); the native model's Switch loss is "
                          f"balance.aux_loss_coeff")
    _validate_balance(cfg)
    _validate_faults(cfg)
    _validate_run(cfg)
    _validate_monitor(cfg)
    if cfg.data.task == "rl":
        _validate_rl(cfg)
    if cfg.train.eval_every and not cfg.train.eval_batches:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs train.eval_batches > 0 (batches scored each time)")
    if cfg.cluster.backend == "nccl" and not cfg.cluster.use_gpu:
        raise ConfigError("cluster.backend='nccl' needs cluster.use_gpu=true (nccl runs on GPUs only)")
    _refuse_idle_keys(cfg, keys)
    keys.raise_refused()
    return keys.resolved


def _validate_values(cfg: Config) -> None:
    """Each value on its own: signs and choices."""
    m, t, c = cfg.model, cfg.train, cfg.cluster
    _positive(cfg, ["model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.max_seq_len",
                    "model.num_experts", "model.top_k", "model.expert_dim", "model.dense_dim",
                    "model.rope_theta", "model.norm_eps", "model.init_std", "model.route_scale",
                    "model.sandwich_attn_scale", "model.sandwich_ffn_scale", "model.tiny_init_embed_std",
                    "data.seq_len", "train.steps", "train.global_batch_size", "train.lr",
                    "cluster.num_devices", "cluster.cpus_per_device", "cluster.start_timeout_s",
                    "cluster.step_timeout_s", "cluster.collective_timeout_s"])
    _positive(cfg, ["model.num_shared_experts", "model.first_k_dense", "model.swiglu_limit", "train.warmup_steps",
                    "train.weight_decay", "train.grad_clip", "train.eval_batches", "data.max_bytes",
                    "cluster.torch_threads", "checkpoint.every_steps", "checkpoint.keep_last",
                    "checkpoint.keep_every"], allow_zero=True)
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} must be zero or more")
    _choice("model.score_func", m.score_func, ("softmax", "sigmoid", "sqrtsoftplus"))
    _choice("model.norm", m.norm, ("pre", "sandwich"))
    _choice("model.init", m.init, ("gpt2", "tiny"))
    _choice("data.format", cfg.data.format, ("auto", "text", "bin"))
    _choice("train.dtype", t.dtype, ("float32", "float64"))
    _choice("train.mixed_precision", t.mixed_precision, ("auto", "bf16", "none"))
    if t.mixed_precision == "bf16" and t.dtype == "float64":
        raise ConfigError("train.mixed_precision='bf16' with train.dtype='float64': float64 runs are the exact "
                          "reference; use train.dtype=float32 for bf16 autocast, or train.mixed_precision=none")
    if not 0.0 < c.gpus_per_device <= 1.0:
        raise ConfigError(f"cluster.gpus_per_device={c.gpus_per_device} must be in (0, 1]: 1 gives every device a "
                          f"GPU of its own, a fraction lets several devices share one (a device uses one GPU)")
    _choice("cluster.placement_strategy", c.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _choice("cluster.backend", c.backend, ("auto", "gloo", "nccl"))
    _choice("run.progress", cfg.run.progress, ("auto", "bar", "lines", "quiet"))
    if m.top_k > m.num_experts:
        raise ConfigError(f"model.top_k={m.top_k} is larger than model.num_experts={m.num_experts}; "
                          f"a token cannot choose more experts than exist: lower model.top_k")


def _validate_mtp(cfg: Config) -> None:
    """model.mtp_depth / mtp_weight (model/mtp.py): the native model's pretraining only."""
    m = cfg.model
    if m.mtp_depth < 0 or m.mtp_weight < 0:
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} and model.mtp_weight={m.mtp_weight} must be zero or more")
    if not m.mtp_depth:
        return
    if m.hf_path or m.hf_config:
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} is the native model's multi-token prediction; a transformers "
                          f"model (model.hf_path / model.hf_config) has none here: remove model.mtp_depth")
    if cfg.data.task != "pretrain":
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} with data.task={cfg.data.task!r}: multi-token prediction "
                          f"trains on pretraining rows only (data.task=pretrain); remove model.mtp_depth")
    if m.mtp_depth >= cfg.data.seq_len:
        raise ConfigError(f"model.mtp_depth={m.mtp_depth} must be below data.seq_len={cfg.data.seq_len} (depth k "
                          f"predicts seq_len - k tokens of each row)")


def _validate_shapes(cfg: Config) -> None:
    """What the model, the batch and the data must agree on."""
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.cluster
    if t.global_batch_size % c.num_devices:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by cluster.num_devices="
                          f"{c.num_devices}; each device takes an equal slice of the global batch")
    if not (m.hf_path or m.hf_config) and m.attention == "mha" and (m.dim % m.n_heads or (m.dim // m.n_heads) % 2):
        raise ConfigError(f"model.dim={m.dim} must split into model.n_heads={m.n_heads} heads of even size (for RoPE)")
    if m.first_k_dense > m.n_layers:
        raise ConfigError(f"model.first_k_dense={m.first_k_dense} exceeds model.n_layers={m.n_layers}")
    _validate_mtp(cfg)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be between 0 and 1 (exclusive)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be between 0 and 1")
    if d.path is not None and not Path(d.path).expanduser().exists():
        raise ConfigError(f"data.path={d.path!r} does not exist; give a text file, a folder of text files or a "
                          f"uint16 .bin token file, or leave data.path unset for the embedded stdlib corpus")
    if d.format == "bin" and d.path is None:
        raise ConfigError("data.format='bin' needs data.path pointing to a uint16 token file")
