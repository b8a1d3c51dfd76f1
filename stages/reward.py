"""The ``reward`` stage: a Bradley-Terry reward model on the SFT backbone, with TRL's RewardTrainer.

The model is the SFT policy with a scalar head (``AutoModelForSequenceClassification``, one label);
with LoRA the head is trained in full and the adapter merged afterwards. Held-out pair accuracy is
measured on the eval pairs after training, by scoring each chosen and rejected conversation.
"""

from __future__ import annotations

import statistics

from stages.generation import reward_scores
from stages.models import load_reward_model, load_tokenizer, peft_config, save_model
from stages.records import read_jsonl
from stages.runner import StageContext, StageOutput
from stages.training import throughput_metrics, train_resuming, trainer_args

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def pair_dataset(path):
    from datasets import Dataset

    return Dataset.from_list([{c: row[c] for c in PAIR_COLUMNS} for row in read_jsonl(path)])


def pair_accuracy(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Share of pairs whose chosen conversation outscores the rejected one, and the mean margin."""
    chosen = reward_scores(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows])
    rejected = reward_scores(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows])
    margins = (chosen - rejected).tolist()
    return {
        "eval_pair_accuracy": statistics.fmean(m > 0 for m in margins),
        "eval_reward_margin": statistics.fmean(margins),
    }


def run(ctx: StageContext) -> StageOutput:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.config.reward
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_reward_model(sft_dir, ctx.config.model, ctx.device)

    # Dataset
    train = pair_dataset(pairs.path / "train.jsonl")
    eval_rows = read_jsonl(pairs.path / "eval.jsonl")

    # Training
    args = RewardConfig(**trainer_args(cfg, ctx, eval_strategy="steps",
                                       eval_steps=max(cfg.logging_steps * 4, 1)))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=pair_dataset(pairs.path / "eval.jsonl"),
        processing_class=tokenizer,
        peft_config=peft_config(ctx.config.model.lora, "SEQ_CLS"),
        callbacks=ctx.callbacks(),
    )
    train_output, resumed, change = train_resuming(trainer, ctx)
    ds = trainer.train_dataset
    tokens = int((sum(map(len, ds["chosen_ids"])) + sum(map(len, ds["rejected_ids"]))) * cfg.epochs)
    metrics = {
        **throughput_metrics(train_output, tokens, trainer.model, resumed),
        "weight_change": change,
        "train_pairs": float(len(train)),
        "dropped_too_long": float(len(train) - len(ds)),
    }

    # Save & held-out accuracy
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    if not ctx.is_main:  # rank 0 measures and reports; the other processes' output is discarded
        return StageOutput(metrics=metrics, info={"model": "model"})
    final = load_reward_model(str(ctx.out_dir / "model"), ctx.config.model, ctx.device)
    tokenizer.padding_side = "left"
    metrics.update(pair_accuracy(final, tokenizer, eval_rows))
    return StageOutput(metrics=metrics, info={"model": "model"})
