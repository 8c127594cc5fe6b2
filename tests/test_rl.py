"""RL post-training (data.task=rl): the device's RL step, the rollout engine, weight sync, routing replay, N devices
== 1 device, and the job through the Driver on Ray (colocated and a separate pool, faults, resume).

The loss itself is held to TRL's GRPOTrainer in tests/test_policy_loss.py; the sampler and replay at the model level
in tests/test_generate.py and tests/test_routing_replay.py.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.config import ConfigError, load_config
from orchestrator.config.rl import prompts_per_step
from orchestrator.data.rl import rl_batch, task_of
from orchestrator.device.rl import sync_tensors
from orchestrator.model.policy_loss import group_advantages
from orchestrator.parallel import groups
from tests.conftest import step_records


def rl_config(tmp_path: Path | None = None, *overrides: str):
    base = ["data.task=rl", "model.vocab_size=256", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
            "model.num_experts=4", "model.top_k=2", "model.expert_dim=32", "model.dense_dim=64",
            "model.first_k_dense=1", "model.max_seq_len=32", "data.seq_len=14", "train.steps=4",
            "train.global_batch_size=8", "train.lr=1e-2", "train.warmup_steps=1", "rl.group_size=4",
            "rl.max_new_tokens=5", "rl.eval_problems=4", "cluster.cpus_per_device=0.5", "cluster.num_devices=1",
            "run.progress=quiet", "monitor.report=false"]
    if tmp_path is not None:
        base.append(f"run.dir={tmp_path}")
    return load_config(None, base + list(overrides))


# ----------------------------------------------------------------------------- config
def test_rl_keys_need_the_rl_task_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="rl.group_size=8 has no effect without data.task=rl"):
        load_config(None, ["rl.group_size=8"])
    with pytest.raises(ConfigError, match="rl.ratio_level='seq' is not one of token, sequence"):
        rl_config(None, "rl.ratio_level=seq")
    with pytest.raises(ConfigError, match="not a multiple of rl.group_size=3"):
        rl_config(None, "rl.group_size=3")
    with pytest.raises(ConfigError, match="max_staleness=1 overlaps generation with training"):  # colocated
        rl_config(None, "rl.max_staleness=1")
    with pytest.raises(ConfigError, match=r"faults.plan\[0\]: a fault with target=rollout is a kill"):
        rl_config(None, "faults.plan=[{step: 2, kind: hang, target: rollout}]")
    with pytest.raises(ConfigError, match="has no effect with data.task=rl"):
        rl_config(None, "train.eval_batches=2")
    with pytest.raises(ConfigError, match="rl.rollout.engine=vllm needs vLLM"):
        rl_config(None, "rl.rollout.engine=vllm")
    assert prompts_per_step(rl_config(None, "rl.updates_per_rollout=2")) == 4


def test_chaos_kills_strike_rollout_workers_in_the_share_asked_and_other_plans_stay_as_they_were():
    from orchestrator.healing import plan_faults

    chaos = ["train.steps=40", "rl.sft_steps=10", "faults.chaos.mean_steps_between=2", "faults.chaos.kinds=[kill]",
             "faults.chaos.first_step=1", "cluster.num_devices=2"]
    plain = plan_faults(rl_config(None, *chaos))
    assert plain and all(f.target == "device" for f in plain)
    assert plan_faults(rl_config(None, *chaos, "faults.chaos.rollout_share=0")) == plain
    every = plan_faults(rl_config(None, *chaos, "faults.chaos.rollout_share=1", "rl.rollout.workers=3"))
    assert [f.step for f in every] == [f.step for f in plain]
    assert all((f.target == "rollout") == (f.step > 10) for f in every)
    assert {f.rank for f in every if f.target == "rollout"} <= {0, 1, 2}
    with pytest.raises(ConfigError, match="faults.chaos.rollout_share=0.5 has no effect"):
        load_config(None, ["faults.chaos.mean_steps_between=2", "faults.chaos.rollout_share=0.5"])
    with pytest.raises(ConfigError, match="a share of the random kills"):
        rl_config(None, *chaos, "faults.chaos.rollout_share=2")


# ----------------------------------------------------------------- one process
def _one_process(*overrides: str):
    from orchestrator.device.rollout import RolloutEngine
    from orchestrator.device.shard import DeviceShard

    cfg = rl_config(None, "train.dtype=float64", *overrides)
    return cfg, DeviceShard(cfg, 0, 1, None, None), RolloutEngine(cfg)


def _batch(cfg, engine, step: int, seed: int = 0):
    """A step's batch from the engine's rollouts, with random advantages (an untrained model earns no reward, and
    the math needs non-zero advantages to say anything)."""
    ids = [p.id for p in task_of(cfg).batch(step, prompts_per_step(cfg))]
    rollouts = engine.generate(step, ids)
    g = torch.Generator().manual_seed(seed * 1000 + step)
    rewards = torch.rand(len(ids), cfg.rl.group_size, generator=g, dtype=torch.float64)
    return rl_batch(step, rollouts, group_advantages(rewards).reshape(-1), cfg.data.seq_len, cfg.model.top_k,
                    cfg.rl.max_new_tokens)


def test_sync_gives_the_engine_the_trainers_parameters_and_the_sampler_its_log_probs():
    cfg, shard, engine = _one_process("balance.bias_update_speed=0.01")
    batch = _batch(cfg, engine, 1)
    report = shard.train_step(1, None, batch)
    # the sampler's log-probs and routing are the trainer's (float64: the same math, KV cache or not)
    assert report.extra["logprob_gap"] < 1e-9 and report.extra["routing_mismatch"] == 0.0
    assert report.extra["replay_mismatch"] == 0.0
    assert report.grad_norm > 0   # (on-policy, the ratio is 1: the loss is -mean(A) weighted by length, ~0)
    assert report.tokens == int(batch.mask.sum())
    received = engine.load(sync_tensors(shard), 1)
    mine, theirs = shard.global_parameters(), engine.parameters()
    assert set(mine) <= set(theirs) and received > 0
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name
    biases = [n for n in theirs if n.endswith("expert_bias")]
    assert biases and all(torch.equal(shard.model.get_buffer(n), theirs[n]) for n in biases)
    assert any(theirs[n].abs().sum() > 0 for n in biases)   # moved by the step: a buffer, synced too


def test_completions_depend_on_seed_step_prompt_and_index_only():
    cfg, _, a = _one_process()
    _, _, b = _one_process()
    ids = [3, 1, 4, 5]
    whole = a.generate(2, ids)
    split = b.generate(2, ids[:1]) + b.generate(2, ids[1:])   # another worker, other chunks, another order of calls
    for x, y in zip(whole, split):
        assert x.prompt_id == y.prompt_id and torch.equal(x.tokens, y.tokens) and torch.equal(x.logprobs, y.logprobs)
    assert not torch.equal(whole[0].tokens, a.generate(3, ids[:1])[0].tokens)   # another step, other draws


def test_a_reward_function_that_raises_is_recorded():
    cfg, _, engine = _one_process("rl.reward=tests.rl_user_rewards:raises")
    (rollout,) = engine.generate(1, [0])
    assert rollout.rewards == [0.0] * cfg.rl.group_size
    assert all(e and "ValueError" in e for e in rollout.errors)


def test_a_failed_reward_call_is_tried_again():
    _, _, engine = _one_process("rl.reward=tests.rl_user_rewards:flaky", "rl.reward_retries=1")
    (rollout,) = engine.generate(1, [7])
    assert rollout.rewards == [1.0] * 4 and rollout.errors == [None] * 4
    _, _, engine = _one_process("rl.reward=tests.rl_user_rewards:flaky", "rl.reward_retries=0")
    (rollout,) = engine.generate(1, [8])
    assert all(e and "ConnectionError" in e for e in rollout.errors)


def test_routing_replay_follows_a_bf16_rollout_exactly():
    """Rollout in bf16, training in float32, routers with near-ties: the trainer's own top-k sets differ from the
    rollout's; with replay, the ids the training forward used equal the recorded ones in every layer."""
    out = {}
    for replay in (False, True):
        from orchestrator.device.rollout import RolloutEngine
        from orchestrator.device.shard import DeviceShard

        cfg = rl_config(None, "rl.rollout.dtype=bfloat16", f"rl.routing_replay={str(replay).lower()}")
        shard = DeviceShard(cfg, 0, 1, None, None)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in shard.model.moe_layers():   # every expert's row alike plus noise: near-ties everywhere
                w = m.router.gate.weight
                w.copy_(w[0].expand_as(w) + 1e-3 * torch.randn(w.shape, generator=g))
        engine = RolloutEngine(cfg)
        engine.load(sync_tensors(shard), 0)
        router_before = shard.model.moe_layers()[0].router.gate.weight.detach().clone()
        report = shard.train_step(1, None, _batch(cfg, engine, 1))
        out[replay] = report.extra
        assert not torch.equal(shard.model.moe_layers()[0].router.gate.weight, router_before)   # it has a gradient
    assert out[False]["routing_mismatch"] > 0 and out[False]["replay_mismatch"] > 0
    assert out[True]["routing_mismatch"] > 0 and out[True]["replay_mismatch"] == 0.0
    assert out[True]["logprob_gap"] < out[False]["logprob_gap"]


