"""What the TRL-based training stages share: trainer arguments, throughput and weight-change figures."""

from __future__ import annotations

from typing import Any

import torch

from stages.config import TrainConfig
from stages.runner import StageContext


def trainer_args(train: TrainConfig, ctx: StageContext, **extra: Any) -> dict[str, Any]:
    """Keyword arguments common to TRL's *Config classes (all subclass transformers' TrainingArguments)."""
    return {
        "output_dir": str(ctx.out_dir / "checkpoints"),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "warmup_steps": train.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        "max_length": train.max_length,
        "logging_steps": train.logging_steps,
        "gradient_checkpointing": train.gradient_checkpointing,  # TRL turns it on by default
        "save_strategy": "no",
        "report_to": "none",
        "seed": ctx.config.run.seed,
        "use_cpu": ctx.device.type == "cpu",
        "bf16": ctx.config.model.dtype == "bfloat16",
        "fp16": ctx.config.model.dtype == "float16",
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **extra,
    }


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


def throughput_metrics(train_output, tokens_seen: int, model) -> dict[str, float]:
    """tokens/s of training and the model FLOPs it implies (6 N per token, Kaplan et al. 2020)."""
    seconds = float(train_output.metrics.get("train_runtime", 0.0)) or 1e-9
    tokens_per_second = tokens_seen / seconds
    return {
        "train_runtime": seconds,
        "train_tokens": float(tokens_seen),
        "train_tokens_per_second": tokens_per_second,
        "train_model_flops_per_second": 6.0 * non_embedding_params(model) * tokens_per_second,
        "train_loss": float(train_output.metrics.get("train_loss", float("nan"))),
    }
