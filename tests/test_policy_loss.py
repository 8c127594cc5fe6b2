"""The GRPO-family policy loss (orchestrator/model/policy_loss.py) against TRL's GRPOTrainer, the kept library that
is its oracle: one tiny random Qwen2 (float64, no download), the same prompts, completions, advantages and old /
reference log-probabilities fed to both; TRL's `compute_loss` on a hand-built `inputs` dict against
token_logprobs -> policy_loss on the same model's logits. Losses, gradients, clip fractions and KL to 1e-6 in float64
(TRL's own fused LM head computes its log-probabilities in float32: those alone are compared to float32 accuracy).
trl (a dev dependency) is required, not skipped: these tests are the loss's only oracle."""
from __future__ import annotations

import pytest
import torch

from orchestrator.model.policy_loss import group_advantages, policy_loss, token_logprobs

V, P, G, T = 64, 2, 4, 6           # vocabulary, prompts, completions per prompt, max completion length
B = P * G
CLIP_LOW, CLIP_HIGH, TEMPERATURE = 0.2, 0.28, 0.7
LOSS_TYPE = {"token_mean": "dapo", "sequence_mean": "grpo", "dr_grpo": "dr_grpo"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tokenizer (a word-level vocabulary built in memory) and the base model, saved: with beta > 0 TRL loads its
    reference model from the policy's `name_or_path`, so the policy must come from a local directory."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    word = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=word, pad_token="t1", eos_token="t2", unk_token="t0")
    config = tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float64).save_pretrained(path)
    return tokenizer, path


@pytest.fixture(scope="module")
def make_trainer(tiny, tmp_path_factory):
    """A real GRPOTrainer per (loss_type, level, beta), each on a fresh copy of the same float64 model (TRL patches
    the model's forward with its fused LM head at construction, so trainers do not share one)."""
    import transformers as tf
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, path = tiny
    cache = {}

    def build(loss_type: str, level: str, beta: float, rewards=None):
        key = (loss_type, level, beta)
        if key in cache and rewards is None:
            return cache[key]
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        args = GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("grpo")), report_to="none", use_cpu=True, bf16=False, fp16=False,
            per_device_train_batch_size=B, num_generations=G, max_completion_length=T, loss_type=loss_type,
            epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, beta=beta, importance_sampling_level=level,
            temperature=TEMPERATURE, scale_rewards="group",
            # trl 1.16 defaults to k3 * ratio (DeepSeek-V3.2's unbiased KL); the spec here is Schulman's plain k3
            use_bias_correction_kl=False)
        queue = [] if rewards is None else list(rewards)

        def reward(completions, **_):
            return [queue.pop(0) for _ in completions]

        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": ["t3 t4"] * P}))
        # set by Trainer's train loop; 1 = no accumulation, so TRL's loss is the whole batch's
        trainer.current_gradient_accumulation_steps = 1
        model.train()   # from_pretrained returns it in eval mode; TRL's "train" branch is the one to match
        if rewards is None:
            cache[key] = trainer
        return trainer

    return build


@pytest.fixture(scope="module")
def batch(tiny):
    """Prompts (one row left-padded), completions right-padded to T with lengths 0..T (row 3 empty), advantages of
    both signs, old / ref log-probabilities perturbed from the model's own so that clipping happens both ways."""
    import transformers as tf

    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, V, (B, 4), generator=g)
    prompt_mask = torch.ones(B, 4, dtype=torch.long)
    prompt_ids[5, :2], prompt_mask[5, :2] = 1, 0
    lengths = torch.tensor([6, 4, 2, 0, 5, 6, 3, 1])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids = torch.randint(3, V, (B, T), generator=g).masked_fill(completion_mask == 0, 1)
    rewards_PG = torch.randint(0, 3, (P, G), generator=g).double()
    rewards_PG[0] = torch.tensor([1.0, 0.0, 2.0, 0.0])
    advantages = group_advantages(rewards_PG).reshape(B)
    model = tf.AutoModelForCausalLM.from_pretrained(tiny[1], dtype=torch.float64)
    with torch.no_grad():
        logp = ours_logp(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # a row-wide shift: the ratio pushed the advantage's way on rows 0, 1, 4, 5 (so it clips, the sequence ratio too)
    shift = 0.5 * advantages.sign() * torch.tensor([-1.0, -1.0, 1.0, 1.0]).repeat(B // 4).double()
    old = (logp + shift[:, None] + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)) * completion_mask
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)) * completion_mask
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages, old_per_token_logps=old,
                ref_per_token_logps=ref, num_items_in_batch=completion_mask.sum())


