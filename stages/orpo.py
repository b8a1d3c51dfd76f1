"""The ``orpo`` stage: ORPO (Hong et al. 2024) from the SFT policy, with TRL's ORPOTrainer.

ORPO adds to the SFT loss on the chosen response ``beta`` (the paper's lambda) times
``-log sigmoid(log odds(chosen) - log odds(rejected))``, with ``odds(y) = p(y) / (1 - p(y))`` of the
length-normalised likelihood. No reference policy, so only one model is held. The trained adapter is
merged into a full policy and saved.
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
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = ctx.config.orpo
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)

    # Training
    args = ORPOConfig(**trainer_args(
        cfg, ctx,
        beta=cfg.beta,
        eval_strategy="steps",
        eval_steps=max(cfg.logging_steps * 4, 1),
    ))
    trainer = ORPOTrainer(
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
