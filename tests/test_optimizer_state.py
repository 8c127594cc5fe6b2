"""What AdamW holds is what a snapshot and a checkpoint hold, at every ZeRO stage: moments and step counts, and "no
state yet" for a parameter that never had a gradient (DeepSeek-V4's indexer: its scores only pick positions) or
a frozen one (train.freeze). Healing (restore from the in-memory snapshots) and resume (restore from the written
shard files through the manifest) then continue bit for bit, as the run that was never interrupted.

The devices are DeviceShards in spawned processes over gloo on loopback (no Ray: the restore is the devices' own
code; the Ray runs are in test_hf_runs.py / test_memory_runs.py). The oracles: the uninterrupted run for the
bits, a parameter's own initial value for one that must not move, and the single-device reference run
(orchestrator/reference.py) for what N devices compute.
"""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.data import load_corpus
from orchestrator.parallel import groups
from orchestrator.reference import reference_run
from tests.conftest import tiny_config
from tests.hf_tiny import make_tiny_hf

WORLD = 2
FROZEN = ["train.freeze=['*.router.gate.weight', 'layers.1.attn.wq.weight', 'layers.2.ffn.experts.w1_EFD']"]
MODELS = {"native": [], "frozen": FROZEN, "deepseek_v4": None}   # None: the tiny DeepSeek-V4 (its folder at run time)
STAGES = (0, 1, 2, 3)
BEFORE, AFTER = 2, 2   # steps before the snapshot, steps after it


def _overrides(model: str, hf_dir: str) -> list[str]:
    extra = MODELS[model]
    return [f"model.hf_path={hf_dir}", "balance.bias_update_speed=0.01"] if extra is None else extra


def _config(model: str, hf_dir: str, *more: str):
    return tiny_config(None, *_overrides(model, hf_dir), f"train.steps={BEFORE + AFTER}", "train.weight_decay=0.1",
                       "train.dtype=float64",
                       *more)


def _checkpoint(snapshots: list) -> tuple[dict, dict[str, bytes]]:
    """The manifest and files a checkpoint of these snapshots holds, assembled as the coordinator commits one."""
    from orchestrator.checkpoint.shard import serialize

    files, blobs, index, steps, expert_files = {}, {}, {}, {}, {}
    for snap in snapshots:
        for name, tensors in snap.files.items():
            blobs[name], files[name] = serialize(tensors)
        for key, pieces in snap.index.items():
            index.setdefault(key, []).extend(pieces)
        steps.update(snap.optimizer_steps)
        for layer, placed in snap.expert_files.items():
            expert_files.setdefault(layer, {}).update(placed)
    manifest = {"files": files, "index": index, "optimizer_step": snapshots[0].optimizer_step,
                "optimizer_steps": steps, "expert_files": expert_files}
    return manifest, blobs


def _worker(rank: int, world: int, port: int, out: str, hf_dir: str, combos: list[tuple[str, int]]) -> None:
    import torch.distributed as dist

    from orchestrator.device.shard import DeviceShard

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    results = {}
    for model in dict.fromkeys(m for m, _ in combos):
        cfg = _config(model, hf_dir, f"cluster.num_devices={world}", "parallel.expert_parallel=2")
        corpus = load_corpus(cfg.data)
        for stage in [s for m, s in combos if m == model]:
            cfg.memory.zero_stage = stage

            def shard() -> DeviceShard:
                return DeviceShard(cfg, rank, world, corpus.train, corpus.val)

            def rest(s: DeviceShard) -> tuple[list[float], dict[str, torch.Tensor], dict[str, int]]:
                reports = [s.train_step(step) for step in range(BEFORE + 1, BEFORE + AFTER + 1)]
                return [r.loss for r in reports], s.global_parameters(), reports[-1].memory

            run = shard()
            initial = run.global_parameters()
            for step in range(1, BEFORE + 1):
                run.train_step(step)
            snap = run.snapshot(BEFORE)
            stateless = sorted(n for n, p in run.model.named_parameters() if run.optim.owns(p) and not
                               run.optim.step_of(p))
            snapshots: list = [None] * world
            dist.all_gather_object(snapshots, snap)
            straight = rest(run)
            healed = shard()
            healed.restore_snapshots(snapshots)
            healed = rest(healed)
            manifest, blobs = _checkpoint(snapshots)
            resumed = shard()
            resumed.restore(manifest, blobs.__getitem__, f"checkpoint of {model} stage {stage}")
            resumed = rest(resumed)
            results[(model, stage)] = (initial, straight, healed, resumed, stateless, manifest["optimizer_steps"])
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(results, f)
    groups.leave()


