"""Tests for stages/losses.py.

Each function gets (a) a hand-made 2-3 element case whose expected value is derived in the test's
docstring, and (b) a comparison against a naive reference written here with plain Python loops over
random tensors. Padding invariance, the KL controller's direction and gradient flow are tested too.
"""

from __future__ import annotations

import math

import pytest
import torch

from stages.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    dpo_implicit_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    gather_log_probs,
    kl_k1,
    kl_k3,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    sequence_log_probs,
    value_loss,
)

DOUBLE = torch.float64


def tensor(data) -> torch.Tensor:
    return torch.tensor(data, dtype=DOUBLE)


def right_padded_mask(lengths: list[int], total_len: int) -> torch.Tensor:
    """(B, T) bool mask, row b true on its first lengths[b] positions."""
    return torch.arange(total_len)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------------
# gather_log_probs
# --------------------------------------------------------------------------------------------------
def test_gather_log_probs_hand_computed():
    """Row logits z = [0, ln 3]: softmax = [1/4, 3/4], so log p(0) = ln(1/4), log p(1) = ln(3/4).

    With temperature 2 and z = [0, ln 9]: z / 2 = [0, ln 3], the same distribution as above.
    """
    logits = tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    expected = tensor([[math.log(0.25), math.log(0.75)]])
    torch.testing.assert_close(gather_log_probs(logits, labels), expected)

    hot_logits = tensor([[[0.0, math.log(9.0)], [0.0, math.log(9.0)]]])
    torch.testing.assert_close(gather_log_probs(hot_logits, labels, temperature=2.0), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_log_probs_matches_log_softmax_gather(generator, temperature):
    """Reference: full log_softmax then gather, values and gradients."""
    logits = torch.randn(3, 5, 11, generator=generator, dtype=DOUBLE, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=generator)

    result = gather_log_probs(logits, labels, temperature=temperature)
    (grad,) = torch.autograd.grad(result.sum(), logits)

    reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(result, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_gather_log_probs_upcasts_bfloat16(generator):
    """bf16 logits give float32 log-probs equal to float32 maths on the same (bf16-representable) values."""
    logits = (4 * torch.randn(2, 6, 50, generator=generator)).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6), generator=generator)
    result = gather_log_probs(logits, labels)
    assert result.dtype == torch.float32
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(result, reference)


def test_gather_log_probs_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        gather_log_probs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        gather_log_probs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# entropy_from_logits
# --------------------------------------------------------------------------------------------------
def test_entropy_hand_computed():
    """z = [0, 0]: uniform over 2, H = ln 2.
    z = [0, ln 3]: p = [1/4, 3/4], H = 1/4 ln 4 + 3/4 ln(4/3) = ln 4 - 3/4 ln 3.
    z = [0, -inf]: p = [1, 0], H = 0 (and no nan from 0 * -inf).
    """
    logits = tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [0.0, -math.inf]]])  # (1, 3, 2)
    expected = tensor([[math.log(2.0), math.log(4.0) - 0.75 * math.log(3.0), 0.0]])
    torch.testing.assert_close(entropy_from_logits(logits), expected)


def test_entropy_matches_reference_and_has_finite_gradient(generator):
    """Reference: -sum_v p log p with a Python loop over positions; gradient finite with -inf logits."""
    logits = torch.randn(2, 4, 7, generator=generator, dtype=DOUBLE)
    logits[0, 0, 3] = -math.inf
    logits.requires_grad_(True)
    result = entropy_from_logits(logits)

    expected = torch.zeros(2, 4, dtype=DOUBLE)
    for b in range(2):
        for t in range(4):
            probs = torch.softmax(logits[b, t].detach(), dim=-1).tolist()
            expected[b, t] = -sum(p * math.log(p) for p in probs if p > 0)
    torch.testing.assert_close(result.detach(), expected)

    (grad,) = torch.autograd.grad(result.sum(), logits)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------
