"""The snapshot arena (orchestrator/device/arena.py): a CPU device's parameters and AdamW moments held as views
of one buffer per kind and dtype, so that a snapshot serialized at once (`copy=False`, what a device actor returns
into the object store) pickles as a few buffers; and the snapshot's skeleton, the part of it the arena fixes,
reused while nothing it depends on changes.

The oracles: the previous code path, take_snapshot without an arena (every tensor gathered by the walk, one array
each), on a twin device that never had an arena; and the twin's own training, bit for bit in float64. Healing
through Ray with the arena on is every healing test's (tests/test_healing*.py: the device actors take their
snapshots this way).
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import shard as checkpoint_shard
from orchestrator.checkpoint.shard import serialize, take_snapshot
from orchestrator.data import load_corpus
from orchestrator.device.shard import DeviceShard
from orchestrator.memory.measure import state_bytes
from tests.conftest import tiny_config
from tests.hf_tiny import make_tiny_hf, tiny_hf_config
from tests.test_optimizer_state import FROZEN


def _config(tmp_path, model: str, *more: str):
    if model == "deepseek_v4":
        hf_dir = tmp_path / "deepseek_v4"
        make_tiny_hf("deepseek_v4", hf_dir)
        extra = [f"model.hf_path={hf_dir}", "balance.bias_update_speed=0.01"]
    elif model == "tied_mixtral":   # its head is the embedding: in the state_dict twice, a parameter once
        from transformers import AutoModelForCausalLM

        hf_dir = tmp_path / "tied_mixtral"
        torch.manual_seed(0)
        config = tiny_hf_config("mixtral")
        config.tie_word_embeddings = True
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf_dir)
        extra = [f"model.hf_path={hf_dir}"]
    else:
        extra = FROZEN if model == "frozen" else []
    return tiny_config(None, *extra, "train.steps=6", "train.weight_decay=0.1", "train.dtype=float64", *more)


def _same(got, want) -> None:
    """Two snapshots hold the same: files, keys in the same order, arrays of the same dtype, shape and bits; the
    same index, step counts, expert files and placement."""
    assert list(got.files) == list(want.files)
    for name in want.files:
        assert list(got.files[name]) == list(want.files[name]), name
        for key, a in want.files[name].items():
            b = got.files[name][key]
            assert (b.dtype, b.shape) == (a.dtype, a.shape), key
            assert np.array_equal(np.asarray(b), np.asarray(a)), key
    for field in ("step", "rank", "optimizer_step", "expert_files", "placement", "index", "optimizer_steps"):
        assert getattr(got, field) == getattr(want, field), field
    assert list(got.index) == list(want.index) and list(got.optimizer_steps) == list(want.optimizer_steps)


def _reference(shard: DeviceShard, step: int):
    """The snapshot as taken before the arena: every tensor viewed by the walk, none from a skeleton."""
    return take_snapshot(shard.model, shard.optim, shard.rank, step, shard.mesh.dp_rank, shard.rl_pending,
                         None, copy=False)


def _out_of_band(snap) -> int:
    buffers: list = []
    pickle.dumps(snap, protocol=5, buffer_callback=buffers.append)
    return len(buffers)


@pytest.mark.parametrize("model", ["native", "frozen", "deepseek_v4", "tied_mixtral"])
def test_a_snapshot_from_the_arena_holds_what_the_walk_gathers_and_training_is_unchanged(tmp_path, monkeypatch, model):
    """Every step: the twin devices' losses and gradient norms are equal (float64); the arena device's snapshot
    (built from the arena and, from the second on, from its skeleton) equals the twin's walk, before and after a
    pickle round trip, which carries a handful of buffers where the walk's carries one per tensor, and whose files
    safetensors writes (no two keys sharing memory: a tied head is a state_dict "buffer" viewing the embedding). The step counts
    cover a frozen parameter (no state) and DeepSeek-V4's indexer (never a gradient: no moments, count 0). The
    arena is built once, every view in it is 64-byte aligned, and the memory the devices hold is the same but for
    that alignment."""
    cfg = _config(tmp_path, model)
    corpus = load_corpus(cfg.data)
    arena, twin = (DeviceShard(cfg, 0, 1, corpus.train, corpus.val) for _ in range(2))
    from_skeleton = []
    monkeypatch.setattr(checkpoint_shard, "_from_skeleton",
                        lambda *a, _real=checkpoint_shard._from_skeleton: from_skeleton.append(1) or _real(*a))
    for step in range(1, 6):
        got, want = arena.train_step(step), twin.train_step(step)
        assert (got.loss, got.grad_norm) == (want.loss, want.grad_norm), step
        snap = arena.snapshot(step, copy=False)
        ref = _reference(twin, step)
        _same(snap, ref)
        back = pickle.loads(pickle.dumps(snap, protocol=5))
        _same(back, ref)
        for arrays in back.files.values():   # as a checkpoint writes it: no two keys share memory
            serialize(arrays)
        assert _out_of_band(snap) <= 8 < _out_of_band(ref)
    assert arena.arena.builds == 1 and len(from_skeleton) == 4   # built at the first, reused by the four after
    assert all(p.data_ptr() % 64 == 0 for p in arena.model.parameters())   # aligned as tensors of their own
    assert all(t.data_ptr() % 64 == 0 for st in arena.optim.states() for t in st.values() if t.dim())
    if model in ("frozen", "deepseek_v4"):
        assert 0 in ref.optimizer_steps.values()   # a parameter without AdamW state is recorded as such
    got, want = state_bytes(arena.model, arena.optim), state_bytes(twin.model, twin.optim)
    tensors = {"params": len(list(arena.model.parameters())), "grads": 0,
               "optimizer": sum(len(st) for st in arena.optim.states())}
    for part, n in tensors.items():   # the same, but for the alignment a view starts at (at most 60 bytes each)
        assert 0 <= got[part] - want[part] <= 60 * n, part


def test_a_step_count_that_differs_is_taken_anew_from_the_skeleton(tmp_path):
    """The skeleton keeps what the arena fixes, not the step counts: a parameter whose AdamW count falls behind
    the optimizer's (as one whose gradient came later does) is recorded in the next snapshot as the walk does."""
    cfg = _config(tmp_path, "native")
    corpus = load_corpus(cfg.data)
    shard = DeviceShard(cfg, 0, 1, corpus.train, corpus.val)
    shard.train_step(1)
    shard.snapshot(1, copy=False)
    shard.train_step(2)
    name, p = next(iter(shard.model.dense_parameters()))
    shard.optim.state_of(p)["step"] -= 1
    snap = shard.snapshot(2, copy=False)
    assert snap.optimizer_steps == {name: 1}
    _same(snap, _reference(shard, 2))


