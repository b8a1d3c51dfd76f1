"""The ``ppo`` stage: RLHF with PPO from the SFT policy, against the reward model or the gold judge.

TRL 1.16 deleted its PPOTrainer, so the loop is written here, after Ziegler et al. 2019 and the
implementation details of Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"). All
tensor math (log-probs, KL, rewards, GAE, whitening, losses, KL controllers) is in
:mod:`stages.losses`; this module only moves batches through models.

One update:

1. draw ``rollout_batch_size`` prompts: a seeded shuffle of the training prompts, cycled;
2. sample one response per prompt from the policy (batched, KV-cached; cut after the first EOS);
3. score prompt + response with the reward model, read at the last token of the chat-rendered
   conversation as TRL's RewardTrainer trained it (or with the task's gold judge), in float32;
   standardise the score by the mean and std of the same scorer over SFT samples drawn once before
   training (``reward_normalization: sft``, Huang et al. 2024), and add ``missing_eos_penalty`` (in
   those units) to the score of a response that never emitted EOS;
4. without gradient: old policy log-probs, reference log-probs and critic values over the response
   tokens; logits are divided by the sampling temperature before the log-softmax, here and in
   training (N+ detail), so they describe the policy that sampled;
5. per-token rewards ``-beta * KL_t`` plus the score on the last token, optionally whitened
   (scale only), GAE, advantages whitened over the batch;
6. ``ppo_epochs`` passes over the batch in shuffled mini-batches of ``mini_batch_size``: clipped
   policy loss + clipped value loss, one AdamW for the policy and one for the critic, gradient
   norms clipped per model (the two models share no parameter, so a weight on the value loss would
   only rescale the critic's gradients, which Adam undoes: its learning rate is the knob);
7. the KL controller sees the batch's mean sequence KL (k1, summed over tokens).

Design choices:

- Policy = SFT weights + a LoRA adapter; the reference is the same module with the adapter
  disabled, so no second copy is held. Without LoRA the reference is a frozen copy.
- Reference EMA (Xu et al. 2024, ``ppo.ref_ema_decay``): with LoRA an EMA copy of the adapter
  weights is kept and copied into the adapter for each reference pass (then the policy weights are
  put back), so the reference is SFT + EMA(adapter). Without LoRA the frozen copy's own weights
  follow the policy by EMA. Either way the EMA moves once per update, after the optimisation.
- Critic: the reward model's backbone with a fresh scalar head that reads the hidden state of every
  position, giving one value per response token (the state before that token); trained with its own
  LoRA adapter (head in ``modules_to_save``) or in full. The head starts at zero and the values at
  the SFT samples' mean score (0 after normalisation; ``Critic.offset`` otherwise), so the critic
  starts on the reward's scale: a copy of the uncentred reward head would put every value off by a
  constant b, which GAE turns into a -b * lambda^(T-1-t) ramp over the response's tokens. Values are
  computed in float32 at rollout time (the head always in float32). The reward model used for
  scoring is a separate frozen copy.
- Dropout is off: models stay in eval mode throughout (N+ detail), so the first mini-batch step of
  every update starts from ratio 1 (to ~1e-5 in float32; under bf16 autocast sampling and training
  round differently, a mean |log-ratio| of ~0.04 on the bench shape). Log-probs account for the
  temperature but not for ``top_p``: keep ``ppo.generation.top_p`` at 1.0, as the N+ reference does, for exact ratios.
- Checkpoints live in ``<run.output_dir>/checkpoints/ppo/<cache key>/update-NNNNNN/``, outside the
  staging directory that the runner deletes when a stage fails: trainable weights of policy and
  critic (and the EMA reference) as safetensors, both optimiser states (``torch.save``, loaded with
  ``weights_only=True``), and ``state.json`` (update count, prompt cursor, KL coefficient, the
  per-update metrics so far). No RNG state is stored: each update derives its seeds from
  (run.seed, update index), so a resumed run draws the same prompts and samples as an uninterrupted
  one. A checkpoint is written to a temporary directory and renamed into place; older ones are then
  removed. The last checkpoint is kept after success, so a run that fails after this function
  returns (e.g. while registering the model) resumes at the end instead of retraining; the cache
  key changes with the code, params and inputs, so a stale checkpoint is never picked up. Delete
  the directory to force a retrain of the same key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import Module
from tqdm.auto import tqdm

from stages.config import PPOConfig
from stages.generation import (
    Messages,
    Samples,
    pad_rows,
    prefix_inputs,
    reward_scores,
    sample,
    shared_prefix_length,
)
from stages.judges import GOLD_JUDGES, gold_judge
from stages.losses import (
    KLController,
    compute_rewards,
    explained_variance,
    gae,
    gather_log_probs,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    value_loss,
)
from stages.models import (
    autocast,
    backbone,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    peft_config,
    process_group,
    save_model,
)
from stages.records import read_jsonl
from stages.runner import StageContext, StageOutput
from stages.training import snapshot_trainable, training_seed, weight_change

Scorer = Callable[[list[Messages], list[str]], Tensor]  # (prompts, response texts) -> (B,) scores on the CPU

TIME_METRICS = ("time/generation", "time/scoring", "time/forward", "time/optimisation", "time/update")
FINAL_METRICS = ("ppo/kl", "ppo/score_mean", "ppo/rlhf_reward_mean", "ppo/entropy", "ppo/response_length",
                 "ppo/eos_fraction", "ppo/explained_variance", "ppo/value_clip_fraction", "ppo/approx_kl_first")


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------
class Sequences(NamedTuple):
    """Prompts and sampled responses as token batches: ``prefix`` + ``[pad.. prompt rest | response ..pad]``.

    prefix_ids: (C,) int64 the tokens every prompt of the rollout starts with (the chat template's
        header and system prompt, a shared instruction; C may be 0). Forward passes run them once and
        share their keys and values across the rows, instead of once per row.
    query_ids: (B, P) int64 the rest of each chat-rendered prompt (at least one token), left-padded
        with the pad id.
    query_mask: (B, P) bool, true on prompt tokens.
    response_ids: (B, R) int64 response tokens up to and including the first EOS, right-padded with
        the pad id (a valid id, so it can be gathered; masked out afterwards).
    response_mask: (B, R) bool, true on response tokens; every row has at least one.
    """

    prefix_ids: Tensor
    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    def select(self, index: Tensor) -> Sequences:
        """Rows ``index`` (b,), without the columns that are padding in every selected row."""
        query_mask, response_mask = self.query_mask[index], self.response_mask[index]
        start = query_mask.shape[1] - int(query_mask.sum(-1).max())
        width = int(response_mask.sum(-1).max())
        return Sequences(
            self.prefix_ids, self.query_ids[index, start:], query_mask[:, start:],
            self.response_ids[index, :width], response_mask[:, :width],
        )


class Rollout(NamedTuple):
    """One PPO batch: the samples and everything the optimisation epochs hold fixed.

    sequences: the token batches, B rows and R response columns (see :class:`Sequences`).
    scores: (B,) float32 sequence scores (reward model or gold judge, plus the missing-EOS penalty).
    logprobs: (B, R) float32 log-probs of the response tokens under the sampling policy (pi_old),
        at the sampling temperature.
    ref_logprobs: (B, R) float32 the same under the reference policy.
    values: (B, R) float32 critic values V_t at sampling time.
    advantages: (B, R) float32 GAE advantages, whitened over the batch.
    returns: (B, R) float32 value targets, GAE advantages before whitening + values.

    Every (B, R) tensor is 0 on padding.
    """

    sequences: Sequences
    scores: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor

    def select(self, index: Tensor) -> Rollout:
        """The mini-batch of rows ``index`` (b,), trimmed to its own longest prompt and response."""
        sequences = self.sequences.select(index)
        width = sequences.response_ids.shape[1]
        per_token = (self.logprobs, self.ref_logprobs, self.values, self.advantages, self.returns)
        return Rollout(sequences, self.scores[index], *(tensor[index, :width] for tensor in per_token))


class RolloutForward(NamedTuple):
    """The no-gradient forward passes over a rollout, each (B, R) float32 and 0 on padding.

    logprobs: response-token log-probs under the policy.
    ref_logprobs: the same under the reference.
    values: critic values.
    entropy: entropy of the policy's (temperature-scaled) next-token distribution.
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    entropy: Tensor


