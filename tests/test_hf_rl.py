"""RL post-training of transformers' MoE models (model.hf_path with data.task=rl): the cached sampler on
transformers' own cache equals a full forward, routing replay in each router family gives transformers' own gates
for the router's own choice and follows any other (through recomputation, with a router gradient), a bf16 rollout's
routing is followed exactly with replay only, weight sync makes the engine the trainer, N devices compute the RL
step of one, and the job on Ray (DeepSeek-V4) heals a rollout kill and resumes to the same bits.

The tiny checkpoints are transformers' own (tests/hf_tiny.py): DeepSeek-V4 (hash-routed first layer, sqrt-softplus
scores), DeepSeek-V3 (group-limited top-k with a correction bias), Mixtral, Qwen2-MoE."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.config import ConfigError, ModelConfig, load_config
from orchestrator.device.rl import sync_tensors
from orchestrator.model.checkpointing import apply_activation_checkpointing
from orchestrator.model.generate import sample
from orchestrator.model.hf import REPLAY_WEIGHTS, build_hf_model
from orchestrator.parallel import groups
from tests.conftest import step_records
from tests.hf_tiny import KINDS, make_tiny_hf
from tests.test_rl import _batch, _final_hashes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_rl")
    for kind in KINDS:
        make_tiny_hf(kind, root / kind)
    return root


def hf_rl_config(path: Path | str, tmp_path: Path | None = None, *overrides: str):
    base = ["data.task=rl", f"model.hf_path={path}", "data.seq_len=14", "train.steps=4",
            "train.global_batch_size=8", "train.lr=1e-2", "train.warmup_steps=1", "rl.group_size=4",
            "rl.max_new_tokens=5", "rl.eval_problems=4", "cluster.cpus_per_device=0.5", "cluster.num_devices=1",
            "run.progress=quiet", "monitor.report=false"]
    if tmp_path is not None:
        base.append(f"run.dir={tmp_path}")
    return load_config(None, base + list(overrides))


def _model(path: Path):
    model = build_hf_model(ModelConfig(hf_path=str(path)), 0).double()
    model.hf_config._experts_implementation = "eager"
    return model


# ------------------------------------------------------------------ the model level
@pytest.mark.parametrize("kind", KINDS)
def test_cached_sampler_and_replay_of_the_own_routing_equal_a_full_forward(checkpoints, kind):
    """The sampler through transformers' cache: its log-probs and recorded routing are a full forward's on the same
    tokens (float64; DeepSeek's float32 routers leave ~1e-8); replaying that routing gives the same logits bit for
    bit, and each router's replay formula gives transformers' own gates for its own choice."""
    model = _model(checkpoints / kind).eval()
    prompt = [5, 17, 33, 200, 7, 9]
    stale = torch.ones(1, 2, dtype=torch.bool)   # a mask a caller left set: sampling neither uses nor loses it
    model.set_valid(stale)
    s = sample(model, prompt, 3, 10, temperature=1.0, top_p=0.9, eos_id=None, seeds=[1, 2, 3], record_routing=True)
    assert model._valid_BT is stale
    model.set_valid(None)
    tokens = torch.cat([torch.tensor(prompt).expand(3, -1), s.tokens], 1)[:, :-1]
    with torch.no_grad():
        logits = model(tokens)
    logp = logits[:, len(prompt) - 1:].log_softmax(-1).gather(-1, s.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, s.logprobs, rtol=0, atol=1e-7)
    own = model.routing()
    assert len(own) == len(model.moe_layers()) and len(s.routing) == len(own)
    for rec, used in zip(s.routing, own):
        assert torch.equal(rec.reshape(used.shape).sort(-1).values, used.sort(-1).values)
    with torch.no_grad():
        model.set_routing_replay(own)
        replayed = model(tokens)
        model.set_routing_replay(None)
    assert torch.equal(replayed, logits)
    # each router, directly: its own (logits, gates, ids), and the replay formula on its ids
    hidden = torch.randn(7, model.hf_config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for m in model.moe_layers():
        gate = m.__dict__["_gate"]
        assert type(gate).__name__ in REPLAY_WEIGHTS
        args = (hidden, torch.arange(7)) if "Hash" in type(gate).__name__ else (hidden,)
        logits_NE, weights_NK, ids_NK = gate(*args)
        assert torch.equal(REPLAY_WEIGHTS[type(gate).__name__](gate, logits_NE, ids_NK.long()), weights_NK)


def test_replayed_foreign_routing_is_followed_trains_the_router_and_survives_recomputation(checkpoints):
    """DeepSeek-V3 (group-limited top-k: a replayed id may lie outside the groups the router would pick) and
    DeepSeek-V4: every layer uses the replayed ids, the routers get a gradient, and full activation checkpointing
    recomputes with the same ids (the same gradients)."""
    for kind in ("deepseek_v3", "deepseek_v4"):
        tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
        model = _model(checkpoints / kind)
        K, E = model.hf_config.num_experts_per_tok, model.moe_layers()[0].experts_total
        g = torch.Generator().manual_seed(2)
        foreign = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(2 * 12)]) for _ in model.moe_layers()]

        def grads(mode: str):
            model = _model(checkpoints / kind)
            if mode != "none":
                apply_activation_checkpointing(model, mode)
            model.set_routing_replay(foreign)
            logits = model(tokens[:, :-1])
            used = [r.clone() for r in model.routing()]
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            model.set_routing_replay(None)
            return used, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        used, plain = grads("none")
        assert all(torch.equal(u, f) for u, f in zip(used, foreign)), kind
        routers = [n for n in plain if n.endswith("mlp.gate.weight")]
        assert len(routers) == len(model.moe_layers()) and all(plain[n].abs().sum() > 0 for n in routers), kind
        _, checkpointed = grads("full")
        for n in plain:
            torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=1e-12, msg=n)
    with pytest.raises(ValueError, match="names an expert outside"):
        model.set_routing_replay([torch.full((4, K), E)] * len(model.moe_layers()))


# -------------------------------------------------------------- one device, one process
def test_sync_makes_the_engine_the_trainer_and_a_bf16_rollout_is_replayed_exactly(checkpoints):
    from orchestrator.device.rollout import RolloutEngine
    from orchestrator.device.shard import DeviceShard

    path = checkpoints / "deepseek_v4"
    cfg = hf_rl_config(path, None, "train.dtype=float64", "balance.bias_update_speed=0.01")
    shard, engine = DeviceShard(cfg, 0, 1, None, None), RolloutEngine(cfg)
    report = shard.train_step(1, None, _batch(cfg, engine, 1))
    assert report.extra["routing_mismatch"] == 0.0 and report.extra["logprob_gap"] < 1e-7 and report.grad_norm > 0
    assert engine.load(sync_tensors(shard), 1) > 0
    mine, theirs = shard.global_parameters(), engine.parameters()
    assert set(mine) <= set(theirs)
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name
    biases = [n for n in theirs if n.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(shard.model.get_buffer(n), theirs[n]) for n in biases)
    # rollout in bf16, training in float32, routers with near-ties: replay makes the trainer use the rollout's ids
    out = {}
    for replay in (False, True):
        cfg = hf_rl_config(path, None, "rl.rollout.dtype=bfloat16", f"rl.routing_replay={str(replay).lower()}")
        shard = DeviceShard(cfg, 0, 1, None, None)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in shard.model.moe_layers():   # every expert's row alike plus noise, no bias: near-ties
                gate = m.__dict__["_gate"]
                gate.weight.copy_(gate.weight[0].expand_as(gate.weight) + 1e-3 * torch.randn(gate.weight.shape,
                                                                                              generator=g))
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.zero_()
        engine = RolloutEngine(cfg)
        engine.load(sync_tensors(shard), 0)
        out[replay] = shard.train_step(1, None, _batch(cfg, engine, 1)).extra
    assert out[False]["routing_mismatch"] > 0 and out[False]["replay_mismatch"] > 0
    assert out[True]["routing_mismatch"] > 0 and out[True]["replay_mismatch"] == 0.0
    assert out[True]["logprob_gap"] < out[False]["logprob_gap"]


def test_a_router_without_a_replay_formula_is_refused(checkpoints, monkeypatch):
    monkeypatch.delitem(REPLAY_WEIGHTS, "MixtralTopKRouter")
    with pytest.raises(ConfigError, match="does not know how MixtralTopKRouter weighs its experts"):
        hf_rl_config(checkpoints / "mixtral", None, "rl.routing_replay=true")
    hf_rl_config(checkpoints / "mixtral", None, "rl.routing_replay=false")


# ------------------------------------------------------------------ N devices == 1
EQUAL = ["memory.activation_checkpointing=full", "train.micro_batches=2", "rl.updates_per_rollout=2",
         "rl.kl_coeff=0.05", "rl.routing_replay=true", "train.lr=0.05"]
BIAS = {"qwen2_moe": [], "deepseek_v4": ["balance.bias_update_speed=0.01"]}   # Qwen2-MoE's routers have no bias


def _equal_worker(rank: int, world: int, path: str, port: int, batches: str, out: str) -> None:
    from orchestrator.device.shard import DeviceShard

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    cfg = hf_rl_config(path, None, "train.dtype=float64", f"cluster.num_devices={world}",
                       "parallel.expert_parallel=2", "memory.zero_stage=3", *EQUAL, *BIAS[Path(path).name])
    shard = DeviceShard(cfg, rank, world, None, None)
    with open(batches, "rb") as f:
        steps = pickle.load(f)
    losses = [shard.train_step(i + 1, None, b).loss for i, b in enumerate(steps)]
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump((losses, shard.global_parameters(), dict(sync_tensors(shard))), f)
    groups.leave()


TOLERANCE = {"qwen2_moe": (dict(abs=1e-9, rel=0), dict(rtol=1e-6, atol=1e-9)),
             "deepseek_v4": (dict(rel=1e-6, abs=1e-7), None)}


@pytest.mark.parametrize("kind", list(TOLERANCE))
def test_two_devices_compute_the_rl_step_of_one(checkpoints, tmp_path, kind):
    """EP 2 with ZeRO 3, full checkpointing, micro-batches, two updates, the KL to the sharded reference, routing
    replay: the losses, the parameters and the tensors sent to an engine are the single device's. Qwen2-MoE computes
    in float64 throughout: losses to 1e-9, parameters to 1e-6 (relative). DeepSeek-V4's transformers code casts its
    norms, rotary, hyper-connections and indexer to float32, so two devices' sums in another order agree to float32's
    precision: losses to 1e-6 relative, or 1e-7 absolute (float32's epsilon) for a loss near 0 after an update, a small
difference of O(1) terms (an AVX2 EPYC gave 0.0100730 vs 0.0100730 + 5.1e-8, 5e-6 relative; with every
parallel.* speed option off too). Its parameters are not compared: AdamW turns a gradient that is ~0 up to
    float32 noise (the first layer's hyper-connection, whose input streams are copies of one embedding) into a step
    of +-lr either way (measured: 0.006 on layer 0's attn_hc.fn). What the devices send an engine is what they hold."""
    from orchestrator.device.rollout import RolloutEngine
    from orchestrator.device.shard import DeviceShard

    path = checkpoints / kind
    cfg = hf_rl_config(path, None, "train.dtype=float64", *EQUAL, *BIAS[kind])
    shard, engine = DeviceShard(cfg, 0, 1, None, None), RolloutEngine(cfg)
    steps = [_batch(cfg, engine, 1)]
    shard.train_step(1, None, steps[0])
    engine.load(sync_tensors(shard), 1)
    steps.append(_batch(cfg, engine, 2))
    shard = DeviceShard(cfg, 0, 1, None, None)
    ref = [shard.train_step(i + 1, None, b).loss for i, b in enumerate(steps)]
    ref_params = shard.global_parameters()
    with open(tmp_path / "batches", "wb") as f:
        pickle.dump(steps, f)
    out = str(tmp_path / "results")
    mp.spawn(_equal_worker, args=(2, str(path), groups.free_port("127.0.0.1"), str(tmp_path / "batches"), out),
             nprocs=2)
    merged, synced = {}, {}
    for rank in range(2):
        with open(f"{out}.{rank}", "rb") as f:
            losses, params, sent = pickle.load(f)
        assert losses == pytest.approx(ref, **TOLERANCE[kind][0])
        merged.update(params)
        synced.update(sent)
    assert set(synced) >= set(ref_params)
    for name, t in ref_params.items():
        assert torch.equal(synced[name], merged[name]), name
        if TOLERANCE[kind][1] is not None:
            torch.testing.assert_close(merged[name], t, **TOLERANCE[kind][1], msg=name)


# --------------------------------------------------------------------------- on Ray
def test_deepseek_v4_rl_job_heals_a_rollout_kill_and_resumes_exactly(ray_session, checkpoints, tmp_path):
    from orchestrator.driver import Driver

    def run(where: str, *overrides: str):
        cfg = hf_rl_config(checkpoints / "deepseek_v4", tmp_path / where, "cluster.num_devices=2", "train.steps=4",
                           "rl.sft_steps=1", "checkpoint.every_steps=2", "faults.snapshot_every=1",
                           "rl.routing_replay=true", *overrides)
        return Driver(cfg, tmp_path / where).run(), step_records(tmp_path / where)

    summary, recs = run("a")
    assert [r["phase"] for r in recs] == ["sft", "rl", "rl", "rl"]
    assert all(r["replay_mismatch"] == 0.0 and "routing_mismatch" in r for r in recs[1:])
    assert summary.accuracy_before is not None and summary.accuracy_after is not None
    _, killed = run("b", "faults.plan=[{step: 3, kind: kill, target: rollout, rank: 1}]")
    assert [r["loss"] for r in killed] == [r["loss"] for r in recs]
    assert _final_hashes(tmp_path / "b") == _final_hashes(tmp_path / "a")
    run("c", "train.steps=2", "train.lr_horizon=4")
    run("c", "train.resume=latest")
    assert [r["loss"] for r in step_records(tmp_path / "c")] == [r["loss"] for r in recs]
    assert _final_hashes(tmp_path / "c") == _final_hashes(tmp_path / "a")


def test_rl_starts_from_an_exported_warm_up_which_is_also_its_kl_reference(ray_session, tmp_path):
    """A supervised warm-up in a run of its own (the native model), exported to transformers, is where an RL run
    starts (model.hf_path) and the reference its KL is taken to: the first update's KL is 0, the next ones not, and
    the held-out accuracy the RL run starts from is the warm-up's own."""
    from orchestrator.checkpoint.hf_export import export_checkpoint
    from orchestrator.driver import Driver
    from tests.test_rl import rl_config

    warm = rl_config(tmp_path / "warm", "cluster.num_devices=2", "train.steps=4", "rl.sft_steps=3",
                     "checkpoint.every_steps=3", "faults.snapshot_every=1")
    warm_summary = Driver(warm, tmp_path / "warm").run()
    export_checkpoint(str(next((tmp_path / "warm").rglob("step_00000003"))), str(tmp_path / "hf"))
    cfg = hf_rl_config(tmp_path / "hf", tmp_path / "rl", "cluster.num_devices=2", "train.steps=2", "rl.sft_steps=0",
                       "rl.kl_coeff=0.1", "faults.snapshot_every=1")
    summary = Driver(cfg, tmp_path / "rl").run()
    recs = step_records(tmp_path / "rl")
    assert summary.accuracy_before == warm_summary.accuracy_before
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-9) and recs[1]["kl"] > 0
