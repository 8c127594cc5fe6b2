"""A rollout engine (plain torch, no Ray): a whole copy of the policy that generates the G completions of each
prompt of an RL step, scores them, and takes the trainer's weights in place after every update.

It lives in a device actor (colocated: rollouts and training time-share the actor, as verl's hybrid engine) or in a
rollout actor of its own (orchestrator/rl/rollout.py, a separate pool). Either way a prompt's completions are a
function of (seed, step, prompt id, sample index) and of the weights only: the G completions of one prompt are one
batch (no padding, no other prompt beside them), and row i draws from a generator seeded by those four numbers
(model/generate.py). So which engine ran a prompt, and when, never changes what it produced.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any, Iterable

import torch

from orchestrator.config import Config
from orchestrator.data.rewards import resolve_reward, score_all
from orchestrator.data.rl import EOS, Rollout, decode, encode, task_of
from orchestrator.model.build import build_any_model
from orchestrator.model.generate import sample


def sample_seed(seed: int, step: int, prompt_id: int, index: int) -> int:
    """The seed of one completion's sampling: a hash of (seed, step, prompt id, sample index), nothing else."""
    digest = hashlib.blake2b(f"rollout/{seed}/{step}/{prompt_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rollout_dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.rl.rollout.dtype or cfg.train.dtype)


def split_name(name: str) -> tuple[str, int | None]:
    """`layers.1.ffn.experts.w1_EFD[3]` -> (`layers.1.ffn.experts.w1_EFD`, 3); a dense name -> (name, None)."""
    if name.endswith("]"):
        base, gid = name[:-1].rsplit("[", 1)
        return base, int(gid)
    return name, None


class RolloutEngine:
    """The policy's whole copy (every expert, one process) and the task, reward and sampling settings."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # the GPU the actor was given, if any (a colocated engine shares its device's; a pool worker's is its own)
        self.device = torch.device("cuda", 0) if cfg.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.model = build_any_model(cfg.model, cfg.seed, None, cfg.balance, self.device,
                                     cfg.rl.rollout.dtype or cfg.train.dtype, parallel=cfg.parallel).eval()
        self.task = task_of(cfg)
        self.reward = resolve_reward(cfg.rl.reward)
        self.version = 0          # the step whose weights the engine holds (0: the initial weights)
        self.kill_armed = False   # fault injection: the process dies after the next generate's first prompt
        self._state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy the trainer's tensors in place (experts by global id: `name[gid]` is row gid), one at a time;
        the bytes received."""
        received = 0
        for name, t in tensors:
            base, gid = split_name(name)
            target = self._state[base] if gid is None else self._state[base][gid]
            target.copy_(t)
            received += t.numel() * t.element_size()
        self.version = version
        return received

    def parameters(self) -> dict[str, torch.Tensor]:
        """The engine's parameters and buffers, experts by global id (the trainer's names: weight-sync checks)."""
        out = {}
        for name, t in self._state.items():
            if ".experts." in name:
                for gid in range(t.shape[0]):
                    out[f"{name}[{gid}]"] = t[gid].detach().cpu().clone()
            else:
                out[name] = t.detach().cpu().clone()
        return out

    # --------------------------------------------------------------- generation
    def generate(self, step: int, prompt_ids: list[int]) -> list[Rollout]:
        """The G completions of each prompt, scored; in the order of `prompt_ids`."""
        r = self.cfg.rl
        out = []
        for pid in prompt_ids:
            problem = self.task.problem(pid)
            prompt = encode(problem.prompt)
            s = sample(self.model, prompt, r.group_size, r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                       eos_id=EOS, seeds=[sample_seed(self.cfg.seed, step, pid, i) for i in range(r.group_size)],
                       record_routing=bool(self.model.moe_layers()))
            texts = [decode(row[m].tolist()) for row, m in zip(s.tokens.cpu(), s.mask.cpu())]
            t0 = time.perf_counter()
            items = [(problem.prompt, text, problem.answer, dict(problem.fields)) for text in texts]
            scored = score_all(self.reward, items, r.reward_timeout_s)
            for _ in range(r.reward_retries):   # a call that raised or ran out of time, tried again
                bad = [i for i, x in enumerate(scored) if x.error]
                for i, x in zip(bad, score_all(self.reward, [items[i] for i in bad], r.reward_timeout_s)):
                    scored[i] = x
            reward_s = time.perf_counter() - t0
            out.append(Rollout(pid, prompt, s.tokens.cpu(), s.logprobs.cpu(), s.mask.cpu(),
                               None if s.routing is None else [ids.cpu() for ids in s.routing],
                               [x.reward for x in scored], [x.error for x in scored], texts, self.version,
                               [_answer(text) == problem.answer for text in texts], reward_s))
            if self.kill_armed:   # injected: killed mid-generation (after its first prompt)
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    def accuracy(self, problems: list[Any]) -> float:
        """Share of `problems` answered exactly with greedy decoding."""
        right = 0
        for p in problems:
            s = sample(self.model, encode(p.prompt), 1, self.cfg.rl.max_new_tokens, temperature=1.0, top_p=1.0,
                       eos_id=EOS, seeds=[0], greedy=True)
            right += _answer(decode(s.tokens[0][s.mask[0]].cpu().tolist())) == p.answer
        return right / max(1, len(problems))


def _answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


__all__ = ["RolloutEngine", "sample_seed", "split_name", "rollout_dtype"]
