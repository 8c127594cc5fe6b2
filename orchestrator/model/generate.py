"""Generation for RL rollouts: a deterministic, KV-cached sampler (pure torch, no Ray) of the native MoE model and of
transformers' MoE models (model/hf.py HFMoEModel).

`sample` draws n completions of one prompt as one batch of n rows (no padding): one prefill of the prompt, then
one token at a time through the model's cache (`model.new_cache()`: the native KVCache of model/layers.py, or
transformers' own cache of the model). Row i draws only from its own
torch.Generator seeded with seeds[i], once per token, so its completion is a function of (model, prompt, seeds[i])
alone: never of which worker ran it or of the other rows. (Its logits could in principle differ in the last bit
with the batch's composition; the caller always samples the same G rows of one prompt as one batch, so workers
agree by construction.)

With `record_routing` every MoE layer's chosen logical expert ids of every position the model read are kept:
what Rollout Routing Replay (R3; MoETransformer.set_routing_replay) replays in the training forward.

Shape legend: n rows (completions), P prompt tokens, L = max_new, V vocab, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class Samples:
    tokens: torch.Tensor        # [n, L] int64 sampled tokens (after a row's eos: eos_id repeated; the mask
                                # says what counts)
    logprobs: torch.Tensor      # [n, L] log softmax(logits / temperature) at the sampled token (the full distribution,
                                # not the top-p renormalised one); 0 where mask is False
    mask: torch.Tensor          # [n, L] bool: the completion's tokens up to and including the first eos
    routing: list[torch.Tensor] | None   # per MoE layer: [n, P + L - 1, K] int64 logical expert ids of every
                                         # position the model read (prompt, completion but its last token)


def routing_mismatch(a_NK: torch.Tensor, b_NK: torch.Tensor) -> float:
    """Share of tokens whose top-k expert SETS differ (order within a token's k ids does not matter)."""
    if a_NK.shape != b_NK.shape:
        raise ValueError(f"routing of shapes {tuple(a_NK.shape)} and {tuple(b_NK.shape)}")
    a, b = a_NK.reshape(-1, a_NK.shape[-1]), b_NK.reshape(-1, b_NK.shape[-1])
    if a.shape[0] == 0:
        return 0.0
    differ = (a.sort(-1).values != b.to(a.device).sort(-1).values).any(-1)
    return float(differ.double().mean())


def routing_mismatch_counts(a_NK: torch.Tensor, b_NK: torch.Tensor, valid_N: torch.Tensor | None = None
                            ) -> tuple[int, int]:
    """(tokens whose top-k expert sets differ, tokens compared), over the valid tokens when `valid_N` is given:
    counts that add up over devices and layers (routing_mismatch is their ratio)."""
    a, b = a_NK.reshape(-1, a_NK.shape[-1]), b_NK.reshape(-1, b_NK.shape[-1]).to(a_NK.device)
    differ = (a.sort(-1).values != b.sort(-1).values).any(-1)
    if valid_N is not None:
        differ = differ[valid_N.reshape(-1).to(differ.device)]
    return int(differ.sum()), int(differ.numel())


def nucleus(probs_nV: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs with every token outside the nucleus zeroed (not renormalised): the smallest set of highest-probability
    tokens whose mass reaches top_p, at least one; ties in probability kept in token order."""
    if top_p >= 1.0:
        return probs_nV
    sorted_nV, order_nV = torch.sort(probs_nV, dim=-1, descending=True, stable=True)
    before_nV = sorted_nV.cumsum(-1) - sorted_nV          # mass of the tokens ranked above
    keep_nV = before_nV < top_p
    keep_nV[:, 0] = True
    return torch.zeros_like(probs_nV).scatter(-1, order_nV, sorted_nV * keep_nV)


def _draw(weights_nV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF over (unnormalised) weights, u from that row's generator only."""
    cdf_nV = weights_nV.double().cumsum(-1)
    u_n1 = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).unsqueeze(-1)
    target_n1 = u_n1.to(cdf_nV.device) * cdf_nV[:, -1:]
    idx_n = torch.searchsorted(cdf_nV, target_n1, right=True).squeeze(-1)
    return idx_n.clamp(max=weights_nV.shape[-1] - 1)


@torch.no_grad()
def sample(model, prompt_ids: list[int], n: int, max_new: int, *, temperature: float, top_p: float,
           eos_id: int | None, seeds: list[int], record_routing: bool = False, greedy: bool = False) -> Samples:
    """n completions of one prompt (a batch of n rows sharing it: no padding), KV-cached: one prefill of the prompt,
    then one token at a time. Row i's sampling draws only from a torch.Generator seeded with seeds[i] (the caller
    makes seeds[i] a function of (seed, step, prompt id, sample index)), so a completion never depends on which
    worker ran it, on n, or on the other rows. greedy: argmax (temperature ignored: logprobs at temperature 1),
    for held-out accuracy.

    Sampling: softmax(logits / temperature) -> top-p nucleus -> renormalised -> one inverse-CDF draw per row.
    A row that has sampled eos goes on reading eos (its later tokens are eos, masked out, logprob 0), so every row
    reads P + max_new - 1 positions whatever the others do; without record_routing the loop stops once every row
    has finished. The model runs in eval mode (no balancing losses) and without any routing replay or valid mask
    the caller left set; its mode and those are put back after.
    """
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} completions")
    if not prompt_ids:
        raise ValueError("an empty prompt: the first token needs a position to be predicted from")
    if max_new < 1:
        raise ValueError(f"max_new {max_new} < 1")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature {temperature} must be > 0 (or greedy)")
    device = next(model.parameters()).device
    moes = model.moe_layers()
    saved = [(m.replay_NK, m.valid_N) for m in moes]
    saved_valid = getattr(model, "_valid_BT", None)   # a transformers model's set_valid (model/hf.py)
    was_training = model.training
    for m in moes:
        m.replay_NK = m.valid_N = None
    if hasattr(model, "_valid_BT"):
        model._valid_BT = None
    model.eval()
    try:
        return _sample(model, moes, device, prompt_ids, n, max_new, temperature, top_p, eos_id, seeds,
                       record_routing, greedy)
    finally:
        model.train(was_training)
        for m, (replay, valid) in zip(moes, saved):
            m.replay_NK, m.valid_N = replay, valid
        if hasattr(model, "_valid_BT"):
            model._valid_BT = saved_valid


