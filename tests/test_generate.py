"""The KV-cached sampler (model/generate.py) for RL rollouts: a cached forward equals the full one, sampling is a
function of (model, prompt, seed) only, logprobs and the routing it records equal a full forward's on the same
tokens (float64), top-p at ~0 is greedy, and routing_mismatch compares top-k sets."""
from __future__ import annotations

import pytest
import torch

from orchestrator.config import ModelConfig
from orchestrator.model.generate import Samples, nucleus, routing_mismatch, sample
from orchestrator.model.layers import KVCache
from orchestrator.model.transformer import build_model

CFG = ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, max_seq_len=64, num_experts=4, top_k=2,
                  expert_dim=32, num_shared_experts=1, first_k_dense=1, dense_dim=64, init_std=0.1)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
N, L, EOS = 6, 12, 12
SEEDS = [101, 202, 303, 404, 505, 606]


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=7).double()


def _run(model, **kw) -> Samples:
    args = dict(n=N, max_new=L, temperature=0.9, top_p=0.95, eos_id=EOS, seeds=SEEDS, record_routing=True)
    args.update(kw)
    return sample(model, PROMPT, **args)


def test_cached_forward_equals_full_forward(model):
    tokens = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(len(model.layers))
        parts = [model(tokens[:, :8], cache), model(tokens[:, 8:13], cache)]   # prefill, then a chunk after it
        parts += [model(tokens[:, t:t + 1], cache) for t in range(13, 20)]     # then one token at a time
    assert cache.position == 20 and cache.k[0].shape == (3, CFG.n_heads, 20, CFG.dim // CFG.n_heads)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)


def test_cache_refuses_positions_past_the_rope_table(model):
    cache = KVCache(len(model.layers))
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long), cache)


def test_same_call_twice_is_identical_and_state_is_put_back(model):
    model.train()
    m0 = model.moe_layers()[0]
    m0.replay_NK, m0.valid_N = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.bool)
    try:
        a, b = _run(model), _run(model)
        assert model.training and m0.replay_NK.shape == (1, 2) and m0.valid_N.shape == (1,)
    finally:
        m0.replay_NK = m0.valid_N = None
    for x, y in [(a.tokens, b.tokens), (a.logprobs, b.logprobs), (a.mask, b.mask), *zip(a.routing, b.routing)]:
        assert torch.equal(x, y)


def test_logprobs_mask_and_routing_equal_a_full_forward(model):
    s = _run(model)
    assert s.tokens.shape == s.logprobs.shape == s.mask.shape == (N, L) and s.logprobs.dtype == torch.float64
    # mask: up to and including the first eos; eos repeated after it, logprob 0 there
    for i in range(N):
        row = s.tokens[i].tolist()
        end = row.index(EOS) + 1 if EOS in row else L
        assert s.mask[i].tolist() == [True] * end + [False] * (L - end)
        assert all(t == EOS for t in row[end:]) and bool((s.logprobs[i, end:] == 0).all())
    assert not bool(s.mask.all()), "no row ended: pick another seed so that eos is exercised"
    seq = torch.cat([torch.tensor(PROMPT).expand(N, -1), s.tokens], dim=1)[:, :-1]   # every position read
    P = len(PROMPT)
    with torch.no_grad():
        model.eval()
        logits = model(seq)
    logp = (logits[:, P - 1:] / 0.9).log_softmax(-1).gather(-1, s.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(s.logprobs[s.mask], logp[s.mask], rtol=0, atol=1e-9)
    assert len(s.routing) == len(model.moe_layers())
    for rec, full in zip(s.routing, model.routing()):
        assert rec.shape == (N, P + L - 1, CFG.top_k) and rec.dtype == torch.int64
        assert torch.equal(rec, full.view(N, P + L - 1, -1))
    # ... and replaying it in a training forward chooses exactly those ids
    model.train()
    model.set_routing_replay(s.routing)
    try:
        model(seq)
        assert all(torch.equal(r.reshape(-1, CFG.top_k), c) for r, c in zip(s.routing, model.routing()))
    finally:
        model.set_routing_replay(None)


def test_tiny_top_p_is_greedy(model):
    nuc = _run(model, top_p=1e-9, temperature=1.0)
    greedy = _run(model, greedy=True, temperature=123.0)
    assert torch.equal(nuc.tokens, greedy.tokens) and torch.equal(nuc.mask, greedy.mask)
    torch.testing.assert_close(nuc.logprobs, greedy.logprobs, rtol=0, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(nuc.routing, greedy.routing))
    assert greedy.tokens.unique(dim=0).shape[0] == 1   # one prompt, argmax: every row the same


def test_seeds_decide_not_the_batch(model):
    a = _run(model, record_routing=False)
    other = _run(model, seeds=[s + 1 for s in SEEDS], record_routing=False)
    assert not torch.equal(a.tokens, other.tokens)
    assert a.routing is None
    # a row depends on its seed only: alone, or in another order, it is the same completion
    alone = sample(model, PROMPT, 1, L, temperature=0.9, top_p=0.95, eos_id=EOS, seeds=[SEEDS[3]])
    assert torch.equal(alone.tokens[0], a.tokens[3]) and torch.equal(alone.mask[0], a.mask[3])
    torch.testing.assert_close(alone.logprobs[0], a.logprobs[3], rtol=0, atol=1e-12)
    rev = _run(model, seeds=SEEDS[::-1], record_routing=False)
    assert torch.equal(rev.tokens, a.tokens.flip(0))


def test_no_eos_and_bad_arguments(model):
    s = sample(model, PROMPT, 2, 5, temperature=1.0, top_p=1.0, eos_id=None, seeds=[1, 2])
    assert bool(s.mask.all()) and bool((s.tokens >= 0).all())
    with pytest.raises(ValueError, match="seeds"):
        sample(model, PROMPT, 2, 5, temperature=1.0, top_p=1.0, eos_id=None, seeds=[1])


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]], dtype=torch.float64)
    assert nucleus(probs, 0.5).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert nucleus(probs, 0.6).tolist() == [[0.0, 0.5, 0.3, 0.0]]
    assert nucleus(probs, 1e-9).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_routing_mismatch_compares_sets():
    a = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])
    assert routing_mismatch(a, a[:, [1, 0]]) == 0.0              # order within a token does not count
    b = a.clone()
    b[2] = torch.tensor([1, 3])
    assert routing_mismatch(a, b) == 0.25
    assert routing_mismatch(a.view(2, 2, 2), b.view(2, 2, 2)) == 0.25
    assert routing_mismatch(a[:0], b[:0]) == 0.0
    with pytest.raises(ValueError):
        routing_mismatch(a, b[:3])
