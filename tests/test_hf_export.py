"""The native model exported to transformers: the same function as transformers' own class with the copied weights.

transformers is the oracle: its MixtralForCausalLM / Ernie4_5_MoeForCausalLM / Qwen2MoeForCausalLM /
Glm4MoeForCausalLM compute the logits and gradients here; the test only maps names (hf_export's maps) and compares.
No Ray: the checkpoint of the CLI test is written with the checkpoint code's own functions (take_snapshot,
serialize, commit_manifest), as a 2-device expert-parallel run would write it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from orchestrator.__main__ import main  # noqa: E402
from orchestrator.checkpoint.manager import CheckpointManifest, commit_manifest, model_fingerprint, step_dir  # noqa: E402
from orchestrator.checkpoint.shard import serialize, take_snapshot  # noqa: E402
from orchestrator.checkpoint.timeline import training_settings  # noqa: E402
from orchestrator.config import BalanceConfig, Config, ConfigError, ModelConfig  # noqa: E402
from orchestrator.checkpoint import hf_export as H, hf_mapping  # noqa: E402
from orchestrator.model.transformer import build_model  # noqa: E402
from orchestrator.checkpoint.storage import Storage  # noqa: E402

BASE = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=32, num_experts=4, top_k=2, expert_dim=16,
            dense_dim=24, init_std=0.1)

CASES = {  # name: (model settings, balance settings, router bias, the class it must export as)
    "mixtral": (dict(num_shared_experts=0, first_k_dense=0), dict(), False, H.MIXTRAL),
    "ernie_shared_dense_bias_untied": (dict(num_shared_experts=1, first_k_dense=1, tie_embeddings=False),
                                       dict(bias_update_speed=0.01), True, H.ERNIE),
    "qwen2_top1": (dict(top_k=1, num_shared_experts=0, first_k_dense=1), dict(), False, H.QWEN2_MOE),
    "glm4_sigmoid_group_limited": (dict(num_experts=8, score_func="sigmoid", num_shared_experts=2, first_k_dense=1,
                                        route_scale=2.5),
                                   dict(routing="group_limited", num_groups=4, topk_groups=2, bias_update_speed=0.01),
                                   True, H.GLM4_MOE),
    "glm4_sigmoid_plain_no_shared": (dict(score_func="sigmoid", num_shared_experts=0, first_k_dense=0,
                                          norm_topk_prob=False), dict(), False, H.GLM4_MOE),
}


def native(case: str, **extra) -> tuple[torch.nn.Module, ModelConfig, BalanceConfig]:
    model_kw, balance_kw, bias, _ = CASES[case]
    mc, bc = ModelConfig(**{**BASE, **model_kw, **extra}), BalanceConfig(**balance_kw)
    model = build_model(mc, seed=3, balance=bc)
    if bias:  # a trained aux-loss-free bias: it moves which experts are chosen, never the gate values
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.router.expert_bias.copy_(torch.randn(mc.num_experts, generator=g) * 0.05)
    return model.eval(), mc, bc


def hf_model(model, mc, bc) -> torch.nn.Module:
    cfg = H.hf_config_for(mc, bc)
    hf = getattr(transformers, H.CLASS_NAMES[cfg.model_type])(cfg)
    hf.load_state_dict(H.native_to_hf_state(model, mc, bc), strict=True)
    return hf.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_native_equals_transformers_logits_and_gradients(case):
    model, mc, bc = native(case)
    assert H.hf_architecture(mc, bc) == CASES[case][3]
    hf = hf_model(model, mc, bc)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (3, 20), generator=g)
    targets = torch.randint(0, mc.vocab_size, (3, 20), generator=g)

    mine, theirs = model(tokens), hf(input_ids=tokens).logits
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    with torch.no_grad():   # transformers' reference loops too (the default is grouped_mm experts, sdpa attention)
        eager = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager",
                                                              experts_implementation="eager")
        eager.load_state_dict(hf.state_dict())
        assert eager.config._experts_implementation == "eager"
        torch.testing.assert_close(eager.eval()(input_ids=tokens).logits, mine, atol=1e-5, rtol=1e-5)

    for m, logits in ((model, mine), (hf, theirs)):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    back = H.hf_to_native_state(grads, mc, bc)
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert set(back) == set(expected), set(back) ^ set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(back[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # what HF has beyond the native model (a zero-width shared expert and its gate) learns nothing
    extra = {n: g for n, g in grads.items() if "shared_expert_gate" in n or g.numel() == 0}
    assert all(not g.any() for g in extra.values())


def test_export_then_from_pretrained_gives_the_native_logits(tmp_path):
    model, mc, bc = native("ernie_shared_dense_bias_untied", vocab_size=256, tie_embeddings=True)
    info = H.export_native(model.state_dict(), mc, bc, tmp_path / "hf")
    assert info["model_class"] == "Ernie4_5_MoeForCausalLM" and "byte-level" in info["tokenizer"]
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= written
    assert not written & {"tokenizer.json", "tokenizer_config.json"}       # byte level: no tokenizer files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "Ernie4_5_MoeForCausalLM"
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_rope_permutation_is_what_makes_rotate_half_classes_equal(monkeypatch):
    model, mc, bc = native("mixtral")
    monkeypatch.setattr(hf_mapping, "_rope_perm", lambda d: torch.arange(d))   # copy q/k rows as they are
    tokens = torch.randint(0, mc.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf_model(model, mc, bc)(input_ids=tokens).logits - model(tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("model_kw, balance_kw, key", [
    (dict(), dict(routing="grouped", num_groups=2), "balance.routing"),
    (dict(num_shared_experts=0, first_k_dense=0, route_scale=2.0), dict(), "model.route_scale"),
    (dict(), dict(routing="group_limited", num_groups=2, topk_groups=1), "balance.routing"),
    (dict(top_k=1, num_shared_experts=1), dict(), "model.num_shared_experts"),
    (dict(norm_topk_prob=False, num_shared_experts=0), dict(bias_update_speed=0.01), "balance.bias_update_speed"),
    (dict(), dict(capacity_factor=1.25), "balance.capacity_factor"),
    (dict(score_func="sigmoid", num_experts=4), dict(routing="group_limited", num_groups=4, topk_groups=2),
     "balance.num_groups"),
])
def test_settings_without_a_transformers_equivalent_are_refused_naming_the_key(model_kw, balance_kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        H.hf_config_for(ModelConfig(**{**BASE, **model_kw}), BalanceConfig(**balance_kw))


def test_dropless_exports_a_capacity_model_on_purpose():
    mc, bc = ModelConfig(**BASE), BalanceConfig(capacity_factor=1.25)
    assert H.hf_config_for(mc, bc, dropless=True).model_type == H.ERNIE


def test_nonzero_router_bias_is_refused_where_the_class_has_none():
    model, mc, bc = native("mixtral")
    with torch.no_grad():
        model.moe_layers()[0].router.expert_bias[0] = 0.1
    with pytest.raises(ConfigError, match="expert_bias"):
        H.native_to_hf_state(model, mc, bc)


# --------------------------------------------------------------------------- the CLI on a checkpoint
class _NoMoments:
    """The optimizer interface take_snapshot reads, for a model that never stepped."""
    optimizer_step = 0

    def state_of(self, p):
        return None

    def partitioned(self, p):
        return False

    def owns(self, p):
        return False


def write_checkpoint(folder: Path, cfg: Config, step: int, models: list[torch.nn.Module], training: bool = True
                     ) -> Path:
    """What a run of len(models) expert-parallel devices commits (coordinator._commit), without Ray (`training`
    False: as checkpoints written before manifests held the training settings)."""
    storage, uri = Storage(str(folder)), str(folder / step_dir(step))
    files, expert_files, index = {}, {}, {}
    for rank, model in enumerate(models):
        snap = take_snapshot(model, _NoMoments(), rank, step)
        for name, tensors in snap.files.items():
            data, meta = serialize(tensors)
            Storage(uri).write(name, data)
            files[name] = meta
        for layer, placement in snap.expert_files.items():
            expert_files.setdefault(layer, {}).update(placement)
        for key, pieces in snap.index.items():
            index.setdefault(key, []).extend(pieces)
    fp = model_fingerprint(cfg)
    commit_manifest(storage, CheckpointManifest(step=step, world_size=len(models), files=files,
                                                expert_files=expert_files, optimizer_step=0, config_hash="test",
                                                fingerprint=fp, seed=cfg.seed,
                                                training=training_settings(cfg) if training else None,
                                                index=index))
    return Path(uri)


def test_cli_exports_a_two_device_checkpoint(tmp_path, capsys):
    _, mc, bc = native("glm4_sigmoid_group_limited", vocab_size=256)
    cfg = Config(model=mc, balance=bc)
    full = build_model(mc, seed=3, balance=bc).eval()
    halves = [build_model(mc, seed=3, balance=bc, expert_ids=ids) for ids in ([0, 1, 2, 3], [4, 5, 6, 7])]
    with torch.no_grad():   # a bias moved by training: the same on every device (dense.safetensors holds it)
        for m in [full, *halves]:
            for moe in m.moe_layers():
                moe.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, mc.num_experts))
    write_checkpoint(tmp_path / "run" / "checkpoints", cfg, 7, halves)

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--hf", str(out)]) == 0
    said = capsys.readouterr().out
    assert "step 7" in said and "Glm4MoeForCausalLM" in said and "RoPE" in said and "byte-level" in said
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.n_group == 4 and loaded.config.routed_scaling_factor == 2.5
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, full(tokens), atol=1e-5, rtol=1e-5)


def test_cli_refuses_a_setting_without_equivalent_with_exit_code_2(tmp_path, capsys):
    mc, bc = ModelConfig(**{**BASE, "vocab_size": 256}), BalanceConfig(routing="grouped", num_groups=2)
    write_checkpoint(tmp_path / "ck", Config(model=mc, balance=bc), 1, [build_model(mc, seed=0, balance=bc)])
    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf")]) == 2
    assert "balance.routing='grouped'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_old_checkpoint_takes_routing_from_the_run_config(tmp_path, capsys):
    """A manifest without training settings: the routing comes from <run dir>/config.yaml, else --config."""
    mc, bc = ModelConfig(**{**BASE, "vocab_size": 256}), BalanceConfig(bias_update_speed=0.01)
    model = build_model(mc, seed=2, balance=bc).eval()
    write_checkpoint(tmp_path / "run" / "checkpoints", Config(model=mc, balance=bc), 2, [model], training=False)
    out = str(tmp_path / "hf")
    assert main(["export", str(tmp_path / "run"), "--hf", out]) == 1
    assert "--config" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("balance:\n  bias_update_speed: 0.01\n")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert main(["export", str(tmp_path / "run"), "--hf", out, "--config", str(tmp_path / "run.yaml"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "Ernie4_5_MoeForCausalLM" in capsys.readouterr().out and (tmp_path / "hf" / "tokenizer.json").is_file()
    (tmp_path / "run" / "config.yaml").write_text("balance:\n  bias_update_speed: 0.01\n")
    assert main(["export", str(tmp_path / "run"), "--hf", out]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_branch_loads_and_saves_the_transformers_names(tmp_path):
    """A checkpoint of a Hugging Face model trained here: its names are transformers' (experts stacked)."""
    model, mc, bc = native("mixtral")
    hf = hf_model(model, mc, bc)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}   # tied: stored once
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(hf.config.to_json_string())
    tokens = torch.randint(0, mc.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))

    def check(out: Path) -> None:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)

    for i, source in enumerate((json.loads(hf.config.to_json_string()), tmp_path / "cfg",
                                tmp_path / "cfg" / "config.json")):
        info = H.export_hf_checkpoint(state, source, tmp_path / f"out{i}")
        assert info["model_class"] == "MixtralForCausalLM"
        check(tmp_path / f"out{i}")

    # through the CLI: a checkpoint whose manifest records model.hf_config, experts stored per id
    experts = {k for k in state if ".experts." in k}
    tensors = {f"param/{k}": v for k, v in state.items() if k not in experts}
    tensors.update({f"param/{k}[{e}]": state[k][e].clone() for k in experts for e in range(state[k].shape[0])})
    data, meta = serialize(tensors)
    ckpt = Storage(str(tmp_path / "hfrun" / step_dir(5)))
    ckpt.write("dense.safetensors", data)
    fingerprint = {"model": {"hf_path": None, "hf_config": str(tmp_path / "cfg" / "config.json")}, "dtype": "float32"}
    commit_manifest(Storage(str(tmp_path / "hfrun")), CheckpointManifest(
        step=5, world_size=1, files={"dense.safetensors": meta}, expert_files={}, optimizer_step=0,
        config_hash="test", fingerprint=fingerprint, seed=0))
    assert main(["export", str(tmp_path / "hfrun"), "--hf", str(tmp_path / "cli")]) == 0
    check(tmp_path / "cli")
