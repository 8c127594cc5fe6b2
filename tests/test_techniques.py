"""Issue 22's small options of the native model, each against its formula or transformers' code: sqrt-softplus
router scores and the SwiGLU clamp (DeepSeek-V4), the depth-scaled sandwich-norm and TinyInit (Pangu Ultra).
Pure torch: the float64 N-device equivalence with these options on is in test_parallel_equivalence.py."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config import ConfigError
from orchestrator.model.layers import SwiGLU, swiglu
from orchestrator.model.moe import GroupedExperts, router_scores
from orchestrator.model.transformer import build_model, init_stds
from tests.conftest import tiny_config


def test_sqrtsoftplus_scores_are_sqrt_of_softplus_as_transformers_computes_them():
    from transformers.activations import ACT2CLS

    z = torch.tensor([[-30.0, -2.0, 0.0, 0.5, 3.0, 25.0]], dtype=torch.float64)
    hand = torch.tensor([[math.sqrt(math.log1p(math.exp(v))) for v in z[0].tolist()]], dtype=torch.float64)
    ours = router_scores(z, "sqrtsoftplus")
    torch.testing.assert_close(ours, hand, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours, ACT2CLS["sqrtsoftplus"]()(z), rtol=0, atol=0)
    assert router_scores(z, "sigmoid").equal(z.sigmoid()) and router_scores(z, "softmax").equal(z.softmax(-1))


def test_swiglu_clamp_caps_the_gate_above_and_the_linear_part_both_ways_as_deepseek_v4():
    gate = torch.tensor([-20.0, -1.0, 2.0, 15.0], dtype=torch.float64)
    up = torch.tensor([-12.0, 3.0, 11.0, 0.5], dtype=torch.float64)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    hand = torch.tensor([silu(-20.0) * -10.0, silu(-1.0) * 3.0, silu(2.0) * 10.0, silu(10.0) * 0.5],
                        dtype=torch.float64)
    torch.testing.assert_close(swiglu(gate, up, 10.0), hand, rtol=1e-12, atol=1e-15)
    assert swiglu(gate, up, 0.0).equal(torch.nn.functional.silu(gate) * up)   # 0: off

    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    cfg = DeepseekV4Config(hidden_size=8, moe_intermediate_size=6, n_routed_experts=3, swiglu_limit=0.3)
    theirs = DeepseekV4Experts(cfg).double()
    torch.nn.init.normal_(theirs.gate_up_proj, std=0.5)
    torch.nn.init.normal_(theirs.down_proj, std=0.5)
    F = theirs.gate_up_proj.shape[1] // 2
    ours = GroupedExperts(8, F, [0, 1, 2], swiglu_limit=0.3).double()
    with torch.no_grad():
        ours.w1_EFD.copy_(theirs.gate_up_proj[:, :F])
        ours.w3_EFD.copy_(theirs.gate_up_proj[:, F:])
        ours.w2_EDF.copy_(theirs.down_proj)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for e in range(3):   # each expert on every token: transformers' per-expert math, gate 1
        want = torch.nn.functional.linear(theirs._apply_gate(torch.nn.functional.linear(x, theirs.gate_up_proj[e])),
                                          theirs.down_proj[e])
        got = ours(torch.cat([x if j == e else x[:0] for j in range(3)]), [5 if j == e else 0 for j in range(3)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    clamped = SwiGLU(8, 6, limit=0.3).double()
    y = clamped(x)
    assert y.shape == (5, 8) and not y.equal(SwiGLU.forward.__get__(clamped)(x) * 0)


def _cfg(*overrides: str):
    return tiny_config(None, "train.dtype=float64", *overrides).model


def test_sandwich_norm_output_scale_starts_at_c_over_sqrt_depth():
    """DSSN: each sub-layer's contribution to the residual is RMS-normalised with scale c / sqrt(L) at init, so its
    root-mean-square per token is exactly that (Pangu Ultra §2.2), whatever the sub-layer computed."""
    cfg = _cfg("model.norm=sandwich", "model.n_layers=4", "model.sandwich_attn_scale=0.283",
               "model.sandwich_ffn_scale=0.432")
    model = build_model(cfg, seed=3).double()
    L = cfg.n_layers
    x = torch.randn(2, 16, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for block in model.layers:
        torch.testing.assert_close(block.attn_out_norm.weight, torch.full((cfg.dim,), 0.283 / math.sqrt(L),
                                                                           dtype=torch.float64), rtol=1e-7, atol=0)
        torch.testing.assert_close(block.ffn_out_norm.weight, torch.full((cfg.dim,), 0.432 / math.sqrt(L),
                                                                          dtype=torch.float64), rtol=1e-7, atol=0)
        assert block.attn_norm.weight.eq(1).all() and block.ffn_norm.weight.eq(1).all()
        # the sub-layer's raw output r has RMS rho per token; the residual gets scale * rho / sqrt(rho^2 + eps)
        # (RMSNorm with its eps): the scale itself once rho^2 >> eps
        raw_attn = block.attn(block.attn_norm(x))
        h = x + block._attention(x)
        raw_ffn = block.ffn(block.ffn_norm(h))
        for raw, got, c in ((raw_attn, h - x, 0.283), (raw_ffn, block(x) - h, 0.432)):
            rho = raw.pow(2).mean(-1).sqrt()
            want = c / math.sqrt(L) * rho / (rho.pow(2) + cfg.norm_eps).sqrt()
            torch.testing.assert_close(got.pow(2).mean(-1).sqrt(), want, rtol=1e-6, atol=0)  # (float32 scales)
        for norm, raw, c in ((block.attn_out_norm, raw_attn, 0.283), (block.ffn_out_norm, raw_ffn, 0.432)):
            loud = norm(raw * 1e4)   # an output with rho^2 >> eps: the residual gets exactly the scale
            torch.testing.assert_close(loud.pow(2).mean(-1).sqrt(), torch.full_like(loud[..., 0], c / math.sqrt(L)),
                                       rtol=1e-5, atol=0)
    pre = build_model(_cfg("model.n_layers=4"), seed=3)
    assert pre.layers[0].attn_out_norm is None and not any("out_norm" in n for n, _ in pre.named_parameters())


def test_tiny_init_draws_every_matrix_with_std_sqrt_1_over_2dL_and_the_embedding_with_its_own():
    cfg = _cfg("model.init=tiny", "model.dim=64", "model.n_layers=4", "model.expert_dim=64", "model.dense_dim=128",
               "model.vocab_size=2048", "model.tie_embeddings=false")
    want = math.sqrt(1 / (2 * 64 * 4))
    assert init_stds(cfg) == {"matrix": want, "output": want, "embedding": 0.5}
    model = build_model(cfg, seed=0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert p.eq(1).all(), name
            continue
        std = 0.5 if name == "tok_emb.weight" else want
        assert p.std().item() == pytest.approx(std, rel=0.1 if p.numel() < 4096 else 0.03), name
        assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel()), name
    gpt2 = init_stds(_cfg("model.n_layers=4", "model.init_std=0.02"))
    assert gpt2 == {"matrix": 0.02, "output": 0.02 / math.sqrt(8), "embedding": 0.02}


def test_every_option_together_trains():
    cfg = tiny_config(None, "model.norm=sandwich", "model.init=tiny", "model.score_func=sqrtsoftplus",
                      "model.swiglu_limit=0.5")
    torch.manual_seed(0)
    model = build_model(cfg.model, seed=0, balance=cfg.balance)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 16, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("overrides,message", [
    (["model.score_func=relu"], "model.score_func='relu' is not one of softmax, sigmoid, sqrtsoftplus"),
    (["model.norm=post"], "model.norm='post' is not one of pre, sandwich"),
    (["model.init=xavier"], "model.init='xavier' is not one of gpt2, tiny"),
    (["model.swiglu_limit=-1"], "model.swiglu_limit=-1.0 must be zero or more"),
    (["model.sandwich_ffn_scale=0.5"], "model.sandwich_ffn_scale=0.5 has no effect with model.norm='pre'"),
    (["model.tiny_init_embed_std=1.0"], "model.tiny_init_embed_std=1.0 has no effect with model.init='gpt2'"),
    (["model.init=tiny", "model.init_std=0.01"], "model.init_std=0.01 has no effect with model.init='tiny'"),
])
def test_bad_option_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(None, *overrides)


def test_the_spike_fault_corrupts_a_batch_reproducibly_and_keeps_untrained_targets():
    from orchestrator.device.shard import corrupted_batch

    inputs = torch.arange(12).view(2, 6) % 7
    targets = torch.tensor([[1, 2, -100, 4, 5, 6], [-100, -100, 3, 4, 5, 6]])
    a = corrupted_batch(inputs, targets, 256, seed=0, step=5, rank=1)
    b = corrupted_batch(inputs, targets, 256, seed=0, step=5, rank=1)
    c = corrupted_batch(inputs, targets, 256, seed=0, step=5, rank=0)
    assert a[0].equal(b[0]) and a[1].equal(b[1]) and not a[0].equal(c[0])
    assert a[1].eq(-100).equal(targets.eq(-100)) and not a[0].equal(inputs)
    assert int(a[0].max()) < 256 and int(a[1][a[1] != -100].min()) >= 0


@pytest.mark.parametrize("options", [["model.norm=sandwich"], ["model.score_func=sqrtsoftplus"],
                                     ["model.swiglu_limit=0.5"]], ids=["sandwich", "sqrtsoftplus", "swiglu_limit"])
def test_activation_plan_matches_what_torch_saves(options):
    """memory/plan.py's terms for these options against the saved-tensor meter over a training step (as
    tests/test_planner.py does for the default model): no recomputation, selective, full; under bf16 autocast too."""
    from orchestrator.config import DEFAULT_CONFIG, load_config
    from orchestrator.memory.plan import plan_memory
    from orchestrator.model.checkpointing import apply_activation_checkpointing
    from tests.test_planner import _measure_step

    def cfg_of(*more):
        return load_config(DEFAULT_CONFIG, [*options, "cluster.num_devices=1", "train.global_batch_size=2",
                                            "data.seq_len=32", "model.n_layers=2", *more])

    cfg = cfg_of()
    model = build_model(cfg.model, cfg.seed, None, cfg.balance).to(torch.float32)
    for m in model.moe_layers():
        m.global_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    for mode, precision in (("none", "none"), ("selective", "none"), ("full", "none"), ("none", "bf16")):
        cfg = cfg_of(f"memory.activation_checkpointing={mode}", f"train.mixed_precision={precision}")
        apply_activation_checkpointing(model, mode)
        measured = _measure_step(model, cfg, autocast=precision == "bf16")
        assert plan_memory(cfg).devices[0].activations_peak == pytest.approx(measured, rel=1e-3), (mode, precision)


def test_the_hf_export_refuses_sqrtsoftplus_scores_and_an_unread_swiglu_limit_is_refused():
    from orchestrator.checkpoint.hf_mapping import hf_architecture

    with pytest.raises(ConfigError, match=r"model\.score_func='sqrtsoftplus': none of the transformers classes"):
        hf_architecture(_cfg("model.score_func=sqrtsoftplus"))
    assert hf_architecture(_cfg("model.norm=pre", "model.init=tiny", "model.tiny_init_embed_std=0.1")) == "ernie4_5_moe"
    with pytest.raises(ConfigError, match=r"model\.swiglu_limit=10\.0 has no effect with model\.first_k_dense"):
        tiny_config(None, "model.first_k_dense=3", "model.swiglu_limit=10")
