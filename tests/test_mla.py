"""Multi-head latent attention (model.attention=mla, orchestrator/model/mla.py): equal to transformers'
DeepseekV3Attention with the same weights, cached generation equal to the uncached forward, a native MLA model
trains, and the config keys are checked."""
from __future__ import annotations

import types

import pytest
import torch

from orchestrator.config import ConfigError, ModelConfig
from orchestrator.model.mla import MLA_NORM_EPS, MLAttention

# transformers name -> ours (model/mla.py's docstring)
TF_NAMES = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
            "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
D, H, QR, KVR, NOPE, ROPE, V, THETA = 48, 3, 24, 20, 8, 6, 10, 10000.0


def _exact_rmsnorm(self, x):
    """transformers' DeepseekV3RMSNorm.forward without its float32 round trip (float64 stays float64)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _pair(q_lora_rank: int, attn_implementation: str, exact_norms: bool, seed: int = 0):
    """(ours, transformers' DeepseekV3Attention, its rotary embedding), float64, the same random weights."""
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    cfg = tf.DeepseekV3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=H,
                              q_lora_rank=q_lora_rank or None, kv_lora_rank=KVR, qk_nope_head_dim=NOPE,
                              qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=64,
                              rope_parameters={"rope_type": "default", "rope_theta": THETA}, attention_bias=False,
                              num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = attn_implementation
    theirs = ds.DeepseekV3Attention(cfg, layer_idx=0).double()
    rotary = ds.DeepseekV3RotaryEmbedding(cfg)
    ours = MLAttention(D, H, q_lora_rank, KVR, NOPE, ROPE, V, 64, THETA).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.3 if "norm" not in name else 1.0)
                    + (1.0 if "norm" in name else 0.0))
            mod, leaf = name.split(".")
            getattr(ours, TF_NAMES[mod]).get_parameter(leaf).copy_(p)
    for m in (theirs.q_a_layernorm, theirs.kv_a_layernorm):
        if m is not None:
            assert m.variance_epsilon == MLA_NORM_EPS   # the eps we chose is transformers' own
            if exact_norms:
                m.forward = types.MethodType(_exact_rmsnorm, m)
    return ours, theirs, rotary


def _tf_forward(theirs, rotary, x, float64_rope: bool):
    """transformers' attention on x [B, T, D] with a causal mask and its rotary embedding's cos/sin (float64_rope:
    the same formula as DeepseekV3RotaryEmbedding.forward, cat(freqs, freqs), computed in float64 instead of its
    float32)."""
    B, T, _ = x.shape
    pos = torch.arange(T).unsqueeze(0).expand(B, T)
    if float64_rope:
        inv = 1.0 / (THETA ** (torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE))
        freqs = pos[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos_sin = (emb.cos(), emb.sin())
    else:
        cos_sin = rotary(x, pos)
    mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)[None, None].expand(B, 1, T, T)
    return theirs(x, position_embeddings=cos_sin, attention_mask=mask)[0]


