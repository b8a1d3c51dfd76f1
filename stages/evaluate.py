"""The ``evaluate`` stage: every policy, and the SFT baseline, scored the same way on held-out prompts.

Per policy: mean gold reward (when the task has a gold judge), mean reward-model score, the
sequence-level KL to the SFT reference estimated from the policy's own samples
(KL(pi||pi_ref) ~= mean over samples of log pi(y|x) - log pi_ref(y|x)), the win rate against the SFT
policy's sample for the same prompt (gold judge, else reward model; a tie counts one half), mean
response length, and distinct-1/2 (Li et al. 2016). Written to ``metrics.json`` (DVC metrics).
"""

from __future__ import annotations

import json
import statistics

import torch

from stages.generation import Samples, reward_scores, sample, sequence_log_probs
from stages.judges import gold_judge
from stages.models import load_causal_lm, load_reward_model, load_tokenizer
from stages.records import read_jsonl, write_jsonl
from stages.runner import StageContext, StageOutput

BASELINE = "sft"


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of the whitespace tokens of all texts."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Mean over samples i of 1 if scores_i > baseline_i, 1/2 if equal, 0 otherwise (a tie counts one half)."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores against {len(baseline)}; both must score the same samples")
    if not scores:
        raise ValueError("win_rate: no scores; need at least one sample")
    return statistics.fmean(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline, strict=True))


def _policy_metrics(samples: Samples, gold: list[float] | None, rm: list[float], kl: list[float]) -> dict:
    metrics = {
        "rm_score_mean": statistics.fmean(rm),
        "kl_to_sft": statistics.fmean(kl),
        "response_tokens_mean": statistics.fmean(len(r) for r in samples.response_ids),
        "ended_with_eos": statistics.fmean(samples.ended),
        "distinct_1": distinct_n(samples.texts, 1),
        "distinct_2": distinct_n(samples.texts, 2),
        "sample_tokens_per_second": samples.tokens_per_second,
    }
    if gold is not None:
        metrics["gold_reward_mean"] = statistics.fmean(gold)
    return metrics


def held_out_prompts(ctx: StageContext) -> list:
    """The first ``evaluate.max_prompts`` prompts of the prepared eval split (chat messages)."""
    rows = read_jsonl(ctx.inputs["prepare"].path / "eval.jsonl")[: ctx.config.evaluate.max_prompts]
    return [row["prompt"] for row in rows]


def score_policy(name: str, model, reference, reward_model, tokenizer, prompts: list, ctx: StageContext) -> dict:
    """Sample ``model`` on ``prompts`` and score every sample: gold judge, reward model, KL to ``reference``.

    Returns ``{"samples": Samples, "gold": [..] | None, "rm": [..], "kl": [..]}``, one entry per sample
    in prompt-major order. The sampling seed is the same for every policy, so the i-th sample of every
    policy answers the same prompt (what win rates between policies compare).
    """
    cfg, judge = ctx.config.evaluate, gold_judge(ctx.config.data.task)
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.generation,
                     seed=ctx.config.run.seed + 1, desc=f"evaluate: sampling {name}")
    conversations = [prompts[i] + [{"role": "assistant", "content": t}]
                     for i, t in zip(samples.prompt_index, samples.texts, strict=True)]
    rm = reward_scores(reward_model, tokenizer, conversations).tolist()
    if model is reference:
        kl = [0.0] * len(samples.texts)
    else:
        pad = tokenizer.pad_token_id
        policy_logps = sequence_log_probs(model, samples.prompt_ids, samples.response_ids, pad_id=pad)
        reference_logps = sequence_log_probs(reference, samples.prompt_ids, samples.response_ids, pad_id=pad)
        kl = (policy_logps - reference_logps).tolist()
    gold = judge.score(samples.texts) if judge else None
    return {"samples": samples, "gold": gold, "rm": rm, "kl": kl}


def policy_metrics(scored: dict) -> dict[str, float]:
    """The per-policy figures of a :func:`score_policy` result (win rates need a second policy)."""
    return _policy_metrics(scored["samples"], scored["gold"], scored["rm"], scored["kl"])


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.config.evaluate
    judge = gold_judge(ctx.config.data.task)
    prompts = held_out_prompts(ctx)
    policies = {BASELINE: ctx.inputs["sft"]} | {
        name: result for name, result in ctx.inputs.items() if result.info.get("policy")
    }

    # Reference, reward model, tokenizer
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model)
    reference = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    reward_model = load_reward_model(str(ctx.inputs["reward"].model_dir), ctx.config.model, ctx.device)

    # Sample & score every policy
    per_policy: dict[str, dict] = {}
    for name, result in policies.items():
        model = reference if name == BASELINE else load_causal_lm(str(result.model_dir), ctx.config.model,
                                                                  ctx.device)
        per_policy[name] = score_policy(name, model, reference, reward_model, tokenizer, prompts, ctx)
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    # Metrics
    judged_by = "gold" if judge else "rm"
    baseline_scores = per_policy[BASELINE][judged_by]
    metrics: dict[str, float] = {}
    for name, p in per_policy.items():
        policy_metrics = _policy_metrics(p["samples"], p["gold"], p["rm"], p["kl"])
        policy_metrics["win_rate_vs_sft"] = win_rate(p[judged_by], baseline_scores)
        metrics.update({f"{name}/{key}": value for key, value in policy_metrics.items()})
    (ctx.out_dir / "metrics.json").write_text(json.dumps(_nest(metrics), indent=2))

    # Sample generations, side by side
    examples = _examples(prompts, per_policy, cfg.samples_per_prompt, cfg.num_examples)
    write_jsonl(ctx.out_dir / "samples.jsonl", examples)
    if ctx.tracker is not None:
        ctx.tracker.log_table(examples, "sample_generations.json")
        ctx.tracker.log_artifact(ctx.out_dir / "metrics.json")
    return StageOutput(metrics=metrics, info={"judged_by": judge.name if judge else "reward_model",
                                              "policies": list(per_policy),
                                              "publish": ["metrics.json"]})


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
            scores = p["gold"] if p["gold"] is not None else p["rm"]
            row[f"{name}_score"] = round(scores[i * k], 4)
        rows.append(row)
    return rows
