"""read_hf_state: one EP device reads from a save_pretrained checkpoint every dense tensor and only its own experts.

Tiny transformers MoE models with random weights, saved in their on-disk layout (one tensor per expert), read back
and compared with from_pretrained of the same folder.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from orchestrator.config import ConfigError  # noqa: E402
from orchestrator.model.hf_load import ReadStats, is_expert_param, list_checkpoint_keys, read_hf_state  # noqa: E402

E = 4  # routed experts in every tiny model
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")  # an on-disk per-expert key, e.g. ...experts.3.w1.weight


def _configs():
    T = transformers
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64)
    return {
        "mixtral": (T.MixtralForCausalLM, lambda: T.MixtralConfig(
            **common, intermediate_size=8, num_key_value_heads=1, head_dim=8, num_local_experts=E,
            num_experts_per_tok=2)),
        "deepseek_v3": (T.DeepseekV3ForCausalLM, lambda: T.DeepseekV3Config(
            **common, intermediate_size=24, moe_intermediate_size=8, num_key_value_heads=2, n_routed_experts=E,
            n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)),
        "qwen2_moe": (T.Qwen2MoeForCausalLM, lambda: T.Qwen2MoeConfig(
            **common, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=8,
            num_key_value_heads=1, num_experts=E, num_experts_per_tok=2)),
        "qwen3_moe": (T.Qwen3MoeForCausalLM, lambda: T.Qwen3MoeConfig(
            **common, intermediate_size=24, moe_intermediate_size=8, num_key_value_heads=1, head_dim=8,
            num_experts=E, num_experts_per_tok=2)),
        # smallest V4 that builds: one layer of each attention type, a hash_moe layer (tid2eid buffer) then moe
        # layers (gate e_score_correction_bias), mHC with 2 streams
        "deepseek_v4": (T.DeepseekV4ForCausalLM, lambda: T.DeepseekV4Config(
            vocab_size=64, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, q_lora_rank=8, n_routed_experts=E, n_shared_experts=1,
            num_experts_per_tok=2, max_position_embeddings=256, partial_rotary_factor=0.5,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            mlp_layer_types=["hash_moe", "moe", "moe"], hc_mult=2, hc_sinkhorn_iters=2, sliding_window=8,
            o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4)),
    }


class Saved:
    """A tiny model saved with save_pretrained, the same model on meta (the target) and from_pretrained's state."""

    def __init__(self, name: str, root: Path, **save_kwargs):
        cls, make_config = _configs()[name]
        torch.manual_seed(0)
        original = cls(make_config()).float()
        self.dir = root / name
        original.save_pretrained(self.dir, **save_kwargs)
        self.original = {k: v.detach().clone() for k, v in original.state_dict().items()}
        self.reference = {k: v.detach() for k, v in cls.from_pretrained(self.dir).state_dict().items()}
        with torch.device("meta"):
            self.meta = cls(make_config()).float()
        self.disk = _disk(self.dir)


def _disk(folder: Path) -> dict[str, tuple[str, int]]:
    """on-disk key -> (file, bytes), from the headers"""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                out[k] = (f.name, n * {"F32": 4, "I64": 8, "BF16": 2}[sl.get_dtype()])
    return out


def _experts(ids_by_layer):
    """experts_of from a function layer -> ids"""
    def experts_of(name):
        if not is_expert_param(name):
            return None
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        return ids_by_layer(layer)
    return experts_of


