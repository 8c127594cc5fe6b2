"""The project's balancing losses on transformers' models (model/hf.py ROUTER_SCORES, moe.balance_losses): equal to
a hand computation on the unmodified transformers model's own router logits (`output_router_logits=True`), with
the family's score function (Qwen2-MoE: softmax; DeepSeek-V3: sigmoid, group-limited top-k with the correction
bias), every aux_loss_scope, the sequence-wise and z losses, padding left out; DeepSeek-V4's hash-routed layer gets
none. Pure torch, one process."""
from __future__ import annotations

import pytest
import torch

from orchestrator.config import BalanceConfig, ModelConfig
from orchestrator.model.hf import build_hf_model
from tests.hf_tiny import make_tiny_hf

B, T, E, K = 4, 6, 4, 2
COEFFS = {"global": BalanceConfig(aux_loss_coeff=1.0),
          "ep_group": BalanceConfig(aux_loss_coeff=1.0, aux_loss_scope="ep_group"),
          "sequence": BalanceConfig(aux_loss_coeff=1.0, aux_loss_scope="sequence"),
          "seq_aux": BalanceConfig(seq_aux_loss_coeff=1.0),
          "z": BalanceConfig(z_loss_coeff=1.0)}


def _switch(scores_NE, ids_NK):
    """E sum_i f_i P_i over these tokens (Switch Transformer, eq. 4-6), written out."""
    f = torch.stack([(ids_NK == i).sum() for i in range(E)]).double() / (ids_NK.shape[0] * K)
    return E * (f * scores_NE.mean(0)).sum()


def _by_hand(name, logits_NE, scores_NE, ids_NK, valid_N):
    keep = valid_N if valid_N is not None else torch.ones(B * T, dtype=torch.bool)
    if name == "global":
        return _switch(scores_NE[keep], ids_NK[keep])
    if name == "ep_group":     # two groups of B/2 sequences, in row order, their losses averaged
        half = B * T // 2
        return sum(_switch(scores_NE[g:g + half][keep[g:g + half]], ids_NK[g:g + half][keep[g:g + half]])
                   for g in (0, half)) / 2
    if name in ("sequence", "seq_aux"):
        if name == "seq_aux":   # DeepSeek-V3 normalises each token's scores to sum 1
            scores_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        rows = [slice(b * T, (b + 1) * T) for b in range(B)]
        return sum(_switch(scores_NE[r][keep[r]], ids_NK[r][keep[r]]) for r in rows) / B
    return (torch.logsumexp(logits_NE[keep], -1) ** 2).mean()


def _oracle_routing(kind, gate, logits_NE):
    """The family's scores and top-k from its router logits, as its router computes them."""
    if kind == "qwen2_moe":
        scores = logits_NE.double().softmax(-1)
        return scores, scores.topk(K, -1).indices
    # DeepSeek-V3: sigmoid; group-limited top-k on scores + correction bias, 2 groups of 2 experts, 1 group kept
    # (the group's score: the sum of its two best, here both), so a token takes both experts of the best group
    scores = logits_NE.double().sigmoid()
    best = (scores + gate.e_score_correction_bias.double()).view(-1, 2, 2).sum(-1).argmax(-1)
    return scores, torch.stack([2 * best, 2 * best + 1], -1)


@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("padded", [False, True])
def test_balancing_losses_of_a_transformers_model_by_hand(tmp_path, kind, padded):
    hf = make_tiny_hf(kind, tmp_path / kind).eval()
    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (B, T))
    valid_BT = None
    if padded:   # rows end in padding of various lengths
        valid_BT = torch.arange(T).unsqueeze(0) < torch.tensor([[6], [4], [1], [3]])
    with torch.no_grad():
        out = hf(input_ids=tokens, output_router_logits=True)
    layers = [(l.gate, logits) for l, logits in zip([l.mlp for l in hf.model.layers if hasattr(l.mlp, "gate")],
                                                    out.router_logits)]
    assert len(layers) == 2
    valid_N = None if valid_BT is None else valid_BT.reshape(-1)
    for name, balance in COEFFS.items():
        model = build_hf_model(ModelConfig(hf_path=str(tmp_path / kind)), seed=0, balance=balance).train()
        for m in model.moe_layers():
            m.ep_groups = m.local_ep_groups = 2          # the reference of a run with two expert-parallel groups
        model.set_valid(valid_BT)
        model(tokens)
        routed = [m.last_experts_NK for m in model.moe_layers()]
        got = model.aux_loss()
        expected = 0.0
        for (gate, logits), ids in zip(layers, routed):
            scores, ids_oracle = _oracle_routing(kind, gate, logits)
            assert torch.equal(ids.sort(-1).values, ids_oracle.sort(-1).values)
            expected = expected + _by_hand(name, logits.double(), scores, ids_oracle, valid_N)
        assert got.item() == pytest.approx(expected.item(), rel=2e-6), name
        got.backward()
        assert all(m.__dict__["_gate"].weight.grad.abs().sum() > 0 for m in model.moe_layers()), name


def test_hash_routed_layers_get_no_balancing_loss(tmp_path):
    make_tiny_hf("deepseek_v4", tmp_path / "v4")
    model = build_hf_model(ModelConfig(hf_path=str(tmp_path / "v4")), seed=0,
                           balance=BalanceConfig(seq_aux_loss_coeff=1.0)).train()
    model(torch.randint(0, 256, (2, 8)))
    gates = [type(m.__dict__["_gate"]).__name__ for m in model.moe_layers()]
    assert gates == ["DeepseekV4HashRouter", "DeepseekV4TopKRouter", "DeepseekV4TopKRouter"]
    assert [m.aux_loss is None for m in model.moe_layers()] == [True, False, False]
    assert model.aux_loss() is not None