# ------------------------------------------------------------- N devices == 1
EQUAL = ["memory.activation_checkpointing=full", "train.micro_batches=2",
         "rl.updates_per_rollout=2", "rl.kl_coeff=0.05", "rl.routing_replay=true", "rl.ratio_level=sequence",
         "rl.loss_agg=sequence_mean", "rl.clip_high=0.28", "balance.bias_update_speed=0.01",
         "balance.seq_aux_loss_coeff=0.001", "train.global_batch_size=8", "train.lr=0.1"]
LAYOUTS = [(2, 2), (4, 2)]   # (devices, expert-parallel degree): ep 2; ep 2 x dp 2


def _equal_worker(rank: int, world: int, ep: int, port: int, batches: str, out: str) -> None:
    from orchestrator.device.shard import DeviceShard

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    cfg = rl_config(None, "train.dtype=float64", f"cluster.num_devices={world}", f"parallel.expert_parallel={ep}",
                    "memory.zero_stage=3", *EQUAL)
    shard = DeviceShard(cfg, rank, world, None, None)
    with open(batches, "rb") as f:
        steps = pickle.load(f)
    reports = [shard.train_step(i + 1, None, b) for i, b in enumerate(steps)]
    synced = dict(sync_tensors(shard))
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(([r.loss for r in reports], [r.extra for r in reports], shard.global_parameters(), synced), f)
    groups.leave()