@pytest.mark.parametrize("q_lora_rank", [QR, 0])
def test_mla_equals_transformers_deepseek_v3_attention_float64(q_lora_rank):
    """Outputs and gradients (input, every weight) to 1e-10. transformers computes its RMSNorm, RoPE table and
    eager softmax in float32 whatever the dtype: the exact comparison patches the two inner norms to stay in
    float64, builds cos/sin in float64 and uses its sdpa path (float64 softmax); the unpatched module (eager,
    its own rotary embedding) is then checked to float32 rounding."""
    ours, theirs, rotary = _pair(q_lora_rank, "sdpa", exact_norms=True)
    x = torch.randn(2, 11, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), _tf_forward(theirs, rotary, xb, float64_rope=True)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-10)
    w = torch.randn(ya.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-10)
    for name, p in theirs.named_parameters():
        mod, leaf = name.split(".")
        torch.testing.assert_close(getattr(ours, TF_NAMES[mod]).get_parameter(leaf).grad, p.grad, rtol=0, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")
    assert {n for n, _ in ours.named_parameters()} == \
        {f"{TF_NAMES[n.split('.')[0]]}.{n.split('.')[1]}" for n, _ in theirs.named_parameters()}

    _, plain, rotary = _pair(q_lora_rank, "eager", exact_norms=False)
    with torch.no_grad():
        yc = _tf_forward(plain, rotary, x, float64_rope=False)
    torch.testing.assert_close(ours(x).detach(), yc, rtol=0, atol=1e-5)


MLA_CFG = ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, max_seq_len=64, num_experts=4, top_k=2,
                      expert_dim=32, num_shared_experts=1, first_k_dense=1, dense_dim=64, init_std=0.1,
                      attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=6)


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_cached_generation_equals_the_uncached_forward(q_lora_rank):
    """The KVCache holds MLA's full per-head keys [B, H, S, nope + rope] and values [B, H, S, v_head_dim]."""
    from orchestrator.model.generate import sample
    from orchestrator.model.transformer import build_model

    cfg = ModelConfig(**{**vars(MLA_CFG), "q_lora_rank": q_lora_rank})
    model = build_model(cfg, seed=7).double()
    tokens = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :8], cache), model(tokens[:, 8:13], cache)]   # prefill, then a chunk after it
        parts += [model(tokens[:, t:t + 1], cache) for t in range(13, 20)]     # then one token at a time
    assert cache.position == 20 and cache.k[0].shape == (3, 4, 20, 12) and cache.v[1].shape == (3, 4, 20, 6)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    # the sampler's logprobs (cached) equal a full forward's on the sampled tokens
    out = sample(model, [3, 1, 4, 1, 5], n=2, max_new=6, temperature=1.0, top_p=1.0, eos_id=None, seeds=[1, 2])
    t = torch.cat((torch.tensor([[3, 1, 4, 1, 5]] * 2), out.tokens), dim=1)
    with torch.no_grad():
        ref = model(t[:, :-1]).log_softmax(-1)[:, 4:].gather(-1, t[:, 5:, None])[..., 0]
    torch.testing.assert_close(out.logprobs, ref, rtol=0, atol=1e-9)
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long), model.new_cache())


def test_native_mla_model_inits_trains_and_recomputes():
    """Parameter names and inits (inner norms at 1, wo scaled), the loss falls over a few AdamW steps, and every
    activation-checkpointing mode gives the same loss and gradients (float64)."""
    import torch.nn.functional as F

    from orchestrator.model.checkpointing import apply_activation_checkpointing
    from orchestrator.model.transformer import build_model, count_parameters

    model = build_model(MLA_CFG, seed=3).double()
    names = {n for n, _ in model.named_parameters() if n.startswith("layers.0.attn.")}
    assert names == {f"layers.0.attn.{n}.weight" for n in ("wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo")}
    a = model.layers[1].attn
    assert torch.all(a.q_norm.weight == 1) and torch.all(a.kv_norm.weight == 1)
    assert a.wo.weight.std() < 0.6 * a.wkv_b.weight.std()   # 0.1 / sqrt(2 * n_layers) vs 0.1
    assert a.wo.weight.shape == (32, 4 * 6) and a.wkv_b.weight.shape == (4 * (8 + 6), 12)
    assert count_parameters(MLA_CFG)["total"] == sum(p.numel() for p in model.parameters())

    tokens = torch.randint(0, 16, (4, 25), generator=torch.Generator().manual_seed(0))

    def loss_of(m):
        return F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    grads = {}
    for mode in ("none", "selective", "full"):
        apply_activation_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        grads[mode] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    for mode in ("selective", "full"):
        assert grads[mode][0] == pytest.approx(grads["none"][0], rel=1e-12)
        for g, g0 in zip(grads[mode][1], grads["none"][1]):
            torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    apply_activation_checkpointing(model, "none")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("overrides,needle", [
    (["model.attention=gqa"], r"model\.attention='gqa' is not one of mha, mla"),
    (["model.kv_lora_rank=32"], r"model\.kv_lora_rank=32 has no effect with model\.attention='mha'"),
    (["model.attention=mla", "model.qk_rope_head_dim=5"], r"model\.qk_rope_head_dim=5 must be even"),
    (["model.attention=mla", "model.v_head_dim=0"], r"model\.v_head_dim=0 must be positive"),
    (["model.attention=mla", "model.q_lora_rank=-1"], r"model\.q_lora_rank=-1 must be zero or more"),
])
def test_mla_keys_are_checked(overrides, needle):
    from orchestrator.config import DEFAULT_CONFIG, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(DEFAULT_CONFIG, overrides)


