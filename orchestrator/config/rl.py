"""The rl section: reinforcement-learning post-training (GRPO / GSPO / DAPO / Dr. GRPO) with `data.task=rl`.

A step of an RL run: rollouts of `train.global_batch_size * rl.updates_per_rollout / rl.group_size` prompts, G
completions each, sampled by the rollout engines with the policy of the step before; their rewards; the
group-relative advantages; then `rl.updates_per_rollout` optimizer updates of `train.global_batch_size`
completions each (orchestrator/device/rl.py; the loss in orchestrator/model/policy_loss.py). The first
`rl.sft_steps` steps are a supervised warm-up on the task's answers instead.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.config.base import ConfigError, Root, _choice


@dataclass
class RolloutConfig:
    workers: int = 0               # 0: colocated (the device actors generate, time-sharing their resources, as verl's
                                   # hybrid engine); N: a separate pool of N rollout actors on resources of their own
    cpus_per_worker: float = 0.5   # a separate rollout actor's CPUs ...
    gpus_per_worker: float = 0.0   # ... and GPU share
    engine: str = "native"         # native: the project's KV-cached sampler | vllm (GPU, where vLLM is installed)
    dtype: Optional[str] = None    # the rollout's precision (null: train.dtype): float32 | bfloat16 | float64; a
                                   # rollout in another precision than training is what real rollout engines do


@dataclass
class RLConfig:
    task: str = "arithmetic"       # arithmetic (procedurally generated, seeded) | a .jsonl file of {prompt, answer}
    task_digits: int = 2           # arithmetic: digits of each operand
    task_ops: str = "+"            # arithmetic: operators drawn from ("+", "-", "+-")
    sft_steps: int = 0             # supervised warm-up steps on the task's answers before the RL steps
    group_size: int = 4            # G: completions per prompt (the group of the group-relative advantage)
    max_new_tokens: int = 8        # completion length limit (tokens)
    temperature: float = 1.0       # sampling temperature (the trainer's log-probs use it too, as TRL's)
    top_p: float = 1.0             # nucleus sampling
    clip_low: float = 0.2          # PPO clip: ratio >= 1 - clip_low ...
    clip_high: float = 0.2         # ... and <= 1 + clip_high (DAPO's clip-higher: 0.28)
    ratio_level: str = "token"     # token (GRPO) | sequence (GSPO: the length-normalised sequence ratio)
    loss_agg: str = "token_mean"   # token_mean (DAPO) | sequence_mean (GRPO) | dr_grpo (sum / (sequences x max_new_tokens))
    scale_rewards: bool = True     # advantages divided by the group's reward std (false: Dr. GRPO)
    kl_coeff: float = 0.0          # KL penalty to the frozen reference policy (the k3 estimator; 0: no reference model)
    updates_per_rollout: int = 1   # optimizer updates (mini-batches) per generation batch
    lr: Optional[float] = None     # the RL steps' learning rate, constant (null: train.lr's schedule goes on)
    routing_replay: bool = False   # R3: the training forward uses the rollout's recorded expert ids
    max_staleness: int = 0         # 0: on-policy; 1: a separate pool generates batch k+1 while the devices train on
                                   # batch k (one step off-policy; each sample's staleness recorded and checked)
    reward: str = "exact_match"    # exact_match | math (math-verify) | format | package.module:function
    reward_timeout_s: float = 5.0  # a reward call's deadline (seconds)
    reward_retries: int = 1        # a reward call that raised or ran past its deadline is tried again this many times,
                                   # then the sample gets reward 0 and a recorded failure; the run goes on
    eval_problems: int = 64        # held-out problems scored (greedy) before the first RL step and at the end
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def prompts_per_step(cfg: Root) -> int:
    """Prompts of one RL step's generation batch."""
    return cfg.train.global_batch_size * cfg.rl.updates_per_rollout // cfg.rl.group_size


