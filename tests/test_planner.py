"""The memory plan (orchestrator/memory/plan.py) against what torch allocates (orchestrator/memory/measure.py), and the
refusal that names the knob.

Model states: four processes over gloo on loopback (torch.multiprocessing, no Ray) shard the model as the run
does (parallel/sharding.py: ZeroRedundancyOptimizer, FSDP2 fully_shard on the [dp, ep] mesh), take one AdamW
step, and count the storages they hold; activations: one process, the saved-tensor meter over a training step.
Both on the default model and one ~10x larger with dimensions that do not split evenly (FSDP2's padding).
"""
from __future__ import annotations

import copy
import json
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from orchestrator.parallel import groups
from orchestrator.memory.plan import CATEGORIES, MemoryPlanError, check_fits, plan_memory

MODELS = {"default": [],
          # ~10x the default's parameters (17M vs 1.7M); dense_dim 702 does not split evenly over 4 devices (FSDP2 pads;
          # it refuses uneven shards on dim 1, where the experts are sharded)
          "10x": ["model.dim=256", "model.n_layers=7", "model.n_heads=8", "model.num_experts=16",
                  "model.expert_dim=200", "model.dense_dim=702"]}
WORLD = 4
LAYOUTS = [("default", 2), ("10x", 2), ("default", 4), ("default", 1)]
# (model, ep): ep 2 x dp 2 shards dense state over 4 devices and experts over 2; ep 4 x dp 1 keeps experts whole
# (expert parallelism already split them 4 ways); ep 1 x dp 4 is plain data parallelism: ZeRO shards everything


def _cfg(model: str, *overrides: str):
    return load_config(DEFAULT_CONFIG, MODELS[model] + list(overrides))


def _layout(model: str, ep: int, stage: int = 0):
    return _cfg(model, f"cluster.num_devices={WORLD}", f"parallel.expert_parallel={ep}", f"memory.zero_stage={stage}",
                "data.seq_len=16", "train.global_batch_size=8")