@pytest.mark.parametrize("world,ep", LAYOUTS, ids=[f"{w}dev-ep{e}" for w, e in LAYOUTS])
def test_n_devices_compute_the_rl_step_of_one(tmp_path, world, ep):
    """EP 2 and EP 2 x DP 2 with ZeRO 3, full activation checkpointing, micro-batches, two updates per rollout,
    the KL to the sharded reference, routing replay, GSPO: losses to 1e-9, parameters to 1e-6 (relative), and the
    tensors the devices send a rollout engine are the single device's parameters."""
    cfg, shard, engine = _one_process(*EQUAL)
    steps = []
    for step in (1, 2):   # the second batch sampled with the first update's weights, as a run would
        steps.append(_batch(cfg, engine, step))
        shard.train_step(step, None, steps[-1]) if step == 1 else None
        engine.load(sync_tensors(shard), step)
    cfg, shard, _ = _one_process(*EQUAL)
    ref = [shard.train_step(i + 1, None, b) for i, b in enumerate(steps)]
    ref_params = shard.global_parameters()
    with open(tmp_path / "batches", "wb") as f:
        pickle.dump(steps, f)
    out = str(tmp_path / "results")
    mp.spawn(_equal_worker, args=(world, ep, groups.free_port("127.0.0.1"), str(tmp_path / "batches"), out),
             nprocs=world)
    synced: dict = {}
    merged: dict = {}
    for rank in range(world):
        with open(f"{out}.{rank}", "rb") as f:
            losses, extras, params, sent = pickle.load(f)
        assert not set(sent) & set(synced)   # one device sends each logical tensor
        synced.update(sent)
        merged.update(params)
        assert losses == pytest.approx([r.loss for r in ref], abs=1e-9, rel=0)
        assert extras[1]["kl"] == pytest.approx(ref[1].extra["kl"], abs=1e-9)
        assert extras[1]["clip_frac"] == pytest.approx(ref[1].extra["clip_frac"], abs=1e-12)
    assert ref[1].extra["kl"] > 0 and ref[1].extra["clip_frac"] > 0   # the KL and the clipping took part
    for name, t in ref_params.items():   # ... and it is the whole one
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(synced[name], t, rtol=1e-6, atol=1e-9, msg=name)


# -------------------------------------------------------------------- on Ray
RUN = ["train.steps=5", "rl.sft_steps=2", "checkpoint.every_steps=3", "faults.snapshot_every=1"]


def _run(tmp_path, *overrides):
    from orchestrator.driver import Driver

    cfg = rl_config(tmp_path, *RUN, *overrides)
    summary = Driver(cfg, tmp_path).run()
    return summary, step_records(tmp_path)


def _final_hashes(run_dir: Path) -> dict:
    """The final checkpoint's files and their sha256 (the manifest's): the trained state, bit for bit."""
    manifests = sorted(Path(run_dir).rglob("step_*/manifest.json"))
    files = json.loads(manifests[-1].read_text())["files"]
    return {name: meta["sha256"] for name, meta in files.items()}


KEYS = ("reward_mean", "accuracy", "response_len", "clip_frac", "staleness", "routing_mismatch", "logprob_gap")


