"""One device's RL step (data.task=rl): the policy trains exactly as a supervised step does (expert parallel, the
mesh, ZeRO stages, activation checkpointing, micro-batches, balancing; device/shard.py `_update_from`), on a batch
the driver built from the rollouts (data/rl.py RLBatch).

    1. old log-probs: a forward without gradient over this device's rows of every update, with the weights the
       rollouts sampled with (on-policy: the step's start); with `rl.routing_replay` the rollout's expert ids are
       replayed. The same pass without replay measures the routing mismatch (top-k sets that differ between
       rollout and trainer, per token x MoE layer) and the train-inference log-prob gap.
    2. reference log-probs (rl.kl_coeff > 0): the frozen reference model, built and sharded like the policy.
    3. rl.updates_per_rollout updates, each over its mini-batch (data/rl.py update_rows): the policy loss
       (model/policy_loss.py), its balancing losses over the trained tokens only, backward, grad sync, update.

Every number here is a sum over this device's rows divided by a global count, so N devices compute what one does.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.data.rl import RLBatch, rows_of, update_rows
from orchestrator.model.generate import routing_mismatch_counts
from orchestrator.model.policy_loss import policy_loss, token_logprobs
from orchestrator.parallel.sharding import reshard, whole

# the step's RL numbers, summed over the world in one all-reduce (then divided into the report's `extra`)
_SUMS = ("mismatch", "replay_mismatch", "routed", "gap", "k3", "gap_tokens", "clip_low", "clip_high", "kl", "ratio",
         "loss_tokens")


def build_reference(shard: Any, expert_ids: list[int], slots: list[list[int]]) -> Any:
    """The frozen reference policy: the model the run starts from (its initial weights), built, made expert
    parallel and sharded (ZeRO stage) as the policy is, in the initial expert placement; no gradient, no optimizer."""
    from orchestrator.model.build import build_any_model
    from orchestrator.parallel import apply_expert_parallel
    from orchestrator.parallel.sharding import shard_model

    cfg = shard.cfg
    ref = build_any_model(cfg.model, cfg.seed, expert_ids, cfg.balance, shard.device, cfg.train.dtype,
                          parallel=cfg.parallel)
    apply_expert_parallel(ref, len(slots), shard.mesh.ep_group, data_parallel=shard.world > len(slots),
                          chunks=cfg.parallel.dispatch_chunks, shared_overlap=cfg.parallel.shared_expert_overlap)
    for m in ref.moe_layers():
        m.set_placement(slots, shard.mesh.ep_rank)
    for p in ref.parameters():
        p.requires_grad_(False)
    shard_model(ref, shard.mesh, shard.zero_stage, False)
    return ref


def sync_tensors(shard: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors this device sends a rollout engine after an update, each logical tensor by one device: dense
    parameters and persistent buffers (the routers' biases) by rank 0, each expert (by global id) by its primary
    copy on the first data-parallel replica. Sharded ones are gathered one tensor at a time (a collective: every
    device calls it), never the whole model at once."""
    reshard(shard.model)
    out: list[tuple[str, torch.Tensor]] = []
    for name, p in shard.model.dense_parameters():
        t = whole(p)
        if shard.rank == 0:
            out.append((name, t.cpu().clone()))
    for name, p in shard.model.expert_parameters():
        t = whole(p)
        if shard.mesh.dp_rank == 0:
            for j, (gid, primary) in enumerate(zip(shard.model.expert_ids_of(name), shard.model.primary_of(name))):
                if primary:
                    out.append((f"{name}[{gid}]", t[j].cpu().clone()))
    if shard.rank == 0:
        for mod_name, mod in shard.model.named_modules():
            for b_name, b in mod.named_buffers(recurse=False):
                if b_name not in mod._non_persistent_buffers_set:
                    out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b.detach().cpu().clone()))
    return out


