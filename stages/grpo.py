"""The ``grpo`` stage: Group Relative Policy Optimisation (Shao et al. 2024) from the SFT policy, with TRL.

For each prompt ``G = num_generations`` completions are sampled (plain transformers ``generate``);
each completion's advantage is its reward minus the group's mean, divided by the group's standard
deviation, so no value model is needed. ``beta`` weighs a per-token KL to the SFT reference in the
loss (k3 estimator; with LoRA the reference is the model with the adapter disabled). TRL 1.16's
defaults are kept otherwise: ``loss_type="dapo"`` (token losses averaged over all tokens of the batch,
which removes the original GRPO loss's length bias) and one optimisation pass per generation round.
The reward is the reward stage's model or the task's gold judge (``grpo.reward_source``).
"""

from __future__ import annotations

from stages.runner import StageContext, StageOutput
from stages.training import train_online


def run(ctx: StageContext) -> StageOutput:
    from trl import GRPOConfig, GRPOTrainer

    return train_online(ctx, "grpo", GRPOConfig, GRPOTrainer)