def test_rl_job_colocated_records_resumes_exactly_and_heals_a_rollout_kill(ray_session, tmp_path):
    summary, recs = _run(tmp_path / "a", "cluster.num_devices=2")
    assert [r["phase"] for r in recs] == ["sft", "sft", "rl", "rl", "rl"]
    for key in KEYS:
        assert all(key in r for r in recs[2:]), key
    assert summary.accuracy_before is not None and summary.accuracy_after is not None
    assert recs[2]["accuracy_before"] == summary.accuracy_before
    assert all(r["staleness"] == 0 for r in recs[2:]) and recs[3]["sync_bytes"] > 0
    # resume: the same run stopped after step 3's checkpoint and resumed goes on exactly
    _run(tmp_path / "b", "cluster.num_devices=2", "train.steps=3", "train.lr_horizon=5")
    _run(tmp_path / "b", "cluster.num_devices=2", "train.resume=latest")
    resumed = step_records(tmp_path / "b")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in recs]
    assert [r.get("reward_mean") for r in resumed] == [r.get("reward_mean") for r in recs]
    assert _final_hashes(tmp_path / "b") == _final_hashes(tmp_path / "a")
    # a colocated rollout worker is a device actor: killed mid-generation, healed as a device, the same results
    summary, healed = _run(tmp_path / "c", "cluster.num_devices=2", "faults.plan=[{step: 4, kind: kill, "
                                                                     "target: rollout, rank: 1}]")
    assert summary.recoveries == 1
    assert [r["loss"] for r in healed] == [r["loss"] for r in recs]
    assert _final_hashes(tmp_path / "c") == _final_hashes(tmp_path / "a")


def test_separate_rollout_pool_one_or_three_workers_and_a_killed_worker_change_nothing(ray_session, tmp_path):
    pool = ["cluster.num_devices=2", "rl.rollout.cpus_per_worker=0.25"]
    _, one = _run(tmp_path / "one", *pool, "rl.rollout.workers=1")
    _, three = _run(tmp_path / "three", *pool, "rl.rollout.workers=3")
    assert [r["loss"] for r in one] == [r["loss"] for r in three]
    assert [r.get("reward_mean") for r in one] == [r.get("reward_mean") for r in three]
    assert _final_hashes(tmp_path / "one") == _final_hashes(tmp_path / "three")
    _, killed = _run(tmp_path / "killed", *pool, "rl.rollout.workers=3",
                     "faults.plan=[{step: 4, kind: kill, target: rollout, rank: 0}]")
    assert [r["loss"] for r in killed] == [r["loss"] for r in three]
    assert _final_hashes(tmp_path / "killed") == _final_hashes(tmp_path / "three")
    assert any(r.get("rollout_failures") for r in killed)


def test_a_raising_reward_function_is_recorded_and_the_run_goes_on(ray_session, tmp_path):
    summary, recs = _run(tmp_path, "rl.reward=tests.rl_user_rewards:raises", "checkpoint.every_steps=0")
    assert summary.state == "finished" and summary.steps_done == 5
    assert all(r["reward_errors"] == 8 and "ValueError" in r["reward_error"] for r in recs[2:])


def test_one_step_off_policy_records_staleness_resumes_and_heals_exactly(ray_session, tmp_path):
    """rl.max_staleness=1 on a separate pool: step k trains on samples of the policy after step k-2 (generated while
    step k-1 trained); a resume from the checkpoint of step 3 (which keeps step 4's batch) and a device killed at
    step 5 (rewound to a snapshot; the batches kept by the driver) give the uninterrupted run's losses and bits."""
    off = ["cluster.num_devices=2", "rl.rollout.workers=2", "rl.rollout.cpus_per_worker=0.25", "rl.max_staleness=1",
           "train.steps=6", "train.lr_horizon=6"]
    _, recs = _run(tmp_path / "a", *off)
    assert [r.get("staleness") for r in recs] == [None, None, 0.0, 1.0, 1.0, 1.0]
    _run(tmp_path / "b", *off, "train.steps=3")
    _run(tmp_path / "b", *off, "train.resume=latest")
    resumed = step_records(tmp_path / "b")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in recs]
    assert [r.get("reward_mean") for r in resumed] == [r.get("reward_mean") for r in recs]
    assert _final_hashes(tmp_path / "b") == _final_hashes(tmp_path / "a")
    summary, healed = _run(tmp_path / "c", *off, "faults.plan=[{step: 5, kind: kill, rank: 1}]")
    assert summary.recoveries == 1
    assert [r["loss"] for r in healed] == [r["loss"] for r in recs]
    assert _final_hashes(tmp_path / "c") == _final_hashes(tmp_path / "a")
