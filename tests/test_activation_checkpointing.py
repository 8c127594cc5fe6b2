"""Activation checkpointing (model/checkpointing.py) changes memory, never the math: none, selective and full give
the same loss and gradients in float64; selective never runs the router twice, full recomputes each block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.model import build_model
from orchestrator.model.checkpointing import SIDE_ATTRS, apply_activation_checkpointing
from tests.conftest import tiny_config

# Every balancing loss on: their gradients flow through tensors computed inside the checkpointed regions.
CFG = tiny_config(None, "train.dtype=float64", "balance.seq_aux_loss_coeff=0.001", "balance.z_loss_coeff=0.001",
                  "balance.aux_loss_coeff=0.01")
B, T = 4, 32


def _step(mode: str) -> dict:
    model = build_model(CFG.model, CFG.seed, None, CFG.balance).double()
    for m in model.moe_layers():
        m.global_tokens = B * T
    apply_activation_checkpointing(model, mode)
    router_calls = []
    for m in model.moe_layers():
        m.router.register_forward_hook(lambda mod, args, out: router_calls.append(mod))
    tokens = torch.randint(0, CFG.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(3))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()
    after_forward = [{a: getattr(m, a) for a in SIDE_ATTRS} for m in model.moe_layers()]
    forward_calls = len(router_calls)
    loss.backward()
    after_backward = [{a: getattr(m, a) for a in SIDE_ATTRS} for m in model.moe_layers()]
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "forward_calls": forward_calls, "calls": len(router_calls), "layers": len(model.moe_layers()),
            "side": (after_forward, after_backward)}


@pytest.fixture(scope="module")
def runs():
    return {mode: _step(mode) for mode in ("none", "selective", "full")}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_loss_and_gradients(runs, mode):
    ref, got = runs["none"], runs[mode]
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-12)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode,per_layer", [("none", 1), ("selective", 1), ("full", 2)])
def test_router_runs_once_unless_full(runs, mode, per_layer):
    run = runs[mode]
    assert run["forward_calls"] == run["layers"]
    assert run["calls"] == per_layer * run["layers"]


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_recomputation_leaves_side_attributes(runs, mode):
    """What an MoE layer's forward left (token counts, balancing loss, ...) is what backward leaves: the very
    objects, so a recomputation's copies never replace them."""
    after_forward, after_backward = runs[mode]["side"]
    for fwd, bwd in zip(after_forward, after_backward):
        for attr in SIDE_ATTRS:
            assert bwd[attr] is fwd[attr], attr


def test_parameter_names_unchanged():
    plain = build_model(CFG.model, CFG.seed)
    ckpt = build_model(CFG.model, CFG.seed)
    apply_activation_checkpointing(ckpt, "full")
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    with pytest.raises(ValueError, match="not one of"):
        apply_activation_checkpointing(ckpt, "some")
