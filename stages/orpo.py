"""The ``orpo`` stage: ORPO (Hong et al. 2024) from the SFT policy, with TRL's ORPOTrainer.

ORPO adds to the SFT loss on the chosen response ``beta`` (the paper's lambda) times
``-log sigmoid(log odds(chosen) - log odds(rejected))``, with ``odds(y) = p(y) / (1 - p(y))`` of the
length-normalised likelihood. No reference policy, so only one model is held. The trained adapter is
merged into a full policy and saved.
"""

from __future__ import annotations

from stages.runner import StageContext, StageOutput
from stages.training import train_on_pairs


def run(ctx: StageContext) -> StageOutput:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return train_on_pairs(ctx, "orpo", ORPOConfig, ORPOTrainer, beta=ctx.config.orpo.beta)
