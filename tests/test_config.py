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
    # 6 experts on 4 devices is EP 2 x DP 2 now (issue 14); an expert-parallel degree that does not divide is refused
    (["model.num_experts=6", "cluster.num_devices=4", "parallel.expert_parallel=4"],
     "parallel.expert_parallel=4 must divide both cluster.num_devices=4"),
    (["memory.zero_stage=4"], "memory.zero_stage=4 must be 0"),
    (["memory.zero_stage=3", "cluster.num_devices=4", "parallel.expert_parallel=2", "model.expert_dim=201"],
     "model.expert_dim=201 is not divisible by the data-parallel degree 2"),
    (["train.micro_batches=3"], "train.micro_batches=3 does not divide each device's slice"),
    (["balance.redundant_experts=4", "cluster.num_devices=4", "model.num_experts=2", "model.top_k=1"],
     "balance.redundant_experts=4 with data parallelism"),
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
    # keys that would do nothing under the chosen options (more in test_keys_without_effect_are_refused)
    (["balance.routing=topk", "balance.num_groups=3"],
     "balance.num_groups=3 has no effect with balance.routing='topk' (only the grouped and group_limited routings "
     "read it): remove it, or set balance.routing=grouped or group_limited"),
    (["balance.routing=grouped", "balance.num_groups=2", "balance.topk_groups=7"],
     "balance.topk_groups=7 has no effect with balance.routing='grouped'"),
    (["faults.plan=[{step: 3, after_s: 5, kind: kill}]"],
     "faults.plan[0].after_s=5.0 has no effect (the fault strikes in its step=3): give either step or after_s"),
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
     "faults.chaos.kinds[1]='melt' is not one of kill, crash, hang, slow, nan, node, checkpoint, spike"),
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


@pytest.mark.parametrize("overrides,needle", [
    (["run.id=../other"], "run.id='../other' must be letters, digits, '.', '_' or '-'"),
    (["train.lr_horizon=0"], "train.lr_horizon=0 must be 1 or more"),
    (["train.resume=latest", "train.resume_accept_changes=[train.lr]"],
     "train.resume_accept_changes: 'train.lr' is not a setting a resume refuses to change"),
    (["train.resume_accept_changes=[seed]"], "train.resume_accept_changes is set but train.resume is not"),
    (["faults.recovery_window_s=-1"], "faults.recovery_window_s=-1.0 must be zero or more"),
])
def test_run_and_resume_settings_are_checked(overrides, needle):
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


CHAOS_ON = "faults.chaos.mean_steps_between=20"


