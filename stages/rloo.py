"""The ``rloo`` stage: REINFORCE Leave-One-Out (Ahmadian et al. 2024) from the SFT policy, with TRL.

For each prompt ``k = num_generations`` completions are sampled (plain transformers ``generate``);
each completion's advantage is its reward minus the mean reward of the other ``k - 1``, so no value
model is needed. TRL 1.16 subtracts ``beta`` times the sequence KL to the SFT reference (the k1
log-ratio summed over tokens) from the reward; with LoRA the reference is the model with the adapter
disabled. The reward is the reward stage's model or the task's gold judge (``rloo.reward_source``).
The merged policy is saved.
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
    from trl import RLOOConfig, RLOOTrainer

    cfg = ctx.config.rloo

    # Reward (first: a gold reward without a gold judge fails before any policy loads)
    reward_funcs, reward_tokenizers = online_rewards(ctx, "rloo")

    # Model, tokenizer & prompts
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="left")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    prompts, dropped = prompt_dataset(ctx.inputs["prepare"].path / "train.jsonl", cfg, tokenizer, "rloo")

    # Training
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=RLOOConfig(**online_trainer_args(cfg, ctx)),
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
