"""The ``sft`` stage: supervised fine-tuning of the base model with TRL's SFTTrainer.

Data (``sft.source``):
- ``self_samples``: the base model's own completions of the training prompts (the embedded task:
  the SFT policy then matches the distribution that labelling samples from, as in the DPO paper);
- ``chosen``: the chosen responses of the prepared preference data;
- ``dataset``: an SFT dataset (``prompt``/``completion`` or ``messages``) named by ``sft.dataset``.
With LoRA the adapter is merged after training, so the output is a full model that later stages
load as their starting point and reference.

The prompts and pairs come from ``data.source`` (stage ``prepare``), or from ``data.sft_source``
(stage ``prepare_sft``) when that is set: SFT's cache key then does not change when new preference
data arrives, and ``alignflow retrain`` trains SFT once.
"""

from __future__ import annotations

from stages.config import DataConfig
from stages.generation import sample
from stages.models import load_causal_lm, load_tokenizer, peft_config, save_model
from stages.records import read_jsonl, write_jsonl
from stages.runner import StageContext, StageOutput
from stages.training import throughput_metrics, train_resuming, trainer_args


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
def _prepared_train(ctx: StageContext) -> list[dict]:
    """The prepared training rows SFT reads: data.sft_source's (stage prepare_sft) when set, else data.source's."""
    prepared = ctx.inputs["prepare_sft"] if "prepare_sft" in ctx.inputs else ctx.inputs["prepare"]
    return read_jsonl(prepared.path / "train.jsonl")


def _self_samples(ctx: StageContext, model, tokenizer) -> list[dict]:
    sft = ctx.config.sft
    prompts = [row["prompt"] for row in _prepared_train(ctx)]
    prompts = prompts[: sft.max_prompts]
    samples = sample(model, tokenizer, prompts, sft.samples_per_prompt, sft.generation,
                     seed=ctx.config.run.seed, desc="sft: sampling base completions")
    ctx.log_metrics({"sample_tokens_per_second": samples.tokens_per_second})
    return [
        {"prompt": prompts[i], "completion": [{"role": "assistant", "content": text}]}
        for i, text, ended in zip(samples.prompt_index, samples.texts, samples.ended, strict=True)
        if text and (ended or not sft.require_eos)  # cut responses would teach it not to stop
    ]


def _chosen(ctx: StageContext, _model, _tokenizer) -> list[dict]:
    rows = _prepared_train(ctx)
    if rows and "chosen" not in rows[0]:
        source = "data.sft_source" if "prepare_sft" in ctx.inputs else "data.source"
        raise ValueError(f"sft.source 'chosen' needs preference data; {source} holds {_kind(rows[0])} rows")
    return [{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows]


def _dataset(ctx: StageContext, _model, _tokenizer) -> list[dict]:
    from stages.prepare import prepare_data

    data = DataConfig(source=ctx.config.sft.dataset, task="preference", eval_fraction=0.01)
    summary = prepare_data(data, ctx.out_dir / "sft_data", seed=ctx.config.run.seed, root=ctx.root)
    if summary.kind != "sft":
        raise ValueError(f"sft.dataset {ctx.config.sft.dataset!r} holds {summary.kind} rows, not SFT rows")
    return read_jsonl(ctx.out_dir / "sft_data" / "train.jsonl")


def _kind(row: dict) -> str:
    return "SFT" if "completion" in row else "prompt-only"


SOURCES = {"self_samples": _self_samples, "chosen": _chosen, "dataset": _dataset}


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def run(ctx: StageContext) -> StageOutput:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, base_path = ctx.config.sft, ctx.inputs["base"].info["path"]

    # Model & tokenizer
    tokenizer = load_tokenizer(base_path, ctx.config.model)
    model = load_causal_lm(base_path, ctx.config.model, ctx.device)

    # Dataset
    kept = ctx.checkpoint_dir / "sft_train.jsonl"  # a resumed run trains on the rows it started with
    if kept.is_file():
        rows = read_jsonl(kept)
    else:
        rows = SOURCES[cfg.source](ctx, model, tokenizer)
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        if not rows:
            raise ValueError(f"sft: source {cfg.source!r} gave no training rows")
        if cfg.save_steps:
            write_jsonl(kept, rows)
    write_jsonl(ctx.out_dir / "sft_train.jsonl", rows)
    tokenizer.padding_side = "right"

    # Training
    args = SFTConfig(**trainer_args(cfg, ctx, completion_only_loss=True))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config(ctx.config.model.lora, "CAUSAL_LM"),
        callbacks=ctx.callbacks(),
    )
    train_output, resumed, change = train_resuming(trainer, ctx)
    tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * cfg.epochs)
    metrics = {
        **throughput_metrics(train_output, tokens, trainer.model, resumed),
        "weight_change": change,
        "train_rows": float(len(rows)),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model"})
