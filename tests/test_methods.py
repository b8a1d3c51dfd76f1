"""Tests for the simpo, orpo, rloo and grpo stages: each run directly on a tiny random model.

A StageContext is built by hand with fake results of the sft, reward, label (preference pairs) and
prepare (prompts) stages; step-wise metrics go through the real trainer callback of
stages.tracking.Tracker into a recording double instead of MLflow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import grpo, orpo, rloo, simpo
from stages.config import ConfigError, validate
from stages.runner import STAGES, StageContext, StageOutput, StageResult
from tests.conftest import RecordingTracker, tiny_params

MODULES = {"simpo": simpo, "orpo": orpo, "rloo": rloo, "grpo": grpo}
TINY_PAIRS = {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3, "max_length": 96}
TINY_ONLINE = TINY_PAIRS | {"num_generations": 2, "max_completion_length": 6, "temperature": 1.0}
STEP_METRICS = {
    # what each stage's trainer logs at every step (TRL 1.16 names)
    "simpo": {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"},
    "orpo": {"loss", "rewards/margins", "log_odds_ratio", "nll_loss"},
    "rloo": {"loss", "reward", "reward_std", "kl", "completions/mean_length"},
    "grpo": {"loss", "reward", "reward_std", "kl", "completions/mean_length"},
}
FINAL_METRICS = {
    "simpo": {"final_eval_loss", "final_eval_rewards/margins", "train_pairs"},
    "orpo": {"final_eval_loss", "final_eval_log_odds_ratio", "train_pairs"},
    "rloo": {"final_reward", "final_kl", "train_prompts", "dropped_too_long"},
    "grpo": {"final_reward", "final_kl", "train_prompts", "dropped_too_long"},
}
OPENINGS = ["The worst part of this film was", "Critics hated the sequel, but", "I walked out of the cinema",
            "The soundtrack of this musical"]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and spinning threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _result(stage: str, output_dir: Path, info: dict | None = None) -> StageResult:
    return StageResult(stage=stage, key=f"{stage}-key", output_dir=str(output_dir), content_key=f"{stage}-content",
                       info=info or {})


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Continue this movie review: {text}"}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict[str, StageResult]:
    """Fake finished sft (the tiny LM), reward (tiny LM + 1-label head), label (pairs), prepare (prompts)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("method-inputs")
    shutil.copytree(tiny_model_dir, root / "sft" / "model")
    torch.manual_seed(1)  # the reward head is random
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.save_pretrained(root / "reward" / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward" / "model")

    # label: the pairs format stages/label.py writes and stages.reward.pair_dataset reads
    pairs = [
        {"prompt": _user(f"{OPENINGS[i % 4]} {i}"),
         "chosen": [{"role": "assistant", "content": f"A wonderful, moving film {i}."}],
         "rejected": [{"role": "assistant", "content": f"Dull and badly acted {i}."}],
         "score_chosen": 0.8, "score_rejected": -0.6}
        for i in range(12)
    ]
    _write_jsonl(root / "label" / "train.jsonl", pairs[:8])
    _write_jsonl(root / "label" / "eval.jsonl", pairs[8:])
    # prepare: chat prompts (online stages ignore any other column)
    _write_jsonl(root / "prepare" / "train.jsonl", [{"id": f"p{i}", "prompt": _user(f"{OPENINGS[i % 4]} {i}")}
                                                    for i in range(8)])
    return {
        "sft": _result("sft", root / "sft", {"model": "model"}),
        "reward": _result("reward", root / "reward", {"model": "model"}),
        "label": _result("label", root / "label"),
        "prepare": _result("prepare", root / "prepare"),
    }


def make_ctx(stage: str, project: Path, tiny_model_dir: Path, inputs: dict[str, StageResult], *,
             params: dict | None = None, tracker: RecordingTracker | None = None, **sections: dict) -> StageContext:
    """A StageContext as runner.run_stage builds it, given only the inputs the stage declares."""
    tiny = TINY_PAIRS if stage in ("simpo", "orpo") else TINY_ONLINE
    config = validate(tiny_params(tiny_model_dir, project, **{stage: tiny | (params or {})}, **sections))
    out_dir = project / "outputs" / stage / ".staging-cachekey-1"
    out_dir.mkdir(parents=True)
    stage_inputs = {name: inputs[name] for name in STAGES[stage].inputs(config)}
    return StageContext(stage, config, stage_inputs, out_dir, project, torch.device("cpu"), tracker)


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["simpo", "orpo", "rloo", "grpo"])
def test_stage_trains_logs_each_step_and_saves_a_changed_policy(stage, tmp_path, tiny_model_dir, inputs):
    from transformers import AutoModelForCausalLM

    tracker = RecordingTracker()
    ctx = make_ctx(stage, tmp_path, tiny_model_dir, inputs, tracker=tracker)
    output = MODULES[stage].run(ctx)

    assert isinstance(output, StageOutput)
    assert output.info == {"model": "model", "policy": True}
    metrics = output.metrics
    assert metrics["weight_change"] > 0
    assert metrics["train_tokens"] > 0 and metrics["train_runtime"] > 0
    assert math.isfinite(metrics["train_loss"])
    assert FINAL_METRICS[stage] <= set(metrics)

    # Params reached the trainer; TRL's default of gradient checkpointing on was overridden.
    args = tracker.train_args
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size) == (1e-3, 2, 2)
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing and tracker.checkpointing is False
    if stage in ("rloo", "grpo"):
        assert (args.num_generations, args.max_completion_length, args.temperature, args.beta) == (2, 6, 1.0, 0.05)
        assert not args.use_vllm
    else:
        assert args.max_length == 96 and args.beta == ctx.config.model_dump()[stage]["beta"]
    if stage == "simpo":
        assert (args.loss_type, args.cpo_alpha, args.simpo_gamma) == ("simpo", 0.0, 0.5)

    # Step-wise training metrics reached the tracker at steps 1 and 2 (logging_steps=1, max_steps=2).
    step_logs = [(step, logged) for step, logged in tracker.calls if "loss" in logged]
    assert [step for step, _ in step_logs] == [1, 2]
    for _, logged in step_logs:
        assert STEP_METRICS[stage] <= set(logged), STEP_METRICS[stage] - set(logged)
    if stage in ("rloo", "grpo"):
        assert all(1 <= logged["completions/max_length"] <= 6 for _, logged in step_logs)
        assert step_logs[0][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: policy == reference

    # The saved policy loads as a plain causal LM and differs from SFT in the LoRA-targeted projections only.
    model_dir = ctx.out_dir / "model"
    assert AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).config.num_hidden_layers == 2
    saved = load_file(model_dir / "model.safetensors")
    original = load_file(inputs["sft"].model_dir / "model.safetensors")
    assert set(saved) == set(original)
    changed = [name for name in original if not torch.equal(saved[name], original[name])]
    assert changed and all(name.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for name in changed)


