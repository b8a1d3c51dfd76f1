"""The ``simpo`` stage: SimPO (Meng et al. 2024) from the SFT policy, with TRL's CPOTrainer.

SimPO's implicit reward is the length-normalised log-likelihood ``beta / |y| * log pi(y | x)``, and
its loss is ``-log sigmoid(r_chosen - r_rejected - gamma)``: no reference policy, so only one model
is held. TRL implements it as CPO with ``loss_type="simpo"``; ``cpo_alpha=0`` drops CPO's behaviour-
cloning term, which leaves pure SimPO. The trained adapter is merged into a full policy and saved.
"""

from __future__ import annotations

from stages.runner import StageContext, StageOutput
from stages.training import train_on_pairs


def run(ctx: StageContext) -> StageOutput:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = ctx.config.simpo
    return train_on_pairs(
        ctx, "simpo", CPOConfig, CPOTrainer,
        loss_type="simpo",
        cpo_alpha=0.0,  # no behaviour-cloning (NLL) term: pure SimPO
        beta=cfg.beta,
        simpo_gamma=cfg.simpo_gamma,
    )
