"""Multi-token prediction (model.mtp_depth, model/mtp.py): the forward's shift, the trained loss's decomposition,
N devices == the reference with MTP on, snapshots and checkpoints carry the MTP modules, config and export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from orchestrator.checkpoint.shard import Snapshot, serialize
from orchestrator.config import ConfigError
from orchestrator.data import load_corpus
from orchestrator.device.shard import DeviceShard
from orchestrator.model.transformer import build_model
from tests.conftest import tiny_config

MTP = ["model.mtp_depth=2", "model.mtp_weight=0.3", "train.dtype=float64"]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(tiny_config().data)


def shard_of(corpus, *overrides: str) -> DeviceShard:
    cfg = tiny_config(None, *overrides)
    return DeviceShard(cfg, rank=0, world=1, train_tokens=corpus.train, val_tokens=corpus.val)


def test_depth_k_logits_predict_the_token_k_plus_1_ahead():
    """A hand-built forward of the modules (h^0 = final-normed main state, embedding first in the concatenation,
    the block over T-k positions, own norm, shared head) equals model(tokens, mtp=True); position i of depth 1
    sees tokens 0..i+1 only."""
    cfg = tiny_config(None, "model.mtp_depth=2", "train.dtype=float64").model
    model = build_model(cfg, seed=3).double()
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 12))
    logits_BTV, mtp = model(tokens_BT, mtp=True)
    assert logits_BTV.shape == (2, 12, cfg.vocab_size)
    assert [t.shape for t in mtp] == [(2, 11, cfg.vocab_size), (2, 10, cfg.vocab_size)]
    torch.testing.assert_close(logits_BTV, model(tokens_BT))   # the main logits are the plain forward's

    emb = model.tok_emb(tokens_BT)
    h = emb
    for layer in model.layers:
        h = layer(h)
    h = model.norm(h)
    for k, module in enumerate(model.mtp, 1):
        x = module.eh_proj(torch.cat([module.enorm(emb[:, k:]), module.hnorm(h[:, :12 - k])], -1))
        h = module.block(x)
        torch.testing.assert_close(module.norm(h) @ model.tok_emb.weight.t(), mtp[k - 1])

    changed = tokens_BT.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    depth1 = model(changed, mtp=True)[1][0]
    torch.testing.assert_close(depth1[:, :6], mtp[0][:, :6])    # positions i < 6 see tokens up to i+1 < 7
    assert not torch.allclose(depth1[:, 6], mtp[0][:, 6])       # position 6 reads token 7's embedding


def test_trained_loss_is_main_ce_plus_weighted_mean_of_depths(corpus):
    """The step's report: loss = main CE, mtp_losses = each depth's mean CE against targets[:, k:] (depth 1 at
    position i: token i+2), by hand in float64; the gradients trained are those of
    main CE + mtp_weight / D * sum_k L_k + balancing losses."""
    shard = shard_of(corpus, *MTP, "balance.seq_aux_loss_coeff=0.001")
    model = copy.deepcopy(shard.model)
    inputs_BT, targets_BT, _, _ = shard._batch(1)
    assert torch.equal(inputs_BT[:, 1:], targets_BT[:, :-1])   # targets are the inputs shifted by one

    logits_BTV, mtp = model(inputs_BT, mtp=True)
    B, T = inputs_BT.shape
    main = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
    ahead2_BT = torch.cat([inputs_BT[:, 2:], targets_BT[:, -1:]], 1)   # position i: token i+2 (the last: the row's next)
    depth = [F.cross_entropy(mtp[0].flatten(0, 1), ahead2_BT.flatten()),
             F.cross_entropy(mtp[1].flatten(0, 1), targets_BT[:, 2:].flatten())]   # 3 ahead
    total = main + 0.3 / 2 * sum(depth) + model.aux_loss()
    total.backward()
    assert shard.mtp_tokens == [B * (T - 1), B * (T - 2)]

    report = shard.train_step(1)
    assert report.loss == pytest.approx(main.item(), rel=1e-12)
    assert report.mtp_losses == pytest.approx([d.item() for d in depth], rel=1e-12)
    assert report.aux_loss > 0
    # (train_step applied the update: compare the gradients it computed, kept by a second forward/backward)
    shard2 = shard_of(corpus, *MTP, "balance.seq_aux_loss_coeff=0.001")
    shard2._begin(1)
    shard2._forward_backward(1, shard2.model.moe_layers())
    for (name, p), (_, q) in zip(shard2.model.named_parameters(), model.named_parameters()):
        assert q.grad is not None and p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert any(n.startswith("mtp.1.block.ffn.experts") for n, _ in shard2.model.named_parameters())


def test_snapshot_and_checkpoint_files_carry_the_mtp_modules(corpus):
    """A shard trained 2 steps, its snapshot serialized to checkpoint files and read back, restored into a fresh
    shard: both then train step 3 alike (main and MTP losses, every parameter), the MTP modules included."""
    a = shard_of(corpus, *MTP)
    for step in (1, 2):
        a.train_step(step)
    snap = a.snapshot(2)
    dense = snap.files["dense.safetensors"]
    assert any(k.startswith("param/mtp.0.eh_proj") for k in dense)
    assert any("mtp.1.block.ffn.experts" in k for f in snap.files.values() for k in f)
    files = {name: {k: v for k, v in load_safetensors(serialize(t)[0]).items()} for name, t in snap.files.items()}
    read_back = Snapshot(**{**vars(snap), "files": {n: {k: v.numpy() if v.dtype != torch.bfloat16 else v
                                                        for k, v in t.items()} for n, t in files.items()}})
    b = shard_of(corpus, *MTP)
    b.restore_snapshots([read_back])
    ra, rb = a.train_step(3), b.train_step(3)
    assert (ra.loss, ra.mtp_losses) == (rb.loss, rb.mtp_losses)
    pa, pb = a.global_parameters(), b.global_parameters()
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_mtp_config_checks_and_export(tmp_path):
    with pytest.raises(ConfigError, match="data.task=pretrain"):
        tiny_config(None, "model.mtp_depth=1", "data.task=sft")
    with pytest.raises(ConfigError, match="model.mtp_weight"):
        tiny_config(None, "model.mtp_weight=0.1")          # no effect without model.mtp_depth
    with pytest.raises(ConfigError, match="below data.seq_len"):
        tiny_config(None, "model.mtp_depth=32")
    # every MoE layer, the MTP blocks' included: the balancer plans as many as the model has
    from orchestrator.experts.balancer import Balancer
    from orchestrator.memory.plan import plan_memory
    from orchestrator.checkpoint.hf_mapping import native_to_hf_state

    cfg = tiny_config(None, "model.mtp_depth=1", "cluster.num_devices=2", "balance.replace_every=2")
    model = build_model(cfg.model, seed=0)
    assert len(Balancer(cfg).initial()) == len(model.moe_layers()) == 3
    assert len(model.blocks()) == 4
    plain = tiny_config(None, "cluster.num_devices=2")
    with_mtp, without = plan_memory(cfg).peak(), plan_memory(plain).peak()   # the plan counts the MTP modules
    assert with_mtp.params > without.params and with_mtp.activations_peak > without.activations_peak
    # a model without MoE layers gets a dense MTP block
    dense = build_model(tiny_config(None, "model.mtp_depth=1", "model.first_k_dense=3").model, seed=0)
    assert dense.moe_layers() == [] and not any(".experts." in n for n, _ in dense.named_parameters())
    # export: the main model exactly, the MTP modules left out
    hf = native_to_hf_state(model, cfg.model, cfg.balance)
    ref = native_to_hf_state(build_model(plain.model, seed=0), plain.model, plain.balance)
    assert hf.keys() == ref.keys()
    for k in hf:
        assert torch.equal(hf[k], ref[k]), k

    # export_native writes the model without them, and the MTP modules beside it (mtp.safetensors, native names)
    from safetensors.torch import load_file

    from orchestrator.checkpoint.hf_export import MTP_FILE, export_native

    done = export_native(model, cfg.model, cfg.balance, tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / MTP_FILE))
    mtp = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    assert saved.keys() == mtp.keys() and all(torch.equal(saved[k], mtp[k]) for k in mtp)
    assert any(MTP_FILE in n for n in done["notes"]) and MTP_FILE in (tmp_path / "hf" / "README.md").read_text()


def test_n_devices_match_reference_with_mtp(ray_session, tmp_path, corpus):
    """mtp_depth=1 (its MoE block expert-parallel, its loss a share of the global mean) in float64: N=2, and N=4
    as 2 expert-parallel x 2 data-parallel with ZeRO-3 (FSDP2 units: the MTP block too), selective recomputation
    and 2 micro-batches, give the reference's losses, MTP losses, routing and parameters; so does a run at N=2 that
    heals a crash."""
    from orchestrator.driver import Driver
    from orchestrator.reference import reference_run

    overrides = ["model.mtp_depth=1", "train.dtype=float64", "train.steps=3"]
    ref_reports, ref_params = reference_run(tiny_config(None, *overrides), corpus=corpus)
    assert ref_reports[-1].mtp_losses[0] < ref_reports[0].mtp_losses[0]
    layouts = {2: [], 4: ["parallel.expert_parallel=2", "memory.zero_stage=3", "train.micro_batches=2",
                          "memory.activation_checkpointing=selective"]}
    for world, layout in layouts.items():
        cfg = tiny_config(tmp_path / f"n{world}", *overrides, f"cluster.num_devices={world}", *layout)
        driver = Driver(cfg, tmp_path)
        try:
            driver.start()
            records = [driver.step(s)[0] for s in range(1, 4)]
            params = driver.global_parameters()
        finally:
            driver.shutdown()
        assert [r.loss for r in records] == pytest.approx([r.loss for r in ref_reports], rel=1e-9)
        assert [r.mtp_losses for r in records] == [pytest.approx(r.mtp_losses, rel=1e-9) for r in ref_reports]
        assert [r.expert_load for r in records] == [r.expert_load for r in ref_reports]
        assert params.keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"N={world} {name}: {m}")
    # healing: a crash at step 2 (the devices replaced, the snapshot of step 1 restored, MTP modules included)
    # ends in the reference's state, read back from the final checkpoint
    from orchestrator.checkpoint.storage import Storage
    from orchestrator.checkpoint.tools import list_checkpoints, read_parameters
    from tests.conftest import step_records

    healed = tmp_path / "healed"
    summary = Driver(tiny_config(healed, *overrides, "cluster.num_devices=2", "train.eval_batches=0",
                                 "faults.plan=[{kind: crash, step: 2}]"), healed).run()
    assert summary.recoveries == 1
    recs = step_records(healed)
    assert [r["mtp_loss"] for r in recs] == pytest.approx([r.mtp_losses[0] for r in ref_reports], rel=1e-9)
    params, _ = read_parameters(list_checkpoints(Storage(str(healed / "checkpoints")))[-1][1])
    assert any(k.startswith("mtp.") for k in params)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-6, atol=1e-9, msg=lambda m: f"healed {name}: {m}")


def test_resume_may_lower_the_mtp_weight_but_not_change_the_depth():
    """check_compatible: mtp_weight shapes no parameter (DeepSeek-V3 lowers it mid-run); mtp_depth does; a
    checkpoint written before the MTP keys existed counts as having their defaults."""
    from types import SimpleNamespace

    from orchestrator.checkpoint import CheckpointError, check_compatible
    from orchestrator.checkpoint.manager import model_fingerprint

    saved = SimpleNamespace(fingerprint=model_fingerprint(tiny_config(None, "model.mtp_depth=1")))
    check_compatible(saved, tiny_config(None, "model.mtp_depth=1", "model.mtp_weight=0.1"), "ckpt")
    with pytest.raises(CheckpointError, match="model.mtp_depth: checkpoint 1, this run 2"):
        check_compatible(saved, tiny_config(None, "model.mtp_depth=2"), "ckpt")
    old = model_fingerprint(tiny_config())
    for key in ("mtp_depth", "mtp_weight"):
        del old["model"][key]
    check_compatible(SimpleNamespace(fingerprint=old), tiny_config(), "ckpt")
    with pytest.raises(CheckpointError, match="model.mtp_depth"):
        check_compatible(SimpleNamespace(fingerprint=old), tiny_config(None, "model.mtp_depth=1"), "ckpt")
