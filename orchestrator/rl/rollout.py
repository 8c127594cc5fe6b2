"""Rollout workers as Ray actors: colocated (the device actors' own engines) or a separate pool of `RolloutActor`s
on resources of their own (rl.rollout.workers = N).

Either way a worker is a handle with `rollout_load(refs, version)`, `rollout_generate(step, prompt_ids)`,
`rollout_accuracy(problems)` and `rollout_parameters()`. A step's prompts are dealt to the workers in contiguous
chunks; what each prompt's completions are does not depend on the worker (device/rollout.py), so a separate
pool's worker that dies mid-generation has its prompts generated again on the others (and is replaced) with
nothing changed in the run's results.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from orchestrator.config import Config, to_dict
from orchestrator.data.rl import Rollout
from orchestrator.device.actor import RolloutWorker

log = logging.getLogger(__name__)


class RolloutActor(RolloutWorker):
    """A rollout worker of its own (a separate pool): a RolloutEngine (device/rollout.py) behind Ray."""

    def __init__(self, cfg: dict[str, Any], torch_threads: int):
        import torch

        from orchestrator.config import config_from_dict
        from orchestrator.device.rollout import RolloutEngine

        torch.set_num_threads(max(1, torch_threads))
        self.engine = RolloutEngine(config_from_dict(cfg))

    def _engine(self) -> Any:
        return self.engine

    def ready(self) -> bool:
        return True


RemoteRollout = ray.remote(max_restarts=0)(RolloutActor)


def chunks(ids: list[int], n: int) -> list[list[int]]:
    """`ids` in n contiguous chunks, as even as can be (the first ones one longer)."""
    per, extra = divmod(len(ids), n)
    out, start = [], 0
    for i in range(n):
        end = start + per + (1 if i < extra else 0)
        out.append(ids[start:end])
        start = end
    return out


@dataclass
class _Generation:
    """A generation in flight on the pool: its step, prompts, and each worker's task with its chunk."""
    step: int
    prompt_ids: list[int]
    refs: dict[Any, tuple[int, list[int]]]


class RolloutPool:
    """A separate pool of rollout actors: started, kept at its size (a dead one replaced and given the weights),
    asked for a step's completions with a deadline."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.actors: list[Any] = []
        self.replaced = 0
        self.last_refs: tuple[list[tuple[str, Any]], int] | None = None   # the newest weights sent (a replacement's)

    def _new(self) -> Any:
        r = self.cfg.rl.rollout
        threads = max(1, int(r.cpus_per_worker))
        return RemoteRollout.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker).remote(
            to_dict(self.cfg), threads)

    def start(self, timeout_s: float) -> None:
        self.actors = [self._new() for _ in range(self.cfg.rl.rollout.workers)]
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def load(self, refs: list[tuple[str, Any]], version: int, timeout_s: float) -> None:
        """Every worker takes the weights (a worker that dies meanwhile is replaced and takes them too)."""
        self.last_refs = (refs, version)
        pending = {a.rollout_load.remote(refs, version): i for i, a in enumerate(self.actors)}
        for ref, i in pending.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                log.warning("rollout worker %d failed to take the weights (%s); replacing it", i, type(e).__name__)
                self.replace(i, timeout_s)

    def replace(self, i: int, timeout_s: float) -> None:
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already dead
            pass
        self.actors[i] = self._new()
        self.replaced += 1
        if self.last_refs is not None:
            ray.get(self.actors[i].rollout_load.remote(*self.last_refs), timeout=timeout_s)

    def arm_kill(self, i: int) -> None:
        """Fault injection: rollout worker i dies in its next generation, after its first prompt."""
        ray.get(self.actors[i].rollout_arm_kill.remote(), timeout=60)

    def launch(self, step: int, prompt_ids: list[int]) -> "_Generation":
        """Start generating the prompts' completions on the workers (contiguous chunks); collect() waits."""
        parts = chunks(list(prompt_ids), len(self.actors))
        refs = {self.actors[i].rollout_generate.remote(step, part): (i, part) for i, part in enumerate(parts) if part}
        return _Generation(step, list(prompt_ids), refs)

    def collect(self, g: "_Generation", timeout_s: float) -> tuple[list[Rollout], list[tuple[int, str]]]:
        """Every prompt's completions, in prompt order; a worker that fails has its prompts generated again on the
        pool (it is replaced first). Also what failed: (worker, what), one each (incidents)."""
        done: dict[int, Rollout] = {}
        failures: list[tuple[int, str]] = []
        refs = g.refs
        for _attempt in range(3):
            deadline = time.perf_counter() + timeout_s
            failed: list[int] = []
            for ref, (i, part) in refs.items():
                try:
                    for r in ray.get(ref, timeout=max(0.1, deadline - time.perf_counter())):
                        done[r.prompt_id] = r
                except (RayActorError, RayTaskError, GetTimeoutError) as e:
                    failures.append((i, f"{type(e).__name__} while generating; its {len(part)} prompt(s) "
                                        f"generated again on the pool, the worker replaced"))
                    failed.append(i)
            for i in failed:
                self.replace(i, timeout_s)
            todo = [p for p in g.prompt_ids if p not in done]
            if not todo:
                return [done[p] for p in g.prompt_ids], failures
            refs = self.launch(g.step, todo).refs
        raise RuntimeError(f"step {g.step}: rollouts failed three times (worker {failures[-1][0]}: "
                           f"{failures[-1][1]})")

    def accuracy(self, problems: list[Any], timeout_s: float) -> float:
        """Share of `problems` answered exactly (greedy), spread over the workers; a worker that fails is replaced
        and its share scored again (three tries)."""
        todo = dict(enumerate(chunks(list(problems), len(self.actors))))
        right = 0.0
        for _attempt in range(3):
            refs = {i: self.actors[i].rollout_accuracy.remote(part) for i, part in todo.items() if part}
            for i, ref in refs.items():
                try:
                    right += ray.get(ref, timeout=timeout_s) * len(todo[i])
                    todo[i] = []
                except (RayActorError, RayTaskError, GetTimeoutError) as e:
                    log.warning("rollout worker %d failed scoring held-out problems (%s); replacing it", i,
                                type(e).__name__)
                    self.replace(i, timeout_s)
            if not any(todo.values()):
                return right / max(1, len(problems))
        raise RuntimeError("held-out accuracy: rollout workers failed three times")

    def generate(self, step: int, prompt_ids: list[int], timeout_s: float
                 ) -> tuple[list[Rollout], list[tuple[int, str]]]:
        return self.collect(self.launch(step, prompt_ids), timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []


__all__ = ["RolloutActor", "RolloutPool", "RemoteRollout", "chunks"]
