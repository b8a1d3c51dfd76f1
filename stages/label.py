"""The ``label`` stage: preference pairs made the DPO paper's way (Rafailov et al. 2023, §6.1).

Sample ``label.samples_per_prompt`` completions per training prompt from the SFT policy, score them
with the task's gold judge, and pair them by rank (``label.pairing``): ``rank``, best against worst
and second against third; or ``all``, every two of them. Each pair is kept only when the gold gap
exceeds ``label.min_gap``. Pairs are split into train/eval by a seeded hash of the prompt, so no
prompt is on both sides; with the held-out judge (``evaluate.judge: held_out_rm``) a further
``data.judge_fraction`` of the prompts' pairs go to ``judge.jsonl``, which only the judge trains on.
``samples.jsonl`` keeps every scored sample with its prompt and split, so the reward stage can pair
the same samples its own way (``reward.pairing``) without one gold call more.

Every completion is one call of the gold judge: ``gold_calls`` (the labelling budget that the
pair-trained policies spend, against PPO-GT's rollouts) is ``max_prompts x samples_per_prompt``.
"""

from __future__ import annotations

import hashlib
import statistics

from stages.generation import sample
from stages.judges import carves_judge_split, gold_judge
from stages.models import load_causal_lm, load_tokenizer
from stages.records import read_jsonl, write_jsonl
from stages.runner import StageContext, StageOutput, check_pair_batches


def rank_positions(count: int) -> list[tuple[int, int]]:
    """The DPO paper's pairs of ranked completions: best vs worst, and 2nd vs 3rd when there are 4+."""
    return [(0, count - 1)] + ([(1, 2)] if count >= 4 else [])


def all_positions(count: int) -> list[tuple[int, int]]:
    """Every pair of ranked completions (k(k-1)/2 of them): more pairs from the same gold-judge calls."""
    return [(better, worse) for better in range(count) for worse in range(better + 1, count)]


PAIRINGS = {"rank": rank_positions, "all": all_positions}


def rank_pairs(prompt: list[dict], completions: list[str], scores: list[float], min_gap: float,
               pairing: str = "rank") -> list[dict]:
    """Pairs from one prompt's scored completions (``label.pairing``), each kept when its gold gap > min_gap."""
    ranked = sorted(zip(scores, completions, strict=True), key=lambda item: -item[0])
    positions = PAIRINGS[pairing](len(ranked))
    pairs = []
    for better, worse in positions:
        (high, chosen), (low, rejected) = ranked[better], ranked[worse]
        if high - low > min_gap and chosen != rejected:
            pairs.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "score_chosen": high,
                "score_rejected": low,
            })
    return pairs


def split_pairs(samples: list[dict], split: str, min_gap: float, pairing: str) -> list[dict]:
    """The pairs of one split (train, eval or judge) of label's ``samples.jsonl``, made with ``pairing``:
    how the reward stage pairs the same scored samples its own way (``reward.pairing``)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in samples:
        if row["split"] == split:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
    pairs = []
    for prompt_id, group in by_prompt.items():
        made = rank_pairs(group[0]["prompt"], [r["completion"] for r in group], [r["score"] for r in group],
                          min_gap, pairing)
        pairs.extend({"id": f"{prompt_id}-{n}", **pair} for n, pair in enumerate(made))
    return pairs


def _bucket(prompt_id: str, seed: int) -> float:
    """A prompt's seeded hash in [0, 1): below label.eval_fraction it is eval, then the judge's share, then train."""
    return int(hashlib.sha256(f"label:{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 16**8


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config.label
    judge = gold_judge(ctx.config.data.task)
    if judge is None:
        raise ValueError(f"label: task {ctx.config.data.task!r} has no gold judge to label with")

    # Prompts & policy
    rows = read_jsonl(ctx.inputs["prepare"].path / "train.jsonl")[: cfg.max_prompts]
    policy_dir = str(ctx.inputs["sft"].model_dir)
    model = load_causal_lm(policy_dir, ctx.config.model, ctx.device)
    tokenizer = load_tokenizer(policy_dir, ctx.config.model)

    # Sample & judge
    prompts = [row["prompt"] for row in rows]
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.generation,
                     seed=ctx.config.run.seed, desc="label: sampling from SFT")
    scores = judge.score(samples.texts)

    # Pairs
    train, evaluation, judged = [], [], []
    k = cfg.samples_per_prompt
    judge_share = ctx.config.data.judge_fraction if carves_judge_split(ctx.config) else 0.0
    if cfg.eval_fraction + judge_share >= 1.0:
        raise ValueError(f"label.eval_fraction ({cfg.eval_fraction}) + data.judge_fraction ({judge_share}) must stay "
                         "below 1 for the held-out judge, so that prompts are left to train on")
    splits = []
    for i, row in enumerate(rows):
        pairs = rank_pairs(row["prompt"], samples.texts[i * k : (i + 1) * k], scores[i * k : (i + 1) * k],
                           cfg.min_gap, cfg.pairing)
        bucket = _bucket(row["id"], ctx.config.run.seed)
        split = "eval" if bucket < cfg.eval_fraction else "judge" if bucket < cfg.eval_fraction + judge_share \
            else "train"
        splits.append(split)
        {"train": train, "eval": evaluation, "judge": judged}[split].extend(
            {"id": f"{row['id']}-{n}", **pair} for n, pair in enumerate(pairs))
    if judge_share and not judged:
        raise ValueError(f"label: no pairs left for the held-out judge from {len(rows)} prompts; raise "
                         "data.judge_fraction or label.max_prompts")
    if not train or not evaluation:
        raise ValueError(
            f"label: {len(train)} train / {len(evaluation)} eval pairs from {len(rows)} prompts; "
            "raise label.max_prompts or label.samples_per_prompt, or lower label.min_gap"
        )
    check_pair_batches(ctx.config, len(train), "label", len(judged) if judge_share else None)
    write_jsonl(ctx.out_dir / "train.jsonl", train)
    write_jsonl(ctx.out_dir / "eval.jsonl", evaluation)
    write_jsonl(ctx.out_dir / "judge.jsonl", judged)
    write_jsonl(ctx.out_dir / "samples.jsonl", (
        {"prompt_id": rows[i]["id"], "split": splits[i], "prompt": rows[i]["prompt"], "completion": text,
         "score": score, "ended": ended}
        for i, text, score, ended in zip(samples.prompt_index, samples.texts, scores, samples.ended, strict=True)
    ))
    gaps = [p["score_chosen"] - p["score_rejected"] for p in train + evaluation + judged]
    return StageOutput(metrics={
        "pairs_train": float(len(train)),
        "pairs_eval": float(len(evaluation)),
        "pairs_judge": float(len(judged)),
        "gold_calls": float(len(scores)),
        "mean_gold_gap": statistics.fmean(gaps),
        "mean_sample_score": statistics.fmean(scores),
        "sample_tokens_per_second": samples.tokens_per_second,
        "generated_tokens": float(samples.generated_tokens),
    }, info={"kind": "preference", "judge": judge.name})
