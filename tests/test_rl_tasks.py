"""RL tasks give the same problems for a (seed, split, id) anywhere, never share a problem between train and
held-out, and rewards score completions without ever raising, whatever the reward function does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.data.rewards import (REWARDS, RewardResult, exact_match, format_reward, math_answer,
                                       resolve_reward, score, score_all)
from orchestrator.data.tasks import ArithmeticTask, JsonlTask, Problem, load_task

ROOT = Path(__file__).resolve().parents[1]
USER = "tests.rl_user_rewards"


def _triple(p: Problem) -> tuple[int, str, int]:
    body = p.prompt.removesuffix("=")
    op = "-" if "-" in body else "+"
    a, b = body.split(op)
    return int(a), op, int(b)


# --- tasks -------------------------------------------------------------------------------------------------


def test_arithmetic_problems_are_a_function_of_seed_split_and_id():
    one, two = ArithmeticTask(seed=7, digits=3, ops="+-"), ArithmeticTask(seed=7, digits=3, ops="+-")
    assert [one.problem(i) for i in range(200)] == [two.problem(i) for i in reversed(range(200))][::-1]
    assert one.heldout(50) == two.heldout(50)
    assert [p.prompt for p in one.batch(1, 50)] != [p.prompt for p in ArithmeticTask(8, 3, "+-").batch(1, 50)]
    ops = set()
    for p in one.batch(1, 200):
        a, op, b = _triple(p)
        ops.add(op)
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert int(p.answer) == (a + b if op == "+" else a - b)
    assert ops == {"+", "-"}
    assert one.sft_text(one.problem(0)) == one.problem(0).prompt + one.problem(0).answer + "\n"


def test_arithmetic_problems_do_not_depend_on_the_process():
    """Another interpreter, with another hash salt and the global RNG moved, generates the same problems."""
    code = ("import random; random.seed(1); random.random(); from orchestrator.data.tasks import ArithmeticTask; "
            "t = ArithmeticTask(11, digits=2, ops='+-'); print([p.prompt for p in t.batch(3, 5) + t.heldout(5)])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    t = ArithmeticTask(11, digits=2, ops="+-")
    assert out.strip() == str([p.prompt for p in t.batch(3, 5) + t.heldout(5)])


@pytest.mark.parametrize("digits,ops", [(1, "+"), (2, "+-")])
def test_train_and_heldout_share_no_problem(digits, ops):
    task = ArithmeticTask(seed=3, digits=digits, ops=ops)
    train = {_triple(p) for p in task.batch(1, 3000)}
    heldout = {_triple(p) for p in task.heldout(300)}
    assert train and heldout and not train & heldout
    assert 0 < len(heldout) < len(train)


def test_batch_ids_follow_the_step():
    task = ArithmeticTask(seed=0)
    assert [p.id for p in task.batch(1, 4)] == [0, 1, 2, 3]
    assert [p.id for p in task.batch(3, 4)] == [8, 9, 10, 11]
    assert task.batch(3, 4) == [task.problem(i) for i in range(8, 12)]
    with pytest.raises(ValueError, match="steps count from 1"):
        task.batch(0, 4)
    with pytest.raises(ValueError, match="split='val'"):
        task.problem(0, "val")
    with pytest.raises(ConfigError, match="rl.task_ops"):
        ArithmeticTask(0, ops="*")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_task_holds_out_the_last_records_and_cycles_the_rest(tmp_path):
    records = [{"prompt": f"q{i}", "answer": i, "weight": i / 10} for i in range(6)]
    path = _write(tmp_path / "qa.jsonl", [json.dumps(r) for r in records[:3]] + [""] +
                  [json.dumps(r) for r in records[3:]])
    task = load_task(str(path), seed=0, heldout=2)
    assert isinstance(task, JsonlTask) and task.n_train == 4
    assert [(p.id, p.prompt, p.answer) for p in task.heldout(2)] == [(4, "q4", "4"), (5, "q5", "5")]
    assert [p.id for p in task.heldout(1)] == [5]
    assert [p.id for p in task.batch(1, 3)] == [0, 1, 2]
    assert [p.id for p in task.batch(2, 3)] == [3, 0, 1]       # train records cycled, held-out ones never
    assert task.problem(1).fields == {"weight": 0.1}
    assert task.sft_text(task.problem(2)) == "q22\n"
    with pytest.raises(ConfigError, match="needs at least that many train records"):
        task.batch(1, 5)
    with pytest.raises(ValueError, match="holds out 2"):
        task.heldout(3)


def test_jsonl_errors_name_the_file_and_the_1_based_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ['{"prompt": "1+1=", "answer": "2"}', "",
                                           '{"prompt": "2+2=", "solution": "4"}'])
    with pytest.raises(ValueError, match=f"^{path}:3: the record has no 'answer' key"):
        load_task(str(path), seed=0)
    _write(path, ['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "2+2=", "answer": "4"'])
    with pytest.raises(ValueError, match=f"^{path}:2: not JSON"):
        load_task(str(path), seed=0)
    _write(path, ['["1+1=", "2"]'])
    with pytest.raises(ValueError, match=f"^{path}:1: a JSON list"):
        load_task(str(path), seed=0)
    with pytest.raises(ValueError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"), seed=0)
    with pytest.raises(ValueError, match="use 'arithmetic' or a path"):
        load_task("gsm8k", seed=0)
    assert isinstance(load_task("arithmetic", seed=1, digits=1, ops="-"), ArithmeticTask)


# --- rewards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion,exact,fmt", [
    ("47\n", 1.0, 1.0), (" 47 \n", 1.0, 0.0), ("47\nmore text", 1.0, 0.0), ("48\n", 0.0, 1.0),
    ("47.0\n", 0.0, 1.0), ("-3.5\n", 0.0, 1.0), ("47", 1.0, 0.0), ("forty-seven\n", 0.0, 0.0), ("", 0.0, 0.0),
    ("4 7\n", 0.0, 0.0), ("\n47\n", 0.0, 0.0)])
def test_exact_match_and_format(completion, exact, fmt):
    assert exact_match(completion, "47") == exact
    assert format_reward(completion, "47") == fmt


@pytest.mark.parametrize("completion,answer,expected", [
    ("47\n", "47", 1.0), ("47.0\n", "47", 1.0), ("0.5\n", "1/2", 1.0), ("1/2\n", "0.5", 1.0), ("-39\n", "-39", 1.0),
    ("48\n", "47", 0.0), ("0.51\n", "1/2", 0.0), ("abc\n", "47", 0.0), ("\n47\n", "47", 0.0), ("", "47", 0.0)])
def test_math_answer_uses_math_verify_equivalence(completion, answer, expected):
    assert math_answer(completion, answer) == expected


def test_math_answer_works_outside_the_main_thread():
    """math-verify's default signal.alarm timeouts raise off the main thread; math_answer turns them off."""
    got: list[object] = []

    def run() -> None:
        try:
            got.append(math_answer("0.5\n", "1/2"))
        except Exception as e:  # noqa: BLE001
            got.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert got == [1.0]
    assert score(REWARDS["math"], "1/4+1/4=", "0.5\n", "1/2", {}, timeout_s=30) == RewardResult(1.0, None)


