"""The ``reward`` and ``judge`` stages: a Bradley-Terry reward model on the SFT backbone, with TRL's RewardTrainer.

The model is the SFT policy with a scalar head (``AutoModelForSequenceClassification``, one label);
with LoRA the head is trained in full and the adapter merged afterwards. Held-out pair accuracy is
measured on the eval pairs after training, by scoring each chosen and rejected conversation.

Both stages run this module with the reward section's recipe. ``reward`` trains on the train split of
the pairs, which the policies train on too (PPO against this model); ``judge`` trains on the judge split
(``data.judge_fraction``), which no policy and no training reward model sees, so it can grade them all.
"""

from __future__ import annotations

from stages.generation import pair_accuracy
from stages.models import load_reward_model, load_tokenizer, peft_config, save_model
from stages.records import read_jsonl
from stages.runner import StageContext, StageOutput
from stages.training import pair_dataset, throughput_metrics, train_resuming, trainer_args

TRAIN_FILES = {"reward": "train.jsonl", "judge": "judge.jsonl"}  # stage -> the split of the pairs it trains on


def run(ctx: StageContext) -> StageOutput:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.config.reward
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_reward_model(sft_dir, ctx.config.model, ctx.device)

    # Dataset
    train_file = pairs.path / TRAIN_FILES[ctx.name]
    if not train_file.is_file() or not read_jsonl(train_file):
        raise ValueError(f"{ctx.name}: no pairs in {train_file}; the held-out judge trains on the judge split "
                         "(data.judge_fraction of the pairs): raise data.judge_fraction or add data")
    train = pair_dataset(train_file)
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