def _state_worker(rank: int, port: int, out: str) -> None:
    from orchestrator.config import expert_slots
    from orchestrator.memory.measure import ActivationMeter, state_bytes
    from orchestrator.model import build_model
    from orchestrator.parallel import apply_expert_parallel
    from orchestrator.parallel.mesh import build_mesh
    from orchestrator.parallel.sharding import Optimizers, shard_model
    from orchestrator.experts.placement import ExpertPlacement

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, WORLD, timeout_s=120)
    results = {}
    for model_name, ep in LAYOUTS:
        mesh = build_mesh(WORLD, rank, ep)
        cfg = _layout(model_name, ep)
        slots = ExpertPlacement.initial(cfg.model.num_experts, ep, expert_slots(cfg)).slots
        built = build_model(cfg.model, cfg.seed, slots[mesh.ep_rank], cfg.balance).to(torch.float32)
        for stage in range(4):
            model = copy.deepcopy(built)
            apply_expert_parallel(model, ep, mesh.ep_group)
            for m in model.moe_layers():
                m.set_placement(slots, mesh.ep_rank)
                m.global_tokens = 8 * 16
            shard_model(model, mesh, stage)
            optim = Optimizers([p for _, p in model.dense_parameters()], [p for _, p in model.expert_parameters()],
                               mesh, stage, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
            tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
            with ActivationMeter(model) as meter:
                loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
                (loss + model.aux_loss()).backward()
            optim.step()
            results[model_name, ep, stage] = {**state_bytes(model, optim), "activations_peak": meter.peak_bytes}
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(results, f)
    groups.leave()


@pytest.fixture(scope="module")
def measured_states(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("states") / "bytes")
    mp.spawn(_state_worker, args=(groups.free_port(), out), nprocs=WORLD, join=True)
    return [pickle.load(open(f"{out}.{rank}", "rb")) for rank in range(WORLD)]


@pytest.mark.parametrize("model,ep", LAYOUTS, ids=[f"{m}-ep{e}" for m, e in LAYOUTS])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_match_plan(measured_states, model, ep, stage):
    plan = plan_memory(_layout(model, ep, stage))
    for rank, device in enumerate(plan.devices):
        got = measured_states[rank][model, ep, stage]
        for category in ("params", "grads", "optimizer"):
            want = getattr(device, category)
            print(f"{model} ep {ep} stage {stage} device {rank} {category}: measured {got[category]} planned {want}")
            assert got[category] == pytest.approx(want, rel=0.10), (model, ep, stage, rank, category)
    if stage > 0:  # it shards at all
        whole = plan_memory(_layout(model, ep)).devices[0].optimizer
        assert measured_states[0][model, ep, stage]["optimizer"] < 0.7 * whole
    # Activations under expert parallelism: a device's experts get as many token copies as routing sends them,
    # the plan assumes the mean; the activation peak (the end of forward, no checkpointing) is affine in that
    # count, and the counts of an ep group add up to the plan's, so the sums over devices must agree.
    measured = sum(measured_states[rank][model, ep, stage]["activations_peak"] for rank in range(WORLD))
    planned = sum(d.activations_peak for d in plan.devices)
    print(f"{model} ep {ep} stage {stage} activations over {WORLD} devices: measured {measured} planned {planned}")
    assert measured == pytest.approx(planned, rel=0.01)


def test_stage3_holds_under_0_30_of_stage0s_model_states_on_4_devices(measured_states):
    """The issue's target, on the default model and 4 devices, data-parallel (EP 1 x DP 4): ZeRO-3 keeps 1/4 of
    every state plus FSDP2's padding. Where expert parallelism already splits the experts, stage 3 can only cut
    what is left: EP 2 x DP 2 reaches 0.38 and EP 4 x DP 1 0.51 (experts are 70% of the default model), the same
    ratio the plan gives."""
    def states(ep: int, stage: int, rank: int) -> int:
        return sum(measured_states[rank]["default", ep, stage][c] for c in ("params", "grads", "optimizer"))

    for rank in range(WORLD):
        assert states(1, 3, rank) <= 0.30 * states(1, 0, rank), rank
    for ep in (1, 2, 4):
        plan0, plan3 = plan_memory(_layout("default", ep, 0)).devices[0], plan_memory(_layout("default", ep, 3)).devices[0]
        planned = sum(getattr(plan3, c) for c in ("params", "grads", "optimizer")) / sum(
            getattr(plan0, c) for c in ("params", "grads", "optimizer"))
        measured = states(ep, 3, 0) / states(ep, 0, 0)
        print(f"default model, 4 devices, ep {ep}: stage 3 / stage 0 model states measured {measured:.3f} "
              f"planned {planned:.3f}")
        assert measured == pytest.approx(planned, rel=0.01)


def _measure_step(model, cfg, autocast: bool = False) -> int:
    """Peak saved-activation bytes of one training step of one device (all experts local), as DeviceShard runs
    it: the model in train.dtype, the device's slice in train.micro_batches forward/backward passes, the
    forward under bf16 autocast when train.mixed_precision says so."""
    from orchestrator.memory.measure import ActivationMeter

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.data.seq_len + 1), generator=g)
    model.zero_grad(set_to_none=True)
    with ActivationMeter(model) as meter:
        for part in tokens.chunk(cfg.train.micro_batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(part[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), part[:, 1:].flatten(), reduction="sum")
            (loss + model.aux_loss()).backward()
    return meter.peak_bytes


@pytest.mark.parametrize("model_name", list(MODELS))
def test_activations_match_plan(model_name):
    from orchestrator.model import build_model
    from orchestrator.model.checkpointing import apply_activation_checkpointing

    cfg = _cfg(model_name, "cluster.num_devices=1", "train.global_batch_size=4")
    model = build_model(cfg.model, cfg.seed, None, cfg.balance).to(getattr(torch, cfg.train.dtype))
    for m in model.moe_layers():
        m.global_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    peaks = {}
    for micro, precision in ((1, "none"), (2, "none"), (1, "bf16")):   # bf16: autocast, as on a GPU
        for mode in ("none", "selective", "full"):
            cfg = _cfg(model_name, "cluster.num_devices=1", "train.global_batch_size=4", f"train.micro_batches={micro}",
                       f"memory.activation_checkpointing={mode}", f"train.mixed_precision={precision}")
            apply_activation_checkpointing(model, mode)
            measured = _measure_step(model, cfg, autocast=precision == "bf16")
            planned = plan_memory(cfg).devices[0].activations_peak
            print(f"{model_name} micro_batches={micro} {precision} {mode}: measured {measured} planned {planned} "
                  f"({planned / measured - 1:+.2%})")
            assert planned == pytest.approx(measured, rel=0.10), (model_name, micro, precision, mode)
            peaks[micro, precision, mode] = measured
    for mode in ("none", "selective", "full"):  # per micro-batch; a stale count of a freed recomputed storage in
        # the second micro-batch's forward (seen with PYTHONHASHSEED=4 before memory.py purged on every growth) fails it
        assert peaks[2, "none", mode] == pytest.approx(peaks[1, "none", mode] / 2, rel=0.05), mode
    if model_name == "default":
        ratio = peaks[1, "none", "full"] / peaks[1, "none", "none"]
        print(f"full / none activation peak: {ratio:.3f}")
        assert ratio <= 0.40


# --------------------------------------------------------------------------- check_fits and the CLI
def _budget_between(fits: str, does_not: str) -> float:
    """A budget (GiB) the default config's fullest device meets with override `fits` and exceeds with `does_not`."""
    a, b = (plan_memory(load_config(DEFAULT_CONFIG, [o])).peak().total for o in (fits, does_not))
    assert a < b
    return (a + (b - a) * 0.1) / 2**30


@pytest.mark.parametrize("knob,worse", [
    ("memory.zero_stage=1", "memory.zero_stage=0"),   # the optimizer's share is the difference
    ("memory.activation_checkpointing=selective", "memory.zero_stage=3"),  # no stage fits (3 is the smallest)
])
def test_check_fits_names_the_knob(knob, worse):
    gb = _budget_between(knob, worse)
    cfg = load_config(DEFAULT_CONFIG, [f"cluster.device_memory_gb={gb}"])
    with pytest.raises(MemoryPlanError) as err:
        check_fits(cfg)
    msg = str(err.value)
    assert f"set {knob}" in msg and "activations_peak" in msg and "over the budget" in msg
    fixed = load_config(DEFAULT_CONFIG, [f"cluster.device_memory_gb={gb}", knob])
    assert check_fits(fixed).peak().total <= gb * 2**30


def test_check_fits_names_knobs_together_else_devices():
    cfg = load_config(DEFAULT_CONFIG, ["cluster.device_memory_gb=0.02"])
    with pytest.raises(MemoryPlanError, match="no single one of .* but together") as err:
        check_fits(cfg)
    overrides = re.search(r"set ((?:\S+=\S+ ?)+)$", str(err.value)).group(1).split()
    assert len(overrides) > 1 and check_fits(load_config(DEFAULT_CONFIG, ["cluster.device_memory_gb=0.02", *overrides]))
    with pytest.raises(MemoryPlanError, match="use more devices") as err:
        check_fits(load_config(DEFAULT_CONFIG, ["cluster.device_memory_gb=0.01"]))
    overrides = re.search(r"use more devices: ((?:\S+=\S+ ?)+) fits", str(err.value)).group(1).split()
    assert check_fits(load_config(DEFAULT_CONFIG, ["cluster.device_memory_gb=0.01", *overrides]))
    with pytest.raises(MemoryPlanError, match="nor more devices"):
        check_fits(load_config(DEFAULT_CONFIG, ["cluster.device_memory_gb=0.001"]))


def test_cli_plan_json():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--json", "memory.zero_stage=2"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    plan = plan_memory(load_config(DEFAULT_CONFIG, ["memory.zero_stage=2"]))
    assert data["plan"]["devices"] == plan.to_dict()["devices"]
    assert len(data["table"]) == 12 and set(CATEGORIES) <= set(data["table"][0])


def test_train_refuses_before_anything_starts(tmp_path):
    gb = _budget_between("memory.zero_stage=1", "memory.zero_stage=0")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jobs.train", f"cluster.device_memory_gb={gb}", f"run.dir={run_dir}",
                          "cluster.address=127.0.0.1:1"],   # a Ray it would try to join, and fail on
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "memory.zero_stage=1" in out.stderr and "config error" in out.stderr
    assert not run_dir.exists()


def test_memory_bench_finds_the_widest_model_that_fits(tmp_path):
    """bench/memory.py's search (planner only, no run): the width it returns fits the budget and the next does not;
    stage 3 with full checkpointing fits a larger model than stage 0 without."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("memory_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    budget = 48 * 2**20
    dim0, params0, need0 = bench.largest(0, "none", budget, 4, 1, [])
    dim3, params3, need3 = bench.largest(3, "full", budget, 4, 1, [])
    assert 0 < need0 <= budget and 0 < need3 <= budget
    assert plan_memory(bench.config(dim0 + 16, 0, "none", 4, 1, [])).peak().total > budget
    assert plan_memory(bench.config(dim3 + 16, 3, "full", 4, 1, [])).peak().total > budget
    assert params3 > params0
