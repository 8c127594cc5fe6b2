"""Hugging Face MoE models (transformers' own classes) trained expert-parallel: N devices compute what the
unmodified transformers model computes in one process.

The distributed runs are DeviceShards in spawned processes over gloo on loopback, each holding its own experts
of the transformers model and exchanging tokens with all_to_all. The oracle is transformers' model loaded with
`from_pretrained` and trained by a plain loop in this process (AdamW, the run's learning-rate schedule and
gradient clipping: the published formulas, none of the project's model, dispatch or sharding code)."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.config import Config, ConfigError, DataConfig, ModelConfig
from orchestrator.data import load_corpus
from orchestrator.data.batches import BatchStream
from orchestrator.parallel import groups
from orchestrator.device.schedule import lr_of
from tests.conftest import tiny_config
from tests.hf_tiny import KINDS, make_tiny_hf, tiny_hf_config

STEPS = 3
BIAS = 0.01   # aux-loss-free bias speed for the models whose routers have a correction bias
COMMON = ["train.dtype=float32", f"train.steps={STEPS}", "train.global_batch_size=8", "data.seq_len=32",
          "train.warmup_steps=1", "train.lr=1e-2"]


# Variants run on the same checkpoints: "kind+variant" (the math is the same, so the oracle is too).
VARIANTS = {"replicas": ["balance.redundant_experts=2"],   # 4 experts in 3 slots per device: two replicated
            "zero3": ["memory.zero_stage=3", "parallel.expert_parallel=2"],   # EP 2 x DP 2, FSDP2 full shard
            "zero1-micro": ["memory.zero_stage=1", "train.micro_batches=2"],
            # the model's own router loss, over the global batch, and the project's sequence-wise loss
            "aux": ["balance.router_aux_loss_coeff=0.02", "balance.seq_aux_loss_coeff=0.01"],
            "full-ckpt-aux": ["memory.activation_checkpointing=full", "memory.zero_stage=2",
                              "balance.router_aux_loss_coeff=0.02"]}


def _overrides(kind: str, path: str, world: int) -> list[str]:
    kind, _, variant = kind.partition("+")
    bias = [f"balance.bias_update_speed={BIAS}"] if kind in ("deepseek_v3", "deepseek_v4") else []
    # DeepSeek-V4's hyper-connection gradients are tiny and sum in float32: a chunked dispatch (the experts' weight
    # gradients summed over chunks, their matmuls on fewer rows) moves them by up to ~8e-6 of their size at 4
    # devices, past this test's 1e-5; one chunk keeps the old summation order. Chunking is checked in float64 by
    # tests/test_moe_overlap.py, and in float32 here by the other families.
    chunks = ["parallel.dispatch_chunks=1"] if kind == "deepseek_v4" else []
    return [f"model.hf_path={path}", f"cluster.num_devices={world}", *COMMON, *bias, *chunks,
            *VARIANTS.get(variant, [])]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for kind in KINDS:
        make_tiny_hf(kind, root / kind)
    return root


def _worker(rank: int, world: int, port: int, root: str, kinds: list[str], out: str) -> None:
    from orchestrator.device.shard import DeviceShard

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    results = {}
    for kind in kinds:
        cfg = tiny_config(None, *_overrides(kind, f"{root}/{kind.partition('+')[0]}", world))
        corpus = load_corpus(cfg.data)
        shard = DeviceShard(cfg, rank, world, corpus.train, corpus.val)
        # The first step's gradients, synchronised as the step does (dense all-reduced; experts where they live).
        x, y = shard.data.train_batch(1)
        lm, aux = shard._loss_sum(x, y) / shard.global_tokens, shard.model.aux_loss()
        (lm if aux is None else lm + aux).backward()
        shard._sync_grads(shard.model.moe_layers())
        grads = {}
        experts = {id(q) for _, q in shard.model.expert_parameters()}
        for name, p in shard.model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()   # FSDP2: gathered
            if id(p) not in experts:
                grads[name] = g
            else:
                grads.update({f"{name}[{e}]": g[j].clone() for j, e in enumerate(shard.model.expert_ids_of(name))})
        shard.optim.zero_grad()
        reports = [shard.train_step(s) for s in range(1, STEPS + 1)]
        results[kind] = {"grads": grads, "losses": [r.loss for r in reports], "load": [r.expert_load for r in reports],
                         "read": dict(shard.load_stats, keys_read=None),
                         "sharded": any(hasattr(p, "device_mesh") for p in shard.model.parameters())}
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(results, f)
    groups.leave()


def _transformers_run(kind: str, path, world: int):
    """transformers' model in one process, on one thread as the devices run: first-step gradients (experts split per
    id), per-step losses and the per-layer expert loads its routers chose (read at the experts' input:
    top_k_index). (With this process's default two threads, float32 matmuls sum in another order, and DeepSeek-V4's
    hyper-connection gradients, computed in float32 and tiny, differed from the devices' by more than the 1e-5 the
    test allows: the test passed only after an earlier test had set one thread.)"""
    cfg = tiny_config(None, *_overrides(kind, str(path), world))
    # the oracle reads only these (not the layout, ZeRO stage, replicas, checkpointing): a variant or another device
    # count that leaves them alone has the same transformers run, so it is computed once
    key = (str(path), repr(cfg.train), repr(cfg.data), cfg.seed, cfg.balance.router_aux_loss_coeff,
           cfg.balance.bias_update_speed, cfg.balance.seq_aux_loss_coeff)
    if key not in _ORACLE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _ORACLE[key] = _transformers_steps(kind, path, world)
        finally:
            torch.set_num_threads(threads)
    return _ORACLE[key]


_ORACLE: dict[tuple, tuple] = {}


def _seq_aux_by_hand(router_logits, B: int, T: int, K: int):
    """DeepSeek-V3's sequence-wise loss summed over the MoE layers, from transformers' router logits of a softmax
    router: per sequence E/(K T) * sum_i c_i * mean_t p_ti (p: the softmax, summing to 1 per token), averaged over
    the B sequences."""
    total = 0.0
    for logits in router_logits:
        p_BTE = logits.float().softmax(-1).view(B, T, -1)
        E = p_BTE.shape[-1]
        ids_BTK = p_BTE.topk(K, -1).indices
        c_BE = torch.stack([(ids_BTK == i).sum((1, 2)) for i in range(E)], -1).float()
        total = total + (E / (K * T) * c_BE * p_BTE.mean(1)).sum() / B
    return total


def _transformers_steps(kind: str, path, world: int):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(None, *_overrides(kind, str(path), world))
    t = cfg.train
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    E = cfg.model.num_experts
    loads: list[list[int]] = []
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]
    for m in experts:
        m.register_forward_pre_hook(lambda mod, args: loads.append(
            torch.bincount(args[1].reshape(-1), minlength=E).tolist()))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    corpus = load_corpus(cfg.data)
    data = BatchStream(corpus.train, corpus.val, cfg.seed, cfg.data.seq_len, t.global_batch_size, 1, 0)
    tokens = t.global_batch_size * cfg.data.seq_len
    losses, step_loads, grads = [], [], {}
    for step in range(1, STEPS + 1):
        x, y = data.train_batch(step)
        loads.clear()
        b = cfg.balance
        out = model(input_ids=x, output_router_logits=bool(b.router_aux_loss_coeff or b.seq_aux_loss_coeff))
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="sum") / tokens
        total = loss
        if b.router_aux_loss_coeff:   # transformers' own load_balancing_loss_func on the whole batch
            total = total + b.router_aux_loss_coeff * out.aux_loss
        if b.seq_aux_loss_coeff:      # the project's sequence-wise loss, by hand on the router logits
            total = total + b.seq_aux_loss_coeff * _seq_aux_by_hand(out.router_logits, *x.shape, cfg.model.top_k)
        total.backward()
        if step == 1:
            for name, p in model.named_parameters():
                if p.grad is not None and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    grads.update({f"{name}[{e}]": p.grad[e].clone() for e in range(E)})
                elif p.grad is not None:
                    grads[name] = p.grad.clone()
        losses.append(loss.item())
        step_loads.append([list(layer) for layer in loads])
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_of(t, step)
        opt.step()
        opt.zero_grad()
        if cfg.balance.bias_update_speed:   # DeepSeek-V3's aux-loss-free update: b_i += u * sign(mean c - c_i)
            routed = [m.gate for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "e_score_correction_bias")]
            layers = [c for c, m in zip(step_loads[-1], [m for m in model.modules() if hasattr(m, "experts")
                                                          and hasattr(getattr(m, "experts"), "gate_up_proj")])
                      if hasattr(m.gate, "e_score_correction_bias")]
            with torch.no_grad():
                for gate, c in zip(routed, layers):
                    c = torch.tensor(c, dtype=torch.float32)
                    gate.e_score_correction_bias.add_(cfg.balance.bias_update_speed * torch.sign(c.mean() - c))
    return losses, step_loads, grads


@pytest.mark.parametrize("world,kinds", [(2, (*KINDS, "mixtral+replicas", "deepseek_v3+zero1-micro", "qwen2_moe+aux")),
                                         (4, ("deepseek_v4", "mixtral", "deepseek_v4+zero3", "deepseek_v4+full-ckpt-aux"))],
                         ids=["2dev", "4dev"])
def test_expert_parallel_matches_transformers_in_one_process(tmp_path, checkpoints, world, kinds):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(world, groups.free_port("127.0.0.1"), str(checkpoints), list(kinds), out), nprocs=world)
    ranks = []
    for r in range(world):
        with open(f"{out}.{r}", "rb") as f:
            ranks.append(pickle.load(f))
    for kind in kinds:
        losses, loads, grads = _transformers_run(kind, checkpoints / kind.partition("+")[0], world)
        got = ranks[0][kind]
        assert got["sharded"] == ("zero3" in kind or "full-ckpt" in kind), kind   # FSDP2's DTensor shards: stages 2, 3
        print(f"{kind} {world} devices: losses {got['losses']} transformers {losses}")
        assert got["losses"] == pytest.approx(losses, rel=1e-5), kind
        assert got["load"] == loads, kind      # per-expert loads: the router's own choices, summed over devices
        merged = {}
        for r in range(world):
            merged.update(ranks[r][kind]["grads"])
        # A parameter no gradient reaches (DeepSeek-V4's indexer: a top-k selection) has None in transformers and
        # here (the all-reduce keeps None where no device has one); should it show up on one side, it must be zeros.
        for name in set(merged) ^ set(grads):
            assert not (merged.get(name, grads.get(name))).any(), (kind, name)
        worst = 0.0
        for name, g in grads.items():
            if name not in merged:
                continue
            scale = max(g.abs().max().item(), 1e-12)
            worst = max(worst, (merged[name] - g).abs().max().item() / scale)
            torch.testing.assert_close(merged[name], g, rtol=1e-5, atol=1e-6 * scale, msg=f"{kind} {name}")
        print(f"{kind} {world} devices: worst relative gradient difference {worst:.2e}")


# --------------------------------------------------------------------------- in one process: load, export, refuse
def _hf_cfg(path, *overrides: str):
    return tiny_config(None, f"model.hf_path={path}", *overrides)


def test_a_device_reads_only_the_dense_tensors_and_its_own_experts(checkpoints):
    """Each device materialises the dense tensors and its own experts: the on-disk tensors of other experts are
    never read (DeepSeek-V4 stores one tensor per expert and projection: layers.N.ffn.experts.E.w1 ...)."""
    from orchestrator.model.hf import build_hf_model
    from orchestrator.model.hf_load import list_checkpoint_keys

    path = checkpoints / "deepseek_v4"
    cfg = _hf_cfg(path)
    keys = list_checkpoint_keys(path)
    expert_keys = {k for k in keys if ".experts." in k}
    stats: dict = {}
    model = build_hf_model(cfg.model, cfg.seed, [1, 3], cfg.balance, stats)
    read = stats["keys_read"]
    assert all(".experts.1." in k or ".experts.3." in k for k in read & expert_keys)
    assert read & expert_keys and not read - set(keys)
    assert read >= set(keys) - expert_keys          # every dense tensor
    assert stats["tensors_read"] == len(keys) - len(expert_keys) // 2
    ref = AutoModelForCausalLM_from(path)
    for name, p in model.expert_parameters():
        torch.testing.assert_close(p.detach(), ref.state_dict()[name][[1, 3]], rtol=0, atol=0)
    print(f"device holding experts [1, 3] of 4: read {stats['tensors_read']} of {len(keys)} tensors, "
          f"{stats['bytes_read']} bytes")


def AutoModelForCausalLM_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_import_export_from_pretrained_gives_identical_logits(tmp_path, checkpoints, kind):
    """HF directory -> two expert-parallel devices -> the checkpoint they commit -> export --hf -> from_pretrained."""
    from orchestrator.__main__ import main
    from orchestrator.model.hf import build_hf_model
    from tests.test_hf_export import write_checkpoint

    path = checkpoints / kind
    cfg = _hf_cfg(path)
    devices = [build_hf_model(cfg.model, cfg.seed, ids, cfg.balance) for ids in ([0, 1], [2, 3])]
    for rank, m in enumerate(devices):
        for layer in m.moe_layers():
            layer.set_placement([[0, 1], [2, 3]], rank)
    write_checkpoint(tmp_path / "run" / "checkpoints", cfg, 1, devices)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "out")]) == 0
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM_from(tmp_path / "out")(input_ids=tokens).logits,
                           AutoModelForCausalLM_from(path)(input_ids=tokens).logits)


def test_experts_outside_the_shared_layout_are_refused_naming_the_class(tmp_path):
    import transformers as tf

    tf.Llama4TextConfig(hidden_size=32, intermediate_size=16, intermediate_size_mlp=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, vocab_size=256,
                        head_dim=8).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="Llama4TextExperts"):
        tiny_config(None, f"model.hf_config={tmp_path / 'config.json'}")


def test_native_keys_and_native_routing_are_refused_with_a_transformers_model(checkpoints):
    with pytest.raises(ConfigError, match="model.expert_dim"):
        _hf_cfg(checkpoints / "mixtral", "model.expert_dim=64")
    with pytest.raises(ConfigError, match="balance.capacity_factor"):
        _hf_cfg(checkpoints / "mixtral", "balance.capacity_factor=1.0")
    with pytest.raises(ConfigError, match="balance.bias_update_speed"):   # Mixtral's router has no correction bias
        _hf_cfg(checkpoints / "mixtral", "balance.bias_update_speed=0.01")
    cfg = _hf_cfg(checkpoints / "deepseek_v4")
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.vocab_size) == (4, 2, 256)   # from its config.json


def test_sft_step_loss_is_transformers_loss_on_the_assistant_tokens_of_its_samples(tmp_path):
    """A packed SFT step through the device shard: its loss equals the mean cross-entropy, over assistant tokens
    only, of transformers' model run on each of the step's samples alone (no packing, no padding, no mask code)."""
    import transformers as tf

    from orchestrator.data.source import load_data
    from orchestrator.device.shard import DeviceShard

    config = tf.MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(6) for b in range(5)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(None, f"model.hf_path={tmp_path / 'm'}", "data.task=sft", "data.train_tokenizer=300",
                      f"data.path={tmp_path / 'chat.jsonl'}", "data.seq_len=96", "data.pack=true",
                      "train.global_batch_size=4")
    data = load_data(cfg)
    shard = DeviceShard(cfg, 0, 1, data.train, None)
    report = shard.train_step(0)
    # padding counts in no expert load: every layer's loads add up to the step's sample tokens times top-k
    assert all(sum(layer) == shard.data.real_tokens(0) * 2 for layer in report.expert_load)
    assert shard.data.real_tokens(0) < 4 * 96
    ref = AutoModelForCausalLM_from(tmp_path / "m")
    total, count = 0.0, 0
    for i in shard.data.samples_in(0):
        tokens, trained = data.train.sample(i)
        tokens = torch.as_tensor(tokens[: cfg.data.seq_len + 1].astype("int64"))
        labels = torch.where(torch.tensor(trained[1: cfg.data.seq_len + 1]), tokens[1:], -100)
        with torch.no_grad():
            logits = ref(input_ids=tokens[None, :-1]).logits[0]
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert len(shard.data.samples_in(0)) > 4            # packed: more samples than the 4 rows
    assert report.tokens == count
    assert report.loss == pytest.approx(total / count, rel=1e-5)


def test_sft_edge_cases_are_refused_before_any_actor_or_run_unpacked(tmp_path, checkpoints):
    """Packing on DeepSeek-V4 (its compressed attention crosses packed samples), an empty validation split,
    training a tokenizer into a model's folder: refused or kept apart. The native model trains SFT unpacked."""
    from orchestrator.config import tokenizer_source
    from orchestrator.data.source import load_data
    from orchestrator.device.shard import DeviceShard

    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "never", "always", "often", "rarely", "soon")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = ["data.task=sft", "data.train_tokenizer=300", f"data.path={tmp_path / 'chat.jsonl'}", "data.seq_len=32"]
    config = tiny_hf_config("deepseek_v4")
    config.vocab_size = 320
    config.save_pretrained(tmp_path / "v4")
    with pytest.raises(ConfigError, match="data.pack=true with DeepseekV4ForCausalLM"):
        tiny_config(None, f"model.hf_config={tmp_path / 'v4' / 'config.json'}", *sft, "data.pack=true")
    with pytest.raises(ConfigError, match="validation split is empty"):
        load_data(tiny_config(None, "model.vocab_size=320", *sft, "data.max_samples=1"))
    (checkpoints / "mixtral" / "tokenizer.json").write_text("{}")   # a model folder holding a tokenizer
    try:
        model = ModelConfig(hf_path=str(checkpoints / "mixtral"))
        assert tokenizer_source(Config(model=model)) == str(checkpoints / "mixtral")   # the model's own tokenizer
        # ... but one to train goes to the cache, never over the model's files
        assert tokenizer_source(Config(model=model, data=DataConfig(train_tokenizer=300))) is None
    finally:
        (checkpoints / "mixtral" / "tokenizer.json").unlink()
    cfg = tiny_config(None, "model.vocab_size=320", *sft, "train.global_batch_size=4")
    data = load_data(cfg)
    report = DeviceShard(cfg, 0, 1, data.train, None).train_step(0)   # the native model, unpacked SFT rows
    assert 0 < report.tokens < 4 * 32 and math.isfinite(report.loss)