def _sample(model, moes, device, prompt_ids, n, max_new, temperature, top_p, eos_id, seeds, record_routing, greedy):
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cache = model.new_cache()
    P = len(prompt_ids)
    tokens_nL = torch.full((n, max_new), -1 if eos_id is None else eos_id, dtype=torch.long, device=device)
    mask_nL = torch.zeros(n, max_new, dtype=torch.bool, device=device)
    logprobs_nL: torch.Tensor | None = None
    routing: list[list[torch.Tensor]] = [[] for _ in moes]
    done_n = torch.zeros(n, dtype=torch.bool, device=device)

    inputs_nT = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).expand(n, P).contiguous()
    for j in range(max_new):
        logits_nV = model(inputs_nT, cache=cache)[:, -1]
        if record_routing:
            for rec, m in zip(routing, moes):
                rec.append(m.last_experts_NK.view(n, inputs_nT.shape[1], -1))
        logits_nV = logits_nV.double() if logits_nV.dtype == torch.float64 else logits_nV.float()
        if greedy:
            logp_nV = logits_nV.log_softmax(-1)
            next_n = logits_nV.argmax(-1)
        else:
            logp_nV = (logits_nV / temperature).log_softmax(-1)
            next_n = _draw(nucleus(logp_nV.exp(), top_p), generators)
        if logprobs_nL is None:
            logprobs_nL = torch.zeros(n, max_new, dtype=logp_nV.dtype, device=device)
        live_n = ~done_n
        if eos_id is not None:
            next_n = torch.where(live_n, next_n, torch.full_like(next_n, eos_id))
        tokens_nL[:, j] = next_n
        mask_nL[:, j] = live_n
        logprobs_nL[:, j] = torch.where(live_n, logp_nV.gather(-1, next_n.unsqueeze(-1)).squeeze(-1),
                                        torch.zeros_like(logprobs_nL[:, j]))
        if eos_id is not None:
            done_n = done_n | (next_n == eos_id)
        if j == max_new - 1 or (not record_routing and bool(done_n.all())):
            break
        inputs_nT = next_n.unsqueeze(-1)
    return Samples(tokens=tokens_nL, logprobs=logprobs_nL, mask=mask_nL,
                   routing=[torch.cat(rec, dim=1) for rec in routing] if record_routing else None)
