"""What the TRL-based training stages share: trainer arguments, throughput and weight-change figures,
and for the online RL stages (rloo, grpo) their prompts, reward functions and last logged figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stages.config import OnlineRLConfig, TrainConfig
from stages.judges import GOLD_JUDGES, CountingJudge, gold_judge
from stages.models import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    peft_config,
    resolve_precision,
    save_model,
)
from stages.records import read_jsonl
from stages.runner import StageContext, StageOutput

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def pair_dataset(path: Path):
    """The prompt/chosen/rejected columns of a pairs file (label or prepare output) as a datasets.Dataset."""
    return rows_dataset(read_jsonl(path))


def rows_dataset(rows: list[dict]):
    """The prompt/chosen/rejected columns of preference rows as a datasets.Dataset."""
    from datasets import Dataset

    return Dataset.from_list([{c: row[c] for c in PAIR_COLUMNS} for row in rows])


def training_seed(run, section) -> int:
    """The seed of a training run: the section's own ``seed`` (``compare.seeds`` sets it per run), else run.seed.

    Only the training draws change with it (initialisation, data order, a policy's own samples); the
    data splits, the SFT model and the held-out evaluation samples stay those of ``run.seed``.
    """
    own = getattr(section, "seed", None)
    return run.seed if own is None else own


def trainer_args(train: TrainConfig, ctx: StageContext, **extra: Any) -> dict[str, Any]:
    """Keyword arguments common to TRL's *Config classes (all subclass transformers' TrainingArguments)."""
    precision = resolve_precision(ctx.config.run, ctx.device)
    return {
        "output_dir": str(ctx.checkpoint_dir),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        # batch_size is global: under `accelerate launch` each of the processes takes its share
        "per_device_train_batch_size": train.batch_size // ctx.num_processes,
        "per_device_eval_batch_size": train.batch_size // ctx.num_processes,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "warmup_steps": train.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        "max_length": train.max_length,
        "logging_steps": train.logging_steps,
        "gradient_checkpointing": train.gradient_checkpointing,  # TRL turns it on by default
        "save_strategy": "steps" if train.save_steps else "no",
        "save_steps": train.save_steps or 500,
        "save_total_limit": 1,
        "report_to": "none",
        "seed": training_seed(ctx.config.run, train),
        "use_cpu": ctx.device.type == "cpu",
        "bf16": ctx.config.model.dtype == "bfloat16" or precision == "bf16",
        "fp16": ctx.config.model.dtype == "float16" or precision == "fp16",
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **extra,
    }


def train_resuming(trainer, ctx: StageContext):
    """``trainer.train()``, resumed from the newest complete checkpoint in ``ctx.checkpoint_dir``.

    A checkpoint is complete when its ``trainer_state.json`` is there: the Trainer writes it last, so a
    process killed in the middle of a save leaves a checkpoint without it, which is removed here.
    Returns the Trainer's output, the step it resumed from (0: from the start) and the weight change
    (L2 norm of the trainable weights' change over the whole run, resumed steps included: the snapshot is
    the trainer's initial weights, taken before any checkpoint is loaded).
    """
    before = snapshot_trainable(trainer.model)
    last = last_checkpoint(ctx.checkpoint_dir)
    step = json.loads((last / "trainer_state.json").read_text())["global_step"] if last else 0
    if last:
        print(f"[alignflow] {ctx.name}: resuming from step {step} ({last})")
    output = trainer.train(resume_from_checkpoint=str(last) if last else None)
    return output, step, weight_change(trainer.model, before)


def last_checkpoint(directory: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``directory`` with its ``trainer_state.json``; incomplete ones are removed."""
    complete: list[tuple[int, Path]] = []
    for path in directory.glob("checkpoint-*") if directory.is_dir() else ():
        if not path.name.removeprefix("checkpoint-").isdigit():
            continue
        if (path / "trainer_state.json").is_file():
            complete.append((int(path.name.removeprefix("checkpoint-")), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return max(complete)[1] if complete else None


def snapshot_trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def weight_change(model, before: dict[str, torch.Tensor]) -> float:
    """L2 norm of the change of the trainable weights during training (0.0 means nothing learned)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name in before:
            total += float((p.detach().float() - before[name].float()).pow(2).sum())
    return total**0.5


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def throughput_metrics(train_output, tokens_seen: int, model, resumed_step: int = 0) -> dict[str, float]:
    """tokens/s of training and the model FLOPs it implies (6 N per token, Kaplan et al. 2020).

    ``tokens_seen`` counts the whole run; after a resume from ``resumed_step`` only the steps this
    process ran count towards the rate.
    """
    seconds = float(train_output.metrics.get("train_runtime", 0.0)) or 1e-9
    done = 1.0 - resumed_step / max(train_output.global_step, 1)
    tokens_per_second = tokens_seen * done / seconds
    return {
        "resumed_from_step": float(resumed_step),
        "train_steps": float(train_output.global_step),
        "train_runtime": seconds,
        "train_tokens": float(tokens_seen),
        "train_tokens_per_second": tokens_per_second,
        "train_model_flops_per_second": 6.0 * non_embedding_params(model) * tokens_per_second,
        "train_loss": float(train_output.metrics.get("train_loss", float("nan"))),
    }


# --------------------------------------------------------------------------------------------------
# Pair-based stages on TRL's CPO-style trainers (simpo, orpo)
# --------------------------------------------------------------------------------------------------
def train_on_pairs(ctx: StageContext, section: str, config_class, trainer_class, **options: Any) -> StageOutput:
    """A reference-free pair method (simpo, orpo): TRL's ``trainer_class`` on the preference pairs from the
    SFT policy, evaluated on the held-out pairs; the merged policy is saved. ``options`` go to ``config_class``."""

    cfg = getattr(ctx.config, section)
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]

    # Model & tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)

    # Training
    args = config_class(**trainer_args(cfg, ctx, eval_strategy="steps", eval_steps=max(cfg.logging_steps * 4, 1),
                                       **options))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=pair_dataset(pairs.path / "train.jsonl"),
        eval_dataset=pair_dataset(pairs.path / "eval.jsonl"),
        processing_class=tokenizer,
        peft_config=peft_config(ctx.config.model.lora, "CAUSAL_LM"),
        callbacks=ctx.callbacks(),
    )
    train_output, resumed, change = train_resuming(trainer, ctx)
    metrics = {
        **throughput_metrics(train_output, pair_tokens(trainer), trainer.model, resumed),
        "weight_change": change,
        "train_pairs": float(len(trainer.train_dataset)),
        **final_evaluation(trainer),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})


def pair_tokens(trainer) -> int:
    """Tokens trained on: chosen and rejected sequences (prompt included), times the epochs reached."""
    dataset = trainer.train_dataset
    per_epoch = sum(map(len, dataset["chosen_input_ids"])) + sum(map(len, dataset["rejected_input_ids"]))
    return int(per_epoch * (trainer.state.epoch or 0.0))


def final_evaluation(trainer) -> dict[str, float]:
    """``final_eval_*``: the last step's evaluation, run once more only if the last step had none."""
    last_step = trainer.state.global_step
    evaluation = next((log for log in trainer.state.log_history if "eval_loss" in log and log["step"] == last_step),
                      None) or trainer.evaluate()
    return {f"final_{k}": float(v) for k, v in evaluation.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------------
# Online RL stages (rloo, grpo): prompts, reward functions and trainer arguments
# --------------------------------------------------------------------------------------------------
def prompt_dataset(path: Path, cfg: OnlineRLConfig, tokenizer, section: str):
    """The chat prompts of ``train.jsonl`` as a TRL prompt-only dataset, and how many were dropped.

    RLOOConfig and GRPOConfig have no ``max_length``; a prompt is dropped here instead when it and
    ``max_completion_length`` new tokens would not fit in ``max_length``.
    """
    from datasets import Dataset

    rows = read_jsonl(path)[: cfg.max_prompts]
    budget = cfg.max_length - cfg.max_completion_length
    kept = [{"prompt": row["prompt"]} for row in rows if _prompt_tokens(tokenizer, row["prompt"]) <= budget]
    if not kept:
        raise ValueError(
            f"{path}: none of the {len(rows)} prompts fits in {section}.max_length ({cfg.max_length}) minus "
            f"{section}.max_completion_length ({cfg.max_completion_length}); raise {section}.max_length"
        )
    return Dataset.from_list(kept), len(rows) - len(kept)


def _prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _reward_model_reward(ctx: StageContext, section: str) -> tuple[list, list]:
    """The reward stage's model and tokenizer; TRL scores the chat-formatted prompt + completion."""
    reward_dir = str(ctx.inputs["reward"].model_dir)
    model = load_reward_model(reward_dir, ctx.config.model, ctx.device).eval()
    return [model], [load_tokenizer(reward_dir, ctx.config.model, padding_side="right")]


def _gold_reward(ctx: StageContext, section: str) -> tuple[list, list]:
    """A TRL reward function that scores the completion text with the task's gold judge."""
    found = gold_judge(ctx.config.data.task)
    if found is None:
        raise ValueError(
            f"{section}.reward_source is 'gold' but data.task {ctx.config.data.task!r} has no gold judge "
            f"(tasks with one: {sorted(GOLD_JUDGES)}); set {section}.reward_source to 'reward_model'"
        )

    judge = CountingJudge(found)

    def gold(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        # conversational completions are [{"role": "assistant", "content": text}]
        return judge.score([c[-1]["content"] if isinstance(c, list) else c for c in completions])

    gold.__name__ = f"gold_{judge.name}"  # TRL logs rewards/<name>/mean
    gold.judge = judge  # its call count is the stage's gold_calls
    return [gold], [None]


REWARD_SOURCES: dict[str, Callable[[StageContext, str], tuple[list, list]]] = {
    "reward_model": _reward_model_reward,
    "gold": _gold_reward,
}


def online_rewards(ctx: StageContext, section: str) -> tuple[list, list]:
    """``reward_funcs`` and ``reward_processing_classes`` for the section's ``reward_source``."""
    cfg: OnlineRLConfig = getattr(ctx.config, section)
    return REWARD_SOURCES[cfg.reward_source](ctx, section)


def online_trainer_args(cfg: OnlineRLConfig, ctx: StageContext, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for RLOOConfig/GRPOConfig: generation with plain transformers ``generate``."""
    args = trainer_args(
        cfg, ctx,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        use_vllm=False,
        **extra,
    )
    del args["max_length"]  # not a field of these configs: prompt_dataset applies it
    return args


def train_online(ctx: StageContext, section: str, config_class, trainer_class) -> StageOutput:
    """An online RL method without a critic (rloo, grpo): TRL's ``trainer_class`` samples completions of the
    training prompts from the SFT policy and rewards them (``<section>.reward_source``); the merged policy is saved."""
    cfg: OnlineRLConfig = getattr(ctx.config, section)

    # Reward (first: a gold reward without a gold judge fails before any policy loads)
    reward_funcs, reward_tokenizers = online_rewards(ctx, section)

    # Model, tokenizer & prompts
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="left")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    prompts, dropped = prompt_dataset(ctx.inputs["prepare"].path / "train.jsonl", cfg, tokenizer, section)

    # Training
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=config_class(**online_trainer_args(cfg, ctx)),
        train_dataset=prompts,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=peft_config(ctx.config.model.lora, "CAUSAL_LM"),
        callbacks=ctx.callbacks(),
    )
    train_output, resumed, change = train_resuming(trainer, ctx)
    metrics = {
        **online_metrics(trainer, train_output, len(prompts), dropped, resumed),
        "weight_change": change,
        # gold-judge calls this process made (a resumed run counts those after the resume)
        "gold_calls": float(sum(f.judge.calls for f in reward_funcs if hasattr(f, "judge"))),
    }

    # Save
    save_model(trainer.model, tokenizer, ctx.out_dir / "model")
    return StageOutput(metrics=metrics, info={"model": "model", "policy": True})


def online_metrics(trainer, train_output, prompts: int, dropped: int, resumed_step: int = 0) -> dict[str, float]:
    """Throughput and the last logged training figures (reward, kl, completion lengths, ...)."""
    last = next((log for log in reversed(trainer.state.log_history) if "reward" in log), {})
    return {
        **throughput_metrics(train_output, int(trainer.state.num_input_tokens_seen), trainer.model, resumed_step),
        "train_prompts": float(prompts),
        "dropped_too_long": float(dropped),
        **{f"final_{k}": float(v) for k, v in last.items() if isinstance(v, int | float) and k != "step"},
    }
