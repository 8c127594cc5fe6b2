"""The batch of an RL step (`data.task=rl`): what the driver hands every device, built from rollouts or, for the
supervised warm-up steps, from the task's answers. Bytes are the tokens (the task's strings are short); the end
of an answer is the byte "\\n".

One step's global batch holds R = train.global_batch_size x rl.updates_per_rollout rows (G completions of each
of R/G prompts, in prompt order). Update u of the step trains on rows [u*M, (u+1)*M) (M = global_batch_size), of
which device d of W takes the d-th of W equal slices (`update_rows`): so N devices compute what one does.

Shape legend: R rows of the step, T positions (data.seq_len), K top-k, L MoE layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

EOS = 10   # b"\n": the end of an answer


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: Sequence[int]) -> str:
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


@dataclass
class Rollout:
    """The G completions of one prompt, as a rollout engine returns them (device/rollout.py)."""
    prompt_id: int
    prompt: list[int]                 # prompt tokens
    tokens: torch.Tensor              # [G, max_new] sampled tokens
    logprobs: torch.Tensor            # [G, max_new] the sampler's log-probs
    mask: torch.Tensor                # [G, max_new] bool: the completion up to and including its eos
    routing: list[torch.Tensor] | None  # per MoE layer [G, P + max_new - 1, K] logical expert ids
    rewards: list[float]
    errors: list[str | None]          # a reward call that failed, per completion
    texts: list[str]                  # the completions decoded
    version: int                      # the policy version (step of its weights) that sampled them
    correct: list[bool] = field(default_factory=list)   # exact answer (accuracy), whatever the reward
    reward_s: float = 0.0             # time spent in the reward function


@dataclass
class RLBatch:
    """A step's global batch, the same object on every device (Ray's object store)."""
    step: int
    kind: str                              # "sft" (the warm-up: cross-entropy on the answers) | "rl"
    inputs: torch.Tensor                   # [R, T] int64
    targets: torch.Tensor                  # [R, T] int64, -100 where nothing is trained
    advantages: torch.Tensor | None        # [R] float64 (rl)
    rollout_logp: torch.Tensor | None      # [R, T] the sampler's log-probs at the targets (rl)
    routing: list[torch.Tensor] | None     # per MoE layer [R, T, K] the rollout's expert ids at the inputs (rl)
    versions: torch.Tensor | None          # [R] int64: the policy version that sampled each row (rl)
    max_new_tokens: int = 0                # Dr. GRPO's constant
    stats: dict[str, float] = field(default_factory=dict)   # its rollouts' numbers (the step's record), when kept

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != -100

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]


def task_of(cfg: Any) -> Any:
    """The run's task (rl.task): its problems by id, a step's batch, the held-out problems."""
    from orchestrator.data.tasks import load_task

    r = cfg.rl
    if r.task == "arithmetic":
        return load_task(r.task, cfg.seed, digits=r.task_digits, ops=r.task_ops)
    return load_task(r.task, cfg.seed, heldout=r.eval_problems)


@dataclass
class RLData:
    """What an RL run's devices are built from: nothing (each step's batch travels with the step); the task's
    prompts checked against data.seq_len here, before any actor."""
    description: str
    train: None = None
    val: None = None

    @classmethod
    def of(cls, cfg: Any) -> "RLData":
        task = task_of(cfg)
        from orchestrator.config.rl import prompts_per_step

        problems = task.batch(1, prompts_per_step(cfg)) + task.heldout(cfg.rl.eval_problems)
        check_fits(problems, cfg.data.seq_len, cfg.rl.max_new_tokens)
        return cls(f"RL task {cfg.rl.task!r} ({type(task).__name__}), reward {cfg.rl.reward}")

    def check_vocab(self, vocab_size: int, path: Any) -> None:
        """Bytes: validation checked model.vocab_size >= 256."""


def flatten(batch: RLBatch) -> dict[str, torch.Tensor]:
    """An RL batch as named tensors (what a checkpoint's safetensors file can hold)."""
    out = {"step": torch.tensor([batch.step, batch.max_new_tokens]), "inputs": batch.inputs, "targets": batch.targets}
    for key in ("advantages", "rollout_logp", "versions"):
        if getattr(batch, key) is not None:
            out[key] = getattr(batch, key)
    for i, r in enumerate(batch.routing or []):
        out[f"routing.{i}"] = r
    for key, value in batch.stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"stats.{key}"] = torch.tensor([float(value)], dtype=torch.float64)
    return {k: v.contiguous() for k, v in out.items()}


