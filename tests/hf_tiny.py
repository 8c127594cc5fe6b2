"""Tiny Hugging Face MoE checkpoints for the tests, made with transformers itself (random weights, no download):
DeepSeek-V4 (compressed sparse / heavily compressed attention, mHC, a hash-routed first MoE layer, sqrt-softplus
scores), DeepSeek-V3 (MLA, group-limited top-k with a correction bias, a dense first layer), Mixtral, Qwen2-MoE
(a gated shared expert). Vocabulary 256, so they also train on the byte corpus."""
from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("deepseek_v4", "deepseek_v3", "mixtral", "qwen2_moe")


def tiny_hf_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, max_position_embeddings=128,
                  num_experts_per_tok=2)
    if kind == "deepseek_v4":
        return tf.DeepseekV4Config(
            **common, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
            q_lora_rank=16, n_routed_experts=4, n_shared_experts=1,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            mlp_layer_types=["hash_moe", "moe", "moe"], hc_mult=2, o_groups=2, o_lora_rank=8, index_n_heads=2,
            index_head_dim=8, index_topk=4, sliding_window=8)
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config(
            **common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
                                num_local_experts=4)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
                                 num_experts=4)
    raise ValueError(kind)


def make_tiny_hf(kind: str, out: Path, seed: int = 0):
    """Save a tiny `kind` checkpoint in `out` (save_pretrained: the model's on-disk naming, one tensor per expert)
    and return the model. Hash routers and correction biases get non-trivial values, so routing is exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):   # distinct experts per token id
                V, K = buf.shape
                E = model.config.num_local_experts
                buf.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]))
            elif name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.01)
    model.save_pretrained(out)
    return model