def rl_step(shard: Any, step: int, batch: RLBatch, guard: dict[str, float] | None) -> Any:
    """The step: old (and reference) log-probs, then the updates; one StepReport (loss: the updates' mean)."""
    t0 = shard._begin(step)
    cfg, moe = shard.cfg, shard.model.moe_layers()
    U = cfg.rl.updates_per_rollout if batch.kind == "rl" else 1
    sums = dict.fromkeys(_SUMS, 0.0)
    old, ref = {}, {}
    t_old = time.perf_counter()
    if batch.kind == "rl":
        for u in range(U):
            r = rows_of(batch, update_rows(batch.rows, U, u, shard.world, shard.rank))
            old[u] = _old_logprobs(shard, r, sums)
            if cfg.rl.kl_coeff:
                ref[u] = _logprobs(shard, shard.reference, r, replay=cfg.rl.routing_replay)
    recompute_s = time.perf_counter() - t_old
    reports = []
    for u in range(U):
        rows = update_rows(batch.rows, U, u, shard.world, shard.rank)
        passes = _passes(shard, step, batch, u, U, rows, moe, old.get(u), ref.get(u), sums)
        lr = cfg.rl.lr if batch.kind == "rl" and cfg.rl.lr is not None else None
        reports.append(shard._update_from(step, moe, passes, guard, t0 if u == 0 else time.perf_counter(), lr))
    report = reports[0]
    total = torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64, device=shard.device)
    shard._all_reduce(total)
    s = dict(zip(_SUMS, total.tolist()))
    report.loss = sum(r.loss for r in reports) / U
    report.grad_norm = max(r.grad_norm for r in reports)
    report.tokens = int(batch.mask.sum())   # the trained tokens of the step's global batch
    report.skipped = next((r.skipped for r in reports if r.skipped), None)
    report.compute_time_s = time.perf_counter() - t0
    # MFU's work: every position's forward and backward, plus the forward-only passes (a third of that) before
    forwards = (1 + bool(cfg.rl.routing_replay) + bool(cfg.rl.kl_coeff)) if batch.kind == "rl" else 0
    report.positions = round(batch.rows * batch.inputs.shape[1] * (1 + forwards / 3))
    if batch.kind == "rl":
        n = max(1.0, s["loss_tokens"])
        report.extra = {"clip_frac": (s["clip_low"] + s["clip_high"]) / n, "clip_low_frac": s["clip_low"] / n,
                        "clip_high_frac": s["clip_high"] / n, "ratio_mean": s["ratio"] / n,
                        "routing_mismatch": s["mismatch"] / max(1.0, s["routed"]),
                        "replay_mismatch": s["replay_mismatch"] / max(1.0, s["routed"]),
                        "logprob_gap": s["gap"] / max(1.0, s["gap_tokens"]),
                        "logprob_k3": s["k3"] / max(1.0, s["gap_tokens"]), "recompute_s": recompute_s}
        if cfg.rl.kl_coeff:
            report.extra["kl"] = s["kl"] / n
    return report


def _set_routing(shard: Any, model: Any, valid: torch.Tensor | None, replay: list[torch.Tensor] | None) -> None:
    """The tokens the MoE layers count (the trained ones) and the expert ids they replay; set before a forward and
    kept through its backward (activation checkpointing recomputes the forward there: the same ids again)."""
    model.set_valid(None if valid is None else valid.to(shard.device))
    model.set_routing_replay(None if replay is None else [r.to(shard.device) for r in replay])


def _forward_logp(shard: Any, model: Any, inputs: torch.Tensor, targets: torch.Tensor, temperature: float
                  ) -> torch.Tensor:
    """log-probs of the targets at `temperature` (an RL step's: rl.temperature, as the sampler's; the warm-up's: 1)."""
    with torch.autocast(shard.device.type, dtype=shard.autocast or torch.bfloat16, enabled=shard.autocast is not None):
        logits = model(inputs.to(shard.device))
    return token_logprobs(logits, targets.to(shard.device), temperature)


def _count_mismatch(model: Any, recorded: list[torch.Tensor], valid_BT: torch.Tensor, sums: dict[str, float],
                    key: str) -> None:
    """Add to sums[key] the (trained token x MoE layer) whose top-k set in the model's last forward differs from the
    rollout's `recorded` ids, and to sums["routed"] how many were compared (when `key` is "mismatch")."""
    for used_NK, recorded_BTK in zip(model.routing(), recorded):
        diff, total = routing_mismatch_counts(used_NK.cpu(), recorded_BTK.reshape(used_NK.shape), valid_BT.reshape(-1))
        sums[key] += diff
        if key == "mismatch":
            sums["routed"] += total


@torch.no_grad()
def _logprobs(shard: Any, model: Any, r: dict[str, Any], replay: bool, sums: dict[str, float] | None = None
              ) -> torch.Tensor:
    """log-probs of rows `r` (data/rl.py rows_of) without gradient, replaying the rollout's routing or not; with
    `sums` (and no replay), the routing mismatch of the model's own choices against the rollout's is counted."""
    out = []
    try:
        for x, y, *rep in _micro(shard, r, replay or sums is not None):
            valid = y != -100
            _set_routing(shard, model, valid, rep if replay and rep else None)
            out.append(_forward_logp(shard, model, x, y, shard.cfg.rl.temperature))
            if sums is not None:
                _count_mismatch(model, rep, valid, sums, "mismatch")
    finally:
        _set_routing(shard, model, None, None)
    reshard(model)
    return torch.cat(out)


