"""Reward functions a user might write, imported by tests/test_rl_tasks.py as "tests.rl_user_rewards:NAME"."""
import time

NOT_A_FUNCTION = 3


def digits_right(prompt, completion, answer, **fields):
    """The share of the answer's characters the completion's first line gets right, position by position."""
    said = completion.partition("\n")[0].strip()
    return sum(x == y for x, y in zip(said, answer)) / len(answer)


def weighted(prompt, completion, answer, weight, **fields):
    """Uses a field of the task record."""
    return weight * float(completion.strip() == answer)


def raises(prompt, completion, answer, **fields):
    raise ValueError("no reward for " + prompt)


def sleeps(prompt, completion, answer, **fields):
    time.sleep(10)
    return 1.0


def not_finite(prompt, completion, answer, **fields):
    return float("nan")


def not_a_number(prompt, completion, answer, **fields):
    return "1.0"


_SEEN: set = set()


def flaky(prompt, completion, answer, **fields):
    """Raises the first time it sees a completion (a transient failure), scores it the next time."""
    if (prompt, completion) not in _SEEN:
        _SEEN.add((prompt, completion))
        raise ConnectionError("transient")
    return 1.0
