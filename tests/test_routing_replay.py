"""Rollout Routing Replay (R3) in the native MoE (model/moe.py replay_NK, MoETransformer.set_routing_replay) and the
valid-token mask of the balancing losses and loads (valid_N): replayed ids are the ones chosen, gates still train
the router, checkpointing recomputes with the same ids, placement maps logical ids, and a precision difference
between rollout and training changes routing only without replay."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import BalanceConfig, ModelConfig
from orchestrator.model.checkpointing import apply_activation_checkpointing
from orchestrator.model.generate import routing_mismatch
from orchestrator.model.transformer import build_model

BAL = BalanceConfig(aux_loss_coeff=0.01, seq_aux_loss_coeff=0.001, z_loss_coeff=0.001)
B, T, K = 4, 16, 2


def _cfg(first_k_dense: int = 0, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=64, num_experts=4, top_k=K,
                       expert_dim=32, num_shared_experts=1, first_k_dense=first_k_dense, dense_dim=64, **kw)


def _model(first_k_dense: int = 0, balance: BalanceConfig = BAL, **kw):
    return build_model(_cfg(first_k_dense, **kw), seed=3, balance=balance).double()


def _tokens(seed: int = 0, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _perturbed_routing(tokens) -> list[torch.Tensor]:
    """The routing of _model() with its routers' weights perturbed."""
    other = _model()
    with torch.no_grad():
        for i, m in enumerate(other.moe_layers()):
            w = m.router.gate.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64))
        other(tokens)
    return other.routing()


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()


@pytest.mark.parametrize("first_k_dense", [0, 1])
def test_replaying_the_own_routing_changes_nothing(first_k_dense):
    model, tokens = _model(first_k_dense), _tokens()
    out = model(tokens)
    recorded, aux = model.routing(), model.aux_loss()
    assert len(recorded) == 2 - first_k_dense
    assert all(r.shape == (B * T, K) and r.dtype == torch.int64 for r in recorded)
    assert not any(r.requires_grad for r in recorded)
    model.set_routing_replay([r.view(B, T, K) for r in recorded])   # [B, T, K] or [N, K]
    replayed = model(tokens)
    model.set_routing_replay(None)
    assert all(torch.equal(a, b) for a, b in zip(model.routing(), recorded))
    assert torch.equal(replayed, out) and torch.equal(model.aux_loss(), aux)
    assert all(m.replay_NK is None for m in model.moe_layers())


def test_replaying_another_models_routing_is_followed_and_trains_the_router():
    model, tokens = _model(), _tokens(1, t=T + 1)
    own_out = model(tokens[:, :-1]).detach()
    own = model.routing()
    foreign = _perturbed_routing(tokens[:, :-1])
    assert all(routing_mismatch(a, b) > 0.2 for a, b in zip(own, foreign))
    model.set_routing_replay(foreign)
    loss = _loss(model, tokens)
    assert all(torch.equal(a, b) for a, b in zip(model.routing(), foreign))
    assert not torch.allclose(model(tokens[:, :-1]), own_out)
    loss.backward()
    model.set_routing_replay(None)
    for m, ids in zip(model.moe_layers(), foreign):
        g = m.router.gate.weight.grad
        assert g is not None and float(g.abs().sum()) > 0
        assert torch.equal(m.last_tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=4))


def test_replay_ignores_group_limits_and_bias_which_only_steer_selection():
    bal = BalanceConfig(routing="group_limited", num_groups=2, topk_groups=1, aux_loss_coeff=0.01)
    model, tokens = _model(balance=bal), _tokens(2)
    for m in model.moe_layers():
        m.router.expert_bias.fill_(0.0)
        m.router.expert_bias[0] = 5.0       # would always be picked
    ids = [torch.tensor([1, 3]).expand(B * T, K).clone() for _ in model.moe_layers()]   # across both groups
    model.set_routing_replay(ids)
    out = model(tokens)
    model.set_routing_replay(None)
    assert torch.isfinite(out).all() and all(torch.equal(a, b) for a, b in zip(model.routing(), ids))