def test_masked_sum_and_mean_hand_computed():
    """values [[1, 2, 3], [4, 5, 6]], mask [[1, 0, 0], [1, 1, 1]]:
    over everything, sum = 1 + 4 + 5 + 6 = 16 over 4 elements, mean = 4;
    per row (dim=1), sums = [1, 15], means = [1/1, 15/3] = [1, 5].
    A nan under the mask must not leak into any of these.
    """
    values = tensor([[1.0, math.nan, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_sum(values, mask), tensor(16.0))
    torch.testing.assert_close(masked_mean(values, mask), tensor(4.0))
    torch.testing.assert_close(masked_sum(values, mask, dim=1), tensor([1.0, 15.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), tensor([1.0, 5.0]))


def test_masked_mean_matches_python_loop(generator):
    values = torch.randn(4, 9, generator=generator, dtype=DOUBLE)
    mask = torch.rand(4, 9, generator=generator) > 0.4
    mask[:, 0] = True
    selected = [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    assert masked_mean(values, mask).item() == pytest.approx(sum(selected) / len(selected))
    for b in range(4):
        row = [values[b, t].item() for t in range(9) if mask[b, t]]
        assert masked_mean(values, mask, dim=-1)[b].item() == pytest.approx(sum(row) / len(row))
        assert masked_sum(values, mask, dim=-1)[b].item() == pytest.approx(sum(row))


def test_masked_var_hand_computed():
    """values [1, 3, 100], mask [1, 1, 0]: mean 2, squared deviations [1, 1];
    biased var = 2 / 2 = 1, unbiased var = 2 / (2 - 1) = 2. The 100 is padding.
    """
    values, mask = tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), tensor(1.0))
    torch.testing.assert_close(masked_var(values, mask), tensor(2.0))


def test_masked_var_matches_torch_var_of_selected(generator):
    values = torch.randn(3, 8, generator=generator, dtype=DOUBLE)
    mask = torch.rand(3, 8, generator=generator) > 0.5
    mask[0, :2] = True
    selected = values[mask]
    torch.testing.assert_close(masked_var(values, mask), selected.var(unbiased=True))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), selected.var(unbiased=False))


def test_masked_statistics_keep_padding_out_of_the_gradient():
    """d var / d x_i = 2 (x_i - mean) / (n - 1) on kept elements: for [1, 3] that is [-2, 2], and 0 for the
    nan padding; whitening [1, 3] then summing has gradient 0 (it is a constant, 0) but must not be nan.
    """
    values = tensor([1.0, 3.0, math.nan]).requires_grad_(True)
    mask = torch.tensor([True, True, False])
    (grad,) = torch.autograd.grad(masked_var(values, mask), values)
    torch.testing.assert_close(grad, tensor([-2.0, 2.0, 0.0]))
    (grad,) = torch.autograd.grad(masked_whiten(values, mask).sum(), values)
    torch.testing.assert_close(grad, tensor([0.0, 0.0, 0.0]))


def test_masked_var_refuses_too_few_elements():
    with pytest.raises(ValueError, match="selects 1 element"):
        masked_var(tensor([1.0, 2.0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="selects 0 element"):
        masked_var(tensor([1.0, 2.0]), torch.tensor([False, False]), unbiased=False)


def test_masked_whiten_hand_computed():
    """values [1, 3, pad], mask [1, 1, 0]: mean 2, unbiased var 2, std sqrt(2);
    whitened = [(1 - 2) / sqrt 2, (3 - 2) / sqrt 2, 0] = [-1/sqrt 2, 1/sqrt 2, 0].
    shift_mean=False adds the mean back: [2 - 1/sqrt 2, 2 + 1/sqrt 2, 0].
    """
    values, mask = tensor([1.0, 3.0, math.nan]), torch.tensor([True, True, False])
    half_root = 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(masked_whiten(values, mask), tensor([-half_root, half_root, 0.0]))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), tensor([2.0 - half_root, 2.0 + half_root, 0.0])
    )


