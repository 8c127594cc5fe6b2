"""The model alone, in one process: causality, deterministic per-expert init, router semantics, options."""
from __future__ import annotations

import torch

from orchestrator.config import ModelConfig
from orchestrator.model import MoE, Router, build_model, count_parameters

CFG = ModelConfig(dim=32, n_layers=3, n_heads=2, num_experts=4, top_k=2, expert_dim=16, dense_dim=32,
                  max_seq_len=32, vocab_size=256)


def test_causal_and_shapes():
    model = build_model(CFG, seed=0)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 256
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert lx.shape == (2, 16, 256)
    torch.testing.assert_close(lx[:, :10], ly[:, :10])        # the past does not see the future
    assert not torch.allclose(lx[:, 10:], ly[:, 10:])


def test_expert_subset_equals_slice_of_full_model():
    full = build_model(CFG, seed=5)
    part = build_model(CFG, seed=5, expert_ids=[2, 3])
    for (name, p_full), (_, p_part) in zip(full.expert_parameters(), part.expert_parameters()):
        assert torch.equal(p_part, p_full[2:4]), name
    for (name, p_full), (_, p_part) in zip(full.dense_parameters(), part.dense_parameters()):
        assert torch.equal(p_part, p_full), name
    assert not torch.equal(build_model(CFG, seed=6).tok_emb.weight, full.tok_emb.weight)


def test_options_untied_head_all_moe_no_shared():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False, "first_k_dense": 0, "num_shared_experts": 0})
    model = build_model(cfg, seed=0)
    assert model.head is not None and model.head.weight is not model.tok_emb.weight
    assert len(model.moe_layers()) == 3 and all(m.shared is None for m in model.moe_layers())
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    tied = build_model(CFG, seed=0)
    assert len(tied.moe_layers()) == 2 and tied.head is None
    counts = count_parameters(CFG)
    per_expert = 3 * 32 * 16
    assert counts["experts"] == 2 * 4 * per_expert
    assert counts["activated"] == counts["total"] - counts["experts"] + 2 * 2 * per_expert


def test_router_gates_and_bias():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    for score_func in ("softmax", "sigmoid"):
        router = Router(32, 4, 2, score_func, norm_topk_prob=True, route_scale=1.0)
        gates, experts, scores, _ = router(x)
        torch.testing.assert_close(gates.sum(-1), torch.ones(64))
        assert torch.equal(experts, scores.topk(2, dim=-1).indices)
        # The bias moves selection only: a large bias on expert 3 makes every token pick it,
        # while its gate stays the token's own (normalised) score.
        router.expert_bias[3] = 100.0
        gates_b, experts_b, scores_b, _ = router(x)
        assert (experts_b == 3).any(-1).all()
        picked = scores_b.gather(-1, experts_b)
        torch.testing.assert_close(gates_b, picked / picked.sum(-1, keepdim=True))


def test_moe_counts_every_routed_copy():
    model = build_model(CFG, seed=0)
    model(torch.randint(0, 256, (3, 16)))
    for moe in model.moe_layers():
        assert isinstance(moe, MoE)
        assert int(moe.last_tokens_per_expert.sum()) == 3 * 16 * 2