def ours_logp(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The completion tokens' log-probabilities from the model's plain logits, through token_logprobs."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    logits_BLV = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits_BTV = logits_BLV[:, prompt_ids.size(1) - 1:-1]
    return token_logprobs(logits_BTV, completion_ids.masked_fill(completion_mask == 0, -100), TEMPERATURE)


def ours(trainer, batch, level, agg, beta, rows=slice(None)):
    """Our loss on `rows` of the batch through the trainer's own model (so the gradients land on the same weights),
    with the counts of the whole batch."""
    b = {k: (v[rows] if k != "num_items_in_batch" else v) for k, v in batch.items()}
    logp = ours_logp(trainer.model, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])
    return policy_loss(
        logp, b["old_per_token_logps"], b["advantages"], b["completion_mask"], clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH, ratio_level=level, agg=agg, ref_logp_BT=b["ref_per_token_logps"] if beta else None,
        kl_coeff=beta, global_tokens=int(batch["completion_mask"].sum()), global_sequences=B, max_completion_len=T)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_logps(trainer, batch):
    """TRL's own per-token log-probabilities (its fused LM head, with the trainer's temperature)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
    return logps


def test_token_logprobs_match_trl_fused_head(make_trainer, batch):
    """TRL's fused LM head accumulates its log-softmax in float32 whatever the model's dtype (trl/kernels/
    chunked_logprob.py), so this is the one comparison held to float32 accuracy, not float64's."""
    trainer = make_trainer("dapo", "token", 0.0)
    with torch.no_grad():
        expected = trl_logps(trainer, batch).double()
        got = ours_logp(trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                        batch["completion_mask"])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["kl_off", "kl_on"])
