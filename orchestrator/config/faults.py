"""The faults section: planned and random faults, and how the run heals (snapshots, recoveries, detectors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from orchestrator.config.base import ConfigError, Root, StrEnum, _choice, _positive




class FaultKind(StrEnum):
    """The kinds of fault a run can inject (`faults.plan[].kind`, `faults.chaos.kinds`). A str Enum: config values,
    JSON and logs keep the plain names. What each kind does when injected and how the night watch catches it is
    its entry in orchestrator/healing/faults.py (FAULTS); the config only needs the names."""
    KILL = "kill"
    CRASH = "crash"
    HANG = "hang"
    SLOW = "slow"
    NAN = "nan"
    NODE = "node"
    CHECKPOINT = "checkpoint"
    SPIKE = "spike"


FAULT_KINDS = tuple(FaultKind)


@dataclass
class FaultSpec:
    kind: str                      # kill | crash | hang | slow | nan | node | checkpoint | spike (see faults in the README)
    step: int = 0                  # the fault strikes during this step (0: use after_s)
    after_s: float = 0.0           # ... or in the first step that starts this long after training started
    rank: int = 0                  # the device it strikes (node: every device on that device's node); -1: random
    steps: int = 10                # slow: how many steps the delay lasts
    delay_s: float = 0.5           # slow: delay added to each of those steps
    repeat: int = 1                # strikes each of the first `repeat` times its step runs (a fault that comes back on replay)
    in_collective: bool = False    # hang: stuck inside a collective (its peers then all wait in one too), not in compute
    target: str = "device"         # device | rollout (data.task=rl: a kill of rollout worker `rank`, mid-generation;
                                   # colocated rollouts run in the device actors, so it is that device's actor)


@dataclass
class ChaosConfig:
    mean_steps_between: float = 0.0   # 0: off; else faults at random steps, this many steps apart on average
    kinds: List[str] = field(default_factory=lambda: ["kill", "crash", "hang", "slow", "nan", "checkpoint"])
    seed: int = 0                     # the same seed gives the same faults at the same steps on the same devices
    first_step: int = 5               # no chaos before this step
    slow_steps: int = 5               # slow faults: steps of delay ...
    slow_delay_s: float = 0.5         # ... of this many seconds each
    rollout_share: float = 0.0        # data.task=rl: the share of random kills (in RL steps) that strike a rollout
                                      # worker mid-generation instead of a device (a pool's worker, or a colocated
                                      # device's engine)


@dataclass
class FaultConfig:
    plan: List[FaultSpec] = field(default_factory=list)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    snapshot_every: int = 5        # in-memory snapshot cadence (steps) recovery rewinds to (a fault recomputes up
                                   # to snapshot_every-1 steps, bit-identically; 1: none, at a snapshot per step);
                                   # 0: no healing
    standby: int = 0               # warm spare device actors (started, torch imported): a replacement only joins and restores
    max_recoveries: int = 10       # recoveries within recovery_window_s before the run stops with a report
    recovery_window_s: float = 3600.0  # ... the window that budget is counted over (0: the whole run)
    max_repeats: int = 3           # the same step failing this many times stops the run (a deterministic fault)
    recovery_attempts: int = 3     # tries per recovery (a replacement that fails to start, ...) ...
    retry_backoff_s: float = 1.0   # ... waiting this long before the second, twice as long before the third
    recovery_timeout_s: float = 120.0
    hang_factor: float = 10.0      # step deadline: hang_factor x median of recent step times ...
    hang_floor_s: float = 10.0     # ... at least this ...
    hang_cap_s: float = 120.0      # ... at most this (also the deadline of warm-up steps, before there is a median)
    straggler_factor: float = 3.0  # a device whose own work (step time outside collectives) exceeds this x the others' median ...
    straggler_min_s: float = 0.05  # ... and the median by at least this ...
    straggler_patience: int = 3    # ... this many steps in a row is a straggler
    on_straggler: str = "replace"  # replace (with a fresh actor, from the snapshot of the step just done) | record
    on_nonfinite: str = "rollback" # non-finite loss or gradients: rollback (to the last snapshot; skip the batch if it repeats) | skip
    on_spike: str = "record"       # loss or grad-norm spike: record | rollback | skip
    loss_spike_factor: float = 3.0 # spike: loss above this x the median of the last spike_window steps ...
    grad_spike_factor: float = 10.0  # ... or grad norm above this x its median
    spike_window: int = 50
    checkpoint_retries: int = 3    # a failed checkpoint is retried after 1, 2, 4 ... steps; this many failures in a row stop the run


def _validate_faults(cfg: Root) -> None:
    f, t, c = cfg.faults, cfg.train, cfg.cluster
    for i, spec in enumerate(f.plan):
        key = f"faults.plan[{i}]"
        _choice(f"{key}.kind", spec.kind, FAULT_KINDS)
        if spec.step and not 1 <= spec.step <= t.steps:
            raise ConfigError(f"{key}.step={spec.step} is outside the run's steps 1..{t.steps}")
        if not spec.step and spec.after_s <= 0:
            raise ConfigError(f"{key} needs a step (1..{t.steps}) or after_s > 0 (seconds into training)")
        _choice(f"{key}.target", spec.target, ("device", "rollout"))
        if spec.target == "rollout":
            workers = cfg.rl.rollout.workers or c.num_devices
            if cfg.data.task != "rl":
                raise ConfigError(f"{key}.target=rollout needs data.task=rl (rollout workers): remove it")
            if spec.kind != FaultKind.KILL:
                raise ConfigError(f"{key}: a fault with target=rollout is a kill (got kind={spec.kind})")
            if not 0 <= spec.rank < workers:
                raise ConfigError(f"{key}.rank={spec.rank} is not a rollout worker (0..{workers - 1})")
        elif not -1 <= spec.rank < c.num_devices:
            raise ConfigError(f"{key}.rank={spec.rank} is not a device (0..{c.num_devices - 1}, or -1 for a random one)")
        if spec.repeat < 1:
            raise ConfigError(f"{key}.repeat={spec.repeat} must be 1 or more")
        if spec.kind == FaultKind.SLOW and (spec.steps < 1 or spec.delay_s <= 0):
            raise ConfigError(f"{key}: a slow fault needs steps >= 1 and delay_s > 0 (got {spec.steps}, {spec.delay_s})")
        if spec.kind == FaultKind.SPIKE and cfg.data.task == "rl":
            raise ConfigError(f"{key}: a spike fault corrupts a training batch of data; an RL step's batch is its "
                              f"rollouts (data.task=rl): use another kind")
    ch = f.chaos
    if ch.mean_steps_between < 0:
        raise ConfigError(f"faults.chaos.mean_steps_between={ch.mean_steps_between} must be zero (off) or more")
    if ch.mean_steps_between:
        if not ch.kinds:
            raise ConfigError("faults.chaos.kinds is empty; list fault kinds such as [kill, crash, hang]")
        for i, kind in enumerate(ch.kinds):
            _choice(f"faults.chaos.kinds[{i}]", kind, FAULT_KINDS)
            if kind == FaultKind.SPIKE and cfg.data.task == "rl":
                raise ConfigError(f"faults.chaos.kinds[{i}]=spike corrupts a training batch of data; an RL step's "
                                  f"batch is its rollouts (data.task=rl): remove it")
        if ch.slow_steps < 1 or ch.slow_delay_s <= 0:
            raise ConfigError("faults.chaos.slow_steps must be >= 1 and faults.chaos.slow_delay_s > 0")
        if not 0.0 <= ch.rollout_share <= 1.0:
            raise ConfigError(f"faults.chaos.rollout_share={ch.rollout_share} is a share of the random kills: 0..1")
    _positive(cfg, ["faults.snapshot_every", "faults.standby", "faults.max_recoveries", "faults.retry_backoff_s",
                    "faults.recovery_window_s",
                    "faults.checkpoint_retries", "faults.straggler_min_s"], allow_zero=True)
    _positive(cfg, ["faults.max_repeats", "faults.recovery_attempts", "faults.recovery_timeout_s",
                    "faults.hang_factor", "faults.hang_floor_s", "faults.hang_cap_s", "faults.straggler_factor",
                    "faults.straggler_patience", "faults.loss_spike_factor", "faults.grad_spike_factor",
                    "faults.spike_window"])
    if f.hang_floor_s > f.hang_cap_s:
        raise ConfigError(f"faults.hang_floor_s={f.hang_floor_s} exceeds faults.hang_cap_s={f.hang_cap_s}")
    _choice("faults.on_straggler", f.on_straggler, ("replace", "record"))
    _choice("faults.on_nonfinite", f.on_nonfinite, ("rollback", "skip"))
    _choice("faults.on_spike", f.on_spike, ("record", "rollback", "skip"))
    needs_snapshots = [s.kind for s in f.plan if s.kind != FaultKind.CHECKPOINT] + (list(ch.kinds) if ch.mean_steps_between else [])
    if f.snapshot_every == 0 and needs_snapshots:
        raise ConfigError(f"faults.snapshot_every=0 turns healing off, but faults are planned ({', '.join(sorted(set(needs_snapshots)))}); "
                          f"set faults.snapshot_every to 1 (or more)")
