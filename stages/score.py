"""The ``score`` stage: one policy scored on the held-out prompts exactly as ``evaluate`` scores each.

``alignflow compare`` and the retrain gate run it once per policy (input ``policy``) and once for the
SFT model (no ``policy`` input), each a cached task: adding a grid point samples and scores only the
new policy. Every policy is sampled with the same seed on the same prompts, so sample ``i`` of every
policy answers the same prompt, and ``samples.jsonl`` holds what win rates and paired intervals between
any two policies need (per-sample judge, gold and training-reward-model scores, and KL to SFT).
"""

from __future__ import annotations

from stages.evaluate import build_judge, held_out_prompts, policy_metrics, sample_rows, score_policy
from stages.models import load_causal_lm, load_reward_model, load_tokenizer
from stages.records import write_jsonl
from stages.runner import StageContext, StageOutput

SAMPLES_FILE = "samples.jsonl"


def run(ctx: StageContext) -> StageOutput:
    prompts = held_out_prompts(ctx)
    policy = ctx.inputs.get("policy")

    # Models and the judge
    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model)
    reference = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    reward_model = load_reward_model(str(ctx.inputs["reward"].model_dir), ctx.config.model, ctx.device)
    judge = build_judge(ctx, reward_model, tokenizer)
    model = reference if policy is None else load_causal_lm(str(policy.model_dir), ctx.config.model, ctx.device)
    name = "sft" if policy is None else policy.stage

    # Sample & score
    scored = score_policy(name, model, reference, judge, reward_model, tokenizer, prompts, ctx)
    write_jsonl(ctx.out_dir / SAMPLES_FILE, sample_rows(prompts, scored))
    if ctx.tracker is not None:
        ctx.tracker.set_tags({"alignflow.judge": judge.name, "alignflow.judge_independent": judge.independent})
    return StageOutput(metrics=policy_metrics(scored, ctx.config.evaluate.samples_per_prompt), info={
        "judged_by": judge.name, "judge": judge.describe(), "samples": SAMPLES_FILE, "policy_stage": name,
        "samples_per_prompt": ctx.config.evaluate.samples_per_prompt,
    })