@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl_grpo_trainer(make_trainer, batch, monkeypatch, level, agg, beta):
    """TRL's `compute_loss` twice: as it is (its float32 log-probabilities: the loss to 1e-6 relative), and with its
    log-probability function replaced by token_logprobs on the same model (float64 throughout: loss and every
    parameter's gradient to 1e-6, clip fractions and KL as TRL logs them)."""
    trainer = make_trainer(LOSS_TYPE[agg], level, beta)
    model = trainer.model
    with torch.no_grad():
        end_to_end = trainer.compute_loss(model, dict(batch))
        loss, _ = ours(trainer, batch, level, agg, beta)
    assert loss.item() == pytest.approx(end_to_end.item(), rel=1e-6)

    def float64_logps(model, input_ids, attention_mask, logits_to_keep, **_):
        n = input_ids.size(1) - logits_to_keep
        logp = ours_logp(model, input_ids[:, :n], attention_mask[:, :n], input_ids[:, n:], attention_mask[:, n:])
        return logp, torch.zeros_like(logp), None

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", float64_logps)
    model.zero_grad()
    trainer._metrics["train"].clear()
    expected = trainer.compute_loss(model, dict(batch))
    expected.backward()
    expected_grads = grads(model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model.zero_grad()
    loss, stats = ours(trainer, batch, level, agg, beta)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-6, atol=1e-12)

    assert stats.clip_low_sum > 0 and stats.clip_high_sum > 0, "the batch must clip both ways"
    tokens = stats.tokens.item()
    assert tokens == batch["completion_mask"].sum().item()
    if level == "token":   # TRL: masked tokens clipped / masked tokens
        low, high = stats.clip_low_sum.item() / tokens, stats.clip_high_sum.item() / tokens
    else:                  # TRL counts sequences at this level: rows clipped / rows (empty rows included)
        per_row = [ours(trainer, batch, level, agg, beta, rows=slice(i, i + 1))[1] for i in range(B)]
        low = sum(bool(s.clip_low_sum > 0) for s in per_row) / B
        high = sum(bool(s.clip_high_sum > 0) for s in per_row) / B
    assert low == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)    # TRL logs float32
    assert high == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
    if beta:
        assert stats.kl_sum.item() / tokens == pytest.approx(metrics["kl"], rel=1e-6)
    else:
        assert stats.kl_sum.item() == 0.0


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cuts", [(4,), (3, 5)], ids=["2_slices", "3_slices"])
def test_device_shares_sum_to_the_whole_batch(make_trainer, batch, level, agg, cuts):
    """Data parallelism: each device's share (its rows over the global counts) summed over devices is the whole
    batch's loss, and so are the gradients and the stats (float64, 1e-12)."""
    model = make_trainer(LOSS_TYPE[agg], level, 0.05).model
    model.zero_grad()
    whole, whole_stats = ours(make_trainer(LOSS_TYPE[agg], level, 0.05), batch, level, agg, 0.05)
    whole.backward()
    whole_grads = grads(model)
    model.zero_grad()
    bounds = (0, *cuts, B)
    total, stats = 0.0, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        share, s = ours(make_trainer(LOSS_TYPE[agg], level, 0.05), batch, level, agg, 0.05, rows=slice(lo, hi))
        share.backward()   # gradients accumulate over the shares, as the all-reduce sum would
        total, stats = total + share.detach(), stats + [s]
    torch.testing.assert_close(total, whole.detach(), rtol=0, atol=1e-12)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=0, atol=1e-12)
    for field in ("clip_low_sum", "clip_high_sum", "kl_sum", "ratio_sum", "tokens"):
        torch.testing.assert_close(sum(getattr(s, field) for s in stats), getattr(whole_stats, field),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_trl(make_trainer, tiny, scale):
    """TRL's own advantage computation (`_generate_and_score_completions`), with generation replaced by fixed
    completions and the rewards given by the reward function."""
    tokenizer = tiny[0]
    rewards_PG = torch.tensor([[1.0, 0.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    trainer = make_trainer("dapo", "token", 0.0, rewards=rewards_PG.reshape(-1).tolist())
    trainer.scale_rewards = "group" if scale else "none"
    completion_ids = [[5, 6, 2]] * B

    def fixed_generation(prompts):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        return prompt_ids, completion_ids, None, ["t5 t6"] * B, None, {}, None, None

    trainer._generate = fixed_generation
    out = trainer._generate_and_score_completions([{"prompt": "t3 t4"}] * B)
    expected = out["advantages"].double().reshape(P, G)
    torch.testing.assert_close(group_advantages(rewards_PG, scale=scale), expected, rtol=1e-6, atol=1e-6)
    if scale:
        assert expected[1].abs().max() == 0   # a group with one reward value carries no signal


def test_group_advantages_formula():
    rewards_PG = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    centred = rewards_PG - rewards_PG.mean(1, keepdim=True)
    torch.testing.assert_close(group_advantages(rewards_PG, scale=False), centred, rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(rewards_PG, eps=0.0)[1], torch.tensor([-1.0, -1.0, 1.0, 1.0],
                               dtype=torch.float64) * 0.5 / rewards_PG[1].std(), rtol=0, atol=1e-15)


def test_token_logprobs_temperature_ignore_and_half_precision():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([[0, 4, -100], [2, -100, 1]])
    got = token_logprobs(logits, targets, temperature=0.5)
    by_hand = torch.log(torch.softmax(logits / 0.5, -1))
    assert got[0, 1].item() == pytest.approx(by_hand[0, 1, 4].item(), rel=1e-12)
    assert got[0, 2].item() == 0.0 and got[1, 1].item() == 0.0
    half = token_logprobs(logits.bfloat16(), targets)
    assert half.dtype == torch.float32


def test_empty_row_contributes_nothing():
    """A row with no masked token adds 0 to the loss, its gradient and the stats, whatever its (padding) values."""
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64)
    old[1] = float("-inf")                              # padding may hold anything
    ref = old.clone()
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, -2.0, -0.5], dtype=torch.float64)
    for level in ("token", "sequence"):
        for agg in ("token_mean", "sequence_mean", "dr_grpo"):
            kw = dict(clip_low=0.2, clip_high=0.3, ratio_level=level, agg=agg, kl_coeff=0.1, global_tokens=6,
                      global_sequences=3, max_completion_len=4)
            ref[1] = 0.0
            loss, stats = policy_loss(logp, old, adv, mask, ref_logp_BT=ref, **kw)
            (grad,) = torch.autograd.grad(loss, logp)
            keep = [0, 2]
            part, part_stats = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], ref_logp_BT=ref[keep], **kw)
            (part_grad,) = torch.autograd.grad(part, logp)
            assert torch.isfinite(loss) and loss.item() == pytest.approx(part.item(), rel=1e-12)
            assert grad[1].abs().max() == 0
            torch.testing.assert_close(grad, part_grad, rtol=0, atol=1e-15)
            assert stats.tokens.item() == 6 and torch.isfinite(stats.kl_sum) and torch.isfinite(stats.ratio_sum)


def test_unknown_options_are_named():
    x = torch.zeros(1, 2, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.2, global_tokens=2, global_sequences=1, max_completion_len=2)
    with pytest.raises(ValueError, match="ratio_level 'tokens'"):
        policy_loss(x, x, x[:, 0], x, ratio_level="tokens", **kw)
    with pytest.raises(ValueError, match="agg 'mean'"):
        policy_loss(x, x, x[:, 0], x, agg="mean", **kw)
    with pytest.raises(ValueError, match="kl_coeff=0.1"):
        policy_loss(x, x, x[:, 0], x, kl_coeff=0.1, **kw)
