"""Bad config is refused before anything starts, with a message naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, DEFAULT_CONFIG, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent


def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # -X importtime would be noisy; instead the child reports whether Ray or torch got imported.
    code = ("import sys, jobs.train as t; rc = t.main(sys.argv[1:]); "
            "print('IMPORTED', 'ray' in sys.modules, 'torch' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["model.nmu_experts=8"], "unknown config key 'model.nmu_experts'"),
    (["model.num_experts=6", "cluster.num_devices=4"], "model.num_experts=6 is not divisible by cluster.num_devices=4"),
    (["model.top_k=9"], "model.top_k=9 is larger than model.num_experts=8"),
    (["data.path=/no/such/corpus.txt"], "data.path='/no/such/corpus.txt' does not exist"),
    (["model.dim=0"], "model.dim=0 must be positive"),
    (["train.steps=-5"], "train.steps=-5 must be positive"),
    (["cluster.num_devices=0"], "cluster.num_devices=0 must be positive"),
    (["train.global_batch_size=10", "cluster.num_devices=4", "model.num_experts=8"],
     "train.global_batch_size=10 is not divisible by cluster.num_devices=4"),
    (["train.steps=many"], "train.steps"),
    (["steps=5"], "unknown config key 'steps'"),
    (["model.score_func=relu"], "model.score_func='relu' is not one of softmax, sigmoid"),
    (["faults.plan=[{step: 3, kind: melt, rank: 0}]"], "faults.plan[0].kind='melt' is not one of kill, crash"),
    (["faults.plan=[{step: 3, kind: kill, rank: 5}]"], "faults.plan[0].rank=5 is not a device (0..1, or -1"),
    (["faults.plan=[{step: 900, kind: kill}]"], "faults.plan[0].step=900 is outside the run's steps 1..500"),
])
def test_cli_rejects_bad_config_before_starting_anything(args, needle):
    proc = run_train(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "IMPORTED False False" in proc.stdout  # neither Ray nor torch was even imported


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_expert: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.num_expert'"):
        load_config(bad)
    proc = run_train("--config", str(bad))
    assert proc.returncode == 2 and "model.num_expert" in proc.stderr


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file /nope.yaml does not exist"):
        load_config("/nope.yaml")


def test_default_config_round_trips_and_overrides_apply():
    cfg = load_config(DEFAULT_CONFIG, ["train.steps=7", "model.num_experts=16", "seed=3"])
    assert (cfg.train.steps, cfg.model.num_experts, cfg.seed, cfg.cluster.num_devices) == (7, 16, 3, 2)
    again = load_config(None, [])
    assert again.train.steps > 0
    assert "num_experts: 16" in to_yaml(cfg)


@pytest.mark.parametrize("overrides,needle", [
    (["faults.plan=[{kind: kill}]"], "faults.plan[0] needs a step (1..500) or after_s > 0"),
    (["faults.plan=[{step: 3, kind: slow, delay_s: 0}]"], "faults.plan[0]: a slow fault needs steps >= 1 and delay_s > 0"),
    (["faults.chaos.mean_steps_between=20", "faults.chaos.kinds=[kill,melt]"],
     "faults.chaos.kinds[1]='melt' is not one of kill, crash, hang, slow, nan, node, checkpoint"),
    (["faults.chaos.mean_steps_between=-1"], "faults.chaos.mean_steps_between=-1.0 must be zero (off) or more"),
    (["faults.hang_floor_s=30", "faults.hang_cap_s=20"], "faults.hang_floor_s=30.0 exceeds faults.hang_cap_s=20.0"),
    (["faults.on_nonfinite=ignore"], "faults.on_nonfinite='ignore' is not one of rollback, skip"),
    (["faults.standby=-1"], "faults.standby=-1 must be zero or more"),
    (["faults.snapshot_every=0", "faults.plan=[{step: 3, kind: kill}]"],
     "faults.snapshot_every=0 turns healing off, but faults are planned (kill)"),
])
def test_fault_settings_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, overrides)
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides,needle", [
    (["balance.routing=random"], "balance.routing='random' is not one of topk, grouped, group_limited"),
    (["balance.routing=grouped", "balance.num_groups=3"], "balance.num_groups=3 does not divide model.num_experts=8"),
    (["balance.routing=grouped", "balance.num_groups=4", "model.top_k=2"],
     "model.top_k=2 must be a multiple of balance.num_groups=4"),
    (["balance.routing=group_limited", "balance.num_groups=8", "balance.topk_groups=1"],
     "balance.topk_groups=1 must be at most num_groups=8 and hold at least model.top_k=2"),
    (["balance.capacity_factor=-1"], "balance.capacity_factor=-1.0 must be zero or more"),
    (["balance.bias_update_speed=-0.1"], "balance.bias_update_speed=-0.1 must be zero or more"),
])
def test_balance_settings_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, overrides)
    assert needle in str(e.value)


def test_overrides_may_come_before_and_after_the_config_option():
    """`ray job submit -- python -m jobs.train run.dir=x --config y key=value`: options and overrides in any order."""
    from jobs.chaos import parse_args as chaos_args
    from jobs.train import parse_args

    args = parse_args(["run.dir=x", "--config", "jobs/configs/tiny.yaml", "train.steps=3"])
    assert args.config == "jobs/configs/tiny.yaml" and args.overrides == ["run.dir=x", "train.steps=3"]
    args = chaos_args(["train.steps=3", "--every", "5", "run.dir=x"])
    assert args.every == 5 and args.overrides == ["train.steps=3", "run.dir=x"]
