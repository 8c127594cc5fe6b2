"""The train, run and checkpoint sections: the optimisation, the run's identity, saving and resuming."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from orchestrator.config.base import ConfigError, Root


@dataclass
class TrainConfig:
    steps: int = 500
    global_batch_size: int = 16    # sequences per step, over all devices
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # global grad-norm clip (0 disables)
    eval_batches: int = 8          # validation batches scored at the end of the run (0: none) ...
    eval_every: int = 0            # ... and every this many steps (0: only at the end)
    dtype: str = "float32"         # parameter and compute dtype: float32 | float64 (float64: exactness checks)
    mixed_precision: str = "auto"  # bf16 autocast of the forward (parameters, gradients, optimizer stay in dtype):
                                   # auto (on GPUs that support bf16, off on CPU) | bf16 (also on CPU) | none
    resume: Optional[str] = None   # latest (the newest checkpoint of this run's live timeline that verifies) | a
                                   # checkpoint path/URI
    lr_horizon: Optional[int] = None  # the step the cosine decay ends at; None: train.steps at a fresh start, the
                                      # checkpoint's on resume (set it to change the schedule of a resumed run)
    micro_batches: int = 1         # gradient accumulation: each device's slice of the global batch in this many
                                   # forward/backward passes, one optimizer step (same math as the whole slice)
    resume_accept_changes: List[str] = field(default_factory=list)  # keys a resume may change although the run then
                                   # does not continue exactly (seed, data.seq_len, ...; see README "Resume")
    freeze: List[str] = field(default_factory=list)  # parameters kept as they are (fnmatch patterns over their
                                   # names, e.g. "*.router.*", "model.embed_tokens.*"; a wrong one lists them):
                                   # no gradient, no AdamW state or weight decay; checked against the model before start


@dataclass
class RunConfig:
    dir: Optional[str] = None      # None: runs/<time>-<name>
    name: str = "train"
    id: Optional[str] = None       # the run's identity (its checkpoints live under <checkpoint.dir>/<id>); None: the
                                   # one recorded in <run.dir>/run.json, else a new <name>-<date>-<time>-<hex>
    progress: str = "auto"         # auto (bar on a terminal, lines otherwise) | bar | lines | quiet


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None      # path or URI (s3://bucket/prefix, gs://...); None: <run.dir>/checkpoints
    every_steps: int = 0           # save every K steps (0: only at the end and on a stop signal)
    at_end: bool = True            # save when the run finishes
    on_signal: bool = True         # save after the step in flight on SIGTERM/SIGINT (ray job stop, preemption)
    keep_last: int = 3             # committed checkpoints kept (0: all)
    keep_every: int = 0            # also keep every M-th step's checkpoint for good (0: none)
    async_save: bool = True        # persist in the background while training goes on


# Settings that decide which data each step sees: a resume that changes one does not continue the run, and is
# refused unless train.resume_accept_changes names it (other training settings change with a warning).
RESUME_EXACT_KEYS = ("seed", "data.path", "data.format", "data.seq_len", "data.val_fraction", "data.max_bytes",
                     "data.tokenizer", "data.train_tokenizer", "data.task", "data.pack", "data.max_samples",
                     "train.global_batch_size")


def is_frozen(name: str, patterns: list[str]) -> bool:
    """Does train.freeze (`patterns`, fnmatch, case-sensitive) name the parameter `name`?"""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, p) for p in patterns)


def _validate_run(cfg: Root) -> None:
    """run.id, train.lr_horizon, train.resume_accept_changes."""
    import re

    rid = cfg.run.id
    if rid is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", rid):
        raise ConfigError(f"run.id={rid!r} must be letters, digits, '.', '_' or '-' (it names the run's checkpoint "
                          f"folder under checkpoint.dir)")
    if cfg.train.lr_horizon is not None and cfg.train.lr_horizon < 1:
        raise ConfigError(f"train.lr_horizon={cfg.train.lr_horizon} must be 1 or more (or null: train.steps)")
    for key in cfg.train.resume_accept_changes:
        if key not in RESUME_EXACT_KEYS:
            raise ConfigError(f"train.resume_accept_changes: {key!r} is not a setting a resume refuses to change; "
                              f"those are {', '.join(RESUME_EXACT_KEYS)} (others change with a warning)")
    if cfg.train.resume_accept_changes and not cfg.train.resume:
        raise ConfigError("train.resume_accept_changes is set but train.resume is not: it only affects a resume")
    for i, pattern in enumerate(cfg.train.freeze):   # whether each names a parameter: planner.frozen_names
        if not pattern.strip():
            raise ConfigError(f"train.freeze[{i}] is empty: give a parameter name or an fnmatch pattern such as "
                              f"'*.router.*'")
