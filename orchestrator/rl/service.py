"""RL post-training's driver-side service (data.task=rl): before each step, the step's batch.

    warm-up step (step <= rl.sft_steps): the task's answers as a supervised batch
    RL step: weight sync (the engines get the policy after step-1, unless they hold it already), rollouts of the
             step's prompts on the workers (colocated: the device actors; else the RolloutPool), rewards,
             group-relative advantages (model/policy_loss.py group_advantages), the RLBatch (data/rl.py)

The batch goes to the object store and from there to every device's `train_step`. It is a function of the
policy's weights and of (seed, step) only: after a rewind to step s the engines are synced with the restored
weights again (`invalidate`), and step s+1's batch comes out as it did the first time; on resume the same.
Every sample carries the version (step of the weights) that sampled it; staleness = step - 1 - version, checked.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from orchestrator.config import Config
from orchestrator.config.rl import prompts_per_step
from orchestrator.data.rl import rl_batch, sft_batch, task_of
from orchestrator.model.policy_loss import group_advantages
from orchestrator.rl.rollout import RolloutPool, chunks

log = logging.getLogger(__name__)


KEEP = 16   # batches kept by the driver (steps back); older ones come back with the devices' restored state


@dataclass
class _Done:
    """A colocated generation: done when launched (the devices generate between steps)."""
    step: int
    rollouts: list[Any]


class RLService:
    def __init__(self, cfg: Config, devices: Any, watch: Any):
        self.cfg, self.devices, self.watch = cfg, devices, watch
        self.task = task_of(cfg)
        self.pool = RolloutPool(cfg) if cfg.rl.rollout.workers else None
        self.synced: int | None = None        # the version every engine holds; None: not known (start, recovery)
        self.stats: dict[str, Any] = {}       # the last batch's numbers (into its step's record)
        self.failures: list[tuple[int, str]] = []   # (worker, what) of a pool's failed workers: the driver's incidents
        self.sync_bytes = 0                   # bytes of the last weight sync
        self.accuracy_before: float | None = None
        self.accuracy_after: float | None = None
        self.heldout = self.task.heldout(cfg.rl.eval_problems)
        self.kept: dict[int, tuple[Any, dict[str, Any]]] = {}   # step -> (its batch's ref, its numbers): recent ones
        self.inflight: tuple[Any, float, tuple[float, int]] | None = None   # (generation, its start, its sync)
        self.forced: dict[int, int] = {}             # step -> the version it must be sampled with instead
        self.rollout_failures: dict[int, int] = {}   # step -> a pool's workers that failed generating it

    @property
    def workers(self) -> list[Any]:
        return self.pool.actors if self.pool is not None else self.devices.actors

    def start(self) -> None:
        if self.pool is not None:
            self.pool.start(self.cfg.cluster.start_timeout_s)

    def take_failures(self) -> list[tuple[int, str]]:
        out, self.failures = self.failures, []
        return out

    def invalidate(self) -> None:
        """The devices' weights changed other than by a step (a restore, a rewind): sync before the next rollout."""
        self.synced = None

    # ------------------------------------------------------------------ batch
    def version_for(self, step: int) -> int:
        """The policy version (step of its weights) step `step`'s batch is sampled with: the step before
        (on-policy), or with rl.max_staleness=1 the one before that (never before the warm-up's end)."""
        first_rl = self.cfg.rl.sft_steps + 1
        if not self.cfg.rl.max_staleness or step <= first_rl:
            return step - 1
        return max(step - 2, first_rl - 1)

    def batch(self, step: int) -> Any:
        """The step's batch in the object store (a ref every device's train_step resolves). One step off-policy, it
        was generated while the step before trained (or is kept from the first pass: a rewind, a resume), and the
        next step's generation starts now, overlapping this step's training."""
        cfg = self.cfg
        if step <= cfg.rl.sft_steps:
            problems = self.task.batch(step, cfg.train.global_batch_size)
            self.stats = {"phase": "sft"}
            return ray.put(sft_batch(problems, step, cfg.data.seq_len))
        ref, self.stats = self._ready(step)
        if cfg.rl.max_staleness and step + 1 <= cfg.train.steps and step + 1 not in self.kept:
            self._launch(step + 1)
        return ref

    def _ready(self, step: int) -> tuple[Any, dict[str, Any]]:
        """Step `step`'s batch and its numbers: kept, in flight, restored with the devices' state, or made now."""
        if step in self.kept:
            return self.kept[step]
        if self.inflight is not None and self.inflight[0].step == step:
            return self._finish()
        self._finish()   # a generation for another step (before a rewind): kept, the engines free again
        version = self.version_for(step)
        if version != step - 1:   # sampled with weights the devices no longer hold: the state restored keeps it
            # device 0's restored state keeps it (the Watch collects: a device lost now fails the step, healed)
            (restored,) = self.watch.collect(self.devices, [self.devices.actors[0].rl_pending.remote()], step,
                                             time.perf_counter())
            if restored is not None and restored.step == step:
                self.kept[step] = (ray.put(restored), {"phase": "rl", **restored.stats})
                return self.kept[step]
            log.warning("step %d: its batch (sampled with the policy after step %d) is not kept; sampling it with the "
                        "policy after step %d instead (on-policy: not what an uninterrupted run trained on)", step,
                        version, step - 1)
            self.forced[step] = step - 1
        self._launch(step)
        return self._finish()

    def _launch(self, step: int) -> None:
        """Start generating step `step`'s rollouts with the policy after step version_for(step), which the devices
        hold now (the engines synced first, before anything is in flight)."""
        ids = [p.id for p in self.task.batch(step, prompts_per_step(self.cfg))]
        t0 = time.perf_counter()
        synced = self.sync(self.forced.pop(step, self.version_for(step)))
        sync = (time.perf_counter() - t0, self.sync_bytes if synced else 0)
        t1 = time.perf_counter()
        if self.pool is not None:
            self.inflight = (self.pool.launch(step, ids), t1, sync)
        else:   # colocated: the device actors generate, now (the Watch collects: a lost device fails the step)
            parts = chunks(ids, len(self.devices.actors))
            refs = [a.rollout_generate.remote(step, part) for a, part in zip(self.devices.actors, parts)]
            rollouts = [r for part in self.watch.collect(self.devices, refs, step, t1) for r in part]
            self.inflight = (_Done(step, rollouts), t1, sync)

    def _finish(self) -> tuple[Any, dict[str, Any]]:
        """The generation in flight collected, scored into its batch, kept; (ref, numbers). None when none."""
        if self.inflight is None:
            return None   # type: ignore[return-value]
        (g, t1, (sync_s, sync_bytes)), self.inflight = self.inflight, None
        if isinstance(g, _Done):
            rollouts = g.rollouts
        else:
            rollouts, failures = self.pool.collect(g, self.cfg.cluster.step_timeout_s)
            self.failures += failures
            self.rollout_failures[g.step] = len(failures)
        gen_s = time.perf_counter() - t1
        self.kept[g.step] = self._assemble(g.step, rollouts, gen_s, sync_s, sync_bytes)
        for old in [s for s in self.kept if s < g.step - KEEP]:   # bounded: older ones come back with the state
            del self.kept[old]
        return self.kept[g.step]

    def _assemble(self, step: int, rollouts: list[Any], gen_s: float, sync_s: float, sync_bytes: int
                  ) -> tuple[Any, dict[str, Any]]:
        cfg = self.cfg
        rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
        adv = group_advantages(rewards, scale=cfg.rl.scale_rewards).reshape(-1)
        batch = rl_batch(step, rollouts, adv, cfg.data.seq_len, cfg.model.top_k, cfg.rl.max_new_tokens)
        staleness = (step - 1 - batch.versions).double()
        if int(staleness.min()) < 0 or int(staleness.max()) > cfg.rl.max_staleness:
            raise RuntimeError(f"step {step}: samples of policy versions {sorted(set(batch.versions.tolist()))}, "
                               f"more than rl.max_staleness={cfg.rl.max_staleness} behind step {step - 1}")
        errors = [e for r in rollouts for e in r.errors if e]
        stats = {"phase": "rl", "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                 "accuracy": sum(c for r in rollouts for c in r.correct) / rewards.numel(),
                 "response_len": sum(int(m.sum()) for r in rollouts for m in r.mask) / rewards.numel(),
                 "staleness": staleness.mean().item(), "reward_errors": len(errors),
                 "rollout_failures": self.rollout_failures.pop(step, 0),
                 "gen_s": gen_s, "reward_s": sum(r.reward_s for r in rollouts), "sync_s": sync_s,
                 "sync_bytes": sync_bytes}
        if errors:
            stats["reward_error"] = errors[0]
        batch.stats = {k: v for k, v in stats.items() if k not in ("phase", "reward_error") and not k.endswith("_s")
                       and k not in ("sync_bytes", "rollout_failures")}   # what a restored batch's record says again
        return ray.put(batch), stats

    def keep_pending(self, step: int) -> None:
        """One step off-policy, after step `step` and before its snapshot or checkpoint: the next step's batch (its
        generation waited for) to device 0, whose snapshots and checkpoints keep it (device/shard.py)."""
        if not self.cfg.rl.max_staleness or step < self.cfg.rl.sft_steps + 1:
            return
        nxt = step + 1
        if nxt not in self.kept and self.inflight is not None and self.inflight[0].step == nxt:
            self._finish()
        ref = self.kept.get(nxt, (None,))[0]
        self.devices.actors[0].set_rl_pending.remote(ref)

    # ------------------------------------------------------------ weight sync
    def sync(self, version: int) -> bool:
        """Every engine gets the policy's weights after step `version`: each device sends its own tensors (one
        logical tensor by one device), one object each; each engine fetches and copies them one at a time. False
        when they held them already."""
        if self.synced == version:
            return False
        parts = self.watch.collect(self.devices, [a.sync_weights.remote() for a in self.devices.actors], version + 1,
                                   time.perf_counter())
        refs = [pair for named, _ in parts for pair in named]
        self.sync_bytes = sum(size for _, size in parts)
        if self.pool is not None:
            self.pool.load(refs, version, self.cfg.cluster.step_timeout_s)
        else:
            self.watch.collect(self.devices, [a.rollout_load.remote(refs, version) for a in self.devices.actors],
                               version + 1, time.perf_counter())
        self.synced = version
        return True

    def parameters(self) -> list[dict[str, torch.Tensor]]:
        """Every engine's parameters (tests: a sync leaves them equal to the trainer's)."""
        return ray.get([w.rollout_parameters.remote() for w in self.workers], timeout=self.cfg.cluster.step_timeout_s)

    # -------------------------------------------------------------- accuracy
    def accuracy(self, version: int) -> float:
        """Greedy held-out accuracy of the policy after step `version` (the engines synced first), the problems
        spread over the workers. Colocated, the Watch collects (a device lost fails the step: StepFailure); a pool's
        worker lost is replaced and its problems scored again (RolloutPool.accuracy)."""
        self._finish()   # nothing in flight while the engines take other weights
        self.sync(version)
        timeout_s = self.cfg.cluster.step_timeout_s
        if self.pool is not None:
            return self.pool.accuracy(self.heldout, timeout_s)
        parts = chunks(list(self.heldout), len(self.devices.actors))
        # the step deadline is learned from training steps (short ones in a warm-up): scoring gets step_timeout_s
        got = self.watch.collect(self.devices, [a.rollout_accuracy.remote(part) for a, part in
                                                zip(self.devices.actors, parts)], version + 1, time.perf_counter(),
                                 deadline_s=timeout_s)
        return sum(a * len(part) for a, part in zip(got, parts)) / max(1, len(self.heldout))

    def record(self, step: int) -> dict[str, Any]:
        """The numbers of the batch `step` trained on, for its record (the accuracy before RL on the first RL step)."""
        rec = dict(self.stats)   # phase: sft | rl (the alert rules judge no loss spike of an RL step)
        if step == self.cfg.rl.sft_steps + 1 and self.accuracy_before is not None:
            rec["accuracy_before"] = self.accuracy_before
        return rec

    def kill_worker(self, rank: int) -> None:
        """A planned fault with target: rollout (a separate pool's worker; colocated, the device's actor)."""
        if self.pool is not None:
            self.pool.arm_kill(rank)
        else:
            self.devices.actors[rank].rollout_arm_kill.remote()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


__all__ = ["RLService"]