def unflatten(t: dict[str, torch.Tensor]) -> RLBatch:
    step, max_new = (int(x) for x in t["step"])
    layers = sorted(int(k.split(".")[1]) for k in t if k.startswith("routing."))
    kind = "rl" if "advantages" in t else "sft"
    stats = {k[len("stats."):]: float(v[0]) for k, v in t.items() if k.startswith("stats.")}
    return RLBatch(step, kind, t["inputs"], t["targets"], t.get("advantages"), t.get("rollout_logp"),
                   [t[f"routing.{i}"] for i in layers] or None, t.get("versions"), max_new, stats)


def update_rows(rows: int, updates: int, u: int, world: int, rank: int) -> slice:
    """Device `rank`'s rows of update `u`: its slice of the update's mini-batch."""
    per_update = rows // updates
    per = per_update // world
    start = u * per_update + rank * per
    return slice(start, start + per)


def sft_batch(problems: Sequence[Any], step: int, seq_len: int) -> RLBatch:
    """The warm-up's batch: prompt + answer + eos per row, trained on the answer and its eos."""
    inputs = torch.zeros(len(problems), seq_len, dtype=torch.long)
    targets = torch.full((len(problems), seq_len), -100, dtype=torch.long)
    for i, p in enumerate(problems):
        prompt, answer = encode(p.prompt), encode(p.answer) + [EOS]
        row = (prompt + answer)[: seq_len + 1]
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        trained = torch.tensor(row[1:])
        trained[: len(prompt) - 1] = -100
        targets[i, : len(row) - 1] = trained
    return RLBatch(step, "sft", inputs, targets, None, None, None, None)


def rl_batch(step: int, rollouts: Sequence[Rollout], advantages: torch.Tensor, seq_len: int, top_k: int,
             max_new_tokens: int) -> RLBatch:
    """The RL batch of a step from its rollouts (in prompt order) and their advantages ([R], row order)."""
    R = sum(r.tokens.shape[0] for r in rollouts)
    inputs = torch.zeros(R, seq_len, dtype=torch.long)
    targets = torch.full((R, seq_len), -100, dtype=torch.long)
    logp = torch.zeros(R, seq_len, dtype=torch.float64)
    versions = torch.zeros(R, dtype=torch.long)
    layers = len(rollouts[0].routing) if rollouts and rollouts[0].routing is not None else 0
    # padding positions replay an arbitrary valid choice (they are never trained on, nor counted)
    routing = [torch.arange(top_k).repeat(R, seq_len, 1) for _ in range(layers)] if layers else None
    i = 0
    for r in rollouts:
        P = len(r.prompt)
        for g in range(r.tokens.shape[0]):
            row = r.prompt + r.tokens[g].tolist()
            n = min(len(row) - 1, seq_len)
            inputs[i, :n] = torch.tensor(row[:n])
            mask = torch.zeros(len(row) - 1, dtype=torch.bool)
            mask[P - 1:] = r.mask[g]
            tgt = torch.tensor(row[1:])
            tgt[~mask] = -100
            targets[i, :n] = tgt[:n]
            j = min(max_new_tokens, seq_len - (P - 1))
            logp[i, P - 1:P - 1 + j] = torch.where(r.mask[g, :j], r.logprobs[g, :j].double(), 0.0)
            versions[i] = r.version
            for layer in range(layers):
                routing[layer][i, :n] = r.routing[layer][g, :n]
            i += 1
    return RLBatch(step, "rl", inputs, targets, advantages.double(), logp, routing, versions, max_new_tokens)


def rows_of(batch: RLBatch, rows: slice) -> dict[str, Any]:
    """A device's rows of the batch."""
    return {"inputs": batch.inputs[rows], "targets": batch.targets[rows],
            "advantages": None if batch.advantages is None else batch.advantages[rows],
            "rollout_logp": None if batch.rollout_logp is None else batch.rollout_logp[rows],
            "routing": None if batch.routing is None else [r[rows] for r in batch.routing]}


def check_fits(problems: Sequence[Any], seq_len: int, max_new_tokens: int) -> None:
    """Every prompt plus max_new_tokens fits data.seq_len + 1 (ValueError naming the longest prompt)."""
    longest = max(problems, key=lambda p: len(encode(p.prompt)))
    need = len(encode(longest.prompt)) + max(max_new_tokens, len(encode(longest.answer)) + 1) - 1
    if need > seq_len:
        raise ValueError(f"data.seq_len={seq_len} is too short for prompt {longest.prompt!r} ({len(encode(longest.prompt))} "
                         f"bytes) plus rl.max_new_tokens={max_new_tokens}: raise data.seq_len to {need}")


__all__ = ["EOS", "RLBatch", "RLData", "Rollout", "check_fits", "decode", "encode", "flatten", "rl_batch", "rows_of",
           "sft_batch", "unflatten",
           "task_of", "update_rows"]