def test_resolve_reward_by_name_and_import_path():
    assert resolve_reward("exact_match") is exact_match and resolve_reward("math") is math_answer
    assert resolve_reward("format") is format_reward
    fn = resolve_reward(f"{USER}:digits_right")
    assert score(fn, "12+35=", "46\n", "47", {}, 5.0) == RewardResult(0.5, None)
    for spec, message in [("f1", "unknown; use one of exact_match, math, format"),
                          ("tests.no_such_module:f", "no module 'tests.no_such_module'; put its folder on"),
                          (f"{USER}:missing", "has no 'missing'; name a function"),
                          (f"{USER}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not callable")]:
        with pytest.raises(ValueError, match=message) as caught:
            resolve_reward(spec)
        assert spec in str(caught.value) and "\n" not in str(caught.value)


def test_score_records_what_went_wrong_and_never_raises():
    fields = {"weight": 0.5}
    assert score(resolve_reward(f"{USER}:weighted"), "1+1=", "2\n", "2", fields, 5.0) == RewardResult(0.5, None)
    raised = score(resolve_reward(f"{USER}:raises"), "1+1=", "2\n", "2", {}, 5.0)
    assert raised == RewardResult(0.0, "raised ValueError: no reward for 1+1=")
    assert score(resolve_reward(f"{USER}:not_finite"), "1+1=", "2\n", "2", {}, 5.0) == RewardResult(
        0.0, "returned a non-finite number: nan")
    assert score(resolve_reward(f"{USER}:not_a_number"), "1+1=", "2\n", "2", {}, 5.0) == RewardResult(
        0.0, "returned str, not a number: '1.0'")
    missing_field = score(resolve_reward(f"{USER}:weighted"), "1+1=", "2\n", "2", {}, 5.0)
    assert missing_field.reward == 0.0 and missing_field.error.startswith("raised TypeError")

    start = time.monotonic()
    hung = score(resolve_reward(f"{USER}:sleeps"), "1+1=", "2\n", "2", {}, timeout_s=0.5)
    assert hung == RewardResult(0.0, "timed out after 0.5 s") and time.monotonic() - start < 3


def test_score_all_keeps_the_order_and_goes_past_failures():
    items = [("1+1=", "2\n", "2", {}), ("1+2=", "4\n", "3", {}), ("2+2=", "4", "4", {})]
    assert score_all(exact_match, items, 5.0) == [RewardResult(1.0, None), RewardResult(0.0, None),
                                                  RewardResult(1.0, None)]
    results = score_all(resolve_reward(f"{USER}:raises"), items, 5.0)
    assert [r.error for r in results] == [f"raised ValueError: no reward for {p}" for p, *_ in items]
