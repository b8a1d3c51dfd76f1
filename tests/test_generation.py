"""Sampling and scoring: the token sampler draws from the right distribution, the nucleus is the one
transformers keeps, merged-adapter sampling leaves the base weights bit for bit, and prefix-shared
reward scoring equals scoring each whole conversation."""

from __future__ import annotations

import math

import pytest
import torch

from stages import ppo
from stages.generation import TokenSampler, draw, nucleus, reward_scores
from tests.test_ppo import OPENINGS, _lora_policy


def test_the_sampler_draws_from_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20_000, 1)  # (N, V)
    sampler = TokenSampler(temperature=0.7)
    torch.manual_seed(0)
    scores = sampler(torch.zeros(20_000, 1, dtype=torch.long), logits)
    drawn = scores.argmax(-1)  # what greedy decoding then takes
    assert torch.isinf(scores).sum(-1).eq(4).all()  # exactly one finite score per row
    expected = torch.softmax(logits[0] / 0.7, -1)
    observed = torch.bincount(drawn, minlength=5).float() / len(drawn)
    # chi-square over the four likely tokens, 3 degrees of freedom: p < 0.001 above 16.3
    chi2 = float((((observed - expected) ** 2) / expected.clamp(min=1e-12))[:4].sum() * len(drawn))
    assert chi2 < 16.3, (observed, expected)

    logprobs, entropies = sampler.statistics()  # (N, 1) each
    torch.testing.assert_close(logprobs[:, 0], expected.log()[drawn])
    entropy = -(expected * expected.log()).sum()
    torch.testing.assert_close(entropies[:, 0], entropy.expand(len(drawn)))


def test_nucleus_keeps_the_smallest_set_reaching_top_p_as_transformers_does():
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    probs = torch.softmax(logits, -1)
    for top_p in (0.05, 0.5, 0.9, 0.99):
        kept = nucleus(probs, top_p) > 0
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(kept, theirs), top_p
        assert (torch.where(kept, probs, 0.0).sum(-1) >= top_p - 1e-6).all()
        assert kept.sum(-1).min() >= 1
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_draw_follows_unnormalised_weights_and_never_takes_a_zero_weight(monkeypatch):
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 6.0, 0.0]]).repeat(50_000, 1)  # (N, V), total 10
    torch.manual_seed(0)
    drawn = draw(weights).squeeze(-1)  # (N,)
    observed = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert observed[[0, 2, 5]].sum() == 0
    expected = weights[0] / weights[0].sum()
    kept = expected > 0  # chi-square over the three tokens of weight > 0, 2 degrees of freedom: p < 0.001 above 13.8
    chi2 = float((((observed - expected) ** 2)[kept] / expected[kept]).sum() * len(drawn))
    assert chi2 < 13.8, (observed, expected)

    # a uniform number that rounds up to the total takes the last token of weight > 0, never the zeros after it
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert draw(weights[:3]).squeeze(-1).tolist() == [4, 4, 4]


def test_sampling_with_top_p_only_draws_tokens_inside_the_nucleus():
    torch.manual_seed(1)
    logits = torch.randn(4, 40) * 4
    keep = nucleus(torch.softmax(logits / 0.9, -1), 0.6) > 0
    sampler = TokenSampler(temperature=0.9, top_p=0.6)
    for _ in range(200):
        drawn = sampler(torch.zeros(4, 1, dtype=torch.long), logits).argmax(-1)
        assert keep[torch.arange(4), drawn].all()


def test_merged_adapter_samples_like_the_adapter_and_restores_the_base_weights_exactly(tiny_model_dir):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoTokenizer

    from stages.config import GenerationConfig
    from stages.generation import sample

    policy, tokenizer = _lora_policy(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    before = {name: weight.detach().clone() for name, weight in policy.state_dict().items()}
    prompts = [[{"role": "user", "content": opening}] for opening in OPENINGS]
    generation = GenerationConfig(max_new_tokens=8, temperature=0.9)
    plain = sample(policy, tokenizer, prompts, 2, generation, seed=5, with_logprobs=True)
    with ppo.merged_adapter(policy):
        merged_weight = next(m for m in policy.modules() if isinstance(m, LoraLayer)).get_base_layer().weight
        assert not torch.equal(merged_weight, before[next(n for n in before if "base_layer.weight" in n)])
        merged = sample(policy, tokenizer, prompts, 2, generation, seed=5, with_logprobs=True)
    after = policy.state_dict()
    assert all(torch.equal(after[name], weight) for name, weight in before.items())  # bit for bit
    assert not any(layer.merged for layer in policy.modules() if isinstance(layer, LoraLayer))
    assert merged.response_ids == plain.response_ids
    for a, b in zip(merged.logprobs, plain.logprobs, strict=True):
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_prefix_shared_reward_scores_equal_scoring_each_whole_conversation(tiny_model_dir, batch_size):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    conversations = [
        [{"role": "user", "content": f"Continue this movie review: {opening}"},
         {"role": "assistant", "content": "it was " + "very " * i + "good"}]
        for i, opening in enumerate(OPENINGS * 2)
    ]
    scores = reward_scores(model, tokenizer, conversations, batch_size=batch_size)
    with torch.no_grad():
        one_by_one = torch.cat([
            model(input_ids=torch.tensor([tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)
                                          ["input_ids"]])).logits[:, 0]
            for c in conversations
        ])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-4)
    assert reward_scores(model, tokenizer, []).shape == (0,)
