"""Pure tensor math for RLHF with PPO and for DPO-style analysis.

Free functions, tensors in and tensors out: no models, no Prefect, no global state, nothing runs at
import time. Every docstring gives the shape of each tensor and the equation it implements.

Shape letters used throughout:

* ``B`` batch (number of sequences), ``T`` response length (tokens), ``V`` vocabulary size.
* ``mask`` is a ``(B, T)`` bool or 0/1 tensor that is true on response tokens (up to and including
  EOS) and false on padding. Values at masked-out positions never influence a result, even when they
  are ``inf`` or ``nan``: masking is done with ``torch.where`` rather than by multiplying by the mask.

References:

* [Schulman 2016] Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", ICLR 2016.
* [Schulman 2017] Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
* [Schulman 2020] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
* [Ziegler 2019] Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
  arXiv:1909.08593.
* [Huang 2024] Huang et al., "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization", arXiv:2403.17031.
* [Rafailov 2023] Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly
  a Reward Model", NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

KLKind = Literal["k1", "k3", "abs", "mse"]
KLControllerKind = Literal["fixed", "adaptive"]


# --------------------------------------------------------------------------------------------------
# Grouped outputs
# --------------------------------------------------------------------------------------------------
class TokenRewards(NamedTuple):
    """Output of :func:`compute_rewards`.

    rewards: (B, T) per-token reward, ``-kl_coef * kl`` plus the score on each row's last token;
        0 on padding.
    kl: (B, T) per-token KL estimate between policy and reference; 0 on padding.
    """

    rewards: Tensor
    kl: Tensor


class AdvantagesAndReturns(NamedTuple):
    """Output of :func:`gae`.

    advantages: (B, T) GAE advantages (not whitened); 0 on padding.
    returns: (B, T) value targets ``advantages + values``; 0 on padding.
    """

    advantages: Tensor
    returns: Tensor


class PolicyLossOutput(NamedTuple):
    """Output of :func:`policy_loss`.

    loss: () scalar clipped-surrogate loss to minimise (carries gradient).
    clip_fraction: () share of response tokens where the clipped term was the active one (detached).
    approx_kl: () estimate of KL(old policy || new policy), ``masked_mean(0.5 * logratio**2)``
        (detached).
    """

    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


class ValueLossOutput(NamedTuple):
    """Output of :func:`value_loss`.

    loss: () scalar clipped value loss to minimise (carries gradient).
    clip_fraction: () share of response tokens where the clipped error was the larger one (detached).
    """

    loss: Tensor
    clip_fraction: Tensor


class ImplicitRewards(NamedTuple):
    """Output of :func:`dpo_implicit_rewards`.

    chosen_rewards: (B,) implicit reward of each chosen response (detached).
    rejected_rewards: (B,) implicit reward of each rejected response (detached).
    """

    chosen_rewards: Tensor
    rejected_rewards: Tensor


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _check_same_shape(function: str, **tensors: Tensor) -> None:
    """Raise ValueError naming the function and every argument's shape if the shapes differ."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{function}: these tensors must all have the same shape, got {listed}")


def _bool_mask(mask: Tensor, values: Tensor) -> Tensor:
    """``mask`` as a bool tensor broadcast to ``values``' shape (so counts include broadcast copies)."""
    return mask.bool().expand_as(values)