@pytest.mark.parametrize("overrides,needle", [
    # routing modes and their group keys
    (["balance.topk_groups=2"], "balance.topk_groups=2 has no effect with balance.routing='topk'"),
    # re-placement: its window and gain are read only when a plan can be made, and never on one device
    (["balance.replace_window=10"], "balance.replace_window=10 has no effect while live re-placement is off "
                                    "(balance.replace_every=0 and balance.replace_on_imbalance=0)"),
    (["balance.redundant_experts=2", "balance.replace_min_gain=0.1"],
     "balance.replace_min_gain=0.1 has no effect while live re-placement is off"),
    (["cluster.num_devices=1", "train.global_batch_size=8", "balance.replace_every=5"],
     "balance.replace_every=5 has no effect with cluster.num_devices=1"),
    # the model's shape keys
    (["model.first_k_dense=0", "model.dense_dim=512"], "model.dense_dim=512 has no effect with model.first_k_dense=0"),
    (["model.top_k=1", "model.norm_topk_prob=false"], "model.norm_topk_prob=false has no effect with model.top_k=1"),
    (["data.format=text"], "data.format='text' has no effect without data.path"),
    # fault plan fields per kind
    (["faults.plan=[{step: 3, kind: kill, delay_s: 2}]"],
     "faults.plan[0].delay_s=2.0 has no effect on a kill fault (only slow faults read steps and delay_s)"),
    (["faults.plan=[{step: 3, kind: hang, steps: 4}]"], "faults.plan[0].steps=4 has no effect on a hang fault"),
    (["faults.plan=[{step: 3, kind: kill}, {step: 4, kind: crash, in_collective: true}]"],
     "faults.plan[1].in_collective=true has no effect on a crash fault (only hang faults read it)"),
    # random chaos keys while it is off, its slow keys without slow faults
    (["faults.chaos.kinds=[kill,crash]"], "faults.chaos.kinds=[kill, crash] has no effect while random chaos is off "
                                          "(faults.chaos.mean_steps_between=0): set faults.chaos.mean_steps_between "
                                          "(jobs.chaos: --every N), or remove it"),
    (["faults.chaos.first_step=50"], "faults.chaos.first_step=50 has no effect while random chaos is off"),
    (["faults.chaos.seed=7", "faults.plan=[{step: 3, kind: kill, rank: 1}]"],
     "faults.chaos.seed=7 has no effect while random chaos is off (faults.chaos.mean_steps_between=0) and no "
     "planned fault has rank -1"),
    ([CHAOS_ON, "faults.chaos.kinds=[kill,nan]", "faults.chaos.slow_delay_s=2"],
     "faults.chaos.slow_delay_s=2.0 has no effect while faults.chaos.kinds has no slow"),
    # stragglers on one device; recovery settings with healing off
    (["cluster.num_devices=1", "faults.straggler_patience=5"],
     "faults.straggler_patience=5 has no effect with cluster.num_devices=1"),
    (["cluster.num_devices=1", "faults.on_straggler=record"],
     "faults.on_straggler='record' has no effect with cluster.num_devices=1"),
    (["faults.snapshot_every=0", "faults.standby=1"],
     "faults.standby=1 has no effect with faults.snapshot_every=0 (healing off: the first failure stops the run)"),
    (["faults.snapshot_every=0", "faults.max_recoveries=50"], "faults.max_recoveries=50 has no effect with "
                                                              "faults.snapshot_every=0"),
    (["balance.aux_loss_scope=ep_group"], "balance.aux_loss_scope='ep_group' has no effect with balance.aux_loss_coeff=0"),
    (["balance.aux_loss_coeff=0.01", "balance.aux_loss_scope=batch"],
     "balance.aux_loss_scope='batch' is not one of global, ep_group, sequence"),
    (["balance.aux_loss_coeff=0.01", "balance.aux_loss_scope=ep_group", "train.micro_batches=2"],
     "balance.aux_loss_coeff=0.01 with train.micro_batches=2: the Switch loss over balance.aux_loss_scope=ep_group"),
    # cluster, checkpoints, monitoring
    (["cluster.gpus_per_device=0.5"], "cluster.gpus_per_device=0.5 has no effect with cluster.use_gpu=false"),
    (["checkpoint.keep_last=0", "checkpoint.keep_every=10"],
     "checkpoint.keep_every=10 has no effect with checkpoint.keep_last=0 (every checkpoint is kept)"),
    (["checkpoint.every_steps=0", "checkpoint.at_end=false", "checkpoint.on_signal=false", "checkpoint.async_save=false"],
     "checkpoint.async_save=false has no effect in a run that never saves a checkpoint"),
    (["monitor.webhook_retries=5"], "monitor.webhook_retries=5 has no effect without monitor.webhook_url"),
    (["monitor.webhook_timeout_s=1"], "monitor.webhook_timeout_s=1.0 has no effect without monitor.webhook_url"),
    (["monitor.webhook_url=https://hooks.example/T1/B2/secret", "monitor.alerts=[{rule: maxvio, action: record}]"],
     "monitor.webhook_url has no effect: every rule of monitor.alerts has action=record"),
    (["monitor.tensorboard=false", "monitor.histogram_every=5"],
     "monitor.histogram_every=5 has no effect with monitor.tensorboard=false"),
    (["monitor.alerts=[{rule: nonfinite, threshold: 2}]"],
     "monitor.alerts[0].threshold=2.0 has no effect on the nonfinite rule"),
    (["monitor.alerts=[{rule: loss_spike}, {rule: maxvio, window: 50}]"],
     "monitor.alerts[1].window=50 has no effect on the maxvio rule"),
])
def test_keys_without_effect_are_refused(overrides, needle):
    """A key set to something other than its default where nothing reads it under the chosen options is refused,
    named with what to do, instead of a run that silently ignores it."""
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, overrides)
    assert needle in str(e.value)