def _validate_rl(cfg: Root) -> None:
    """The rl section with data.task=rl (idle.py refuses its keys otherwise)."""
    r, t = cfg.rl, cfg.train
    for key in ("group_size", "max_new_tokens", "updates_per_rollout", "eval_problems"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"rl.{key}={getattr(r, key)} must be positive")
    for key in ("sft_steps", "kl_coeff", "clip_low", "clip_high", "reward_timeout_s", "reward_retries"):
        if getattr(r, key) < 0:
            raise ConfigError(f"rl.{key}={getattr(r, key)} must be zero or more")
    if r.reward_timeout_s == 0:
        raise ConfigError("rl.reward_timeout_s=0: give reward calls a deadline in seconds (e.g. 5)")
    if r.lr is not None and r.lr <= 0:
        raise ConfigError(f"rl.lr={r.lr} must be positive (or null: train.lr's schedule)")
    if not 0 < r.temperature:
        raise ConfigError(f"rl.temperature={r.temperature} must be positive")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rl.top_p={r.top_p} must be in (0, 1]")
    if r.clip_low >= 1:
        raise ConfigError(f"rl.clip_low={r.clip_low} must be below 1 (the ratio's lower bound is 1 - clip_low)")
    _choice("rl.ratio_level", r.ratio_level, ("token", "sequence"))
    _choice("rl.loss_agg", r.loss_agg, ("token_mean", "sequence_mean", "dr_grpo"))
    _choice("rl.task_ops", r.task_ops, ("+", "-", "+-"))
    _choice("rl.rollout.engine", r.rollout.engine, ("native", "vllm"))
    if r.rollout.dtype is not None:
        _choice("rl.rollout.dtype", r.rollout.dtype, ("float32", "bfloat16", "float64"))
    if r.rollout.workers < 0 or r.rollout.cpus_per_worker <= 0 or r.rollout.gpus_per_worker < 0:
        raise ConfigError("rl.rollout.workers must be zero or more, rl.rollout.cpus_per_worker positive and "
                          "rl.rollout.gpus_per_worker zero or more")
    if r.task_digits <= 0 or r.task_digits > 9:
        raise ConfigError(f"rl.task_digits={r.task_digits} must be in 1..9")
    rows = t.global_batch_size * r.updates_per_rollout
    if rows % r.group_size:
        raise ConfigError(f"train.global_batch_size x rl.updates_per_rollout = {rows} completions per step is not a "
                          f"multiple of rl.group_size={r.group_size} (whole groups of one prompt): change one of them")
    if t.global_batch_size % cfg.cluster.num_devices:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} completions per update does not split over "
                          f"cluster.num_devices={cfg.cluster.num_devices}: make it a multiple")
    if r.max_staleness not in (0, 1):
        raise ConfigError(f"rl.max_staleness={r.max_staleness} must be 0 (on-policy) or 1 (one step off-policy)")
    if r.max_staleness and not r.rollout.workers:
        raise ConfigError("rl.max_staleness=1 overlaps generation with training, which needs rollout workers of their "
                          "own: set rl.rollout.workers (colocated rollouts time-share the devices)")
    if r.rollout.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("rl.rollout.engine=vllm needs vLLM, which is not installed here: pip install vllm (on a "
                              "GPU machine), or use rl.rollout.engine=native")
        raise ConfigError("rl.rollout.engine=vllm is not wired yet: use rl.rollout.engine=native (see README, RL)")
    if (cfg.model.hf_path or cfg.model.hf_config) and r.routing_replay:
        from orchestrator.config.model import describe_hf_model

        info = describe_hf_model(cfg.model)
        unknown = [name for name in info.get("routers", []) if name not in info.get("replayable", [])]
        if unknown:
            raise ConfigError(f"rl.routing_replay=true: this project does not know how {', '.join(unknown)} weighs "
                              f"its experts (the gates a replay recomputes); set rl.routing_replay=false")
    if cfg.data.tokenizer not in (None, "bytes") or cfg.data.train_tokenizer:
        raise ConfigError("data.task=rl reads bytes (the task's prompts and answers are short strings): remove "
                          "data.tokenizer / data.train_tokenizer")
    if cfg.model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is too small for the byte-level task: at least 256")
    if cfg.train.micro_batches > 1 and (t.global_batch_size // cfg.cluster.num_devices) % cfg.train.micro_batches:
        raise ConfigError(f"train.micro_batches={cfg.train.micro_batches} does not split a device's "
                          f"{t.global_batch_size // cfg.cluster.num_devices} completions per update")
    if r.kl_coeff and r.sft_steps:
        raise ConfigError("rl.kl_coeff > 0 with rl.sft_steps > 0: the reference policy is the model the run starts "
                          "from, so a warm-up inside the run would leave it behind; set rl.kl_coeff=0, or warm up in a "
                          "run of its own, export it (python -m orchestrator export RUN --hf DIR) and start this run "
                          "from it with model.hf_path=DIR rl.sft_steps=0")