def _upcast(tensor: Tensor) -> Tensor:
    """``tensor`` in at least float32 (bf16/fp16 logits are upcast before softmax arithmetic)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------------
def gather_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    log p(y_t) = z_{t, y_t} / tau - logsumexp_v(z_{t, v} / tau)

    The full ``(B, T, V)`` ``log_softmax`` is never materialised: one row ``(T, V)`` at a time is
    upcast to float32 (bf16/fp16 inputs), divided by the temperature, reduced with ``logsumexp`` and
    gathered, so the extra memory is one row rather than the whole batch (the same idea as trl's
    ``selective_log_softmax``). Autograd works through it.

    The caller aligns logits and labels (for a causal LM, ``logits[:, :-1]`` predicts
    ``input_ids[:, 1:]``). PPO must use the sampling temperature here, or the log-probs describe a
    different policy from the one that generated the tokens [Huang 2024, detail "temperature"].

    Args:
        logits: (B, T, V) unnormalised scores, any float dtype.
        labels: (B, T) int64 token ids, each in ``[0, V)``; padded positions need a valid id (e.g. the
            pad id) and are masked out by the caller afterwards.
        temperature: softmax temperature ``tau > 0``.

    Returns:
        (B, T) log-probabilities, float32 (float64 if ``logits`` is float64).
    """
    if temperature <= 0:
        raise ValueError(f"gather_log_probs: temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"gather_log_probs: logits (B, T, V) and labels (B, T) disagree: logits={tuple(logits.shape)}, "
            f"labels={tuple(labels.shape)}"
        )
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = _upcast(row_logits)  # (T, V), one row in float32 at a time
        if temperature != 1.0:
            row_logits = row_logits / temperature
        label_logits = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(label_logits - torch.logsumexp(row_logits, dim=-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at every position.

    H_t = -sum_v p_{t,v} log p_{t,v} = logsumexp_v(z_{t,v}) - sum_v p_{t,v} z_{t,v}

    Computed one row ``(T, V)`` at a time in float32 (bf16/fp16 inputs are upcast per row). Logits of
    ``-inf`` (banned tokens) contribute 0, not ``nan``, to the value and the gradient.

    Args:
        logits: (B, T, V) unnormalised scores.

    Returns:
        (B, T) entropies in nats, float32 (float64 if ``logits`` is float64).
    """
    rows = []
    for row_logits in logits:
        row_logits = _upcast(row_logits)  # (T, V)
        log_normaliser = torch.logsumexp(row_logits, dim=-1, keepdim=True)  # (T, 1)
        probs = torch.exp(row_logits - log_normaliser)  # (T, V)
        # p = 0 where z = -inf; replacing z by 0 there keeps 0 * -inf = nan out of value and gradient.
        finite_logits = torch.where(torch.isfinite(row_logits), row_logits, 0.0)  # (T, V)
        rows.append(log_normaliser.squeeze(-1) - (probs * finite_logits).sum(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def sequence_log_probs(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of each whole response: the sum of its token log-probs.

    log pi(y | x) = sum_{t : mask_t} log pi(y_t | x, y_<t)   [Rafailov 2023, eq. 7 uses this sum]

    Args:
        token_logps: (B, T) per-token log-probs (e.g. from :func:`gather_log_probs`).
        mask: (B, T) true on response tokens.

    Returns:
        (B,) summed log-probs (a sum, not a length-normalised mean).
    """
    _check_same_shape("sequence_log_probs", token_logps=token_logps, mask=mask)
    return masked_sum(token_logps, mask, dim=-1)


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------
def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is true: sum_i m_i x_i.

    Args:
        values: (...) any shape, e.g. (B, T).
        mask: bool or 0/1 tensor broadcastable to ``values``.
        dim: dimension to reduce; ``None`` reduces over every element.

    Returns:
        () if ``dim`` is None, else ``values``' shape without ``dim``.
    """
    mask = _bool_mask(mask, values)
    kept = torch.where(mask, values, 0.0)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true: sum_i m_i x_i / sum_i m_i.

    An all-false mask (over ``dim``) gives ``nan``, the mean of nothing.

    Args:
        values: (...) any shape, e.g. (B, T).
        mask: bool or 0/1 tensor broadcastable to ``values``.
        dim: dimension to reduce; ``None`` reduces over every element.

    Returns:
        () if ``dim`` is None, else ``values``' shape without ``dim``.
    """
    mask = _bool_mask(mask, values)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim=dim) / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements of ``values`` (over all of them, as trl and torchtune do).

    var = sum_i m_i (x_i - mu)^2 / (n - 1)  if unbiased (Bessel's correction), else / n,
    with mu = masked_mean(x, m) and n = sum_i m_i.

    Args:
        values: (...) any shape, e.g. (B, T).
        mask: bool or 0/1 tensor broadcastable to ``values``.
        unbiased: divide by ``n - 1`` rather than ``n``.

    Returns:
        () scalar variance.

    Raises:
        ValueError: if the mask selects no element, or only one when ``unbiased``.
    """
    mask = _bool_mask(mask, values)
    values = torch.where(mask, values, 0.0)  # padding out before squaring, so it cannot reach a gradient
    count = int(mask.sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(
            f"masked_var: the mask selects {count} element(s); the {'unbiased' if unbiased else 'biased'} "
            f"variance needs at least {2 if unbiased else 1}"
        )
    centred = values - masked_mean(values, mask)
    variance = masked_mean(centred.square(), mask)
    return variance * (count / (count - 1)) if unbiased else variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise the masked elements to zero mean and unit (unbiased) variance.

    whiten(x)_i = (x_i - mu) / sqrt(var + 1e-8)   (+ mu again if not ``shift_mean``)

    with mu and var from :func:`masked_mean` / :func:`masked_var` over every masked element, as in
    trl's ``masked_whiten`` and torchtune's ``whiten``. ``shift_mean=False`` keeps the mean and only
    rescales, which is what [Huang 2024] recommends for rewards (advantages use ``shift_mean=True``).

    Args:
        values: (...) any shape, e.g. (B, T) advantages.
        mask: bool or 0/1 tensor broadcastable to ``values``; at least two elements must be selected.
        shift_mean: subtract the mean (True) or only divide by the standard deviation (False).

    Returns:
        ``values``' shape; 0 at masked-out positions.
    """
    mask = _bool_mask(mask, values)
    values = torch.where(mask, values, 0.0)  # a nan in padding would reach the variance's gradient
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the value head explains (a diagnostic, detached).

    EV = 1 - Var[R - V] / Var[R]   over the masked tokens.

    1 is a perfect value function, 0 is no better than predicting the mean return, negative is
    worse. ``nan`` if the returns have zero variance.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) value targets.
        mask: (B, T) true on response tokens; at least one must be selected.

    Returns:
        () float tensor.
    """
    _check_same_shape("explained_variance", values=values, returns=returns, mask=mask)
    values, returns = values.detach(), returns.detach()
    returns_variance = masked_var(returns, mask, unbiased=False)
    residual_variance = masked_var(returns - values, mask, unbiased=False)
    ratio = residual_variance / returns_variance
    return torch.where(returns_variance == 0, torch.nan, 1.0 - ratio)


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimator of KL(pi || pi_ref) from tokens sampled from pi [Schulman 2020].

    k1 = log pi(y_t) - log pi_ref(y_t) = -log r,   r = pi_ref / pi

    Unbiased but high variance, and negative for individual tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, T) log-probs of the same tokens under the reference policy.

    Returns:
        (B, T) per-token estimates.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) from tokens sampled from pi [Schulman 2020].

    k3 = (r - 1) - log r,   log r = log pi_ref(y_t) - log pi(y_t)

    Unbiased, never negative, and lower variance than k1 when pi and pi_ref are close.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, T) log-probs of the same tokens under the reference policy.

    Returns:
        (B, T) per-token estimates, >= 0.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|log pi(y_t) - log pi_ref(y_t)|, a biased, non-negative penalty (trl's ``"abs"``).

    Args and returns as in :func:`kl_k1`: (B, T) -> (B, T).
    """
    return (logprobs - ref_logprobs).abs()


def kl_mse(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi(y_t) - log pi_ref(y_t))^2 [Schulman 2020] (trl's ``"mse"``).

    Biased, non-negative, low variance. Args and returns as in :func:`kl_k1`: (B, T) -> (B, T).
    """
    return 0.5 * (logprobs - ref_logprobs).square()


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k3": kl_k3,
    "abs": kl_abs,
    "mse": kl_mse,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token KL estimate chosen by name from :data:`KL_ESTIMATORS`.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
        kind: ``"k1"``, ``"k3"``, ``"abs"`` or ``"mse"`` (k2).

    Returns:
        (B, T) per-token estimates.
    """
    _check_same_shape("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(
            f"kl_penalty: unknown kind {kind!r}; expected one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return estimator(logprobs, ref_logprobs)


# --------------------------------------------------------------------------------------------------
# PPO: rewards, advantages, losses
# --------------------------------------------------------------------------------------------------
def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: KLKind = "k1",
) -> TokenRewards:
    """Per-token PPO rewards: a KL penalty on every token plus the sequence score on the last one.

    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))   [Ziegler 2019, eq. 2]

    spread over tokens as [Huang 2024] describes: r_t = -beta * KL_t for every response token, and
    the reward-model score r(x, y) is added at the last response token (the last true position of
    each row of ``mask``).

    Args:
        scores: (B,) reward-model score of each whole response.
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
        mask: (B, T) true on response tokens; every row needs at least one (the EOS token counts).
        kl_coef: beta, the KL penalty coefficient (e.g. a KL controller's ``value``).
        kl_kind: which estimator of :func:`kl_penalty` to use.

    Returns:
        :class:`TokenRewards` with ``rewards`` (B, T) and ``kl`` (B, T), both 0 on padding.
    """
    _check_same_shape("compute_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"compute_rewards: scores must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}"
        )
    mask = mask.bool()
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kl_kind), 0.0)  # (B, T)

    # Index of each row's last response token; -1 for a row with no response token at all.
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    last_index = torch.where(mask, positions, -1).amax(dim=-1)  # (B,)
    empty_rows = (last_index < 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"compute_rewards: mask has no response token in rows {empty_rows}; every row needs at least "
            "one (the EOS token) to carry the score"
        )
    score_on_last_token = torch.zeros_like(kl).scatter(
        -1, last_index.unsqueeze(-1), scores.to(kl.dtype).unsqueeze(-1)
    )  # (B, T)
    rewards = -kl_coef * kl + score_on_last_token
    return TokenRewards(rewards=rewards, kl=kl)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> AdvantagesAndReturns:
    """Generalised advantage estimation [Schulman 2016, eqs. 11-16].

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}      (= sum_l (gamma * lam)^l delta_{t+l})
    R_t     = A_t + V_t                            (value-function target)

    computed by a reverse loop over time, vectorised over the batch. Positions where ``mask`` is
    false are padding: their rewards and values are ignored, and a false position acts as the end of
    the episode, so the token before it bootstraps from V = 0 and A = 0 (right padding after EOS and
    left padding both work). Advantages are not whitened here; use :func:`masked_whiten`. Callers
    normally pass detached values.

    Args:
        rewards: (B, T) per-token rewards (e.g. from :func:`compute_rewards`).
        values: (B, T) value-head predictions V_t.
        mask: (B, T) true on response tokens.
        gamma: discount factor.
        lam: GAE lambda (0: one-step TD, 1: Monte-Carlo return minus value).

    Returns:
        :class:`AdvantagesAndReturns` with ``advantages`` (B, T) and ``returns`` (B, T), both 0 on
        padding.
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)  # (B, T); V = 0 on padding is the bootstrap after EOS

    next_value = torch.zeros_like(values[..., 0])  # (B,)
    next_advantage = torch.zeros_like(values[..., 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(values.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]  # (B,)
        # A = 0 on padding: ends the recursion there, and drops padded rewards (even nan) from delta.
        next_advantage = torch.where(mask[..., t], delta + gamma * lam * next_advantage, 0.0)  # (B,)
        next_value = values[..., t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)  # (B, T)
    returns = advantages + values  # (B, T); both are 0 on padding
    return AdvantagesAndReturns(advantages=advantages, returns=returns)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss [Schulman 2017, eq. 7], negated for minimisation.

    rho_t = exp(log pi(y_t) - log pi_old(y_t))
    L     = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    The mean is over every response token in the batch (token-level mean, trl's default).
    ``approx_kl`` is the k2 estimator ``masked_mean(0.5 * (log rho)^2)`` of KL(pi_old || pi) on tokens
    sampled from pi_old [Schulman 2020], as trl's PPO trainer logs it.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs: (B, T) log-probs under the policy that sampled them (no gradient needed).
        advantages: (B, T) advantages, usually whitened.
        mask: (B, T) true on response tokens.
        clip_range: eps, e.g. 0.2.

    Returns:
        :class:`PolicyLossOutput` of three () tensors: ``loss``, ``clip_fraction``, ``approx_kl``.
    """
    _check_same_shape(
        "policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    mask = mask.bool()
    # Zero log-ratio on padding keeps exp() finite there (inf * 0 = nan) and gives padding no gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio.square(), mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> ValueLossOutput:
    """Clipped value loss [Huang 2024, detail "value function loss clipping"; PPO2 baselines].

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    L_V    = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    Args:
        values: (B, T) current value-head predictions (with gradient).
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) value targets from :func:`gae`.
        mask: (B, T) true on response tokens.
        clip_range_value: eps_v, e.g. 0.2.

    Returns:
        :class:`ValueLossOutput` of two () tensors: ``loss`` and ``clip_fraction``.
    """
    _check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    mask = mask.bool()
    # Padding may hold anything; masking the input keeps a nan there out of the gradient.
    values = torch.where(mask, values, 0.0)  # (B, T)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns).square()  # (B, T)
    clipped_error = (clipped_values - returns).square()  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(unclipped_error.dtype), mask)
    return ValueLossOutput(loss=loss, clip_fraction=clip_fraction)


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------
class KLController(Protocol):
    """Holds the KL coefficient beta and updates it from the KL observed in a batch."""

    value: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None: ...