def test_masked_whiten_matches_manual_mean_std(generator):
    values = 3.0 + 2.0 * torch.randn(4, 6, generator=generator, dtype=DOUBLE)
    mask = right_padded_mask([6, 3, 1, 5], 6)
    selected = values[mask].tolist()
    mean = sum(selected) / len(selected)
    std = math.sqrt(sum((v - mean) ** 2 for v in selected) / (len(selected) - 1))
    whitened = masked_whiten(values, mask)
    for b in range(4):
        for t in range(6):
            expected = (values[b, t].item() - mean) / std if mask[b, t] else 0.0
            assert whitened[b, t].item() == pytest.approx(expected, abs=1e-6)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_computed():
    """logp = [-1, -2, -0.5], ref = [-1, -1, -1]:
    k1 = logp - ref = [0, -1, 0.5];
    k3 with r = ref - logp = [0, 1, -0.5]: e^r - 1 - r = [0, e - 2, e^-0.5 - 0.5];
    abs = [0, 1, 0.5];  mse = 0.5 * k1^2 = [0, 0.5, 0.125].
    """
    logprobs, ref_logprobs = tensor([[-1.0, -2.0, -0.5]]), tensor([[-1.0, -1.0, -1.0]])
    expected = {
        "k1": tensor([[0.0, -1.0, 0.5]]),
        "k3": tensor([[0.0, math.e - 2.0, math.exp(-0.5) - 0.5]]),
        "abs": tensor([[0.0, 1.0, 0.5]]),
        "mse": tensor([[0.0, 0.5, 0.125]]),
    }
    for kind, values in expected.items():
        torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, kind), values, msg=kind)
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), expected["k1"])
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), expected["k3"])


def test_kl_estimators_match_python_loop(generator):
    logprobs = -torch.rand(3, 5, generator=generator, dtype=DOUBLE) * 3
    ref_logprobs = -torch.rand(3, 5, generator=generator, dtype=DOUBLE) * 3
    naive = {
        "k1": lambda p, q: p - q,
        "k3": lambda p, q: math.exp(q - p) - 1 - (q - p),
        "abs": lambda p, q: abs(p - q),
        "mse": lambda p, q: 0.5 * (p - q) ** 2,
    }
    assert set(naive) == set(KL_ESTIMATORS)
    for kind, formula in naive.items():
        result = kl_penalty(logprobs, ref_logprobs, kind)
        for b in range(3):
            for t in range(5):
                expected = formula(logprobs[b, t].item(), ref_logprobs[b, t].item())
                assert result[b, t].item() == pytest.approx(expected, abs=1e-12), kind


def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference(generator):
    """Sampling tokens from the policy p, E[k1] = E[k3] = KL(p || q) = sum_x p log(p / q); k3 >= 0."""
    policy = torch.tensor([0.6, 0.3, 0.1], dtype=DOUBLE)
    reference = torch.tensor([0.2, 0.5, 0.3], dtype=DOUBLE)
    exact_kl = (policy * (policy / reference).log()).sum()
    tokens = torch.multinomial(policy, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = policy.log()[tokens], reference.log()[tokens]
    k3 = kl_k3(logprobs, ref_logprobs)
    assert (k3 >= 0).all()
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs).mean(), exact_kl, atol=0.01, rtol=0)
    torch.testing.assert_close(k3.mean(), exact_kl, atol=0.01, rtol=0)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'k2'.*abs"):
        kl_penalty(tensor([0.0]), tensor([0.0]), "k2")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# compute_rewards
# --------------------------------------------------------------------------------------------------
def test_compute_rewards_hand_computed():
    """scores [1, 2], kl_coef 0.1, k1:
    row 0: logp [-1, -1, -1], ref [-1, -2, -1] -> kl [0, 1, 0]; rewards -0.1 * kl = [0, -0.1, 0],
           score 1 on the last token (index 2) -> [0, -0.1, 1].
    row 1: logp [-1, -2, pad], ref [-1, -1, pad], mask [1, 1, 0] -> kl [0, -1, 0];
           rewards [0, 0.1, 0], score 2 on index 1 -> [0, 2.1, 0]; the padded token gets nothing.
    """
    scores = tensor([1.0, 2.0])
    logprobs = tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, math.nan]])
    ref_logprobs = tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, tensor([[0.0, -0.1, 1.0], [0.0, 2.1, 0.0]]))