@dataclass
class Critic:
    """Per-token values V(s_t): the reward model's backbone and scalar head, trained (LoRA or full)."""

    model: Module  # owns the parameters (a PeftModel when LoRA is on)
    backbone: Module  # (B, L) ids -> last_hidden_state (B, L, H)
    head: Module  # (..., H) -> (..., 1), zero at the start
    offset: float = 0.0  # added to every value: the SFT mean score when scores are not normalised


@dataclass
class Reference:
    """Where reference log-probs come from, and the EMA that may move the reference weights.

    ``model`` is called inside ``activate()``: the policy with its adapter disabled (LoRA), the
    policy with EMA adapter weights swapped in (LoRA + EMA), or a frozen copy (no LoRA). ``ema``
    holds the EMA weights under the names of the policy weights in ``tracked`` (both empty without
    EMA).
    """

    model: Module
    activate: Callable[[], AbstractContextManager]
    tracked: dict[str, Tensor] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)
    ema_decay: float | None = None

    def update_ema(self) -> None:
        """ref <- decay * ref + (1 - decay) * policy  (Xu et al. 2024); a no-op without EMA."""
        if self.ema_decay is None:
            return
        with torch.no_grad():
            for name, weight in self.ema.items():
                weight.lerp_(self.tracked[name].detach(), 1.0 - self.ema_decay)