def _spawn(tmp, world: int, combos: list[tuple[str, int]]) -> tuple[dict, str]:
    hf_dir = tmp / "deepseek_v4"
    if not hf_dir.exists():
        make_tiny_hf("deepseek_v4", hf_dir)
    out = str(tmp / f"results{world}")
    mp.spawn(_worker, args=(world, groups.free_port("127.0.0.1"), out, str(hf_dir), combos), nprocs=world)
    parts = []
    for rank in range(world):
        with open(f"{out}.{rank}", "rb") as f:
            parts.append(pickle.load(f))
    results = parts[0]
    for other in parts[1:]:   # every device's experts: global_parameters gives the ones a device holds
        for key, (initial, straight, healed, resumed, _, _) in other.items():
            mine = results[key]
            for mine_part, their_part in ((mine[0], initial), (mine[1][1], straight[1]), (mine[2][1], healed[1]),
                                          (mine[3][1], resumed[1])):
                mine_part.update(their_part)
    return results, str(hf_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 devices, expert parallel: every model at every stage."""
    return _spawn(tmp_path_factory.mktemp("optimizer_state"), WORLD, [(m, s) for m in MODELS for s in STAGES])


# 4 devices, EP 2 x DP 2: ZeRO-1 partitions the experts' states over the data-parallel pair (the device writing
# a moment is its partition's owner, not the first replica) and FSDP2 shards the experts on dim 1 over it
DP_COMBOS = [("frozen", 1), ("frozen", 3), ("deepseek_v4", 1), ("deepseek_v4", 3)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert a.keys() == b.keys(), where
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where}: {name}"


@pytest.mark.parametrize("model", list(MODELS))
def test_healing_and_resume_continue_bit_for_bit_at_every_stage(runs, model):
    results, _ = runs
    for stage in STAGES:
        _, (losses, params, _), healed, resumed, _, _ = results[(model, stage)]
        for how, (got_losses, got_params, _) in (("healed", healed), ("resumed", resumed)):
            where = f"{model}, ZeRO stage {stage}, {how}"
            assert got_losses == losses, where
            _same(got_params, params, where)


def test_healing_and_resume_continue_bit_for_bit_with_data_parallel_experts(tmp_path):
    results, _ = _spawn(tmp_path, 4, DP_COMBOS)
    for model, stage in DP_COMBOS:
        initial, (losses, params, _), healed, resumed, _, counts = results[(model, stage)]
        for how, (got_losses, got_params, _) in (("healed", healed), ("resumed", resumed)):
            where = f"{model}, EP 2 x DP 2, ZeRO stage {stage}, {how}"
            assert got_losses == losses, where
            _same(got_params, params, where)
        still = [n for n in initial if ".indexer." in n or n.endswith("router.gate.weight")]
        assert still and all(torch.equal(initial[n], params[n]) for n in still), (model, stage)
        assert counts and set(counts.values()) == {0}, (model, stage)


@pytest.mark.parametrize("model", ["frozen", "deepseek_v4"])
def test_parameters_without_gradients_keep_no_state_and_do_not_move(runs, model):
    """Frozen parameters and DeepSeek-V4's indexer: no AdamW state at any stage, recorded as such (step count 0),
    and their values are their initial ones (no weight decay applied to them: at stage 0 the gradient all-reduce
    once gave them zero gradients, which AdamW then decayed)."""
    results, _ = runs
    for stage in STAGES:
        initial, (_, final, _), _, _, stateless, counts = results[(model, stage)]
        still = sorted(n for n in initial if ".experts." not in n and torch.equal(initial[n], final[n]))
        if model == "frozen":
            frozen = {n for n in initial if n.endswith("router.gate.weight")} | {"layers.1.attn.wq.weight"}
            assert frozen <= set(still), stage
            assert all(torch.equal(initial[n], final[n]) for n in initial if n.startswith("layers.2.ffn.experts.w1_EFD"))
            assert stateless == [], stage          # frozen ones are in no optimizer at all
            assert frozen <= set(counts) and all(counts[n] == 0 for n in frozen), stage
            assert set(counts) >= {f"layers.2.ffn.experts.w1_EFD[{e}]" for e in range(4)}, stage
        else:
            indexer = [n for n in initial if ".indexer." in n]
            assert indexer and set(indexer) <= set(still), stage
            if stage < 2:   # rank 0 holds the state of every replicated parameter (stage 1: its own partition)
                assert set(stateless) <= set(indexer), stage
            assert set(indexer) == {n for n, c in counts.items() if c == 0}, stage


@pytest.mark.parametrize("model", list(MODELS))
def test_two_devices_compute_what_one_does_for_every_parameter(runs, model):
    """Every stage's parameters after the run against the single-device reference (float64: 1e-6 relative, 1e-7
    absolute: AdamW's m/sqrt(v) magnifies summation-order rounding in a rarely seen embedding row to ~1e-8, while
    one wrong weight-decay step on a parameter that must not move is lr*wd*|p| ~ 2e-5). DeepSeek-V4 computes its
    hyper-connections in float32 whatever the model's dtype (transformers' DeepseekV4HyperConnection casts), so
    its tiny gradients there carry float32 rounding that AdamW turns into visible differences: for it, the
    parameters without a gradient are compared (they must equal the reference exactly) and the losses to 1e-5;
    test_hf_models checks the rest of it against transformers."""
    results, hf_dir = runs
    ref_reports, ref = reference_run(_config(model, hf_dir))
    for stage in STAGES:
        _, (losses, params, _), _, _, _, _ = results[(model, stage)]
        assert params.keys() == ref.keys()
        if model == "deepseek_v4":
            assert losses == pytest.approx([r.loss for r in ref_reports][BEFORE:], rel=1e-5), stage
            indexer = [n for n in ref if ".indexer." in n]
            assert indexer and all(torch.equal(params[n], ref[n]) for n in indexer), stage
            continue
        for name, want in ref.items():
            torch.testing.assert_close(params[name], want, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{model} stage {stage} {name}: {m}")


def test_freeze_patterns_are_checked_against_the_model_before_anything_starts():
    from orchestrator.config import ConfigError
    from orchestrator.memory.plan import frozen_names

    assert frozen_names(tiny_config(None, *FROZEN)) == {"layers.1.ffn.router.gate.weight",
                                                        "layers.2.ffn.router.gate.weight", "layers.1.attn.wq.weight",
                                                        "layers.2.ffn.experts.w1_EFD"}
    with pytest.raises(ConfigError, match=r"train.freeze\[1\]='layers.9.\*' names no parameter of this model, whose "
                                          r"parameters are tok_emb.weight, layers.\*.attn_norm.weight, .*fix the "
                                          r"pattern, or remove it"):
        frozen_names(tiny_config(None, "train.freeze=['*.router.*', 'layers.9.*']"))
    with pytest.raises(ConfigError, match=r"freezes every parameter: nothing would train"):
        frozen_names(tiny_config(None, "train.freeze=['*']"))
    with pytest.raises(ConfigError, match=r"train.freeze\[0\] is empty"):
        tiny_config(None, "train.freeze=['']")


def test_the_memory_plan_counts_no_gradient_or_optimizer_state_for_frozen_parameters(runs):
    """The planner's bytes of the frozen run on device 0 against what it held after its last step (as
    test_planner: within 10%), at every stage; and fewer than the same model's without freezing."""
    from orchestrator.memory.plan import plan_memory

    results, hf_dir = runs
    for stage in STAGES:
        cfg = _config("frozen", hf_dir, f"cluster.num_devices={WORLD}", f"memory.zero_stage={stage}")
        plan, plain = plan_memory(cfg).devices[0], plan_memory(_config("native", hf_dir, f"cluster.num_devices={WORLD}",
                                                                       f"memory.zero_stage={stage}")).devices[0]
        measured = results[("frozen", stage)][1][2]
        for category in ("params", "grads", "optimizer"):
            assert measured[category] == pytest.approx(getattr(plan, category), rel=0.10), (stage, category)
        assert plan.params == plain.params and plan.grads < plain.grads and plan.optimizer < plain.optimizer, stage


def test_an_experts_module_without_rows_still_gets_zero_gradients(tmp_path):
    """transformers' eager expert loop runs only the experts that got rows: a device that got none would leave its
    experts' gradient None (AdamW then skips them there only: no weight decay, a step count behind the other
    devices'), where one device holding every expert always has one. ExpertParallelExperts keeps them in the
    graph: zero gradients."""
    from orchestrator.model.hf import build_hf_model

    make_tiny_hf("mixtral", tmp_path / "mixtral")
    cfg = tiny_config(None, f"model.hf_path={tmp_path / 'mixtral'}", "train.dtype=float64")
    model = build_hf_model(cfg.model, 0, [0, 1, 2, 3], cfg.balance, {}).double()
    model.hf_config._experts_implementation = "eager"
    experts = model.moe_layers()[0]
    x = torch.zeros(0, cfg.model.dim, dtype=torch.float64)
    y = experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64))
    y.sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters()}
    assert grads and all(g is not None and not g.any() for g in grads.values()), grads
