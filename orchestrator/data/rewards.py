"""Verifiable rewards for RL post-training, and the safe call of a user's reward function.

A reward function is called with keyword arguments: fn(prompt=..., completion=..., answer=..., **fields), where
fields are the task record's other keys, and returns a number. The built-ins read the completion's answer line:
the text before the first '\\n' (the end-of-answer marker), stripped.

`score` is how the run calls any of them: under a deadline, and never raising, so one bad completion or one bad
function costs a reward of 0.0 and an error string in the logs, not the run.
"""
from __future__ import annotations

import importlib
import logging
import math
import numbers
import re
import reprlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

_NUMBER_LINE = re.compile(r"[+-]?\d+(?:\.\d+)?\n")
_ERROR_CHARS = 300   # an error string is one line of at most this many characters


def answer_of(completion: str) -> str:
    """The completion's answer: the text before the first '\\n', stripped (all of it when there is no '\\n')."""
    return completion.partition("\n")[0].strip()


def exact_match(completion: str, answer: str, **fields: Any) -> float:
    """1.0 when the completion's answer line is the answer, character for character (both stripped), else 0.0."""
    return 1.0 if answer_of(completion) == answer.strip() else 0.0


def math_answer(completion: str, answer: str, **fields: Any) -> float:
    """1.0 when math-verify finds the answer line equal to the answer ("47.0" == "47", "0.5" == "1/2"), else 0.0.

    math-verify's own timeouts use signal.alarm, which works only in the main thread; they are turned off here
    (parsing_timeout=None, timeout_seconds=None) so this runs in worker threads and Ray actors, and `score`'s
    deadline bounds it instead."""
    from math_verify import parse, verify

    said = answer_of(completion)
    if not said:
        return 0.0
    gold, pred = parse(answer, parsing_timeout=None), parse(said, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


class _DeadlineElsewhere(logging.Filter):
    """Drops math-verify's warning that its timeouts are off: score() holds the deadline instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DeadlineElsewhere())


def format_reward(completion: str, answer: str, **fields: Any) -> float:
    """1.0 when the whole completion is one answer line: an optional sign, digits, an optional decimal part, then
    '\\n' (nothing before or after), else 0.0. It rewards the shape, not the value."""
    return 1.0 if _NUMBER_LINE.fullmatch(completion) else 0.0


REWARDS: dict[str, Callable[..., float]] = {"exact_match": exact_match, "math": math_answer, "format": format_reward}


def resolve_reward(spec: str) -> Callable[..., Any]:
    """A built-in's name (REWARDS) or "package.module:function", imported. ValueError in one line otherwise."""
    if spec in REWARDS:
        return REWARDS[spec]
    builtins = ", ".join(REWARDS)
    if ":" not in spec:
        raise ValueError(f"reward {spec!r}: unknown; use one of {builtins} or 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"reward {spec!r}: no module {module_name!r}; put its folder on PYTHONPATH (every "
                             f"worker's) or fix the module path") from None
        raise ValueError(f"reward {spec!r}: importing {module_name!r} failed: {_one_line(e)}") from None
    except Exception as e:  # the user's module raised while it was imported
        raise ValueError(f"reward {spec!r}: importing {module_name!r} raised {_one_line(e)}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no {attr!r}; name a function it defines")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not callable; name a function")
    return fn


@dataclass
class RewardResult:
    reward: float
    error: str | None   # None, or what went wrong: "raised ValueError: ...", "timed out after 2.0 s", ...


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:_ERROR_CHARS]


def _shown(value: Any) -> str:
    try:  # a user's object may have a repr that raises
        return reprlib.repr(value).replace("\n", " ")[:_ERROR_CHARS]
    except Exception:  # noqa: BLE001
        return "(no repr)"


def score(fn: Callable[..., Any], prompt: str, completion: str, answer: str, fields: dict[str, Any],
          timeout_s: float) -> RewardResult:
    """Call a reward function under a deadline; never raises.

    A function that raises, returns something that is not a real number (bools count as 0/1), returns a
    non-finite number, or runs past timeout_s gives reward 0.0 and the error recorded; the run goes on.

    The deadline: the call runs in a daemon worker thread and this one waits at most timeout_s. Python cannot
    stop a thread, so a hung function's thread is left behind, still running (a daemon: it does not keep the
    process alive); a function that hangs on every call leaks one thread per call."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(prompt=prompt, completion=completion, answer=answer, **fields)
        except BaseException as e:  # noqa: BLE001 - a user's function may raise anything, SystemExit included
            outcome["error"] = e

    worker = threading.Thread(target=call, name="reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return RewardResult(0.0, f"timed out after {float(timeout_s)} s")
    if "error" in outcome:
        return RewardResult(0.0, f"raised {_one_line(outcome['error'])}")
    value = outcome.get("value")
    if not isinstance(value, numbers.Real):
        return RewardResult(0.0, f"returned {type(value).__name__}, not a number: {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        return RewardResult(0.0, f"returned a non-finite number: {value}")
    return RewardResult(value, None)


def score_all(fn: Callable[..., Any], items: list[tuple[str, str, str, dict[str, Any]]],
              timeout_s: float) -> list[RewardResult]:
    """score() for each (prompt, completion, answer, fields), in order, each under its own deadline."""
    return [score(fn, prompt, completion, answer, fields, timeout_s) for prompt, completion, answer, fields in items]