@dataclass(frozen=True)
class ScoreScale:
    """Standardisation of the scorer's output: (score - mean) / std, measured on SFT samples."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, scores: Tensor) -> Tensor:
        """(B,) raw scores -> (B,) standardised scores."""
        return (scores - self.mean) / self.std


@dataclass
class Models:
    """Everything an update calls: tokenizer, trainable policy and critic, reference, scorer."""

    tokenizer: Any
    policy: Module
    reference: Reference
    critic: Critic
    scorer: Scorer
    autocast: Callable[[], AbstractContextManager] = nullcontext  # run.mixed_precision for every forward pass
    scale: ScoreScale = field(default_factory=ScoreScale)  # set from SFT samples before the first update


@dataclass
class Optimisers:
    """One AdamW for the policy, one for the critic (their learning rates differ)."""

    policy: torch.optim.Optimizer
    critic: torch.optim.Optimizer

    def step(self, loss: Tensor, max_grad_norm: float) -> None:
        """Backward, sum the gradients over the processes (when launched), clip, step."""
        for optimiser in (self.policy, self.critic):
            optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if process_group()[1] > 1:
            grads = [p.grad for o in (self.policy, self.critic) for p in o.param_groups[0]["params"]
                     if p.grad is not None]
            flat = torch.cat([grad.reshape(-1) for grad in grads])
            torch.distributed.all_reduce(flat)
            for grad, summed in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
                grad.copy_(summed.view_as(grad))
        for optimiser in (self.policy, self.critic):
            torch.nn.utils.clip_grad_norm_(optimiser.param_groups[0]["params"], max_grad_norm)
            optimiser.step()


@dataclass
class Progress:
    """What a checkpoint restores besides weights: how far training got."""

    updates_done: int = 0
    prompt_cursor: int = 0  # prompts drawn so far, across epochs of the shuffled prompt list
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per update
    scale: ScoreScale | None = None  # the reward standardisation, measured once before the first update


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config.ppo

    # Prompts
    prompts = load_prompts(ctx.inputs["prepare"].path / "train.jsonl", cfg.max_prompts)

    # Models, optimisers, KL controller
    models = build_models(ctx)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    optimisers = build_optimisers(models, cfg)
    controller = make_kl_controller("adaptive" if cfg.adaptive_kl else "fixed", cfg.kl_coef,
                                    cfg.kl_target, cfg.kl_horizon)
    before = snapshot_trainable(models.policy)  # taken before a resume, so it measures the whole run

    # Resume
    checkpoints = ctx.checkpoint_dir
    progress = load_checkpoint(checkpoints, models, optimisers, controller, ctx.device)
    resumed_from = progress.updates_done
    if resumed_from:
        print(f"[alignflow] ppo: resuming from update {resumed_from} ({checkpoints})")

    # Reward scale, measured on the SFT policy before it moves (kept in the checkpoints)
    if progress.scale is None:
        progress.scale = measure_score_scale(models, prompts, cfg, seed=training_seed(ctx.config.run, cfg))
    set_score_scale(models, progress.scale, cfg)

    # Training
    train(ctx, models, optimisers, controller, prompts, progress, checkpoints)
    metrics = {
        **summary_metrics(progress, resumed_from),
        **({"ppo/sft_score_mean": progress.scale.mean, "ppo/sft_score_std": progress.scale.std}
           if cfg.reward_normalization == "sft" else {}),
        "ppo/kl_coef": controller.value,
        "train_prompts": float(len(prompts)),
        # every rollout response and every sample of the reward scale is one call of the scorer
        "gold_calls": float(scorer_calls(cfg)) if cfg.reward_source == "gold" else 0.0,
        "weight_change": weight_change(models.policy, before),
    }

    # Save
    save_model(models.policy, models.tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})


def train(ctx: StageContext, models: Models, optimisers: Optimisers, controller: KLController,
          prompts: list[Messages], progress: Progress, checkpoints: Path) -> None:
    """Run the remaining updates, logging each and checkpointing every ``checkpoint_every`` and at the end."""
    cfg = ctx.config.ppo
    bar = tqdm(range(progress.updates_done, cfg.updates), initial=progress.updates_done, total=cfg.updates,
               desc="ppo", unit="update")
    for update in bar:
        metrics = ppo_update(ctx, models, optimisers, controller, prompts, progress, update)
        ctx.log_metrics(metrics, step=progress.updates_done)
        bar.set_postfix(score=f"{metrics['ppo/score_mean']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        checkpoint_due = progress.updates_done % cfg.checkpoint_every == 0 or progress.updates_done == cfg.updates
        if checkpoint_due and ctx.is_main:  # every process holds the same weights and state
            save_checkpoint(checkpoints, models, optimisers, controller, progress)


def ppo_update(ctx: StageContext, models: Models, optimisers: Optimisers, controller: KLController,
               prompts: list[Messages], progress: Progress, update: int) -> dict[str, float]:
    """One PPO update (rollout, then optimisation); advances ``progress`` and returns its metrics."""
    cfg = ctx.config.ppo
    seed = training_seed(ctx.config.run, cfg)
    started = time.perf_counter()
    indices = prompt_indices(len(prompts), progress.prompt_cursor, cfg.rollout_batch_size, seed)
    kl_coef = controller.value
    rollout, metrics = collect_rollout(models, [prompts[i] for i in indices], cfg, kl_coef,
                                       seed=derive_seed(seed, "generation", update), device=ctx.device)

    optimisation_started = time.perf_counter()
    metrics |= optimise(rollout, models, optimisers, cfg, seed=derive_seed(seed, "minibatches", update))
    models.reference.update_ema()
    controller.update(metrics["ppo/kl"], cfg.rollout_batch_size)
    finished = time.perf_counter()

    progress.updates_done = update + 1
    progress.prompt_cursor += cfg.rollout_batch_size
    metrics |= {"time/optimisation": finished - optimisation_started, "time/update": finished - started}
    progress.history.append(metrics)
    return metrics


def measure_score_scale(models: Models, prompts: list[Messages], cfg: PPOConfig, *, seed: int) -> ScoreScale:
    """Mean and std of the scorer over ``cfg.normalization_samples`` samples of the policy before training.

    The policy is then the SFT model (its LoRA adapter starts at zero). Prompts are the first of a
    seeded shuffle of the training prompts, one sample each, cycled when there are fewer prompts.
    ``reward_normalization: none`` gives the identity scale; scores that do not vary are centred only.
    """
    if cfg.reward_normalization == "none":
        return ScoreScale()
    indices = prompt_indices(len(prompts), 0, cfg.normalization_samples, derive_seed(seed, "normalization", 0))
    chosen = [prompts[i] for i in indices]
    with models.autocast(), merged_adapter(models.policy):
        samples = sample(models.policy, models.tokenizer, chosen, 1, cfg.generation,
                         seed=derive_seed(seed, "normalization", 1), desc="ppo: SFT samples for the reward scale")
    scores = models.scorer(chosen, samples.texts).double()  # (N,)
    std = float(scores.std())
    if not std > 1e-6:  # every SFT sample scored alike: centre only, and say so
        print(f"[alignflow] ppo: WARNING: the {cfg.reward_source} scores of {len(scores)} SFT samples are all "
              f"{float(scores.mean()):.4g}; rewards are centred but not scaled (check the reward model's "
              "eval_pair_accuracy, or raise ppo.normalization_samples)")
        std = 1.0
    scale = ScoreScale(float(scores.mean()), std)
    print(f"[alignflow] ppo: {cfg.reward_source} scores of {len(scores)} SFT samples: mean {scale.mean:.4f}, "
          f"std {scale.std:.4f} (rewards are standardised by these)")
    return scale


def set_score_scale(models: Models, scale: ScoreScale, cfg: PPOConfig) -> None:
    """Standardise the rollouts' scores by ``scale``; the critic's values start at the scaled SFT mean."""
    models.scale = scale
    # with normalisation the SFT mean is 0; without, the values start at the raw SFT mean (measured or 0)
    models.critic.offset = 0.0 if cfg.reward_normalization == "sft" else scale.mean


def scorer_calls(cfg: PPOConfig) -> int:
    """How many responses the scorer judges in a whole run: the reward-scale samples, then every rollout."""
    scale_samples = cfg.normalization_samples if cfg.reward_normalization == "sft" else 0
    return scale_samples + cfg.updates * cfg.rollout_batch_size


def summary_metrics(progress: Progress, resumed_from: int) -> dict[str, float]:
    """Final values of the main per-update metrics, and the mean time per update and its split."""
    first, last = progress.history[0], progress.history[-1]
    return {
        "updates_done": float(progress.updates_done),
        "resumed_from_update": float(resumed_from),
        **{name: last[name] for name in FINAL_METRICS},
        "ppo/score_mean_first": first["ppo/score_mean"],
        **{f"{name}_mean": statistics.fmean(h[name] for h in progress.history) for name in TIME_METRICS},
    }


# --------------------------------------------------------------------------------------------------
# Prompts and seeds
# --------------------------------------------------------------------------------------------------
def load_prompts(path: Path, max_prompts: int | None) -> list[Messages]:
    """The chat prompts of ``train.jsonl`` (any chosen/rejected columns are ignored)."""
    rows = read_jsonl(path)[:max_prompts]
    if not rows:
        raise ValueError(f"{path}: no rows, so no prompts to train PPO on")
    for number, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(
                f"{path}: row {number} (id {row.get('id')!r}): 'prompt' must be a non-empty list of "
                f"{{role, content}} messages, got {prompt!r:.80}"
            )
    return [row["prompt"] for row in rows]


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """A seed for (purpose, index) derived from the training seed (``ppo.seed``, else ``run.seed``), so a
    resumed run repeats the same draws."""
    digest = hashlib.sha256(f"ppo:{seed}:{purpose}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_indices(num_prompts: int, cursor: int, count: int, seed: int) -> list[int]:
    """Prompts ``cursor .. cursor + count - 1`` of an endless stream of seeded shuffles of the prompts.

    Epoch ``e`` of the stream is a permutation seeded by (seed, e), so the stream depends on the
    cursor alone and needs no RNG state to resume.
    """
    first_epoch, last_epoch = cursor // num_prompts, (cursor + count - 1) // num_prompts
    order = torch.cat([
        torch.randperm(num_prompts, generator=torch.Generator().manual_seed(derive_seed(seed, "prompts", epoch)))
        for epoch in range(first_epoch, last_epoch + 1)
    ])
    start = cursor - first_epoch * num_prompts
    return order[start : start + count].tolist()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def build_models(ctx: StageContext) -> Models:
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="left")
    scorer = SCORERS[ctx.config.ppo.reward_source](ctx, tokenizer)  # first: fails fast without a judge
    policy, reference = build_policy(ctx, sft_dir)
    return Models(tokenizer, policy, reference, build_critic(ctx), scorer,
                  autocast=lambda: autocast(ctx.config.run, ctx.device))


def build_policy(ctx: StageContext, sft_dir: str) -> tuple[Module, Reference]:
    """The trainable policy and its reference (see the module docstring for the four cases)."""
    model_config, decay = ctx.config.model, ctx.config.ppo.ref_ema_decay
    policy = load_causal_lm(sft_dir, model_config, ctx.device).eval()
    lora = peft_config(model_config.lora, "CAUSAL_LM")
    if lora is None:
        frozen = load_causal_lm(sft_dir, model_config, ctx.device).requires_grad_(False).eval()
        return policy, _copy_reference(policy, frozen, decay)
    policy = _with_lora(policy, lora, training_seed(ctx.config.run, ctx.config.ppo))
    return policy, _adapter_reference(policy, decay)


def _with_lora(model: Module, lora: Any, seed: int) -> Module:
    from peft import get_peft_model

    with torch.random.fork_rng():  # LoRA's A matrices start random: seed them, leave the global RNG alone
        torch.manual_seed(seed)
        return get_peft_model(model, lora).eval()


def _adapter_reference(policy: Module, decay: float | None) -> Reference:
    if decay is None:
        return Reference(policy, policy.disable_adapter)
    tracked = _trainable(policy)
    ema = {name: weight.detach().clone() for name, weight in tracked.items()}
    return Reference(policy, lambda: _swapped(tracked, ema), tracked, ema, decay)


def _copy_reference(policy: Module, frozen: Module, decay: float | None) -> Reference:
    if decay is None:
        return Reference(frozen, nullcontext)
    # The frozen copy's own weights are the EMA: updating them in place moves the reference.
    return Reference(frozen, nullcontext, dict(policy.named_parameters()), dict(frozen.named_parameters()), decay)


@contextmanager
def _swapped(weights: dict[str, Tensor], replacement: dict[str, Tensor]) -> Iterator[None]:
    """Copy ``replacement`` into ``weights`` (same names) for the duration, then put the originals back."""
    saved = {name: weight.detach().clone() for name, weight in weights.items()}
    with torch.no_grad():
        for name, weight in weights.items():
            weight.copy_(replacement[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(saved[name])


def build_critic(ctx: StageContext) -> Critic:
    """A trainable backbone (the reward model's, else the SFT model's) with a zero head applied at every position."""
    from peft import PeftModel

    # the reward model's backbone when PPO optimises it; on the gold judge, the SFT model's (no labels behind it)
    source = ctx.inputs.get("reward", ctx.inputs["sft"])
    model = load_reward_model(str(source.model_dir), ctx.config.model, ctx.device).eval()
    lora = peft_config(ctx.config.model.lora, "SEQ_CLS")  # modules_to_save=["score"]: the head trains in full
    if lora is not None:
        model = _with_lora(model, lora, training_seed(ctx.config.run, ctx.config.ppo) + 1)
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(
            f"{source.model_dir}: {type(inner).__name__} has no 'score' head; the PPO critic "
            "needs a sequence-classification model with a linear 'score' head (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    with torch.no_grad():  # a zero head: every value starts at Critic.offset (see the module docstring)
        for weight in head.parameters():
            weight.zero_()
    return Critic(model=model, backbone=backbone(model), head=head)


def enable_gradient_checkpointing(models: Models) -> None:
    """Recompute activations in backward (non-reentrant checkpointing, so LoRA's inputs need no grad)."""
    for model in (models.policy, models.critic.model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimisers(models: Models, cfg: PPOConfig) -> Optimisers:
    # weight_decay 0, as in TRL's trainers and the N+ reference (plain Adam).
    return Optimisers(
        policy=torch.optim.AdamW(_trainable(models.policy).values(), lr=cfg.learning_rate, weight_decay=0.0),
        critic=torch.optim.AdamW(_trainable(models.critic.model).values(), lr=cfg.value_learning_rate,
                                 weight_decay=0.0),
    )


def _trainable(model: Module) -> dict[str, Tensor]:
    return {name: weight for name, weight in model.named_parameters() if weight.requires_grad}


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def _reward_model_scorer(ctx: StageContext, tokenizer: Any) -> Scorer:
    reward_model = load_reward_model(str(ctx.inputs["reward"].model_dir), ctx.config.model, ctx.device)
    reward_model.requires_grad_(False).eval()
    batch_size = ctx.config.ppo.generation.batch_size

    def score(prompts: list[Messages], texts: list[str]) -> Tensor:
        conversations = [[*prompt, {"role": "assistant", "content": text}]
                         for prompt, text in zip(prompts, texts, strict=True)]
        return reward_scores(reward_model, tokenizer, conversations, batch_size=batch_size)

    return score


def _gold_scorer(ctx: StageContext, tokenizer: Any) -> Scorer:
    judge = gold_judge(ctx.config.data.task)
    if judge is None:
        raise ValueError(
            f"ppo.reward_source is 'gold' but data.task {ctx.config.data.task!r} has no gold judge "
            f"(tasks with one: {sorted(GOLD_JUDGES)}); set ppo.reward_source to 'reward_model'"
        )
    return lambda prompts, texts: torch.tensor(judge.score(texts), dtype=torch.float32)


SCORERS: dict[str, Callable[[StageContext, Any], Scorer]] = {
    "reward_model": _reward_model_scorer,
    "gold": _gold_scorer,
}


# --------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------
def _model_inputs(backbone: Module, sequences: Sequences) -> dict[str, Any]:
    """Keyword arguments for a forward pass over ``[prefix | query | response]`` (see :func:`prefix_inputs`)."""
    input_ids = torch.cat([sequences.query_ids, sequences.response_ids], dim=1)  # (B, P + R)
    mask = torch.cat([sequences.query_mask, sequences.response_mask], dim=1)  # (B, P + R)
    return prefix_inputs(backbone, sequences.prefix_ids, input_ids, mask)


def response_logits(model: Module, sequences: Sequences) -> Tensor:
    """(B, R, V) logits that predict the response tokens (position t - 1 predicts token t).

    Only the last R + 1 positions go through the LM head (``logits_to_keep``): the prompt's logits
    are never computed.
    """
    width = sequences.response_ids.shape[1]
    return model(**_model_inputs(backbone(model), sequences), logits_to_keep=width + 1).logits[:, :-1]


def response_values(critic: Critic, sequences: Sequences) -> Tensor:
    """(B, R) float32 values of the states before each response token, the head read at every position."""
    prompt_width, width = sequences.query_ids.shape[1], sequences.response_ids.shape[1]
    hidden = critic.backbone(**_model_inputs(critic.backbone, sequences)).last_hidden_state  # (B, P + R, H)
    states = hidden[:, prompt_width - 1 : prompt_width - 1 + width]  # (B, R, H)
    with torch.autocast(states.device.type, enabled=False):  # values in float32: bf16 rounds 1.7 to 0.008
        return critic.head(states.float()).squeeze(-1) + critic.offset  # (B, R)


@torch.no_grad()
def rollout_forward(models: Models, sequences: Sequences, samples: Samples, chunk_size: int,
                    temperature: float) -> RolloutForward:
    """Reference and critic over the rollout, one forward pass each per chunk of rows.

    pi_old's log-probs and entropies are those sampling computed (``sample(..., with_logprobs=True)``),
    not a third forward pass: the same weights, tokens and temperature give the same numbers.
    """
    width = sequences.response_ids.shape[1]
    columns: list[list[Tensor]] = [[], []]
    for index in torch.arange(len(sequences.response_ids), device=sequences.response_ids.device).split(chunk_size):
        chunk = sequences.select(index)
        with models.autocast(), models.reference.activate():
            ref_logits = response_logits(models.reference.model, chunk)  # (b, r, V)
            ref_logprobs = gather_log_probs(ref_logits, chunk.response_ids, temperature)  # (b, r)
        del ref_logits
        values = response_values(models.critic, chunk)  # (b, r), float32 throughout
        for column, tensor in zip(columns, (ref_logprobs, values), strict=True):
            masked = torch.where(chunk.response_mask, tensor, 0.0)
            column.append(torch.nn.functional.pad(masked, (0, width - masked.shape[1])))  # (b, R)
    device = sequences.response_ids.device
    logprobs, _ = pad_rows(samples.logprobs, 0, device, "right", dtype=torch.float32)  # (B, R)
    entropy, _ = pad_rows(samples.entropies, 0, device, "right", dtype=torch.float32)  # (B, R)
    return RolloutForward(logprobs, torch.cat(columns[0]), torch.cat(columns[1]), entropy)


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------
def collect_rollout(models: Models, prompts: list[Messages], cfg: PPOConfig, kl_coef: float, *, seed: int,
                    device: torch.device) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and evaluate one batch; return it with its rollout metrics and timings."""
    started = time.perf_counter()
    with models.autocast(), merged_adapter(models.policy):
        samples = sample(models.policy, models.tokenizer, prompts, 1, cfg.generation, seed=seed,
                         desc="ppo: sampling", with_logprobs=True)
    generated = time.perf_counter()

    ended = torch.tensor(samples.ended, dtype=torch.bool, device=device)  # (B,)
    raw_scores = models.scorer(prompts, samples.texts).to(device)  # (B,), float32
    scores = models.scale.apply(raw_scores)  # (B,)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores + cfg.missing_eos_penalty)
    scored = time.perf_counter()

    # gradient checkpointing drops a layer's KV cache, so the shared prefix cannot be run once then
    sequences = to_sequences(samples, models.tokenizer.pad_token_id, device,
                             share_prefix=not cfg.gradient_checkpointing)
    forward = rollout_forward(models, sequences, samples, cfg.mini_batch_size, cfg.generation.temperature)
    rollout, metrics = assemble_rollout(sequences, scores, forward, cfg, kl_coef)
    finished = time.perf_counter()

    metrics |= {
        "ppo/score_mean": float(raw_scores.mean()),  # the scorer's own units, before standardisation
        "ppo/eos_fraction": float(ended.float().mean()),
        "time/generation": generated - started,
        "time/scoring": scored - generated,
        "time/forward": finished - scored,
    }
    return rollout, metrics


@contextmanager
def merged_adapter(model: Module) -> Iterator[None]:
    """The LoRA adapter merged into its base weights for the duration, then the exact base weights back.

    Each adapted layer then runs one matmul per token instead of three (sampling ~15 % faster on
    CPU). ``unmerge`` alone would leave the base weights off by rounding (W + BA - BA), so they are
    restored from a copy. A no-op for a model without adapters.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield
        return
    bases = [layer.get_base_layer().weight for layer in model.modules() if isinstance(layer, LoraLayer)]
    saved = [weight.detach().clone() for weight in bases]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for weight, original in zip(bases, saved, strict=True):
                weight.copy_(original)


def to_sequences(samples: Samples, pad_id: int, device: torch.device, share_prefix: bool = True) -> Sequences:
    """Token batches of the samples, the prompts' common prefix split off (see :class:`Sequences`)."""
    prefix_length = shared_prefix_length(samples.prompt_ids) if share_prefix else 0
    prefix = torch.tensor(samples.prompt_ids[0][:prefix_length], dtype=torch.long, device=device)  # (C,)
    return Sequences(prefix, *pad_rows([ids[prefix_length:] for ids in samples.prompt_ids], pad_id, device, "left"),
                     *pad_rows(samples.response_ids, pad_id, device, "right"))


def assemble_rollout(sequences: Sequences, scores: Tensor, forward: RolloutForward, cfg: PPOConfig,
                     kl_coef: float) -> tuple[Rollout, dict[str, float]]:
    """Per-token rewards, GAE and whitening (all from :mod:`stages.losses`), and the batch's metrics."""
    mask = sequences.response_mask  # (B, R)
    whitenable = int(mask.sum()) >= 2  # the unbiased variance needs two tokens
    token_rewards = compute_rewards(scores, forward.logprobs, forward.ref_logprobs, mask, kl_coef,
                                    cfg.kl_estimator)
    rewards = token_rewards.rewards  # (B, R)
    if cfg.whiten_rewards and whitenable:
        rewards = masked_whiten(rewards, mask, shift_mean=False)  # scale only [Huang 2024]
    advantages, returns = gae(rewards, forward.values, mask, cfg.gamma, cfg.lam)  # (B, R) each
    if whitenable:
        advantages = masked_whiten(advantages, mask)
    sequence_kl = masked_sum(kl_penalty(forward.logprobs, forward.ref_logprobs, "k1"), mask, dim=-1)  # (B,)
    metrics = {
        "ppo/normalized_score_mean": scores.mean(),  # the scores PPO optimises (collect_rollout adds the raw mean)
        # What PPO maximises: score - beta * KL, with the configured estimator, before any whitening.
        "ppo/rlhf_reward_mean": masked_sum(token_rewards.rewards, mask, dim=-1).mean(),
        "ppo/kl": sequence_kl.mean(),
        "ppo/entropy": masked_mean(forward.entropy, mask),
        "ppo/explained_variance": explained_variance(forward.values, returns, mask),
        "ppo/response_length": mask.sum(-1).float().mean(),
        "ppo/kl_coef": kl_coef,
    }
    rollout = Rollout(sequences, scores, forward.logprobs, forward.ref_logprobs, forward.values, advantages,
                      returns)
    return rollout, {name: float(value) for name, value in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------
def optimise(rollout: Rollout, models: Models, optimisers: Optimisers, cfg: PPOConfig, *,
             seed: int) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes over the rollout in mini-batches; the mean of each loss statistic."""
    generator = torch.Generator().manual_seed(seed)
    device = rollout.scores.device
    collected: dict[str, list[float]] = defaultdict(list)
    first: dict[str, float] = {}
    if cfg.gradient_checkpointing:  # transformers checkpoints only in training mode
        for model in (models.policy, models.critic.model):
            _train_without_dropout(model)
    try:
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout.scores), generator=generator).to(device)
            for index in order.split(cfg.mini_batch_size):
                step = minibatch_step(rollout.select(index), models, optimisers, cfg)
                first = first or step
                for name, value in step.items():
                    collected[name].append(value)
    finally:
        models.policy.eval()
        models.critic.model.eval()
    # the first step starts from ratio 1, so its approx-KL shows how far sampling and training disagree
    return {name: statistics.fmean(values) for name, values in collected.items()} | {
        "ppo/approx_kl_first": first["ppo/approx_kl"]}


def _train_without_dropout(model: Module) -> None:
    """Training mode (for gradient checkpointing) with every dropout off, as PPO trains (Huang et al. 2024)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()


def minibatch_step(batch: Rollout, models: Models, optimisers: Optimisers, cfg: PPOConfig) -> dict[str, float]:
    """One gradient step on the clipped policy and value losses: one forward of policy and critic.

    Under ``accelerate launch`` each of the W processes takes rows ``rank::W`` of the mini-batch and
    weights its token means by its share of the mini-batch's tokens; the summed gradients (see
    :meth:`Optimisers.step`) are then those of the whole mini-batch, as in a single process.
    """
    rank, world = process_group()
    share = 1.0
    if world > 1:
        rows = torch.arange(rank, len(batch.scores), world, device=batch.scores.device)
        tokens = batch.sequences.response_mask.sum()
        batch = batch.select(rows)
        share = batch.sequences.response_mask.sum() / tokens.clamp(min=1)
    sequences, mask = batch.sequences, batch.sequences.response_mask
    with models.autocast():  # forward only; backward follows the dtypes autocast chose
        logits = response_logits(models.policy, sequences)  # (b, r, V)
        values = response_values(models.critic, sequences)  # (b, r)
    logprobs = gather_log_probs(logits, sequences.response_ids, cfg.generation.temperature)  # (b, r), float32
    policy_out = policy_loss(logprobs, batch.logprobs, batch.advantages, mask, cfg.clip_range)
    value_out = value_loss(values, batch.values, batch.returns, mask, cfg.clip_range_value)
    optimisers.step((policy_out.loss + value_out.loss) * share, cfg.max_grad_norm)
    statistics = {
        "ppo/policy_loss": policy_out.loss.detach(),
        "ppo/value_loss": value_out.loss.detach(),
        "ppo/clip_fraction": policy_out.clip_fraction,
        "ppo/approx_kl": policy_out.approx_kl,
        "ppo/value_clip_fraction": value_out.clip_fraction,
    }
    values = torch.stack([value.float() for value in statistics.values()]) * share
    if world > 1:  # token-weighted means over the whole mini-batch
        torch.distributed.all_reduce(values)
    return dict(zip(statistics, values.tolist(), strict=True))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "update-"


def save_checkpoint(directory: Path, models: Models, optimisers: Optimisers, controller: KLController,
                    progress: Progress) -> Path:
    """Write ``update-NNNNNN/`` atomically (temporary directory + rename), then drop older checkpoints."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    save_file(_to_cpu(_trainable(models.policy)), staging / "policy.safetensors")
    save_file(_to_cpu(_trainable(models.critic.model)), staging / "critic.safetensors")
    if models.reference.ema:
        save_file(_to_cpu(models.reference.ema), staging / "reference_ema.safetensors")
    torch.save({"policy": optimisers.policy.state_dict(), "critic": optimisers.critic.state_dict()},
               staging / "optimisers.pt")
    state = {"updates_done": progress.updates_done, "prompt_cursor": progress.prompt_cursor,
             "kl_coef": controller.value, "history": progress.history,
             "score_scale": asdict(progress.scale) if progress.scale else None}
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    target = directory / f"{CHECKPOINT_PREFIX}{progress.updates_done:06d}"
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    for old in directory.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(directory: Path, models: Models, optimisers: Optimisers, controller: KLController,
                    device: torch.device) -> Progress:
    """Restore the newest checkpoint under ``directory`` into the models and optimisers, if there is one."""
    from safetensors.torch import load_file

    for leftover in directory.glob(".tmp-*"):  # only a crash in the middle of a save leaves one
        shutil.rmtree(leftover, ignore_errors=True)
    found = sorted(directory.glob(f"{CHECKPOINT_PREFIX}*"))
    if not found:
        return Progress()
    latest = found[-1]
    _copy_into(_trainable(models.policy), load_file(latest / "policy.safetensors"), latest / "policy.safetensors")
    _copy_into(_trainable(models.critic.model), load_file(latest / "critic.safetensors"),
               latest / "critic.safetensors")
    if models.reference.ema:
        _copy_into(models.reference.ema, load_file(latest / "reference_ema.safetensors"),
                   latest / "reference_ema.safetensors")
    states = torch.load(latest / "optimisers.pt", map_location=device, weights_only=True)
    optimisers.policy.load_state_dict(states["policy"])
    optimisers.critic.load_state_dict(states["critic"])
    state = json.loads((latest / "state.json").read_text())
    controller.value = float(state["kl_coef"])
    scale = state.get("score_scale")
    return Progress(int(state["updates_done"]), int(state["prompt_cursor"]), list(state["history"]),
                    ScoreScale(**scale) if scale else None)


def _to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def _copy_into(weights: dict[str, Tensor], saved: dict[str, Tensor], source: Path) -> None:
    if set(weights) != set(saved):
        missing, unexpected = sorted(set(weights) - set(saved)), sorted(set(saved) - set(weights))
        raise ValueError(
            f"{source}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); it was written by a different setup: delete {source.parent.parent} to start over"
        )
    with torch.no_grad():
        for name, weight in weights.items():
            weight.copy_(saved[name])
