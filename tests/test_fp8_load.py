"""FP8 block-quantized checkpoints (the released DeepSeek-V3/V4 weights) load, dequantized on read per device.

A tiny DeepSeek-V3 (random weights) is saved as the release is: every Linear weight of attention, dense MLP, shared
and routed experts as float8_e4m3fn with a float32 `<name>.weight_scale_inv` per block, config.json's
quantization_config (weight_block_size [16, 16], so tiny dims give several blocks; kv_a_proj_with_mqa [24, 32], the
experts' [24, 32] / [32, 24] and the dense MLP's [40, 32] have ragged edge blocks, as V3's [576, 7168] does). The
oracles: transformers' own `Fp8Dequantize._dequantize_one` for the tensors whose dims the block divides (it refuses
the others), block-by-block hand multiplication for the ragged ones; the model they make is read by transformers'
`from_pretrained` from a dequantized copy of the checkpoint. Pure torch, no Ray.
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
from orchestrator.model.fp8 import Fp8Format, dequantize  # noqa: E402
from orchestrator.model.hf_load import check_weight_files, is_expert_param, read_hf_state  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

BLOCK = (16, 16)
E = 4
QUANTIZED = re.compile(r"_proj(_with_mqa)?\.weight$")   # the Linear weights the release stores in FP8
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")
QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}


def _v3_config():
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        num_experts_per_tok=2, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
        n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per block: the block's max |w| / 448), edge blocks cropped."""
    M, N = w.shape
    b0, b1 = block
    s = torch.empty(-(-M // b0), -(-N // b1))
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
            s[i, j] = blk.abs().max().clamp(min=1e-8) / 448.0
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _by_hand(q: torch.Tensor, s: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """Each block of q (float32) times its scale, block by block (the cropped edge blocks included)."""
    out = torch.empty(q.shape)
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def _oracle(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(the dequantized weight, which oracle): transformers' for divisible dims, the hand formula for ragged."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    if q.shape[-2] % BLOCK[0] or q.shape[-1] % BLOCK[1]:
        # Why this project has its own dequantization: transformers takes the block from the scale grid (rows //
        # grid rows), so a ragged weight is refused (V3's [576, 7168] with [5, 56]) or, where the grid happens to
        # divide it ([24, 32] with [2, 2]: 12-row blocks), dequantized with the wrong blocks.
        try:
            theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
        except ValueError:
            theirs = None
        hand = _by_hand(q, s)
        assert theirs is None or not torch.equal(theirs, hand)
        return hand, "hand"
    return Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32), "transformers"


class Fp8Checkpoint:
    """The FP8 checkpoint (weights in one file, scales in another, with an index), its dequantized twin (same keys,
    float32, no scales, no quantization_config) and what transformers' from_pretrained makes of the twin."""

    def __init__(self, root: Path):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_v3_config(), dtype=torch.float32)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape) * 0.01)
        model.save_pretrained(root / "plain")
        disk = load_file(str(root / "plain" / "model.safetensors"))
        self.dir, self.twin = root / "fp8", root / "twin"
        self.dir.mkdir()
        self.twin.mkdir()
        weights, scales, twin = {}, {}, {}
        self.oracle_of: dict[str, str] = {}
        for key, w in disk.items():
            if QUANTIZED.search(key):
                q, s = _quantize(w)
                weights[key], scales[f"{key}_scale_inv"] = q, s
                twin[key], self.oracle_of[key] = _oracle(q, s)
            else:
                weights[key] = twin[key] = w
        save_file(weights, str(self.dir / "model-00001-of-00002.safetensors"))
        save_file(scales, str(self.dir / "model-00002-of-00002.safetensors"))
        weight_map = {**{k: "model-00001-of-00002.safetensors" for k in weights},
                      **{k: "model-00002-of-00002.safetensors" for k in scales}}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config = json.loads((root / "plain" / "config.json").read_text())
        (self.dir / "config.json").write_text(json.dumps({**config, "quantization_config": QCONFIG}))
        save_file(twin, str(self.twin / "model.safetensors"))
        shutil.copy(root / "plain" / "config.json", self.twin / "config.json")
        self.keys = set(weight_map)
        self.reference = {k: v.detach() for k, v in
                          transformers.AutoModelForCausalLM.from_pretrained(self.twin, dtype=torch.float32)
                          .state_dict().items()}
        with torch.device("meta"):
            self.meta = transformers.AutoModelForCausalLM.from_config(_v3_config(), dtype=torch.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Fp8Checkpoint:
    return Fp8Checkpoint(tmp_path_factory.mktemp("fp8"))


def _experts(ids):
    return lambda name: ids if is_expert_param(name) else None


def test_every_tensor_equals_transformers_dequantization_or_the_hand_formula(ckpt):
    """(a) read_hf_state of the FP8 folder: every model tensor exactly (float32) what from_pretrained makes of the
    oracles' dequantized copy (experts fused from dequantized per-expert tensors)."""
    oracles = set(ckpt.oracle_of.values())
    assert oracles == {"transformers", "hand"}, ckpt.oracle_of
    ragged = {k for k, o in ckpt.oracle_of.items() if o == "hand"}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in ragged   # [24, 32], as V3's [576, 7168]
    assert any(PER_EXPERT.search(k) for k in ragged)
    state, stats = read_hf_state(ckpt.dir, ckpt.meta, _experts(list(range(E))))
    assert set(state) == set(ckpt.reference)
    for k, want in ckpt.reference.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], want), k
    assert stats.keys_read == ckpt.keys   # every scale read once, with its weight
    assert stats.tensors_read == len(ckpt.keys) and stats.files_opened == 2


