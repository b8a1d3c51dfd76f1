"""The ``rloo`` stage: REINFORCE Leave-One-Out (Ahmadian et al. 2024) from the SFT policy, with TRL.

For each prompt ``k = num_generations`` completions are sampled (plain transformers ``generate``);
each completion's advantage is its reward minus the mean reward of the other ``k - 1``, so no value
model is needed. TRL 1.16 subtracts ``beta`` times the sequence KL to the SFT reference (the k1
log-ratio summed over tokens) from the reward; with LoRA the reference is the model with the adapter
disabled. The reward is the reward stage's model or the task's gold judge (``rloo.reward_source``).
The merged policy is saved.
"""

from __future__ import annotations

from stages.runner import StageContext, StageOutput
from stages.training import train_online


def run(ctx: StageContext) -> StageOutput:
    from trl import RLOOConfig, RLOOTrainer

    return train_online(ctx, "rloo", RLOOConfig, RLOOTrainer)
