"""The ``score`` stage: one policy scored on the held-out prompts exactly as ``evaluate`` scores each.

``alignflow compare`` runs it once per policy of its grid (input ``policy``) and once for the SFT
model (no ``policy`` input), each a cached task: adding a grid point samples and scores only the new
policy. Every policy is sampled with the same seed on the same prompts, so sample ``i`` of every
policy answers the same prompt, and ``samples.jsonl`` holds what win rates between any two policies
need (per-sample gold and reward-model scores).
"""

from __future__ import annotations

from stages.evaluate import held_out_prompts, policy_metrics, score_policy
from stages.judges import gold_judge
from stages.models import load_causal_lm, load_reward_model, load_tokenizer
from stages.records import write_jsonl
from stages.runner import StageContext, StageOutput

SAMPLES_FILE = "samples.jsonl"


def run(ctx: StageContext) -> StageOutput:
    judge = gold_judge(ctx.config.data.task)
    prompts = held_out_prompts(ctx)
    policy = ctx.inputs.get("policy")

    sft_dir = str(ctx.inputs["sft"].model_dir)
    tokenizer = load_tokenizer(sft_dir, ctx.config.model)
    reference = load_causal_lm(sft_dir, ctx.config.model, ctx.device)
    reward_model = load_reward_model(str(ctx.inputs["reward"].model_dir), ctx.config.model, ctx.device)
    model = reference if policy is None else load_causal_lm(str(policy.model_dir), ctx.config.model, ctx.device)
    name = "sft" if policy is None else policy.stage

    scored = score_policy(name, model, reference, reward_model, tokenizer, prompts, ctx)
    samples = scored["samples"]
    write_jsonl(ctx.out_dir / SAMPLES_FILE, (
        {"prompt_index": i, "prompt": prompts[i][-1]["content"], "completion": text, "ended": ended,
         "gold": None if scored["gold"] is None else scored["gold"][n], "rm": scored["rm"][n],
         "kl": scored["kl"][n]}
        for n, (i, text, ended) in enumerate(zip(samples.prompt_index, samples.texts, samples.ended, strict=True))
    ))
    return StageOutput(metrics=policy_metrics(scored), info={
        "judged_by": "gold" if judge else "reward_model", "samples": SAMPLES_FILE, "policy_stage": name,
    })