def test_one_devices_expert_rows_read_only_their_weights_and_scales(ckpt):
    """(b) a device holding experts [2, 0] gets the same rows of the full load, reading only those experts'
    weights and scales (in the model's dtype: bfloat16 here)."""
    full, _ = read_hf_state(ckpt.dir, ckpt.meta, _experts(list(range(E))))
    ids = [2, 0]
    mine, stats = read_hf_state(ckpt.dir, ckpt.meta, _experts(ids))
    for k, want in full.items():
        assert torch.equal(mine[k], want[ids] if is_expert_param(k) else want), k
    read_experts = {int(m.group(1)) for k in stats.keys_read if (m := PER_EXPERT.search(k))}
    assert read_experts == {0, 2}
    assert any(k.endswith("_scale_inv") and PER_EXPERT.search(k) for k in stats.keys_read)
    with torch.device("meta"):
        bf16 = transformers.AutoModelForCausalLM.from_config(_v3_config(), dtype=torch.bfloat16)
    low, _ = read_hf_state(ckpt.dir, bf16, _experts(ids))
    dtypes = {k: v.dtype for k, v in bf16.state_dict().items()}   # (the correction bias stays float32)
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj"] == torch.bfloat16
    for k, want in mine.items():
        assert low[k].dtype == dtypes[k] and torch.equal(low[k], want.to(dtypes[k])), k


@pytest.mark.parametrize("suffix", ["scale", "qscale_weight"])
def test_renamed_scale_keys_load_the_same(ckpt, tmp_path, suffix):
    """`<x>.scale` (DeepSeek-V4-Flash) and `<x>.qscale_weight` (Mistral Large), as transformers renames them."""
    d = tmp_path / suffix
    d.mkdir()
    shutil.copy(ckpt.dir / "config.json", d / "config.json")
    tensors = {}
    for f in ckpt.dir.glob("*.safetensors"):
        for k, v in load_file(str(f)).items():
            tensors[re.sub(r"\.weight_scale_inv$", f".{suffix}", k)] = v
    save_file(tensors, str(d / "model.safetensors"))
    check_weight_files(d)
    state, _ = read_hf_state(d, ckpt.meta, _experts([1, 3]))
    full, _ = read_hf_state(ckpt.dir, ckpt.meta, _experts([1, 3]))
    for k, want in full.items():
        assert torch.equal(state[k], want), k


