"""Verifiable tasks for RL post-training: prompts whose answers a program can check exactly.

A task hands out `Problem`s. `batch(step, prompts)` is the prompts of one RL step (steps count from 1): problem ids
(step-1)*prompts ... step*prompts-1 of the train split, so a step's prompts are a pure function of (task, seed,
step), whichever worker asks. `heldout(n)` is the evaluation set, which never shares a problem with training.

Two tasks share the interface: `ArithmeticTask`, generated (no file, any number of problems), and `JsonlTask`, the
records of a user's .jsonl file. `load_task` picks one by name.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from orchestrator.config import ConfigError

SPLITS = ("train", "heldout")
HELDOUT_SHARE = 8       # ArithmeticTask: one operand pair in 8 belongs to the held-out split
_MAX_DRAWS = 10_000     # a split that rejection sampling cannot hit in this many draws is empty


@dataclass(frozen=True)
class Problem:
    id: int            # the prompt id: stable for (task, seed, split, index)
    prompt: str        # e.g. "12+35="
    answer: str        # e.g. "47"
    fields: dict[str, Any] = field(default_factory=dict, hash=False)  # a record's other keys, passed to rewards


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")


def _batch_ids(step: int, prompts: int) -> range:
    if step < 1 or prompts < 1:
        raise ValueError(f"batch(step={step}, prompts={prompts}): steps count from 1 and a step has prompts >= 1")
    return range((step - 1) * prompts, step * prompts)


def _hash_int(*parts: object) -> int:
    """A 64-bit integer from the parts: the same in every process (unlike hash(), salted by PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ArithmeticTask:
    """Multi-digit addition (and optionally subtraction) as short strings a byte-level model reads.

    The prompt is 'a+b=' (or 'a-b='), the answer the decimal result (negative for a-b with b > a), and a
    completion ends with '\\n', the end-of-answer marker. Operands have exactly `digits` digits (0-9 when
    digits=1); `ops` is the operators to draw from ("+", "-" or "+-").

    Problem i of a split is a function of (seed, split, i) only: its own random.Random, seeded from a SHA-256 of
    the three, never the global RNG. The splits are disjoint by construction: an operand triple (a, op, b) is
    held out when a hash of (seed, a, op, b) is 0 mod HELDOUT_SHARE, and each split draws (rejection sampling)
    only from its own triples. Within a split problems may repeat (the space of 2-digit sums is 8100 triples).
    """

    def __init__(self, seed: int, digits: int = 2, ops: str = "+"):
        if digits < 1:
            raise ConfigError(f"rl.task_digits={digits}: use 1 or more")
        if not ops or set(ops) - {"+", "-"}:
            raise ConfigError(f"rl.task_ops={ops!r}: use '+', '-' or '+-'")
        self.seed, self.digits, self.ops = seed, digits, ops
        self._low = 0 if digits == 1 else 10 ** (digits - 1)
        self._high = 10 ** digits - 1

    def _split_of(self, a: int, op: str, b: int) -> str:
        return "heldout" if _hash_int(self.seed, "pair", a, op, b) % HELDOUT_SHARE == 0 else "train"

    def problem(self, i: int, split: str = "train") -> Problem:
        _check_split(split)
        rng = random.Random(_hash_int(self.seed, split, i))
        for _ in range(_MAX_DRAWS):
            a, b = rng.randint(self._low, self._high), rng.randint(self._low, self._high)
            op = rng.choice(self.ops)
            if self._split_of(a, op, b) == split:
                result = a + b if op == "+" else a - b
                return Problem(id=i, prompt=f"{a}{op}{b}=", answer=str(result))
        raise ValueError(f"ArithmeticTask(seed={self.seed}, digits={self.digits}, ops={self.ops!r}) has no "
                         f"{split} problems: too few operand pairs; use more digits or ops")

    def batch(self, step: int, prompts: int) -> list[Problem]:
        return [self.problem(i) for i in _batch_ids(step, prompts)]

    def heldout(self, n: int) -> list[Problem]:
        return [self.problem(i, "heldout") for i in range(n)]

    def sft_text(self, p: Problem) -> str:
        return p.prompt + p.answer + "\n"


class JsonlTask:
    """The records of a .jsonl file, one JSON object a line with "prompt" and "answer" (a string or a number);
    any other keys travel to the reward function as `fields`. Blank lines are skipped.

    Problem ids are the records' 0-based order in the file. The last `heldout` records are the held-out split;
    the rest are the train split, cycled: train problem i is record i mod (number of train records). The order is
    the file's, so `seed` changes nothing (it is kept so every task is built the same way)."""

    def __init__(self, path: Union[str, Path], seed: int = 0, heldout: int = 0):
        self.path, self.seed = Path(path), seed
        self.records = _read_records(self.path)
        if heldout < 0 or heldout >= len(self.records):
            raise ConfigError(f"{self.path}: heldout={heldout} of {len(self.records)} records leaves no train "
                              f"records; hold out fewer (0 <= heldout < {len(self.records)})")
        self.n_heldout = heldout
        self.n_train = len(self.records) - heldout

    def problem(self, i: int, split: str = "train") -> Problem:
        _check_split(split)
        if split == "train":
            return self.records[i % self.n_train]
        if not 0 <= i < self.n_heldout:
            raise IndexError(f"held-out problem {i} of {self.n_heldout} ({self.path})")
        return self.records[self.n_train + i]

    def batch(self, step: int, prompts: int) -> list[Problem]:
        if prompts > self.n_train:
            # the same prompt twice in one step would merge two groups of completions into one
            raise ConfigError(f"{self.path}: a step of {prompts} prompts needs at least that many train records, "
                              f"the file has {self.n_train}; use fewer prompts per step or more records")
        return [self.problem(i) for i in _batch_ids(step, prompts)]

    def heldout(self, n: int) -> list[Problem]:
        if n > self.n_heldout:
            raise ValueError(f"{self.path}: {n} held-out problems asked for, the task holds out {self.n_heldout}")
        return self.records[len(self.records) - n:]

    def sft_text(self, p: Problem) -> str:
        return p.prompt + p.answer + "\n"


def _read_records(path: Path) -> list[Problem]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a task is 'arithmetic' or a path to a .jsonl file)")
    records: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg}); each line is one object with "
                                  f"\"prompt\" and \"answer\"") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{where}: a JSON {type(rec).__name__}, not an object with \"prompt\" and \"answer\"")
            for key in ("prompt", "answer"):
                if key not in rec:
                    raise ConfigError(f"{where}: the record has no {key!r} key; each line needs \"prompt\" and "
                                      f"\"answer\"")
                value = rec[key]
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ConfigError(f"{where}: {key!r} is a {type(value).__name__}; use a string or a number")
            fields = {k: v for k, v in rec.items() if k not in ("prompt", "answer")}
            records.append(Problem(id=len(records), prompt=str(rec["prompt"]), answer=str(rec["answer"]),
                                   fields=fields))
    if not records:
        raise ConfigError(f"{path}: no records; each line is one JSON object with \"prompt\" and \"answer\"")
    return records


def load_task(name: str, seed: int, **kw: Any) -> Union[ArithmeticTask, JsonlTask]:
    """"arithmetic" (keywords: digits, ops) or a path to a .jsonl file (keyword: heldout, the records held out)."""
    if name == "arithmetic":
        return ArithmeticTask(seed, **kw)
    if name.endswith(".jsonl") or Path(name).is_file():
        return JsonlTask(name, seed, **kw)
    raise ConfigError(f"task {name!r}: use 'arithmetic' or a path to a .jsonl file of {{\"prompt\", \"answer\"}} records")
