"""The ``evaluate`` stage: every policy, and the SFT baseline, scored the same way on held-out prompts.

What scores them is ``evaluate.judge`` (:func:`build_judge`): the task's gold judge where it has one,
else a reward model trained on a split of the pairs that no policy and no training reward model saw
(``held_out_rm``), or a reward model the user names. A policy is never graded by a model it was
trained against, unless ``evaluate.judge: training_rm`` says so, and then every figure says so too.

Per policy, on ``max_prompts x samples_per_prompt`` samples (the same prompts and sampling seeds for
every policy, so sample i of every policy answers the same prompt):

- the mean judge score with its 95% bootstrap interval over prompts (:mod:`stages.bootstrap`); the
  mean gold reward where the task has one; the training reward model's mean score (a diagnostic);
- the win rate against the SFT policy's sample of the same prompt (a tie counts one half) and the
  difference of mean judge scores to SFT, each with its paired-bootstrap interval;
- the KL to the SFT policy at the sampling temperature, in float32: the mean over samples y ~ pi_T of
  log pi_T(y|x) - log pi_SFT,T(y|x), the KL between the two distributions that actually sampled;
- judge-free: the held-out preference accuracy of the policy's implicit reward
  (log pi/pi_SFT of the chosen reply above that of the rejected one);
- mean response length, EOS rate and distinct-1/2 (Li et al. 2016).

Written to ``metrics.json`` (DVC metrics).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

from stages.bootstrap import as_scores, difference_interval, mean_interval, win_rate_interval
from stages.generation import Samples, implicit_pair_accuracy, pair_accuracy, sample, sequence_log_probs
from stages.judges import (
    JudgeError,
    PolicyJudge,
    gold_judge,
    gold_policy_judge,
    judge_kind,
    reward_model_judge,
)
from stages.models import load_causal_lm, load_reward_model, load_tokenizer
from stages.records import read_jsonl, write_jsonl
from stages.runner import StageContext, StageOutput, pairs_source

log = logging.getLogger(__name__)

BASELINE = "sft"
RESAMPLES = 2000  # bootstrap replicates behind every interval


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of the whitespace tokens of all texts."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def held_out_prompts(ctx: StageContext) -> list:
    """The first ``evaluate.max_prompts`` prompts of the prepared eval split (chat messages)."""
    cfg = ctx.config.evaluate
    rows = read_jsonl(ctx.inputs["prepare"].path / "eval.jsonl")
    if len(rows) < cfg.max_prompts:
        log.warning("evaluate: the eval split holds %d prompts, fewer than evaluate.max_prompts (%d): %d samples "
                    "per policy; raise data.eval_fraction for tighter intervals", len(rows), cfg.max_prompts,
                    len(rows) * cfg.samples_per_prompt)
    return [row["prompt"] for row in rows[: cfg.max_prompts]]


def held_out_pairs(ctx: StageContext) -> list[dict]:
    """Up to ``evaluate.implicit_max_pairs`` held-out preference pairs (no policy trained on them)."""
    limit = ctx.config.evaluate.implicit_max_pairs
    rows = read_jsonl(ctx.inputs[pairs_source(ctx.config)].path / "eval.jsonl")
    return [row for row in rows if "chosen" in row and "rejected" in row][:limit]


# --------------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------------
def build_judge(ctx: StageContext, reward_model, tokenizer) -> PolicyJudge:
    """The judge ``evaluate.judge`` names, with its held-out pair accuracy where it is a reward model."""
    kind, config = judge_kind(ctx.config), ctx.config
    if kind == "gold":
        return gold_policy_judge(config.data.task)
    if kind == "training_rm":
        metrics = ctx.inputs["reward"].metrics
        return reward_model_judge("training_rm", kind, reward_model, tokenizer,
                                  accuracy=metrics.get("eval_pair_accuracy"), pairs=_count(metrics.get("eval_pairs")))
    if kind == "held_out_rm":
        result = ctx.inputs["judge"]
        model = load_reward_model(str(result.model_dir), config.model, ctx.device)
        return reward_model_judge("held_out_rm", kind, model, tokenizer,
                                  accuracy=result.metrics.get("eval_pair_accuracy"),
                                  pairs=_count(result.metrics.get("eval_pairs")))
    # a reward model the user names: its own tokenizer and chat template; its accuracy measured here
    name = config.evaluate.judge
    if Path(name).expanduser().resolve() == ctx.inputs["reward"].model_dir.resolve():
        raise JudgeError(f"evaluate.judge {name!r} is this run's training reward model, which PPO optimises "
                         "against; say evaluate.judge: training_rm to judge by it anyway (marked as not independent)")
    model = load_reward_model(name, config.model, ctx.device)
    judge_tokenizer = load_tokenizer(name, config.model)
    pairs = held_out_pairs(ctx)
    measured = pair_accuracy(model, judge_tokenizer, pairs) if pairs else {}
    return reward_model_judge(name, kind, model, judge_tokenizer, accuracy=measured.get("eval_pair_accuracy"),
                              pairs=_count(measured.get("eval_pairs")))


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------------
# Scoring one policy
# --------------------------------------------------------------------------------------------------
def score_policy(name: str, model, reference, judge: PolicyJudge, reward_model, tokenizer, prompts: list,
                 ctx: StageContext) -> dict:
    """Sample ``model`` on ``prompts`` and score every sample: judge, gold judge, training RM, KL to ``reference``.

    Returns ``{"samples", "judge", "gold" | None, "rm", "kl", "implicit_accuracy" | None}``, per-sample lists
    in prompt-major order. The sampling seed is the same for every policy, so the i-th sample of every
    policy answers the same prompt (what win rates and paired intervals between policies compare).
    """
    cfg = ctx.config.evaluate
    # the policy's own log-probs at the sampling temperature come from the sampling pass itself (float32,
    # no autocast here): one forward pass over every sample fewer than scoring them again
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.generation,
                     seed=ctx.config.run.seed + 1, desc=f"evaluate: sampling {name}",
                     with_logprobs=model is not reference)
    asked = [prompts[i] for i in samples.prompt_index]
    judged = judge.score(asked, samples.texts)
    rm = judged if judge.kind == "training_rm" else reward_model_judge(
        "training_rm", "training_rm", reward_model, tokenizer).score(asked, samples.texts)
    gold = gold_judge(ctx.config.data.task)
    gold_scores = judged if judge.kind == "gold" else gold.score(samples.texts) if gold else None
    implicit = None
    if model is reference:
        kl = [0.0] * len(samples.texts)
    else:
        pad, temperature = tokenizer.pad_token_id, cfg.generation.temperature
        policy_logps = torch.tensor([sum(row) for row in samples.logprobs])
        reference_logps = sequence_log_probs(reference, samples.prompt_ids, samples.response_ids, pad_id=pad,
                                             temperature=temperature)
        kl = (policy_logps - reference_logps).tolist()
        pairs = held_out_pairs(ctx)
        implicit = implicit_pair_accuracy(model, reference, tokenizer, pairs) if pairs else None
    return {"samples": samples, "judge": judged, "gold": gold_scores, "rm": rm, "kl": kl,
            "implicit_accuracy": implicit}


def policy_metrics(scored: dict, samples_per_prompt: int) -> dict[str, float]:
    """The per-policy figures of a :func:`score_policy` result (win rates need a second policy)."""
    samples: Samples = scored["samples"]
    judge_mean = mean_interval(as_scores(scored["judge"], samples_per_prompt), resamples=RESAMPLES)
    metrics = {
        "judge_score_mean": judge_mean.estimate,
        "judge_score_ci_low": judge_mean.low,
        "judge_score_ci_high": judge_mean.high,
        "rm_score_mean": statistics.fmean(scored["rm"]),
        "kl_to_sft": statistics.fmean(scored["kl"]),
        "samples": float(len(samples.texts)),
        "response_tokens_mean": statistics.fmean(len(r) for r in samples.response_ids),
        "ended_with_eos": statistics.fmean(samples.ended),
        "distinct_1": distinct_n(samples.texts, 1),
        "distinct_2": distinct_n(samples.texts, 2),
        "sample_tokens_per_second": samples.tokens_per_second,
        "sample_seconds": samples.seconds,
    }
    if scored["gold"] is not None:
        metrics["gold_reward_mean"] = statistics.fmean(scored["gold"])
    if scored["implicit_accuracy"] is not None:
        metrics["implicit_pair_accuracy"] = scored["implicit_accuracy"]
    return metrics


def versus_sft(scores: list[float], baseline: list[float], samples_per_prompt: int) -> dict[str, float]:
    """Win rate against SFT and the difference of mean judge scores, each with its paired 95% interval."""
    policy, sft = as_scores(scores, samples_per_prompt), as_scores(baseline, samples_per_prompt)
    wins = win_rate_interval(policy, sft, resamples=RESAMPLES)
    difference = difference_interval(policy, sft, resamples=RESAMPLES)
    return {"win_rate_vs_sft": wins.estimate, "win_rate_ci_low": wins.low, "win_rate_ci_high": wins.high,
            "vs_sft_difference": difference.estimate, "vs_sft_ci_low": difference.low,
            "vs_sft_ci_high": difference.high}


def sample_rows(prompts: list, scored: dict) -> list[dict]:
    """One row per sample: what ``samples.jsonl`` holds for win rates and intervals between any two policies."""
    samples: Samples = scored["samples"]
    return [
        {"prompt_index": i, "prompt": prompts[i][-1]["content"], "completion": text, "ended": ended,
         "judge": scored["judge"][n], "gold": None if scored["gold"] is None else scored["gold"][n],
         "rm": scored["rm"][n], "kl": scored["kl"][n]}
        for n, (i, text, ended) in enumerate(zip(samples.prompt_index, samples.texts, samples.ended, strict=True))
    ]


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config.evaluate
    prompts = held_out_prompts(ctx)
    policies = {BASELINE: ctx.inputs["sft"]} | {
        name: result for name, result in ctx.inputs.items() if result.info.get("policy")
    }

    # Reference, reward model, judge, tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model)
    reference = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    reward_model = load_reward_model(str(ctx.inputs["reward"].model_dir), ctx.config.model, ctx.device)
    judge = build_judge(ctx, reward_model, tokenizer)

    # Sample & score every policy
    per_policy: dict[str, dict] = {}
    for name, result in policies.items():
        model = reference if name == BASELINE else load_causal_lm(str(result.model_dir), ctx.config.model,
                                                                  ctx.device)
        per_policy[name] = score_policy(name, model, reference, judge, reward_model, tokenizer, prompts, ctx)
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    # Metrics
    baseline_scores = per_policy[BASELINE]["judge"]
    metrics: dict[str, float] = {}
    for name, p in per_policy.items():
        figures = policy_metrics(p, cfg.samples_per_prompt)
        if name != BASELINE:
            figures |= versus_sft(p["judge"], baseline_scores, cfg.samples_per_prompt)
        else:
            figures["win_rate_vs_sft"] = 0.5
        metrics.update({f"{name}/{key}": value for key, value in figures.items()})
    (ctx.out_dir / "metrics.json").write_text(json.dumps(_nest(metrics), indent=2))
    (ctx.out_dir / "judge.json").write_text(json.dumps(judge.describe(), indent=2))  # what the scores mean

    # Sample generations, side by side
    examples = _examples(prompts, per_policy, cfg.samples_per_prompt, cfg.num_examples)
    write_jsonl(ctx.out_dir / "samples.jsonl", examples)
    if ctx.tracker is not None:
        ctx.tracker.log_table(examples, "sample_generations.json")
        ctx.tracker.log_artifact(ctx.out_dir / "metrics.json")
        ctx.tracker.log_artifact(ctx.out_dir / "judge.json")
        ctx.tracker.set_tags({"alignflow.judge": judge.name, "alignflow.judge_independent": judge.independent})
    return StageOutput(metrics=metrics, info={"judged_by": judge.name, "judge": judge.describe(),
                                              "policies": list(per_policy),
                                              "publish": ["metrics.json", "judge.json"]})


def _nest(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    nested: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        policy, name = key.split("/", 1)
        nested.setdefault(policy, {})[name] = value
    return nested


def _examples(prompts, per_policy: dict[str, dict], k: int, limit: int) -> list[dict]:
    rows = []
    for i in range(min(limit, len(prompts))):
        row = {"prompt": prompts[i][-1]["content"]}
        for name, p in per_policy.items():
            row[f"{name}_completion"] = p["samples"].texts[i * k]
            row[f"{name}_score"] = round(p["judge"][i * k], 4)
        rows.append(row)
    return rows
