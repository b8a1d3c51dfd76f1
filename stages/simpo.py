"""The ``simpo`` stage: SimPO (Meng et al. 2024) from the SFT policy, with TRL's CPOTrainer.

SimPO's implicit reward is the length-normalised log-likelihood ``beta / |y| * log pi(y | x)``, and
its loss is ``-log sigmoid(r_chosen - r_rejected - gamma)``: no reference policy, so only one model
is held. TRL implements it as CPO with ``loss_type="simpo"``; ``cpo_alpha=0`` drops CPO's behaviour-
cloning term, which leaves pure SimPO. The trained adapter is merged into a full policy and saved.
"""

from __future__ import annotations

from stages.models import load_causal_lm, load_tokenizer, peft_config, save_model
from stages.reward import pair_dataset
from stages.runner import StageContext, StageOutput
from stages.training import (
    final_evaluation,
    pair_tokens,
    snapshot_trainable,
    throughput_metrics,
    train_resuming,
    trainer_args,
    weight_change,
)


def run(ctx: StageContext) -> StageOutput:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = ctx.config.simpo
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)

    # Training
    args = CPOConfig(**trainer_args(
        cfg, ctx,
        loss_type="simpo",
        cpo_alpha=0.0,  # no behaviour-cloning (NLL) term: pure SimPO
        beta=cfg.beta,
        simpo_gamma=cfg.simpo_gamma,
        eval_strategy="steps",
        eval_steps=max(cfg.logging_steps * 4, 1),
    ))
    trainer = CPOTrainer(
        model=model,
        args=args,
        train_dataset=pair_dataset(pairs.path / "train.jsonl"),
        eval_dataset=pair_dataset(pairs.path / "eval.jsonl"),
        processing_class=tokenizer,
        peft_config=peft_config(ctx.config.model.lora, "CAUSAL_LM"),
        callbacks=ctx.callbacks(),
    )
    before = snapshot_trainable(trainer.model)
    train_output, resumed = train_resuming(trainer, ctx)
    metrics = {
        **throughput_metrics(train_output, pair_tokens(trainer), trainer.model, resumed),
        "weight_change": weight_change(trainer.model, before),
        "train_pairs": float(len(trainer.train_dataset)),
        **final_evaluation(trainer),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})