def test_grpo_full_finetuning_keeps_a_frozen_reference_copy(tmp_path, tiny_model_dir, inputs):
    """Without LoRA, TRL loads a second copy of the SFT model as the KL reference."""
    ctx = make_ctx("grpo", tmp_path, tiny_model_dir, inputs, model={"lora": {"enabled": False}})
    metrics = grpo.run(ctx).metrics
    assert metrics["weight_change"] > 0 and math.isfinite(metrics["final_kl"])
    saved = load_file(ctx.out_dir / "model" / "model.safetensors")
    original = load_file(inputs["sft"].model_dir / "model.safetensors")
    assert any("mlp" in name for name in original if not torch.equal(saved[name], original[name]))


def test_rloo_gold_reward_scores_with_the_judge(tmp_path, tiny_model_dir, inputs):
    tracker = RecordingTracker()
    ctx = make_ctx("rloo", tmp_path, tiny_model_dir, inputs, tracker=tracker,
                   params={"reward_source": "gold", "max_steps": 1}, data={"task": "sentiment"})
    metrics = rloo.run(ctx).metrics
    assert -1.0 <= metrics["final_rewards/gold_vader/mean"] <= 1.0  # VADER compound score
    assert any("rewards/gold_vader/mean" in logged for _, logged in tracker.calls)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_gold_reward_needs_a_task_with_a_gold_judge(stage, tmp_path, tiny_model_dir, inputs, monkeypatch):
    def no_policy_load(*args, **kwargs):
        raise AssertionError("the policy was loaded before the reward source was checked")

    monkeypatch.setattr("stages.training.load_causal_lm", no_policy_load)
    ctx = make_ctx(stage, tmp_path, tiny_model_dir, inputs, params={"reward_source": "gold"},
                   data={"task": "preference"})
    message = rf"{stage}\.reward_source is 'gold' but data\.task 'preference' has no gold judge"
    with pytest.raises(ValueError, match=message):
        MODULES[stage].run(ctx)


def test_prompts_too_long_for_max_length_are_dropped_and_counted(tmp_path, tiny_model_dir, inputs):
    from transformers import AutoTokenizer

    from stages.training import prompt_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx = make_ctx("grpo", tmp_path, tiny_model_dir, inputs)
    path = tmp_path / "prompts.jsonl"
    _write_jsonl(path, [{"prompt": _user("short")}, {"prompt": _user("long " * 200)}, {"prompt": _user("also short")}])
    dataset, dropped = prompt_dataset(path, ctx.config.grpo, tokenizer, "grpo")
    assert dropped == 1 and dataset["prompt"] == [_user("short"), _user("also short")]
    with pytest.raises(ValueError, match=r"none of the 1 prompts fits in grpo\.max_length"):
        prompt_dataset(path, ctx.config.grpo.model_copy(update={"max_prompts": 1, "max_length": 20}), tokenizer,
                       "grpo")


# --------------------------------------------------------------------------------------------------
# Config and wiring
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ({"rloo": {"batch_size": 3, "num_generations": 2}}, r"rloo.*must be a multiple of num_generations \(2\)"),
    ({"grpo": {"num_generations": 1}}, r"'grpo\.num_generations'"),
    ({"grpo": {"max_completion_length": 192}}, r"grpo.*max_completion_length \(192\) must be below max_length"),
    ({"simpo": {"simpo_gamma": -1.0}}, r"'simpo\.simpo_gamma'"),
    ({"orpo": {"beta": 0.0}}, r"'orpo\.beta'"),
    ({"rloo": {"reward_source": "oracle"}}, r"'rloo\.reward_source'"),
])
def test_impossible_method_params_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(override)

@pytest.mark.parametrize("task, pairs", [("sentiment", "label"), ("preference", "prepare")])
def test_stage_inputs(task, pairs):
    config = validate({"data": {"task": task}})
    assert STAGES["simpo"].inputs(config) == STAGES["orpo"].inputs(config) == ("sft", pairs)
    assert STAGES["rloo"].inputs(config) == STAGES["grpo"].inputs(config) == ("sft", "reward", "prepare")
    assert all(STAGES[name].trains for name in MODULES)
    # on the gold judge no reward model (nor the labels behind it) is needed
    gold = validate({"data": {"task": task}, "rloo": {"reward_source": "gold"}, "ppo": {"reward_source": "gold"}})
    assert STAGES["rloo"].inputs(gold) == STAGES["ppo"].inputs(gold) == ("sft", "prepare")