def test_replay_of_the_wrong_shape_or_ids_is_refused():
    model, tokens = _model(), _tokens()
    model(tokens)
    ids = model.routing()
    with pytest.raises(ValueError, match="MoE layers"):
        model.set_routing_replay(ids[:1])
    with pytest.raises(ValueError, match="outside"):
        model.set_routing_replay([ids[0], ids[1] + 4])
    model.set_routing_replay(ids)
    with pytest.raises(ValueError, match="routing replay of shape"):
        model(tokens[:, :-1])
    model.set_routing_replay(None)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_recomputes_with_the_replayed_ids(mode):
    tokens = _tokens(4, t=T + 1)
    foreign = _perturbed_routing(tokens[:, :-1])

    def grads(m: str):
        model = _model()
        apply_activation_checkpointing(model, m)
        model.set_routing_replay(foreign)           # set before the forward ...
        loss = _loss(model, tokens)
        after_forward = [(r, x.last_tokens_per_expert) for r, x in zip(model.routing(), model.moe_layers())]
        loss.backward()
        model.set_routing_replay(None)              # ... cleared after the backward
        after_backward = [(r, x.last_tokens_per_expert) for r, x in zip(model.routing(), model.moe_layers())]
        for (r0, c0), (r1, c1) in zip(after_forward, after_backward):
            assert torch.equal(r0, r1) and torch.equal(c0, c1)   # nothing recounted by the recomputation
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads("none"), grads(mode)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=1e-12, msg=n)


def test_replayed_ids_are_logical_whatever_the_placement():
    model, tokens = _model(), _tokens(5)
    foreign = _perturbed_routing(tokens)
    model.set_routing_replay(foreign)
    out = model(tokens)
    # the same experts held in another slot order (one process): weights moved with their experts
    perm = [3, 1, 0, 2]
    moved = _model()
    with torch.no_grad():
        for m in moved.moe_layers():
            m.set_placement([perm], 0)
            for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
                p = getattr(m.experts, name)
                p.copy_(p[perm].clone())
    moved.set_routing_replay(foreign)
    assert torch.equal(moved(tokens), out)
    assert all(torch.equal(a, b) for a, b in zip(moved.routing(), foreign))
    # two "devices", expert 0 replicated: a replayed logical id goes to a slot that holds that expert
    m = _model().moe_layers()[0]
    slots = [[0, 1, 2, 3], [0, 2, 1, 3]]
    m.set_placement(slots, 0)
    slot_NK = m.slots_of(foreign[0])
    flat = [e for ids in slots for e in ids]
    assert torch.equal(torch.tensor(flat)[slot_NK], foreign[0])
    assert {int(s) for s in slot_NK[foreign[0] == 0]} == {0, 4}   # expert 0's copies split over its two replicas


def test_valid_mask_leaves_masked_tokens_out_of_loads_and_losses():
    tokens = _tokens(6)
    keep = [0, 2]
    model = _model()
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[keep] = True
    model.set_valid(valid)
    model(tokens)
    masked = [(m.last_tokens_per_expert, m.aux_loss) for m in model.moe_layers()]
    model.set_valid(None)
    model(tokens[keep])                        # only the valid sequences
    for (counts, aux), m in zip(masked, model.moe_layers()):
        assert torch.equal(counts, m.last_tokens_per_expert)
        torch.testing.assert_close(aux, m.aux_loss, rtol=0, atol=1e-12)
    # all valid == no mask; a partial mask counts exactly the valid tokens' copies
    model(tokens)
    plain = [(m.last_tokens_per_expert, m.aux_loss) for m in model.moe_layers()]
    model.set_valid(torch.ones(B, T, dtype=torch.bool))
    model(tokens)
    for (counts, aux), m in zip(plain, model.moe_layers()):
        assert torch.equal(counts, m.last_tokens_per_expert)
        torch.testing.assert_close(aux, m.aux_loss, rtol=0, atol=1e-12)
    partial = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.5
    model.set_valid(partial)
    out = model(tokens)
    model.set_valid(None)
    assert torch.equal(out, model(tokens))     # the mask never changes the output
    model.set_valid(partial)
    model(tokens)
    for ids, m in zip(model.routing(), model.moe_layers()):
        assert torch.equal(m.last_tokens_per_expert, torch.bincount(ids[partial.reshape(-1)].reshape(-1), minlength=4))
        assert not torch.allclose(m.aux_loss, plain[0][1])
    model.set_valid(None)


def test_bf16_rollout_routing_differs_from_training_without_replay_only():
    # every expert's router row the same but for a tiny difference: near ties that bfloat16 rounding flips
    model = build_model(_cfg(), seed=11).float()
    with torch.no_grad():
        for i, m in enumerate(model.moe_layers()):
            w = m.router.gate.weight
            w.copy_(w[:1] + 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(i)))
    tokens = _tokens(7, b=8, t=32)
    rollout = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        rollout(tokens)
    recorded = rollout.routing()
    model(tokens)
    without = [routing_mismatch(a, b) for a, b in zip(model.routing(), recorded)]
    assert min(without) > 0.05, without
    model.set_routing_replay(recorded)
    model(tokens)
    model.set_routing_replay(None)
    assert [routing_mismatch(a, b) for a, b in zip(model.routing(), recorded)] == [0.0, 0.0]
