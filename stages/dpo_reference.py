"""The ``dpo_reference`` stage: the SFT policy's log-probs of every DPO pair, computed once.

DPO's loss needs log pi_ref(y|x) of the chosen and rejected response of every pair; they depend on
the SFT model and on how pairs are cut to ``dpo.max_length``, not on beta or the loss type. Computing
them here, as a cached artifact, lets every DPO run of a sweep (``alignflow compare``) and every
re-run with a new beta skip the reference forward pass in each training step. The numbers are TRL's
own: its DPOTrainer computes them (``precompute_ref_log_probs``), this stage only keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.models import load_causal_lm, load_tokenizer
from stages.runner import StageContext, StageOutput
from stages.training import pair_dataset, trainer_args

SPLITS = ("train", "eval")


def reference_file(directory: Path, split: str) -> Path:
    return directory / f"reference_logps-{split}.json"


def run(ctx: StageContext) -> StageOutput:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.config.dpo
    pairs = ctx.inputs["label"] if "label" in ctx.inputs else ctx.inputs["prepare"]
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model, padding_side="right")
    model = load_causal_lm(sft_dir, ctx.config.model, ctx.device).eval()

    # Without a peft config or a ref_model, TRL precomputes with the model itself: the SFT policy.
    args = DPOConfig(**trainer_args(cfg, ctx, precompute_ref_log_probs=True,
                                    precompute_ref_batch_size=cfg.batch_size))
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=pair_dataset(pairs.path / "train.jsonl"),
                         eval_dataset=pair_dataset(pairs.path / "eval.jsonl"))
    metrics: dict[str, float] = {}
    for split, dataset in zip(SPLITS, (trainer.train_dataset, trainer.eval_dataset), strict=True):
        chosen, rejected = dataset["ref_chosen_logps"], dataset["ref_rejected_logps"]
        reference_file(ctx.out_dir, split).write_text(json.dumps({
            "source": str(pairs.path / f"{split}.jsonl"), "rows": len(chosen),
            "ref_chosen_logps": list(chosen), "ref_rejected_logps": list(rejected),
        }))
        metrics[f"{split}_pairs"] = float(len(chosen))
    return StageOutput(metrics=metrics, info={"files": [reference_file(Path(), s).name for s in SPLITS]})


def load_reference(directory: Path, split: str, rows: int) -> dict[str, list[float]]:
    """The stored columns of ``split``, checked against the number of pairs they are for."""
    file = reference_file(directory, split)
    stored = json.loads(file.read_text())
    if stored["rows"] != rows:
        raise ValueError(
            f"{file}: holds reference log-probs of {stored['rows']} {split} pairs, but the DPO dataset has {rows}; "
            "the dpo_reference output does not belong to these pairs (delete it to recompute)"
        )
    return {name: stored[name] for name in ("ref_chosen_logps", "ref_rejected_logps")}
