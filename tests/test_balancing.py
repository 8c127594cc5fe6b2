"""Expert load balancing: each strategy's formula against hand-computed values, the shares of a
global-batch loss summing to the loss, the aux-loss-free bias moving a skewed router toward balance,
the load statistics, and N devices still computing what one device computes with every strategy on."""
from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.experts.balancer import load_stats
from orchestrator.config import BalanceConfig
from orchestrator.model.balancing import (drop_over_capacity, ep_group_aux_loss, router_z_loss, select_experts,
                                          sequence_aux_loss, switch_aux_loss, update_expert_bias)
from orchestrator.model.moe import LocalTokenDispatcher, Router, balance_losses


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


def test_ep_group_aux_loss_by_hand():
    # group g of G=2 holds these 2 tokens (K=1, E=2), both to expert 0: N_g = 2, f = [1, 0], P = [0.625, 0.375]
    # (this device's tokens are the whole group): L_g = E * 0.625 = 1.25, the device's share L_g / G = 0.625
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    assert ep_group_aux_loss(scores, torch.tensor([2, 0]), top_k=1, num_groups=2).item() == pytest.approx(0.625)
    # a device holding the first token of a group of 4 tokens whose counts are [3, 1]: f = [3/4, 1/4],
    # its share of P = [0.75, 0.25] / 4: E * (3/4 * 0.1875 + 1/4 * 0.0625) / G = 2 * 0.15625 / 2
    assert ep_group_aux_loss(scores[:1], torch.tensor([3, 1]), 1, 2).item() == pytest.approx(0.15625)
    # one group: the global Switch loss exactly
    torch.manual_seed(0)
    s = torch.rand(6, 4, dtype=torch.float64).softmax(-1)
    counts = torch.bincount(s.topk(2, -1).indices.flatten(), minlength=4)
    assert torch.equal(ep_group_aux_loss(s, counts, 2, 1), switch_aux_loss(s, counts, 6, 2))


class _GroupOf:
    """A dispatcher of one device of a simulated expert-parallel group: group_counts returns the group's counts."""

    def __init__(self, group_counts_E):
        self.counts = group_counts_E

    def group_counts(self, counts_E):
        return self.counts


def test_ep_group_scope_one_process_equals_the_devices_shares():
    """The reference holds both groups' rows (local_ep_groups=2); 4 devices (2 groups of 2) each hold a quarter.
    Same loss, same gradient; with one group it is the global scope's loss; and two groups differ from global."""
    torch.manual_seed(1)
    B, T, E, K = 4, 3, 4, 2
    logits = torch.randn(B * T, E, dtype=torch.float64, requires_grad=True)
    scores = logits.softmax(-1)
    experts = scores.topk(K, -1).indices
    b = BalanceConfig(aux_loss_coeff=1.0, aux_loss_scope="ep_group")
    one = balance_losses(b, LocalTokenDispatcher(), scores, logits, experts, B, T, ep_groups=2, local_ep_groups=2)
    (g_one,) = torch.autograd.grad(one, logits, retain_graph=True)
    devices = 0
    for g in range(2):                                  # group g: rows [2g, 2g+2), tokens [6g, 6g+6)
        rows = slice(6 * g, 6 * g + 6)
        group_counts = torch.bincount(experts[rows].flatten(), minlength=E)
        for d in range(2):                              # device d of the group: one row
            t = slice(6 * g + 3 * d, 6 * g + 3 * d + 3)
            devices = devices + balance_losses(b, _GroupOf(group_counts), scores[t], logits[t], experts[t], 1, T,
                                               ep_groups=2)
    (g_devices,) = torch.autograd.grad(devices, logits, retain_graph=True)
    assert devices.item() == pytest.approx(one.item(), rel=1e-12)
    assert torch.allclose(g_devices, g_one, rtol=1e-12, atol=1e-15)
    by_hand = sum(E * (torch.bincount(experts[r].flatten(), minlength=E).double() / (6 * K)
                               * scores[r].detach().mean(0)).sum() / 2 for r in (slice(0, 6), slice(6, 12)))
    assert one.item() == pytest.approx(by_hand.item(), rel=1e-12)
    glob = balance_losses(BalanceConfig(aux_loss_coeff=1.0), LocalTokenDispatcher(), scores, logits, experts, B, T)
    single = balance_losses(b, LocalTokenDispatcher(), scores, logits, experts, B, T)
    assert torch.equal(single, glob)
    assert abs(one.item() - glob.item()) > 1e-6