def test_fused_fp8_experts_read_their_rows_and_scale_rows(ckpt, tmp_path):
    """Experts already fused on disk in FP8 ([E, M, N] with [E, ceil(M/16), ceil(N/16)] scales, transformers'
    FP8Experts layout): a device's rows and only those scale rows, dequantized."""
    d = tmp_path / "fused"
    d.mkdir()
    shutil.copy(ckpt.dir / "config.json", d / "config.json")
    tensors, want = {}, {}
    for k, v in ckpt.reference.items():
        if is_expert_param(k):
            qs = [_quantize(v[e]) for e in range(E)]
            tensors[k] = torch.stack([q for q, _ in qs])
            tensors[f"{k}_scale_inv"] = torch.stack([s for _, s in qs])
            want[k] = torch.stack([_by_hand(q, s) for q, s in qs])
        else:
            tensors[k] = want[k] = v
    save_file(tensors, str(d / "model.safetensors"))
    ids = [3, 1, 3]
    state, stats = read_hf_state(d, ckpt.meta, _experts(ids))
    for k, w in want.items():
        assert torch.equal(state[k], w[ids] if is_expert_param(k) else w), k
    expert_keys = [k for k in tensors if is_expert_param(k.removesuffix("_scale_inv"))]
    assert expert_keys and all(k in stats.keys_read for k in expert_keys)
    assert stats.bytes_read < sum(t.numel() * t.element_size() for t in tensors.values())   # rows 1 and 3 only


def test_ue8m0_scales_are_powers_of_two():
    """scale_fmt ue8m0: float8_e8m0fnu scales (V4) and uint8 exponent bytes give the float32 power-of-two scales'
    weights; edge blocks cropped."""
    torch.manual_seed(1)
    q = (torch.randn(20, 40) * 50).to(torch.float8_e4m3fn)
    exp = torch.randint(-6, 6, (2, 3)).float()
    fmt = Fp8Format(BLOCK, "ue8m0")
    want = _by_hand(q, torch.exp2(exp))
    for s in (torch.exp2(exp), torch.exp2(exp).to(torch.float8_e8m0fnu), (exp + 127).to(torch.uint8)):
        assert torch.equal(dequantize(q, s, fmt, torch.float32), want), s.dtype
    with pytest.raises(ConfigError, match="uint8"):
        dequantize(q, (exp + 127).to(torch.uint8), Fp8Format(BLOCK, "float"), torch.float32)