class FixedKLController:
    """Constant beta: ``update`` does nothing."""

    def __init__(self, init_kl_coef: float) -> None:
        self.value = float(init_kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Ignore the observation; beta stays at its initial value."""


class AdaptiveKLController:
    """Adaptive beta that steers the KL towards a target [Ziegler 2019, §2.2, eq. 3].

    e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    KL above target -> beta grows; below -> beta shrinks; by at most ``0.2 * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController: init_kl_coef, target and horizon must all be > 0, got "
                f"init_kl_coef={init_kl_coef}, target={target}, horizon={horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Move beta after ``n_steps`` samples (e.g. the batch size) whose mean KL was ``current_kl``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def _fixed_controller(init: float, target: float | None, horizon: int | None) -> KLController:
    return FixedKLController(init)


def _adaptive_controller(init: float, target: float | None, horizon: int | None) -> KLController:
    if target is None or horizon is None:
        raise ValueError(
            f"make_kl_controller: kind 'adaptive' needs target and horizon, got target={target}, "
            f"horizon={horizon}"
        )
    return AdaptiveKLController(init, target, horizon)


KL_CONTROLLERS: dict[str, Callable[[float, float | None, int | None], KLController]] = {
    "fixed": _fixed_controller,
    "adaptive": _adaptive_controller,
}


def make_kl_controller(
    kind: KLControllerKind, init: float, target: float | None = None, horizon: int | None = None
) -> KLController:
    """Build the KL controller named ``kind`` from :data:`KL_CONTROLLERS`.

    Args:
        kind: ``"fixed"`` (beta = ``init`` forever) or ``"adaptive"`` (:class:`AdaptiveKLController`).
        init: initial beta.
        target: target KL per sequence (adaptive only).
        horizon: K_beta's denominator in samples (adaptive only), e.g. 10000.
    """
    try:
        build = KL_CONTROLLERS[kind]
    except KeyError:
        raise ValueError(
            f"make_kl_controller: unknown kind {kind!r}; expected one of {sorted(KL_CONTROLLERS)}"
        ) from None
    return build(init, target, horizon)


# --------------------------------------------------------------------------------------------------
# DPO analysis
# --------------------------------------------------------------------------------------------------
def dpo_implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> ImplicitRewards:
    """DPO's implicit rewards of the chosen and rejected responses [Rafailov 2023, eq. 5].

    r_hat(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))

    (the partition-function term cancels in every comparison, so it is left out). Detached, for
    logging reward margins and accuracies, as the DPO reference implementation does.

    Args:
        policy_chosen_logps: (B,) sequence log-probs (:func:`sequence_log_probs`) of chosen responses.
        policy_rejected_logps: (B,) the same for rejected responses.
        ref_chosen_logps: (B,) chosen responses under the reference model.
        ref_rejected_logps: (B,) rejected responses under the reference model.
        beta: DPO's beta.

    Returns:
        :class:`ImplicitRewards` with ``chosen_rewards`` (B,) and ``rejected_rewards`` (B,).
    """
    _check_same_shape(
        "dpo_implicit_rewards",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return ImplicitRewards(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
