"""The ``reward`` and ``judge`` stages: a Bradley-Terry reward model on the SFT backbone, with TRL's RewardTrainer.

The model is the SFT policy with a scalar head (``AutoModelForSequenceClassification``, one label);
with LoRA the head is trained in full and the adapter merged afterwards. Held-out pair accuracy is
measured on the eval pairs after training, by scoring each chosen and rejected conversation.

Both stages run this module with the reward section's recipe. ``reward`` trains on the train split of
the pairs, which the policies train on too (PPO against this model); ``judge`` trains on the judge split
(``data.judge_fraction``), which no policy and no training reward model sees, so it can grade them all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.generation import pair_accuracy
from stages.label import split_pairs
from stages.models import load_reward_model, load_tokenizer, peft_config, save_model
from stages.records import read_jsonl
from stages.runner import StageContext, StageOutput
from stages.training import rows_dataset, throughput_metrics, train_resuming, trainer_args

SPLITS = {"reward": "train", "judge": "judge"}  # stage -> the split of the pairs it trains on


def reward_pairs(ctx: StageContext, split: str) -> tuple[list[dict], Path]:
    """The pairs of one split and the file they come from: label's own pairs, or with ``reward.pairing``
    (label's samples only) the same scored samples paired that way."""
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]
    pairing = ctx.config.reward.pairing
    if pairing is not None and "label" in ctx.inputs:
        source = pairs.path / "samples.jsonl"
        return split_pairs(read_jsonl(source), split, ctx.config.label.min_gap, pairing), source
    source = pairs.path / f"{split}.jsonl"
    return (read_jsonl(source) if source.is_file() else []), source


def head_optimizer(model, cfg) -> torch.optim.Optimizer | None:
    """AdamW with the scalar head (``score``) at ``reward.head_learning_rate`` and the rest at
    ``learning_rate``; None (the Trainer's own optimizer) when no head rate is set. The Trainer's
    schedule scales both groups alike."""
    if cfg.head_learning_rate is None:
        return None
    head, body = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if ".score." in f".{name}." or name.startswith("score.") else body).append(parameter)
    if not head:
        raise ValueError("reward.head_learning_rate: the model has no trainable `score` head")
    return torch.optim.AdamW([{"params": body, "lr": cfg.learning_rate},
                              {"params": head, "lr": cfg.head_learning_rate}], weight_decay=0.0)


def run(ctx: StageContext) -> StageOutput:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.config.reward

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_reward_model(sft_dir, ctx.config.model, ctx.device)

    # Dataset
    train_rows, train_file = reward_pairs(ctx, SPLITS[ctx.name])
    eval_rows, _ = reward_pairs(ctx, "eval")
    if not train_rows:
        raise ValueError(f"{ctx.name}: no {SPLITS[ctx.name]} pairs in {train_file}; the held-out judge trains on the "
                         "judge split (data.judge_fraction of the pairs): raise data.judge_fraction or add data")
    if not eval_rows:
        raise ValueError(f"{ctx.name}: no eval pairs beside {train_file} to measure held-out accuracy on")
    train = rows_dataset(train_rows)

    # Training
    args = RewardConfig(**trainer_args(cfg, ctx, eval_strategy="steps",
                                       eval_steps=max(cfg.logging_steps * 4, 1)))
    class Trainer(RewardTrainer):
        def create_optimizer(self, model=None):
            """The head at its own rate; called after FSDP has wrapped the model when it delays the optimizer."""
            if self.optimizer is None:
                self.optimizer = head_optimizer(self.model if model is None else model, cfg)
            return super().create_optimizer(model)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=rows_dataset(eval_rows),
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