ALL = _experts(lambda layer: list(range(E)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


_saved: dict[str, Saved] = {}


@pytest.fixture(params=list(_configs()))
def saved(request, root):
    if request.param not in _saved:
        _saved[request.param] = Saved(request.param, root)
    return _saved[request.param]


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_is_expert_param():
    assert is_expert_param("model.layers.1.mlp.experts.gate_up_proj")
    assert is_expert_param("model.layers.1.mlp.experts.down_proj")
    assert not is_expert_param("model.layers.1.mlp.experts.3.w1.weight")
    assert not is_expert_param("model.layers.1.mlp.shared_experts.gate_proj.weight")
    assert not is_expert_param("model.layers.1.mlp.gate.weight")


def test_all_experts_equals_from_pretrained(saved):
    state, stats = read_hf_state(saved.dir, saved.meta, ALL)
    _assert_same(state, saved.reference)
    _assert_same(state, saved.original)
    assert any(is_expert_param(k) for k in state)
    assert stats.files_opened == 1
    assert stats.keys_read == set(saved.disk)  # every on-disk tensor belongs to the model
    assert stats.tensors_read == len(saved.disk)
    assert stats.bytes_read == sum(b for _, b in saved.disk.values())


def test_subset_reads_only_own_experts(saved):
    ids = [2, 0]
    state, stats = read_hf_state(saved.dir, saved.meta, _experts(lambda layer: ids))
    assert set(state) == set(saved.reference)
    n_expert_params = 0
    for k, want in saved.reference.items():
        if is_expert_param(k):
            n_expert_params += 1
            assert state[k].shape == (2, *want.shape[1:])
            assert torch.equal(state[k], want[ids]), k
        else:
            assert torch.equal(state[k], want), k
    assert n_expert_params >= 2
    others = {k for k in saved.disk if (m := PER_EXPERT.search(k)) and int(m.group(1)) not in ids}
    mine = {k for k in saved.disk if (m := PER_EXPERT.search(k)) and int(m.group(1)) in ids}
    assert others and len(others) == len(mine)  # 2 of 4 experts, same tensors each
    assert not stats.keys_read & others
    assert stats.keys_read == set(saved.disk) - others
    assert stats.tensors_read == len(saved.disk) - len(others)
    assert stats.bytes_read == sum(b for k, (_, b) in saved.disk.items() if k not in others)


def test_replicas_and_per_layer_lists(saved):
    lists = {0: [3, 1, 3], 1: [1], 2: []}
    state, stats = read_hf_state(saved.dir, saved.meta, _experts(lambda layer: lists[layer]))
    for k, want in saved.reference.items():
        if is_expert_param(k):
            ids = lists[int(re.search(r"layers\.(\d+)\.", k).group(1))]
            assert torch.equal(state[k], want[ids]), k
    # a replica is read once
    assert len(stats.keys_read) == stats.tensors_read


def test_sharded_checkpoint(root):
    s = Saved("mixtral", root / "sharded", max_shard_size="6KB")
    files = sorted(p.name for p in s.dir.glob("*.safetensors"))
    assert len(files) >= 3 and (s.dir / "model.safetensors.index.json").is_file()
    ids = [3]
    state, stats = read_hf_state(s.dir, s.meta, _experts(lambda layer: ids))
    for k, want in s.reference.items():
        assert torch.equal(state[k], want[ids] if is_expert_param(k) else want), k
    needed_files = {s.disk[k][0] for k in stats.keys_read}
    assert stats.files_opened == len(needed_files)  # with an index, a file is opened only when a key in it is read
    assert not any((m := PER_EXPERT.search(k)) and int(m.group(1)) != 3 for k in stats.keys_read)
    # without the index: every file's header is read to list keys, the result is the same
    (s.dir / "model.safetensors.index.json").unlink()
    state2, stats2 = read_hf_state(s.dir, s.meta, _experts(lambda layer: ids))
    _assert_same(state2, state)
    assert stats2.files_opened == len(files) and stats2.keys_read == stats.keys_read


def test_index_skips_files_of_other_experts(root):
    """experts 1 and 2 in a file of their own: a device holding experts 0 and 3 never opens it"""
    s = _saved.get("deepseek_v3") or Saved("deepseek_v3", root)
    d = root / "by_expert"
    d.mkdir()
    shutil.copy(s.dir / "config.json", d / "config.json")
    tensors = load_file(str(s.dir / "model.safetensors"))
    other = {k for k in tensors if (m := PER_EXPERT.search(k)) and int(m.group(1)) in (1, 2)}
    save_file({k: v for k, v in tensors.items() if k not in other}, str(d / "a.safetensors"))
    save_file({k: tensors[k] for k in other}, str(d / "b.safetensors"))
    weight_map = {k: "b.safetensors" if k in other else "a.safetensors" for k in tensors}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    state, stats = read_hf_state(d, s.meta, _experts(lambda layer: [3, 0]))
    assert stats.files_opened == 1 and stats.tensors_read == len(tensors) - len(other)
    for k, want in s.original.items():
        assert torch.equal(state[k], want[[3, 0]] if is_expert_param(k) else want), k


def test_fused_checkpoint_reads_rows(root):
    """a checkpoint in the model's own (fused) naming, split over two files without index: rows via get_slice"""
    s = _saved.get("qwen2_moe") or Saved("qwen2_moe", root)
    d = root / "fused"
    d.mkdir()
    shutil.copy(s.dir / "config.json", d / "config.json")
    items = sorted(s.original.items())
    save_file(dict(items[: len(items) // 2]), str(d / "part-1.safetensors"))
    save_file(dict(items[len(items) // 2:]), str(d / "part-2.safetensors"))
    ids = [2, 0, 2]
    state, stats = read_hf_state(d, s.meta, _experts(lambda layer: ids))
    expert_bytes = 0
    for k, want in s.original.items():
        if is_expert_param(k):
            expert_bytes += want.numel() * 4
            assert torch.equal(state[k], want[ids]), k
        else:
            assert torch.equal(state[k], want), k
    total = sum(v.numel() * 4 for v in s.original.values())
    assert stats.bytes_read == total - expert_bytes // 2  # experts 0 and 2 of 4
    n_expert = sum(is_expert_param(k) for k in s.original)
    assert stats.tensors_read == len(s.original) - n_expert + 2 * n_expert  # rows 0 and 2: two runs per tensor
    assert stats.files_opened == 2


def test_deepseek_v4_original_layout(root):
    """V4 as released: no `model.` prefix, `embed`, `head`, `hc_head_fn`, `layers.N.ffn.experts.E.w1.weight`"""
    s = _saved.get("deepseek_v4") or Saved("deepseek_v4", root)
    d = root / "v4_release"
    d.mkdir()
    shutil.copy(s.dir / "config.json", d / "config.json")
    renamed = {}
    for k, v in load_file(str(s.dir / "model.safetensors")).items():
        k = k.removeprefix("model.")
        k = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
             "hc_head.hc_scale": "hc_head_scale"}.get(k, k)
        renamed[k] = v
    assert "layers.1.ffn.experts.3.w1.weight" in renamed and "layers.0.ffn.gate.tid2eid" in renamed
    save_file(renamed, str(d / "model.safetensors"))
    state, _ = read_hf_state(d, s.meta, ALL)
    _assert_same(state, s.original)
    _assert_same(state, {k: v.detach() for k, v in type(s.meta).from_pretrained(d).state_dict().items()})
    sub, stats = read_hf_state(d, s.meta, _experts(lambda layer: [1]))
    assert torch.equal(sub["model.layers.0.mlp.gate.tid2eid"], s.original["model.layers.0.mlp.gate.tid2eid"])
    assert torch.equal(sub["model.layers.2.mlp.experts.gate_up_proj"],
                       s.original["model.layers.2.mlp.experts.gate_up_proj"][[1]])
    assert all(int(m.group(1)) == 1 for k in stats.keys_read if (m := PER_EXPERT.search(k)))


def test_tied_embeddings(root):
    cls, make_config = _configs()["qwen2_moe"]
    torch.manual_seed(0)
    model = cls(make_config().__class__(**{**make_config().to_dict(), "tie_word_embeddings": True}))
    model.save_pretrained(root / "tied")
    assert "lm_head.weight" not in list_checkpoint_keys(root / "tied")
    state, _ = read_hf_state(root / "tied", model, ALL)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def _rewrite(src: Path, dst: Path, edit) -> None:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_errors(root):
    s = _saved.get("mixtral") or Saved("mixtral", root)
    (root / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        read_hf_state(root / "empty", s.meta, ALL)

    _rewrite(s.dir, root / "no_norm", lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(ConfigError, match="model.layers.1.input_layernorm.weight"):
        read_hf_state(root / "no_norm", s.meta, ALL)

    _rewrite(s.dir, root / "no_expert", lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ConfigError, match=r"3 on-disk tensors .*model.layers.0.mlp.experts.down_proj"):
        read_hf_state(root / "no_expert", s.meta, _experts(lambda layer: [0]))

    def bad_shape(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 16)
    _rewrite(s.dir, root / "bad_shape", bad_shape)
    with pytest.raises(ConfigError, match=r"model\.safetensors: 'model.layers.0.self_attn.q_proj.weight'.*\[3, 16\]"):
        read_hf_state(root / "bad_shape", s.meta, ALL)

    with pytest.raises(ConfigError, match=r"ids must be .* \[0, 4\)"):
        read_hf_state(s.dir, s.meta, _experts(lambda layer: [4]))
    assert isinstance(ConfigError("x"), ValueError) and ReadStats().tensors_read == 0
