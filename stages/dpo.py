"""The ``dpo`` stage: Direct Preference Optimisation from the SFT policy, with TRL's DPOTrainer.

The reference policy is the SFT model. With ``dpo.shared_reference`` (the default) its log-probs of
the pairs come precomputed from the ``dpo_reference`` stage (shared by every DPO run on the same SFT
model and pairs), so training runs no reference forward pass and holds no reference model: TRL's
``precompute_ref_log_probs`` path, fed the stored columns instead of computing them again. Without
it, TRL runs the reference in every step (the SFT weights with the LoRA adapter disabled, or a frozen
copy without LoRA). The trained adapter is merged into a full policy,
saved, logged to MLflow and registered.
"""

from __future__ import annotations

from stages.dpo_reference import load_reference
from stages.models import load_causal_lm, load_tokenizer, peft_config, save_model
from stages.runner import StageContext, StageOutput
from stages.training import (
    final_evaluation,
    pair_dataset,
    throughput_metrics,
    train_resuming,
    trainer_args,
)


def _shared_reference_trainer(reference_dir):
    from trl import DPOTrainer

    class SharedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs are read from the dpo_reference stage."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            for column, values in load_reference(reference_dir, name, len(dataset)).items():
                dataset = dataset.add_column(column, values)
            return dataset

    return SharedReferenceDPOTrainer


def run(ctx: StageContext) -> StageOutput:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.config.dpo
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    lora = peft_config(ctx.config.model.lora, "CAUSAL_LM")
    shared = "dpo_reference" in ctx.inputs  # dpo.shared_reference: the log-probs come precomputed
    if shared:
        trainer_class, reference = _shared_reference_trainer(ctx.inputs["dpo_reference"].path), None
    else:  # a reference forward pass in every step: the adapter disabled (LoRA) or a frozen copy
        trainer_class = DPOTrainer
        reference = None if lora else load_causal_lm(sft_dir, ctx.config.model, ctx.device)

    # Training
    args = DPOConfig(**trainer_args(
        cfg, ctx,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        eval_strategy="steps",
        eval_steps=max(cfg.logging_steps * 4, 1),
        precompute_ref_log_probs=shared,
    ))
    trainer = trainer_class(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=pair_dataset(pairs.path / "train.jsonl"),
        eval_dataset=pair_dataset(pairs.path / "eval.jsonl"),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=ctx.callbacks(),
    )
    train_output, resumed, change = train_resuming(trainer, ctx)
    ds = trainer.train_dataset
    tokens = int((sum(map(len, ds["prompt_ids"])) * 2 + sum(map(len, ds["chosen_ids"]))
                  + sum(map(len, ds["rejected_ids"]))) * cfg.epochs)
    metrics = {
        **throughput_metrics(train_output, tokens, trainer.model, resumed),
        "weight_change": change,
        "train_pairs": float(len(ds)),
        **final_evaluation(trainer),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})