def _old_logprobs(shard: Any, r: dict[str, Any], sums: dict[str, float]) -> torch.Tensor:
    """The trainer's log-probs of rows `r` with the rollout's weights; the mismatch and the gap measured on the way
    (the mismatch always with the trainer's own routing; the gap with the log-probs the loss uses)."""
    mask = r["targets"] != -100
    own = _logprobs(shard, shard.model, r, replay=False, sums=sums)
    logp = _logprobs(shard, shard.model, r, replay=True) if shard.cfg.rl.routing_replay else own
    rollout = r["rollout_logp"].to(logp.device, logp.dtype)
    diff = (logp - rollout)[mask.to(logp.device)]
    sums["gap"] += diff.abs().sum().item()
    sums["k3"] += (torch.exp(-diff) + diff - 1).sum().item()   # KL(rollout || train), k3 with rollout as reference
    sums["gap_tokens"] += float(mask.sum())
    return logp


def _micro(shard: Any, r: dict[str, Any], with_routing: bool) -> list[tuple]:
    """This device's rows in train.micro_batches chunks: (inputs, targets[, routing of each MoE layer...])."""
    m = shard.cfg.train.micro_batches
    xs, ys = r["inputs"].chunk(m), r["targets"].chunk(m)
    if not with_routing or r["routing"] is None:
        return list(zip(xs, ys))
    per_layer = [t.chunk(m) for t in r["routing"]]
    return [(x, y, *[layer[i] for layer in per_layer]) for i, (x, y) in enumerate(zip(xs, ys))]


def _passes(shard: Any, step: int, batch: RLBatch, u: int, U: int, rows: slice, moe: list,
            old: torch.Tensor | None, ref: torch.Tensor | None, sums: dict[str, float]) -> Any:
    """Update u's forward/backward passes over this device's rows, one per micro-batch; what they add up (the
    loss sum is this device's share of the update's loss: the world's sum is the loss)."""
    cfg = shard.cfg
    r = rows_of(batch, rows)
    whole = slice(u * batch.rows // U, (u + 1) * batch.rows // U)
    global_tokens = int(batch.mask[whole].sum())
    global_rows = whole.stop - whole.start
    for m in moe:   # balancing losses and loads over the trained tokens of the update's global batch
        m.global_tokens, m.global_sequences = max(1, global_tokens), global_rows
    passes = shard._new_passes(1, moe)   # the loss sum is this device's share of the loss itself
    micro = cfg.train.micro_batches
    olds = old.chunk(micro) if old is not None else [None] * micro
    refs = ref.chunk(micro) if ref is not None else [None] * micro
    advs = r["advantages"].chunk(micro) if r["advantages"] is not None else [None] * micro
    replay = cfg.rl.routing_replay and batch.kind == "rl"
    with passes.meter:
        for i, ((x, y, *rep), o, rf, a) in enumerate(zip(_micro(shard, r, batch.kind == "rl"), olds, refs, advs)):
            mask = y != -100
            _set_routing(shard, shard.model, mask, rep if replay and rep else None)
            logp = _forward_logp(shard, shard.model, x, y, cfg.rl.temperature if batch.kind == "rl" else 1.0)
            _count_mismatch(shard.model, rep, mask, sums, "replay_mismatch")   # 0 with replay: checked, not assumed
            mask = mask.to(logp.device)
            if batch.kind == "sft":
                part = -(logp * mask).sum() / max(1, global_tokens)
            else:
                rl = cfg.rl
                part, st = policy_loss(logp, o, a.to(logp.device, logp.dtype), mask, clip_low=rl.clip_low,
                                       clip_high=rl.clip_high, ratio_level=rl.ratio_level, agg=rl.loss_agg,
                                       ref_logp_BT=rf, kl_coeff=rl.kl_coeff, global_tokens=max(1, global_tokens),
                                       global_sequences=global_rows, max_completion_len=batch.max_new_tokens)
                for key, value in (("clip_low", st.clip_low_sum), ("clip_high", st.clip_high_sum), ("kl", st.kl_sum),
                                   ("ratio", st.ratio_sum), ("loss_tokens", st.tokens)):
                    sums[key] += float(value)
            if i == 0 and u == 0:
                part = shard._inject_faults(step, part)
            aux = shard.model.aux_loss()
            shard._before_backward(i == micro - 1)
            (part if aux is None else part + aux).backward()
            _set_routing(shard, shard.model, None, None)
            passes.add(part, aux, moe, shard.device)
    return passes


__all__ = ["rl_step"]
