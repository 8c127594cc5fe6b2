"""Expert load balancing: each strategy's formula against hand-computed values, the shares of a
global-batch loss summing to the loss, the aux-loss-free bias moving a skewed router toward balance,
the load statistics, and N devices still computing what one device computes with every strategy on."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.balancer import load_stats
from orchestrator.model.balancing import router_z_loss, sequence_aux_loss, switch_aux_loss, update_expert_bias
from orchestrator.model.moe import Router


def test_switch_aux_loss_by_hand():
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    # both tokens to expert 0 (K=1): f = [1, 0], P = [0.625, 0.375]: L = E * (1 * 0.625) = 1.25
    assert switch_aux_loss(scores, torch.tensor([2, 0]), global_tokens=2, top_k=1).item() == pytest.approx(1.25)
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    assert switch_aux_loss(uniform, torch.tensor([2, 2, 2, 2]), 4, top_k=2).item() == pytest.approx(1.0)


def test_sequence_aux_loss_by_hand():
    scores = torch.tensor([[[0.6, 0.4], [0.2, 0.8]]], dtype=torch.float64)  # B=1, T=2, E=2
    # one token each (K=1): f = E/(K T) * [1, 1] = [1, 1]; P = [0.4, 0.6]: L = 1.0
    assert sequence_aux_loss(scores, torch.tensor([[[0], [1]]]), global_sequences=1).item() == pytest.approx(1.0)
    # both to expert 0: f = [2, 0]: L = 2 * 0.4 = 0.8; two global sequences halve this one's share
    assert sequence_aux_loss(scores, torch.tensor([[[0], [0]]]), global_sequences=2).item() == pytest.approx(0.4)
    # sigmoid scores are normalised per token first: [0.5, 0.25] -> [2/3, 1/3]
    sig = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    assert sequence_aux_loss(sig, torch.tensor([[[0]]]), 1).item() == pytest.approx(2 * 2 / 3)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits, global_tokens=2).item() == pytest.approx(expected)


def test_device_shares_sum_to_the_global_loss_and_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    scores = logits.softmax(-1)
    experts = scores.topk(2, dim=-1).indices
    counts = torch.bincount(experts.flatten(), minlength=4)
    whole = switch_aux_loss(scores, counts, 8, 2) + router_z_loss(logits, 8)
    (g_whole,) = torch.autograd.grad(whole, logits, retain_graph=True)
    shares = sum(switch_aux_loss(scores[i:i + 4], counts, 8, 2) + router_z_loss(logits[i:i + 4], 8) for i in (0, 4))
    (g_shares,) = torch.autograd.grad(shares, logits)
    assert shares.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(g_shares, g_whole, rtol=1e-12, atol=0)


def test_bias_update_moves_a_skewed_router_toward_balance():
    torch.manual_seed(0)
    router = Router(dim=16, num_experts=8, top_k=2, score_func="sigmoid", norm_topk_prob=True, route_scale=1.0)
    with torch.no_grad():
        router.gate.weight[:2] += 0.3  # experts 0 and 1 score high for most tokens (x has a positive mean)
    x = torch.randn(512, 16) + 0.5

    def maxvio() -> float:
        counts = torch.bincount(router(x)[1].flatten(), minlength=8)
        return load_stats([counts.tolist()], 1)["maxvio"]

    before = maxvio()
    for _ in range(2000):  # DeepSeek-V3's speed; larger speeds settle into a wider oscillation around balance
        counts = torch.bincount(router(x)[1].flatten(), minlength=8)
        update_expert_bias(router.expert_bias, counts, speed=0.001)
    after = maxvio()
    assert before > 1.5 and after < 0.1, (before, after)
    assert router.expert_bias[:2].max() < router.expert_bias[2:].min()  # the hot experts were pushed down


def test_load_stats_by_hand():
    stats = load_stats([[4, 0, 2, 2], [2, 2, 2, 2]], world=2)
    assert stats["maxvio_layers"] == [1.0, 0.0] and stats["maxvio"] == 0.5
    assert stats["cv_layers"][0] == pytest.approx(math.sqrt(2) / 2) and stats["cv_layers"][1] == 0.0
    assert stats["dead_fraction"] == 1 / 8
    assert stats["device_tokens"] == [8, 8] and stats["device_imbalance_layers"] == [1.0, 1.0]
    skewed = load_stats([[6, 2, 0, 0]], world=2)
    assert skewed["device_tokens"] == [8, 0] and skewed["device_imbalance"] == 2.0