def test_sequence_scope_is_the_switch_loss_per_sequence():
    """aux_loss_scope=sequence: each sequence's E sum f_i P_i on the raw scores, averaged over the sequences; the
    sequence-wise loss (seq_aux_loss_coeff) with softmax scores, not with sigmoid ones (DeepSeek-V3 normalises
    those per token)."""
    torch.manual_seed(2)
    B, T, E, K = 2, 4, 4, 2
    logits = torch.randn(B * T, E, dtype=torch.float64)
    scope = BalanceConfig(aux_loss_coeff=1.0, aux_loss_scope="sequence")
    seq = BalanceConfig(seq_aux_loss_coeff=1.0)
    for scores, same in ((logits.softmax(-1), True), (logits.sigmoid(), False)):
        experts = scores.topk(K, -1).indices
        got = balance_losses(scope, LocalTokenDispatcher(), scores, logits, experts, B, T)
        by_hand = sum(E * (torch.bincount(experts[r].flatten(), minlength=E).double() / (T * K) * scores[r].mean(0)).sum()
                      for r in (slice(0, T), slice(T, 2 * T))) / B
        assert got.item() == pytest.approx(by_hand.item(), rel=1e-12)
        deepseek = balance_losses(seq, LocalTokenDispatcher(), scores, logits, experts, B, T)
        assert (got.item() == pytest.approx(deepseek.item(), rel=1e-12)) == same


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


def test_grouped_routing_takes_k_over_g_from_every_group_and_balances_devices():
    torch.manual_seed(1)
    scores = torch.rand(64, 8)
    experts = select_experts(scores, top_k=4, routing="grouped", num_groups=2)
    per_group = (experts // 4)  # 2 groups of 4 experts
    assert ((per_group == 0).sum(1) == 2).all() and ((per_group == 1).sum(1) == 2).all()
    assert len({tuple(sorted(row)) for row in experts.tolist()}) > 1  # still a choice within each group
    # with one group per device, the devices' loads are equal whatever the scores
    counts = torch.bincount(experts.flatten(), minlength=8).tolist()
    assert load_stats([counts], world=2)["device_imbalance"] == 1.0


def test_group_limited_routing_uses_at_most_topk_groups():
    torch.manual_seed(2)
    scores = torch.rand(64, 8)
    experts = select_experts(scores, top_k=3, routing="group_limited", num_groups=4, topk_groups=2)
    assert max(len(set((row // 2).tolist())) for row in experts) <= 2
    # the chosen groups are the ones with the best two-expert sums; with every group allowed it is plain top-k
    everything = select_experts(scores, top_k=3, routing="group_limited", num_groups=4, topk_groups=4)
    assert torch.equal(everything.sort(-1).values, scores.topk(3).indices.sort(-1).values)


def test_capacity_keeps_each_experts_first_copies_per_sequence():
    experts = torch.tensor([[0], [0], [0], [1], [0], [0], [1], [1]])   # two sequences of T=4, K=1, E=2
    kept = drop_over_capacity(experts, seq_len=4, num_experts=2, capacity=2)
    # sequence 1: expert 0 keeps tokens 0 and 1, drops token 2; sequence 2: nothing over capacity
    assert kept.flatten().tolist() == [0, 0, 2, 1, 0, 0, 1, 1]
    top2 = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])                  # one sequence of T=4, K=2, E=3
    assert drop_over_capacity(top2, 4, 3, capacity=2).tolist() == [[0, 1], [1, 0], [3, 2], [2, 3]]


def test_capacity_drops_are_causal_and_do_not_depend_on_the_batch_split():
    """A copy's fate depends on its own sequence's earlier tokens only: the same whether later tokens change or
    the sequences are cut into per-device slices (which is what makes N devices drop what one device drops)."""
    g = torch.Generator().manual_seed(0)
    B, T, K, E = 6, 16, 2, 4
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)])
    kept = drop_over_capacity(experts, T, E, capacity=3)
    assert 0 < (kept == E).sum() < B * T * K
    halves = [drop_over_capacity(part, T, E, capacity=3) for part in experts.split(2 * T)]
    assert torch.equal(torch.cat(halves), kept)
    changed = experts.clone()
    changed[T + 9:2 * T] = changed[T + 9:2 * T].flip(-1).roll(1, 0)   # sequence 2 from token 9 on
    assert torch.equal(drop_over_capacity(changed, T, E, capacity=3)[:T + 9], kept[:T + 9])