def _copy(ckpt, dst: Path, edit=None, config=None) -> Path:
    dst.mkdir()
    tensors = {k: v for f in ckpt.dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    data = json.loads((ckpt.dir / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(data) if config else data))
    return dst


def test_refusals_are_one_line_naming_the_tensor_and_file(ckpt, tmp_path):
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    missing = _copy(ckpt, tmp_path / "missing", lambda t: t.pop(f"{key}_scale_inv"))
    msg = rf"{missing / 'model.safetensors'}: '{re.escape(key)}' is float8_e4m3fn, but its scale"
    for check in (lambda: check_weight_files(missing),
                  lambda: read_hf_state(missing, ckpt.meta, _experts([2]))):
        with pytest.raises(ConfigError, match=msg) as e:
            check()
        assert "\n" not in str(e.value)
    read_hf_state(missing, ckpt.meta, _experts([0, 1]))   # a device without expert 2 never reads it

    noconfig = _copy(ckpt, tmp_path / "noconfig", config=lambda c: {k: v for k, v in c.items()
                                                                     if k != "quantization_config"})
    with pytest.raises(ConfigError, match=r"has no quantization_config"):
        check_weight_files(noconfig)
    with pytest.raises(ConfigError, match=r"has no quantization_config"):
        read_hf_state(noconfig, ckpt.meta, _experts([0]))

    def shape(t):
        t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 3)
    bad = _copy(ckpt, tmp_path / "shape", shape)
    for check in (lambda: check_weight_files(bad), lambda: read_hf_state(bad, ckpt.meta, _experts([0]))):
        with pytest.raises(ConfigError, match=r"o_proj.* \[2, 3\].*\[2, 2\]"):
            check()

    def packed(t):   # FP4-packed (int8) experts beside their scales, as DeepSeek-V4-Flash's
        t["model.layers.2.mlp.experts.0.down_proj.weight"] = torch.zeros(32, 12, dtype=torch.int8)
    fp4 = _copy(ckpt, tmp_path / "packed", packed)
    for check in (lambda: check_weight_files(fp4), lambda: read_hf_state(fp4, ckpt.meta, _experts([0]))):
        with pytest.raises(ConfigError, match=r"experts\.0\.down_proj\.weight' is (I8|int8) with a block scale"):
            check()

    from orchestrator.config import ModelConfig
    from orchestrator.model.hf import load_hf_config

    for name, q, needle in (("e5m2", {**QCONFIG, "fmt": "e5m2"}, "quantization_config.fmt is 'e5m2'"),
                            ("awq", {"quant_method": "awq", "bits": 4}, "quantization_config.quant_method is 'awq'"),
                            ("fp4", {**QCONFIG, "expert_dtype": "fp4"}, "quantization_config.expert_dtype is 'fp4'"),
                            ("block", {**QCONFIG, "weight_block_size": [128]},
                             "quantization_config.weight_block_size is [128]")):
        d = _copy(ckpt, tmp_path / name, config=lambda c: {**c, "quantization_config": q})
        for check in (lambda: check_weight_files(d), lambda: read_hf_state(d, ckpt.meta, _experts([0])),
                      lambda: load_hf_config(ModelConfig(hf_path=str(d)))):
            with pytest.raises(ConfigError, match=re.escape(f"{d / 'config.json'}: {needle}")) as e:
                check()
            assert "\n" not in str(e.value)


def test_a_run_accepts_the_fp8_folder_trains_as_its_dequantized_twin_and_exports_the_training_dtype(ckpt, tmp_path):
    """(c) The job's config validation and pre-flight (`check_inputs`, as `python -m jobs.train` runs them) take
    the FP8 folder; a training step of the device shard on it has the loss and gradient norm of the same step on
    the dequantized twin (bit for bit); the export of the trained weights is float32 without quantization_config,
    and transformers loads it."""
    from orchestrator.checkpoint.hf_export import export_hf_checkpoint
    from orchestrator.data import load_corpus
    from orchestrator.device.shard import DeviceShard
    from orchestrator.runtime.preflight import check_inputs

    reports, shards = [], []
    for folder in (ckpt.dir, ckpt.twin):
        cfg = tiny_config(None, f"model.hf_path={folder}", "train.dtype=float32", "train.global_batch_size=4",
                          "data.seq_len=32", "balance.bias_update_speed=0.01")
        check_inputs(cfg)
        corpus = load_corpus(cfg.data)
        shard = DeviceShard(cfg, 0, 1, corpus.train, corpus.val)
        reports.append(shard.train_step(1))
        shards.append(shard)
    fp8, twin = reports
    assert fp8.skipped is None and torch.isfinite(torch.tensor(fp8.loss))
    assert (fp8.loss, fp8.grad_norm) == (twin.loss, twin.grad_norm)
    state = {k: v.detach() for k, v in shards[0].model.hf.state_dict().items()}
    out = tmp_path / "out"
    export_hf_checkpoint(state, ckpt.dir, out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"F32"}
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for k, v in state.items():
        assert torch.equal(back[k], v), k