def test_mla_config_accepted_and_refused_with_a_transformers_model():
    from orchestrator.config import DEFAULT_CONFIG, load_config
    from orchestrator.config.validate import validate

    # MLA heads need not split model.dim (dim 96 over 5 heads is fine: the head dims are their own keys)
    cfg = load_config(DEFAULT_CONFIG, ["model.attention=mla", "model.dim=96", "model.n_heads=5", "model.q_lora_rank=48",
                                       "model.qk_nope_head_dim=0"])
    assert (cfg.model.attention, cfg.model.q_lora_rank, cfg.model.qk_nope_head_dim) == ("mla", 48, 0)
    m = cfg.model
    info = {"class": "FakeMoeForCausalLM", "router_aux_loss": False, "correction_bias": False, "packing_leaks": "",
            **{k: getattr(m, k) for k in ("vocab_size", "dim", "n_layers", "max_seq_len", "num_experts", "top_k",
                                          "first_k_dense")}}
    cfg = load_config(DEFAULT_CONFIG, [])
    cfg.model.hf_config, cfg.model.attention, cfg.model.kv_lora_rank = "x/config.json", "mla", 8
    with pytest.raises(ConfigError) as err:
        validate(cfg, frozenset({"model.hf_config", "model.attention", "model.kv_lora_rank"}), describe=lambda _: info)
    assert "model.attention='mla' has no effect with model.hf_config" in str(err.value)
    assert "model.kv_lora_rank=8 has no effect with model.hf_config" in str(err.value)


def test_flops_per_token_and_hf_export_refusal():
    from orchestrator.checkpoint.hf_mapping import hf_architecture
    from orchestrator.config import DEFAULT_CONFIG, load_config
    from orchestrator.model.transformer import count_parameters
    from orchestrator.monitoring.metrics import flops_per_token

    cfg = load_config(DEFAULT_CONFIG, ["model.attention=mla", "model.q_lora_rank=32"])
    m = cfg.model
    active = count_parameters(m)["activated"]   # tied embeddings: the head counts, the lookup does not
    attention = 6 * m.n_layers * cfg.data.seq_len * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    assert flops_per_token(cfg) == 6 * active + attention
    with pytest.raises(ConfigError, match=r"model\.attention='mla': the Hugging Face export maps plain multi-head"):
        hf_architecture(m)


@pytest.mark.parametrize("mla", [["model.q_lora_rank=16"], ["model.v_head_dim=64"]], ids=["v<qk,q_lora", "v>qk"])
def test_activation_plan_matches_what_torch_saves(mla):
    """memory/plan.py's MLA terms (mla_attention_bytes) against the saved-tensor meter over a training step, as
    tests/test_planner.py does for the default attention: no recomputation, full, under bf16 autocast too."""
    from orchestrator.config import DEFAULT_CONFIG, load_config
    from orchestrator.memory.plan import plan_memory
    from orchestrator.model import build_model
    from orchestrator.model.checkpointing import apply_activation_checkpointing
    from tests.test_planner import _measure_step

    def cfg_of(*more):
        return load_config(DEFAULT_CONFIG, ["model.attention=mla", *mla, "cluster.num_devices=1",
                                            "train.global_batch_size=2", "data.seq_len=32", "model.n_layers=2", *more])

    cfg = cfg_of()
    model = build_model(cfg.model, cfg.seed, None, cfg.balance).to(torch.float32)   # as DeviceShard: buffers too
    for m in model.moe_layers():
        m.global_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    for mode, precision in (("none", "none"), ("full", "none"), ("none", "bf16")):
        cfg = cfg_of(f"memory.activation_checkpointing={mode}", f"train.mixed_precision={precision}")
        apply_activation_checkpointing(model, mode)
        measured = _measure_step(model, cfg, autocast=precision == "bf16")
        assert plan_memory(cfg).devices[0].activations_peak == pytest.approx(measured, rel=1e-3), (mode, precision)


MLA_KEYS = ["model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
            "model.qk_rope_head_dim=4", "model.v_head_dim=8", "train.dtype=float64"]


def test_float64_devices_match_reference_with_mla(ray_session, tmp_path):
    """N = 2 (expert parallel) and N = 4 with ZeRO-3 (FSDP2 shards the MLA weights) and selective recomputation
    (the attention region): the reference's losses, routing and parameters (tests/test_parallel_equivalence.py)."""
    from tests.test_parallel_equivalence import distributed_run, reference

    steps = 3
    ref_reports, ref_params = reference(None, MLA_KEYS, steps)
    assert any(".attn.wkv_b." in name for name in ref_params)
    for world, extra in ((2, []), (4, ["memory.zero_stage=3", "memory.activation_checkpointing=selective"])):
        records, params = distributed_run(tmp_path, world, MLA_KEYS + extra, steps)
        assert [r.loss for r in records] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
        assert [r.expert_load for r in records] == [r.expert_load for r in ref_reports]
        assert params.keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"N={world} {name}: {m}")