def test_dropped_copies_reach_no_expert():
    from orchestrator.model.moe import permute_by_expert

    x = torch.arange(3.0).view(3, 1)
    experts = torch.tensor([[0, 2], [1, 0], [2, 2]])  # 2 = dropped (E=2)
    x_sorted, counts, token_idx, _ = permute_by_expert(x, experts, num_experts=2)
    assert counts.tolist() == [2, 1] and token_idx.tolist() == [0, 1, 1]
    assert x_sorted.flatten().tolist() == [0.0, 1.0, 1.0]


def test_routing_study_job_compares_strategies_with_plots(ray_session, tmp_path):
    from jobs import routing_study
    from orchestrator.config import to_yaml
    from tests.conftest import tiny_config

    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(to_yaml(tiny_config(tmp_path / "study", "cluster.num_devices=2", "train.steps=6")))
    rc = routing_study.main(["--config", str(cfg_file), "--strategies", "none,aux_free_bias,grouped,capacity_1.25",
                             "--extra", "moved:balance.replace_every=2,balance.replace_window=2,"
                             "balance.replace_min_gain=0,balance.redundant_experts=2", "--warmup", "2"])
    assert rc == 0
    out = tmp_path / "study"
    rows = {r["strategy"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert list(rows) == ["none", "aux_free_bias", "grouped", "capacity_1.25", "moved"]
    assert rows["moved"]["replacements"] >= 1 and rows["none"]["replacements"] == 0
    assert rows["grouped"]["device_imbalance_after_warmup"] == 1.0  # one group per device: balanced by construction
    assert rows["capacity_1.25"]["dropped_copies_per_step"] > 0 and rows["none"]["dropped_copies_per_step"] == 0
    assert rows["none"]["final_loss"] != rows["aux_free_bias"]["final_loss"]  # the bias changed the routing
    for name in ("maxvio.png", "device_imbalance.png", *(f"heatmap-{s}.png" for s in rows)):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "| grouped |" in (out / "comparison.md").read_text()


def test_balance_default_script_sums_the_load_before_taking_maxvio(tmp_path):
    """bench/balance_default.py: MaxVio of the summed load (two layers' by hand), the per-step mean, maxvio alerts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "balance_default.py"
    spec = importlib.util.spec_from_file_location("balance_default", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    loads = [[[4, 0], [2, 2]], [[0, 4], [3, 1]], [[1, 3], [2, 2]]]   # [step][layer][expert]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s + 1, "loss": 3.0 - s, "expert_load": load, **load_stats(load, 1)}) + "\n"
        for s, load in enumerate(loads)))
    (tmp_path / "summary.json").write_text(json.dumps({"val_loss": 1.5, "tokens_per_s": 100.0}))
    (tmp_path / "alerts.jsonl").write_text(json.dumps({"step": 2, "rule": "maxvio"}) + "\n"
                                           + json.dumps({"step": 3, "rule": "loss_spike"}) + "\n")
    row = script.balance_figures(tmp_path, first=2, last=2)
    # first two steps summed: layer 0 [4, 4] -> 0, layer 1 [5, 3] -> 5/4 - 1; per step: (1 + 0)/2, (1 + 0.5)/2
    assert row["maxvio_first_2_summed"] == pytest.approx(0.125)
    assert row["maxvio_first_2_mean"] == pytest.approx((0.5 + 0.75) / 2)
    # last two: layer 0 [1, 7] -> 7/4 - 1, layer 1 [5, 3] -> 0.25
    assert row["maxvio_last_2_summed"] == pytest.approx((0.75 + 0.25) / 2)
    assert row["final_loss"] == 1.0 and row["mean_loss_last_50"] == 2.0 and row["maxvio_alerts"] == [2]