def test_a_restore_and_a_new_placement_leave_no_stale_view(tmp_path):
    """A restore replaces the moments the arena held, and a new placement changes which expert each slot holds:
    the next snapshot still equals the walk's (the arena rebuilt, the skeleton made anew), and training goes on
    as on a twin that never had an arena."""
    cfg = _config(tmp_path, "native")
    corpus = load_corpus(cfg.data)
    arena, twin = (DeviceShard(cfg, 0, 1, corpus.train, corpus.val) for _ in range(2))
    for step in (1, 2):
        arena.train_step(step), twin.train_step(step)
        kept = arena.snapshot(step, copy=False)
    kept = pickle.loads(pickle.dumps(kept, protocol=5))   # as the object store hands it back
    for step in (3, 4):
        arena.train_step(step), twin.train_step(step)
        arena.snapshot(step, copy=False)
    builds = arena.arena.builds
    arena.restore_snapshots([kept])
    twin.restore_snapshots([_reference_copy(twin, kept)])
    old_skeleton = arena.arena.skeleton
    _same(arena.snapshot(2, copy=False), _reference(twin, 2))
    assert arena.arena.builds > builds   # the restored moments are new tensors: the arena took them in
    assert arena.arena.skeleton is not old_skeleton and arena.arena.skeleton.key[0] == arena.arena.builds
    for step in (3, 4):
        got, want = arena.train_step(step), twin.train_step(step)
        assert (got.loss, got.grad_norm) == (want.loss, want.grad_norm), step
        _same(arena.snapshot(step, copy=False), _reference(twin, step))
    placement = [[list(reversed(ids)) for ids in layer] for layer in arena.model.placement()]
    for shard in (arena, twin):
        shard.set_placement(placement)
    snap = arena.snapshot(4, copy=False)
    _same(snap, _reference(twin, 4))
    assert snap.placement == placement


def _reference_copy(shard: DeviceShard, snap):
    """`snap` for the twin: the same arrays, copied (the twin must not share the arena device's memory)."""
    out = pickle.loads(pickle.dumps(snap, protocol=5))
    out.files = {name: {k: np.array(a) if isinstance(a, np.ndarray) else a.clone() for k, a in arrays.items()}
                 for name, arrays in out.files.items()}
    return out


def test_a_snapshot_to_copy_takes_no_arena(tmp_path):
    """`copy=True` (the snapshot thread's, and a GPU's): copies, no arena, nothing re-pointed."""
    cfg = _config(tmp_path, "native")
    corpus = load_corpus(cfg.data)
    shard = DeviceShard(cfg, 0, 1, corpus.train, corpus.val)
    shard.train_step(1)
    ptrs = [p.data_ptr() for p in shard.model.parameters()]
    snap = shard.snapshot(1, copy=True)
    assert shard.arena.builds == 0 and not snap.arena and not snap.in_arena
    assert [p.data_ptr() for p in shard.model.parameters()] == ptrs
    assert torch.equal(torch.from_numpy(np.asarray(next(iter(snap.files["dense.safetensors"].values())))),
                       torch.from_numpy(np.asarray(next(iter(_reference(shard, 1).files["dense.safetensors"]
                                                              .values())))))