@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_compute_rewards_matches_python_loop(generator, kl_kind):
    lengths = [5, 1, 3, 4]
    scores = torch.randn(4, generator=generator, dtype=DOUBLE)
    logprobs = -torch.rand(4, 5, generator=generator, dtype=DOUBLE)
    ref_logprobs = -torch.rand(4, 5, generator=generator, dtype=DOUBLE)
    mask = right_padded_mask(lengths, 5)
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05, kl_kind=kl_kind)
    for b, length in enumerate(lengths):
        for t in range(5):
            p, q = logprobs[b, t].item(), ref_logprobs[b, t].item()
            token_kl = (p - q if kl_kind == "k1" else math.exp(q - p) - 1 - (q - p)) if t < length else 0.0
            token_reward = -0.05 * token_kl + (scores[b].item() if t == length - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(token_kl, abs=1e-12)
            assert rewards[b, t].item() == pytest.approx(token_reward, abs=1e-12)


def test_compute_rewards_refuses_row_without_tokens():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_rewards(
            tensor([1.0, 2.0]), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), 0.1
        )


# --------------------------------------------------------------------------------------------------
# gae
# --------------------------------------------------------------------------------------------------
def test_gae_hand_computed():
    """One row, rewards [0, 1, pad 3], values [0.5, 0.2, pad 7], mask [1, 1, 0], gamma 0.9, lam 0.5.
    t=1 (last token): V_2 = 0 (bootstrap after EOS; the padded 7 is ignored),
        delta_1 = 1 + 0.9 * 0 - 0.2 = 0.8, A_1 = 0.8.
    t=0: delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32, A_0 = -0.32 + 0.9 * 0.5 * 0.8 = 0.04.
    returns = A + V = [0.54, 1.0, 0 on padding].
    """
    advantages, returns = gae(
        tensor([[0.0, 1.0, 3.0]]), tensor([[0.5, 0.2, 7.0]]), torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5
    )
    torch.testing.assert_close(advantages, tensor([[0.04, 0.8, 0.0]]))
    torch.testing.assert_close(returns, tensor([[0.54, 1.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
    """gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t. rewards [1, 2, 3], values [1, 1, 1]:
    returns-to-go [6, 5, 3], advantages [5, 4, 2], returns = [6, 5, 3].
    """
    advantages, returns = gae(
        tensor([[1.0, 2.0, 3.0]]), tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3), gamma=1.0, lam=1.0
    )
    torch.testing.assert_close(advantages, tensor([[5.0, 4.0, 2.0]]))
    torch.testing.assert_close(returns, tensor([[6.0, 5.0, 3.0]]))


def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{l=0}^{L-1-t} (gamma lam)^l delta_{t+l} with explicit nested loops (not the recursion)."""
    batch, total_len = rewards.shape
    advantages = [[0.0] * total_len for _ in range(batch)]
    for b in range(batch):
        length = lengths[b]

        def value(t, b=b, length=length):
            return values[b, t].item() if t < length else 0.0

        deltas = [rewards[b, t].item() + gamma * value(t + 1) - value(t) for t in range(length)]
        for t in range(length):
            advantages[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t))
    return torch.tensor(advantages, dtype=DOUBLE)


def test_gae_matches_naive_sum_of_discounted_deltas(generator):
    lengths = [6, 2, 4, 1, 5]
    rewards = torch.randn(5, 6, generator=generator, dtype=DOUBLE)
    values = torch.randn(5, 6, generator=generator, dtype=DOUBLE)
    mask = right_padded_mask(lengths, 6)
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    expected = naive_gae(rewards, values, lengths, 0.97, 0.9)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask, expected + values, 0.0))


def test_gae_left_padding_matches_right_padding(generator):
    """Moving the padding from the right to the left of each row moves the results with it: the same
    advantages on the response tokens, 0 on the padding (no advantage leaks backwards into it).
    """
    lengths, total_len = [4, 2, 3], 5
    rewards = torch.randn(3, total_len, generator=generator, dtype=DOUBLE)
    values = torch.randn(3, total_len, generator=generator, dtype=DOUBLE)
    right_mask = right_padded_mask(lengths, total_len)
    right = gae(rewards, values, right_mask, gamma=0.9, lam=0.8)

    shifts = [total_len - length for length in lengths]
    left_mask = torch.stack([row.roll(shift) for row, shift in zip(right_mask, shifts, strict=True)])

    def to_left(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row.roll(shift) for row, shift in zip(x, shifts, strict=True)])

    left = gae(to_left(rewards), to_left(values), left_mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(left.advantages, to_left(right.advantages))
    torch.testing.assert_close(left.returns, to_left(right.returns))
    assert (left.advantages[~left_mask] == 0).all()


# --------------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------------
def policy_case(requires_grad: bool = False):
    """Three tokens plus one padded token whose garbage (ratio e^1000 = inf, nan advantage) is ignored."""
    logprobs = tensor([[math.log(1.5), math.log(0.5), 0.0, 1000.0]]).requires_grad_(requires_grad)
    old_logprobs = tensor([[0.0, 0.0, 0.0, 0.0]])
    advantages = tensor([[1.0, 1.0, -1.0, math.nan]])
    mask = torch.tensor([[True, True, True, False]])
    return logprobs, old_logprobs, advantages, mask


def test_policy_loss_hand_computed():
    """eps = 0.2, ratios [1.5, 0.5, 1.0], advantages [1, 1, -1]:
    token 0: -A rho = -1.5, -A clip(rho) = -1.2 -> max -1.2 (clipped term active);
    token 1: -0.5, -A clip(0.5) = -0.8 -> max -0.5 (unclipped, the pessimistic bound);
    token 2: 1.0 and 1.0 -> 1.0, not clipped.
    loss = (-1.2 - 0.5 + 1.0) / 3 = -0.7 / 3; clip_fraction = 1 / 3;
    approx_kl = mean(0.5 * [ln^2 1.5, ln^2 0.5, 0]) = (ln^2 1.5 + ln^2 2) / 6.
    """
    loss, clip_fraction, approx_kl = policy_loss(*policy_case(), clip_range=0.2)
    torch.testing.assert_close(loss, tensor(-0.7 / 3))
    torch.testing.assert_close(clip_fraction, tensor(1 / 3))
    torch.testing.assert_close(approx_kl, tensor((math.log(1.5) ** 2 + math.log(2.0) ** 2) / 6))


def test_policy_loss_gradient_flows_into_logprobs_only_where_unclipped():
    """d loss / d logp_t = max-branch derivative / 3 tokens:
    token 0 clipped -> 0; token 1: d(-A rho)/d logp = -A rho = -0.5 -> -0.5/3;
    token 2: -(-1) * 1 = 1 -> 1/3; the padded token -> 0 (and not nan).
    """
    logprobs, old_logprobs, advantages, mask = policy_case(requires_grad=True)
    output = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    assert not output.clip_fraction.requires_grad and not output.approx_kl.requires_grad
    output.loss.backward()
    torch.testing.assert_close(logprobs.grad, tensor([[0.0, -0.5 / 3, 1 / 3, 0.0]]))


def test_policy_loss_matches_per_element_python(generator):
    logprobs = -torch.rand(3, 7, generator=generator, dtype=DOUBLE)
    old_logprobs = logprobs + 0.3 * torch.randn(3, 7, generator=generator, dtype=DOUBLE)
    advantages = torch.randn(3, 7, generator=generator, dtype=DOUBLE)
    lengths = [7, 3, 5]
    mask = right_padded_mask(lengths, 7)
    losses, clipped, kls = [], [], []
    for b, length in enumerate(lengths):
        for t in range(length):
            log_ratio = logprobs[b, t].item() - old_logprobs[b, t].item()
            ratio, advantage = math.exp(log_ratio), advantages[b, t].item()
            unclipped_term = -advantage * ratio
            clipped_term = -advantage * min(max(ratio, 0.8), 1.2)
            losses.append(max(unclipped_term, clipped_term))
            clipped.append(1.0 if clipped_term > unclipped_term else 0.0)
            kls.append(0.5 * log_ratio**2)
    loss, clip_fraction, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(sum(losses) / len(losses))
    assert clip_fraction.item() == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < clip_fraction.item() < 1  # the random case exercises both branches
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls))


# --------------------------------------------------------------------------------------------------
# value_loss
# --------------------------------------------------------------------------------------------------
def test_value_loss_hand_computed():
    """eps_v = 0.2, old values 0, values [0.5, -0.1, 0.3], returns [1, 1, -1]:
    token 0: V_clip = 0.2; (0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64 -> 0.64 (clipped is larger);
    token 1: V_clip = -0.1; both (-1.1)^2 = 1.21 -> 1.21, not clipped;
    token 2: V_clip = 0.2; (1.3)^2 = 1.69, (1.2)^2 = 1.44 -> 1.69, not clipped.
    loss = 0.5 * (0.64 + 1.21 + 1.69) / 3 = 0.59; clip_fraction = 1/3. A padded 4th token with
    nan return is ignored, and its value gets gradient 0.
    """
    values = tensor([[0.5, -0.1, 0.3, 9.0]]).requires_grad_(True)
    old_values = tensor([[0.0, 0.0, 0.0, 0.0]])
    returns = tensor([[1.0, 1.0, -1.0, math.nan]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_fraction = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    torch.testing.assert_close(loss, tensor(0.59))
    torch.testing.assert_close(clip_fraction, tensor(1 / 3))
    loss.backward()
    # d/dV of 0.5 * (V - R)^2 / 3 = (V - R) / 3 where unclipped wins; 0 where clipped wins or padded.
    torch.testing.assert_close(values.grad, tensor([[0.0, -1.1 / 3, 1.3 / 3, 0.0]]))


def test_value_loss_matches_per_element_python(generator):
    values = torch.randn(3, 6, generator=generator, dtype=DOUBLE)
    old_values = values + 0.3 * torch.randn(3, 6, generator=generator, dtype=DOUBLE)
    returns = torch.randn(3, 6, generator=generator, dtype=DOUBLE)
    lengths = [6, 2, 4]
    mask = right_padded_mask(lengths, 6)
    errors, clipped = [], []
    for b, length in enumerate(lengths):
        for t in range(length):
            value, old, target = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            clipped_value = old + min(max(value - old, -0.1), 0.1)
            unclipped_error, clipped_error = (value - target) ** 2, (clipped_value - target) ** 2
            errors.append(max(unclipped_error, clipped_error))
            clipped.append(1.0 if clipped_error > unclipped_error else 0.0)
    loss, clip_fraction = value_loss(values, old_values, returns, mask, clip_range_value=0.1)
    assert loss.item() == pytest.approx(0.5 * sum(errors) / len(errors))
    assert clip_fraction.item() == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < clip_fraction.item() < 1


# --------------------------------------------------------------------------------------------------
# explained_variance
# --------------------------------------------------------------------------------------------------
def test_explained_variance_hand_computed():
    """returns [1, 2, 3] (var 2/3):
    values = returns -> residual 0 -> EV = 1;
    values [1.5, 2, 2.5] -> residual [-0.5, 0, 0.5], var 1/6 -> EV = 1 - (1/6)/(2/3) = 0.75;
    values [2, 2, 2] -> residual = returns - 2, same variance -> EV = 0;
    constant returns -> nan.
    """
    returns, mask = tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    torch.testing.assert_close(explained_variance(returns, returns, mask), tensor(1.0))
    torch.testing.assert_close(explained_variance(tensor([[1.5, 2.0, 2.5]]), returns, mask), tensor(0.75))
    torch.testing.assert_close(explained_variance(tensor([[2.0, 2.0, 2.0]]), returns, mask), tensor(0.0))
    assert torch.isnan(explained_variance(returns, tensor([[4.0, 4.0, 4.0]]), mask))


def test_explained_variance_matches_python_loop(generator):
    returns = torch.randn(3, 5, generator=generator, dtype=DOUBLE)
    values = returns + 0.5 * torch.randn(3, 5, generator=generator, dtype=DOUBLE)
    mask = right_padded_mask([5, 2, 3], 5)
    pairs = [(values[b, t].item(), returns[b, t].item()) for b in range(3) for t in range(5) if mask[b, t]]

    def variance(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    expected = 1 - variance([r - v for v, r in pairs]) / variance([r for _, r in pairs])
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# padding invariance
# --------------------------------------------------------------------------------------------------
def test_padding_does_not_change_any_result(generator):
    """The same batch, once exact and once with 3 extra padded columns full of garbage (huge values,
    inf, nan), gives identical results on the real tokens and 0 on padding.
    """
    batch, length, pad = 3, 4, 3
    lengths = [4, 2, 3]
    mask = right_padded_mask(lengths, length)
    padded_mask = torch.cat([mask, torch.zeros(batch, pad, dtype=torch.bool)], dim=1)

    def with_garbage(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact, padded): padding columns and masked-out positions hold garbage."""
        garbage = torch.full((batch, pad), math.nan, dtype=DOUBLE)
        garbage[:, 0], garbage[:, 1] = 1e4, math.inf
        exact = torch.where(mask, values, -123.0)
        return exact, torch.cat([exact, garbage], dim=1)

    logprobs, padded_logprobs = with_garbage(-torch.rand(batch, length, generator=generator, dtype=DOUBLE))
    ref, padded_ref = with_garbage(-torch.rand(batch, length, generator=generator, dtype=DOUBLE))
    values, padded_values = with_garbage(torch.randn(batch, length, generator=generator, dtype=DOUBLE))
    scores = torch.randn(batch, generator=generator, dtype=DOUBLE)

    def check_tokens(exact: torch.Tensor, padded: torch.Tensor) -> None:
        torch.testing.assert_close(padded[:, :length], exact)
        assert (padded[:, length:] == 0).all()

    rewards, kl = compute_rewards(scores, logprobs, ref, mask, 0.1, "k3")
    padded_rewards, padded_kl = compute_rewards(scores, padded_logprobs, padded_ref, padded_mask, 0.1, "k3")
    check_tokens(rewards, padded_rewards)
    check_tokens(kl, padded_kl)

    advantages, returns = gae(rewards, values, mask, 0.99, 0.95)
    padded_advantages, padded_returns = gae(padded_rewards, padded_values, padded_mask, 0.99, 0.95)
    check_tokens(advantages, padded_advantages)
    check_tokens(returns, padded_returns)
    check_tokens(masked_whiten(advantages, mask), masked_whiten(padded_advantages, padded_mask))

    scalar_pairs = [
        (masked_mean(values, mask), masked_mean(padded_values, padded_mask)),
        (masked_var(values, mask), masked_var(padded_values, padded_mask)),
        (
            explained_variance(values, returns, mask),
            explained_variance(padded_values, padded_returns, padded_mask),
        ),
        (sequence_log_probs(logprobs, mask), sequence_log_probs(padded_logprobs, padded_mask)),
        (
            policy_loss(logprobs, ref, advantages, mask, 0.2),
            policy_loss(padded_logprobs, padded_ref, padded_advantages, padded_mask, 0.2),
        ),
        (
            value_loss(values, ref, returns, mask, 0.2),
            value_loss(padded_values, padded_ref, padded_returns, padded_mask, 0.2),
        ),
    ]
    for exact, padded in scalar_pairs:
        torch.testing.assert_close(padded, exact)


# --------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller_hand_computed():
    """init 0.1, target 6, horizon 10000, n_steps 256 (K_beta = 0.0256):
    KL 6.6: e = 0.1           -> beta = 0.1 * (1 + 0.1 * 0.0256) = 0.100256 (grows);
    KL 8:   e = 1/3 -> 0.2    -> beta = 0.1 * (1 + 0.2 * 0.0256) = 0.100512 (clipped);
    KL 3:   e = -0.5 -> -0.2  -> beta = 0.1 * (1 - 0.2 * 0.0256) = 0.099488 (shrinks, clipped);
    KL 6:   e = 0             -> beta unchanged.
    """
    for current_kl, expected in [(6.6, 0.100256), (8.0, 0.100512), (3.0, 0.099488), (6.0, 0.1)]:
        controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
        controller.update(torch.tensor(current_kl, dtype=DOUBLE), n_steps=256)
        assert controller.value == pytest.approx(expected, rel=1e-12), current_kl


def test_adaptive_kl_controller_direction_and_clipping():
    """Repeated updates: above target beta only grows, below it only shrinks; a huge KL moves beta no
    further than the clipped error allows.
    """
    above = AdaptiveKLController(0.2, target=1.0, horizon=100)
    below = AdaptiveKLController(0.2, target=1.0, horizon=100)
    for _ in range(5):
        previous_above, previous_below = above.value, below.value
        above.update(1.5, n_steps=10)
        below.update(0.5, n_steps=10)
        assert above.value > previous_above
        assert below.value < previous_below
    huge, edge = AdaptiveKLController(0.2, 1.0, 100), AdaptiveKLController(0.2, 1.0, 100)
    huge.update(1e9, n_steps=10)
    edge.update(1.2, n_steps=10)
    assert huge.value == pytest.approx(edge.value) == pytest.approx(0.2 * 1.02)


def test_fixed_controller_and_factory():
    fixed = make_kl_controller("fixed", 0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05

    adaptive = make_kl_controller("adaptive", 0.05, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(100.0, n_steps=64)
    assert adaptive.value > 0.05

    with pytest.raises(ValueError, match="target and horizon"):
        make_kl_controller("adaptive", 0.05)
    with pytest.raises(ValueError, match="'linear'.*adaptive"):
        make_kl_controller("linear", 0.05)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# DPO analysis
# --------------------------------------------------------------------------------------------------
def test_sequence_log_probs_hand_computed():
    """[[-1, -2, pad]] with mask [[1, 1, 0]] -> -1 + -2 = -3; [[-0.5, -0.5, -1]] fully kept -> -2."""
    token_logps = tensor([[-1.0, -2.0, math.nan], [-0.5, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_log_probs(token_logps, mask), tensor([-3.0, -2.0]))


def test_dpo_implicit_rewards_hand_computed():
    """beta 0.1: chosen 0.1 * (-10 - -11) = 0.1, rejected 0.1 * (-12 - -11) = -0.1; detached."""
    policy_chosen = tensor([-10.0]).requires_grad_(True)
    chosen, rejected = dpo_implicit_rewards(
        policy_chosen, tensor([-12.0]), tensor([-11.0]), tensor([-11.0]), 0.1
    )
    torch.testing.assert_close(chosen, tensor([0.1]))
    torch.testing.assert_close(rejected, tensor([-0.1]))
    assert not chosen.requires_grad


def test_dpo_implicit_rewards_match_python_loop(generator):
    logps = [-10 * torch.rand(4, generator=generator, dtype=DOUBLE) for _ in range(4)]
    chosen, rejected = dpo_implicit_rewards(*logps, beta=0.25)
    for i in range(4):
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = (x[i].item() for x in logps)
        assert chosen[i].item() == pytest.approx(0.25 * (policy_chosen - ref_chosen))
        assert rejected[i].item() == pytest.approx(0.25 * (policy_rejected - ref_rejected))


def test_shape_mismatch_names_the_arguments():
    with pytest.raises(ValueError, match=r"gae: .*rewards=\(2, 3\).*values=\(2, 4\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