def test_the_per_sequence_switch_loss_takes_micro_batches():
    cfg = load_config(DEFAULT_CONFIG, ["balance.aux_loss_coeff=0.01", "balance.aux_loss_scope=sequence",
                                       "train.micro_batches=2"])
    assert (cfg.balance.aux_loss_scope, cfg.train.micro_batches) == ("sequence", 2)


def test_token_files_make_text_only_keys_idle(tmp_path):
    """A nanoGPT token folder is read whole, and its val.bin is the validation split."""
    (tmp_path / "train.bin").write_bytes(b"\0\1" * 1000)
    (tmp_path / "val.bin").write_bytes(b"\0\1" * 100)
    load_config(DEFAULT_CONFIG, [f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.max_bytes=1000 has no effect on token files"):
        load_config(DEFAULT_CONFIG, [f"data.path={tmp_path}", "data.max_bytes=1000"])
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.1 has no effect with a val.bin"):
        load_config(DEFAULT_CONFIG, [f"data.path={tmp_path}", "data.val_fraction=0.1"])
    text = tmp_path / "corpus.txt"
    text.write_text("hello " * 1000)
    load_config(DEFAULT_CONFIG, [f"data.path={text}", "data.max_bytes=1000", "data.val_fraction=0.1"])


@pytest.mark.parametrize("overrides", [
    # the same keys where they are read
    ["balance.routing=group_limited", "balance.num_groups=4", "balance.topk_groups=2"],
    ["balance.routing=grouped", "balance.num_groups=2"],
    ["balance.replace_every=10", "balance.replace_window=10", "balance.replace_min_gain=0"],
    ["balance.replace_on_imbalance=1.2", "balance.replace_window=10"],
    ["balance.redundant_experts=2"],  # without re-placement: the initial placement's replicas split tokens
    ["faults.plan=[{step: 3, kind: slow, steps: 4, delay_s: 0.4}, {step: 5, kind: hang, in_collective: true}]"],
    ["faults.plan=[{after_s: 30, kind: crash}]"],
    ["faults.plan=[{step: 3, kind: kill, rank: -1}]", "faults.chaos.seed=7"],  # the seed draws the random device
    [CHAOS_ON, "faults.chaos.kinds=[kill,slow]", "faults.chaos.slow_steps=2", "faults.chaos.first_step=10"],
    ["faults.standby=1", "faults.max_recoveries=50", "faults.straggler_patience=5"],
    ["faults.snapshot_every=0", "faults.plan=[{step: 3, kind: checkpoint}]"],
    ["checkpoint.every_steps=0", "checkpoint.at_end=false", "checkpoint.keep_last=1"],  # on_signal still saves
    ["cluster.use_gpu=true", "cluster.gpus_per_device=0.5"],
    ["monitor.webhook_url=https://hooks.example/x", "monitor.webhook_retries=5", "monitor.webhook_timeout_s=1"],
    ["monitor.alerts=[{rule: restarts, window: 50}, {rule: nonfinite, steps: 2}]"],
    ["model.first_k_dense=2", "model.dense_dim=512", "model.top_k=1"],
])
def test_keys_that_take_effect_are_accepted(overrides):
    load_config(DEFAULT_CONFIG, overrides)


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every shipped job config, also with each of the routing study's option sets and the chaos job's."""
    from jobs.routing_study import STRATEGIES

    cfg = load_config(path)
    world = cfg.cluster.num_devices
    for options in STRATEGIES.values():
        overrides = [o.format(world=world) for o in options]
        native_only = [o for o in overrides if o.split("=")[0] in
                       ("balance.routing", "balance.capacity_factor")]   # (the balancing losses apply to it)
        if cfg.model.hf_config and native_only:   # a transformers model routes by itself: refused, naming the key
            with pytest.raises(ConfigError, match=native_only[0].split("=")[0].replace(".", r"\.")):
                load_config(path, overrides)
            continue
        load_config(path, overrides)
    load_config(path, [CHAOS_ON, "faults.standby=1", "checkpoint.at_end=true"])
