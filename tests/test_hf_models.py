"""Hugging Face MoE models (transformers' own classes) trained expert-parallel: N devices compute what the
unmodified transformers model computes in one process.

The distributed runs are DeviceShards in spawned processes over gloo on loopback, each holding its own experts
of the transformers model and exchanging tokens with all_to_all. The oracle is transformers' model loaded with
`from_pretrained` and trained by a plain loop in this process (AdamW, the run's learning-rate schedule and
gradient clipping: the published formulas, none of the project's model, dispatch or sharding code)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.data import load_corpus
from orchestrator.data.batches import BatchStream
from orchestrator.parallel import groups
from orchestrator.schedule import lr_of
from tests.conftest import tiny_config
from tests.hf_tiny import KINDS, make_tiny_hf

STEPS = 3
BIAS = 0.01   # aux-loss-free bias speed for the models whose routers have a correction bias
COMMON = ["train.dtype=float32", f"train.steps={STEPS}", "train.global_batch_size=8", "data.seq_len=32",
          "train.warmup_steps=1", "train.lr=1e-2"]


def _overrides(kind: str, path: str, world: int) -> list[str]:
    bias = [f"balance.bias_update_speed={BIAS}"] if kind in ("deepseek_v3", "deepseek_v4") else []
    return [f"model.hf_path={path}", f"cluster.num_devices={world}", *COMMON, *bias]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for kind in KINDS:
        make_tiny_hf(kind, root / kind)
    return root


def _worker(rank: int, world: int, port: int, root: str, kinds: list[str], out: str) -> None:
    from orchestrator.device_shard import DeviceShard

    torch.set_num_threads(1)
    groups.join("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
    results = {}
    for kind in kinds:
        cfg = tiny_config(None, *_overrides(kind, f"{root}/{kind}", world))
        corpus = load_corpus(cfg.data)
        shard = DeviceShard(cfg, rank, world, corpus.train, corpus.val)
        # The first step's gradients, synchronised as the step does (dense all-reduced; experts where they live).
        x, y = shard.data.train_batch(1)
        (shard._loss_sum(x, y) / shard.global_tokens).backward()
        shard._sync_grads(shard.model.moe_layers())
        grads = {}
        for name, p in shard.model.named_parameters():
            if p.grad is None:
                continue
            ids = shard.model.expert_ids_of(name) if any(p is q for _, q in shard.model.expert_parameters()) else None
            if ids is None:
                grads[name] = p.grad.clone()
            else:
                grads.update({f"{name}[{e}]": p.grad[j].clone() for j, e in enumerate(ids)})
        shard.optim.zero_grad()
        reports = [shard.train_step(s) for s in range(1, STEPS + 1)]
        results[kind] = {"grads": grads, "losses": [r.loss for r in reports], "load": [r.expert_load for r in reports],
                         "read": dict(shard.load_stats, keys_read=None)}
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(results, f)
    groups.leave()


def _transformers_run(kind: str, path, world: int):
    """transformers' model in one process: first-step gradients (experts split per id), per-step losses and the
    per-layer expert loads its routers chose (read at the experts' input: top_k_index)."""
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
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(), reduction="sum") / tokens
        loss.backward()
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


@pytest.mark.parametrize("world,kinds", [(2, KINDS), (4, ("deepseek_v4", "mixtral"))], ids=["2dev", "4dev"])
def test_expert_parallel_matches_transformers_in_one_process(tmp_path, checkpoints, world, kinds):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(world, groups.free_port("127.0.0.1"), str(checkpoints), list(kinds), out), nprocs=world)
    ranks = []
    for r in range(world):
        with open(f"{out}.{r}", "rb") as f:
            ranks.append(pickle.load(f))
    for kind in kinds:
        losses, loads, grads = _transformers_run(kind, checkpoints / kind, world)
        got = ranks[0][kind]
        print(f"{kind} {world} devices: losses {got['losses']} transformers {losses}")
        assert got["losses"] == pytest.approx(losses, rel=1e-5), kind
        assert got["load"] == loads, kind      # per-expert loads: the router's own choices, summed over devices
        merged = {}
        for r in range(world):
            merged.update(ranks[r][kind]["grads"])
        # A parameter no gradient reaches (DeepSeek-V4's indexer: a top-k selection) has None in transformers and
        # zeros after the all-reduce here.
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
