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

from stages.models import load_causal_lm, load_tokenizer, peft_config, save_model
from stages.runner import StageContext, StageOutput
from stages.training import (
    online_metrics,
    online_rewards,
    online_trainer_args,
    prompt_dataset,
    snapshot_trainable,
    train_resuming,
    weight_change,
)


def run(ctx: StageContext) -> StageOutput:
    from trl import GRPOConfig, GRPOTrainer

    cfg = ctx.config.grpo

    # Reward (first: a gold reward without a gold judge fails before any policy loads)
    reward_funcs, reward_tokenizers = online_rewards(ctx, "grpo")

    # Model, tokenizer & prompts
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="left")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    prompts, dropped = prompt_dataset(ctx.inputs["prepare"].path / "train.jsonl", cfg, tokenizer, "grpo")

    # Training
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=GRPOConfig(**online_trainer_args(cfg, ctx)),
        train_dataset=prompts,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=peft_config(ctx.config.model.lora, "CAUSAL_LM"),
        callbacks=ctx.callbacks(),
    )
    before = snapshot_trainable(trainer.model)
    train_output, resumed = train_resuming(trainer, ctx)
    metrics = {
        **online_metrics(trainer, train_output, len(prompts), dropped, resumed),
        "weight_change": weight_change(trainer.model, before),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})
