"""Tests for stages/ppo.py: the PPO stage run directly (no Prefect, no MLflow) on a tiny random model.

A StageContext is built by hand with fake results of the sft, reward and prepare stages; metrics go
to a recording double of the MLflow tracker. Crash-resume is tested by making the third update raise.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import ppo
from stages.config import validate
from stages.runner import StageContext, StageOutput, StageResult
from tests.conftest import RecordingTracker, tiny_params

PER_UPDATE_METRICS = {
    "ppo/score_mean", "ppo/rlhf_reward_mean", "ppo/kl", "ppo/entropy", "ppo/clip_fraction", "ppo/approx_kl",
    "ppo/policy_loss", "ppo/value_loss", "ppo/value_clip_fraction", "ppo/explained_variance",
    "ppo/response_length", "ppo/eos_fraction", "ppo/kl_coef", "ppo/approx_kl_first", "ppo/normalized_score_mean",
    "time/generation", "time/scoring", "time/forward", "time/optimisation", "time/update",
}
SMALL_PPO = {
    "updates": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "learning_rate": 1e-3, "normalization_samples": 8,
    "value_learning_rate": 1e-3, "generation": {"max_new_tokens": 8, "temperature": 1.5, "top_p": 1.0,
                                                "batch_size": 4},
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


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict[str, StageResult]:
    """Fake finished sft (the tiny LM), reward (the tiny LM with a 1-label head) and prepare stages."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("ppo-inputs")
    shutil.copytree(tiny_model_dir, root / "sft" / "model")
    torch.manual_seed(1)  # the reward head is random
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.save_pretrained(root / "reward" / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward" / "model")

    rows = [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Continue this movie review: {OPENINGS[i % 4]} {i}"}]}
        for i in range(16)
    ]
    rows[0] |= {"chosen": [{"role": "assistant", "content": "Great."}],
                "rejected": [{"role": "assistant", "content": "Bad."}]}  # ignored: PPO uses the prompt only
    (root / "prepare").mkdir()
    (root / "prepare" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "sft": _result("sft", root / "sft", {"model": "model"}),
        "reward": _result("reward", root / "reward", {"model": "model"}),
        "prepare": _result("prepare", root / "prepare"),
    }


def make_ctx(project: Path, tiny_model_dir: Path, inputs: dict[str, StageResult], *, ppo_params: dict,
             key: str = "cachekey", pid: int = 1, tracker: RecordingTracker | None = None,
             **sections: dict) -> StageContext:
    """A StageContext as runner.run_stage builds it, with the staging directory named the same way."""
    config = validate(tiny_params(tiny_model_dir, project, ppo=SMALL_PPO | ppo_params, **sections))
    out_dir = project / "outputs" / "ppo" / f".staging-{key}-{pid}"
    out_dir.mkdir(parents=True)
    return StageContext("ppo", config, inputs, out_dir, project, torch.device("cpu"), tracker)


def _first_changed(saved: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in original if not torch.equal(saved[name], original[name])]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def test_ppo_trains_logs_each_update_and_saves_a_changed_policy(tmp_path, tiny_model_dir, inputs):
    tracker = RecordingTracker()
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params={}, tracker=tracker)
    output = ppo.run(ctx)

    assert isinstance(output, StageOutput)
    assert output.info == {"model": "model", "policy": True}
    metrics = output.metrics
    assert metrics["updates_done"] == 2 and metrics["resumed_from_update"] == 0
    assert metrics["weight_change"] > 0
    assert math.isfinite(metrics["ppo/kl"]) and math.isfinite(metrics["ppo/score_mean"])
    assert metrics["time/update_mean"] > 0

    # One log_metrics call per update, steps 1 and 2, carrying every per-update metric.
    assert [step for step, _ in tracker.calls] == [1, 2]
    for _, logged in tracker.calls:
        assert PER_UPDATE_METRICS <= set(logged)
        assert 1 <= logged["ppo/response_length"] <= 8
    # Before the first step the LoRA adapter is zero, so policy == reference and the KL is 0 up to float32
    # rounding (the sampling pass's KV-cached log-probs against the reference's full pass: 1.4e-6 on an AMD
    # EPYC, under 1e-6 elsewhere); after it, the policy has moved away from the reference.
    assert tracker.calls[0][1]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)
    assert tracker.calls[1][1]["ppo/kl"] != pytest.approx(0.0, abs=1e-9)

    # The merged policy differs from the SFT model in the LoRA-targeted projections only.
    saved = load_file(ctx.out_dir / "model" / "model.safetensors")
    original = load_file(inputs["sft"].model_dir / "model.safetensors")
    assert set(saved) == set(original)
    changed = _first_changed(saved, original)
    assert changed and all(name.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for name in changed)

    # The final checkpoint is kept, and it is the only one.
    checkpoints = tmp_path / "outputs" / "checkpoints" / "ppo" / "cachekey"
    assert [p.name for p in checkpoints.iterdir()] == ["update-000002"]


def test_gold_reward_with_ema_reference_starts_every_update_at_ratio_one(tmp_path, tiny_model_dir, inputs):
    """One mini-batch per update and one epoch: each update's only step sees the policy that sampled,
    so PPO's ratio is exactly 1 there (approx_kl 0, nothing clipped), which holds only if rollout and
    training log-probs agree (same temperature, same positions, dropout off)."""
    tracker = RecordingTracker()
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, tracker=tracker, data={"task": "sentiment"},
                   ppo_params={"reward_source": "gold", "ref_ema_decay": 0.5, "mini_batch_size": 4, "ppo_epochs": 1})
    metrics = ppo.run(ctx).metrics

    assert metrics["weight_change"] > 0
    for _, logged in tracker.calls:
        assert -1.0 <= logged["ppo/score_mean"] <= 1.0  # VADER in [-1, 1]; no missing-EOS penalty by default
        assert logged["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-7)
        assert logged["ppo/clip_fraction"] == 0.0
    checkpoint = tmp_path / "outputs" / "checkpoints" / "ppo" / "cachekey" / "update-000002"
    assert (checkpoint / "reference_ema.safetensors").is_file()


def test_missing_eos_penalty_is_added_to_exactly_the_responses_without_eos(tmp_path, tiny_model_dir, inputs):
    from stages.generation import _eos_ids

    scores, ended = [], None
    for penalty in (None, -0.75):
        ctx = make_ctx(tmp_path / str(penalty), tiny_model_dir, inputs, data={"task": "sentiment"},
                       ppo_params={"reward_source": "gold", "missing_eos_penalty": penalty,
                                   "generation": SMALL_PPO["generation"] | {"max_new_tokens": 3}})
        models = ppo.build_models(ctx)
        prompts = ppo.load_prompts(ctx.inputs["prepare"].path / "train.jsonl", None)[:4]
        rollout, _ = ppo.collect_rollout(models, prompts, ctx.config.ppo, 0.05, seed=7, device=ctx.device)
        scores.append(rollout.scores)
        last = rollout.sequences.response_ids.gather(1, rollout.sequences.response_mask.sum(-1, keepdim=True) - 1)
        ended = torch.isin(last[:, 0], torch.tensor(sorted(_eos_ids(models.policy, models.tokenizer))))
    assert not ended.all()  # 3 tokens: some responses are cut (a random tiny model rarely says EOS)
    torch.testing.assert_close(scores[1], torch.where(ended, scores[0], scores[0] - 0.75))


def test_gold_reward_needs_a_task_with_a_gold_judge(tmp_path, tiny_model_dir, inputs):
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, data={"task": "preference"},
                   ppo_params={"reward_source": "gold"})
    with pytest.raises(ValueError, match="data.task 'preference' has no gold judge"):
        ppo.run(ctx)


def test_full_finetuning_with_adaptive_kl_k3_and_ema(tmp_path, tiny_model_dir, inputs):
    """Without LoRA: a frozen reference copy that follows the policy by EMA; every option on."""
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, model={"lora": {"enabled": False}},
                   ppo_params={"adaptive_kl": True, "kl_estimator": "k3", "whiten_rewards": True,
                               "ref_ema_decay": 0.9, "kl_coef": 0.05})
    metrics = ppo.run(ctx).metrics

    assert metrics["weight_change"] > 0
    assert metrics["ppo/kl_coef"] != 0.05  # KL far below the target of 6: the adaptive controller lowers beta
    assert metrics["ppo/kl_coef"] < 0.05
    saved = load_file(ctx.out_dir / "model" / "model.safetensors")
    original = load_file(inputs["sft"].model_dir / "model.safetensors")
    assert any("mlp" in name for name in _first_changed(saved, original))  # full fine-tuning moved the MLPs


def test_crash_after_a_checkpoint_resumes_where_it_stopped(tmp_path, tiny_model_dir, inputs, monkeypatch, capsys):
    """updates=4, checkpoint every 2, the 3rd update raises; the re-run resumes at update 2 and ends
    with the same weights as an uninterrupted run (so policy, critic, EMA reference, optimisers,
    prompt cursor and KL coefficient were all restored)."""
    params = {"updates": 4, "checkpoint_every": 2, "ref_ema_decay": 0.5}
    collect_rollout, calls = ppo.collect_rollout, []

    def crash_on_third_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in update 3")
        return collect_rollout(*args, **kwargs)

    monkeypatch.setattr(ppo, "collect_rollout", crash_on_third_update)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ppo.run(make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params=params, key="crashy", pid=11))
    checkpoints = tmp_path / "outputs" / "checkpoints" / "ppo" / "crashy"
    assert [p.name for p in checkpoints.iterdir()] == ["update-000002"]
    monkeypatch.setattr(ppo, "collect_rollout", collect_rollout)

    tracker = RecordingTracker()
    resumed_ctx = make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params=params, key="crashy", pid=12, tracker=tracker)
    metrics = ppo.run(resumed_ctx).metrics
    assert "resuming from update 2" in capsys.readouterr().out
    assert metrics["resumed_from_update"] == 2 and metrics["updates_done"] == 4
    assert [step for step, _ in tracker.calls] == [3, 4]
    assert [p.name for p in checkpoints.iterdir()] == ["update-000004"]

    straight_ctx = make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params=params, key="straight", pid=13)
    straight = ppo.run(straight_ctx).metrics
    assert straight["resumed_from_update"] == 0
    assert metrics["ppo/kl"] == pytest.approx(straight["ppo/kl"], rel=1e-5, abs=1e-6)
    resumed_weights = load_file(resumed_ctx.out_dir / "model" / "model.safetensors")
    straight_weights = load_file(straight_ctx.out_dir / "model" / "model.safetensors")
    for name, weight in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, msg=name)


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_trains_the_same_policy(tmp_path, tiny_model_dir, inputs):
    """Recomputing activations in backward (and so running the prompt prefix per row) changes no result."""
    runs = {}
    for checkpointing in (False, True):
        ctx = make_ctx(tmp_path / str(checkpointing), tiny_model_dir, inputs,
                       ppo_params={"gradient_checkpointing": checkpointing})
        metrics = ppo.run(ctx).metrics
        runs[checkpointing] = metrics, load_file(ctx.out_dir / "model" / "model.safetensors")
    (plain_metrics, plain), (checkpointed_metrics, checkpointed) = runs[False], runs[True]
    assert checkpointed_metrics["weight_change"] == pytest.approx(plain_metrics["weight_change"], rel=1e-4)
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_prompt_stream_is_a_cycle_of_seeded_shuffles_that_resumes_from_its_cursor():
    stream = ppo.prompt_indices(5, 0, 15, seed=3)
    for epoch in range(3):
        assert sorted(stream[epoch * 5 : (epoch + 1) * 5]) == list(range(5))
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]  # epochs are reshuffled
    assert ppo.prompt_indices(5, 3, 9, seed=3) == stream[3:12]  # any cursor continues the same stream
    assert ppo.prompt_indices(5, 0, 5, seed=4) != stream[:5]


def test_checkpoint_dir_is_keyed_by_the_cache_key_of_the_staging_dir(tmp_path):
    config = validate({"run": {"output_dir": "out"}})

    def ctx(name: str) -> StageContext:
        return StageContext("ppo", config, {}, tmp_path / "out" / "ppo" / name, tmp_path, torch.device("cpu"), None)

    assert ctx(".staging-ab12cd-4242").checkpoint_dir == tmp_path / "out" / "checkpoints" / "ppo" / "ab12cd"
    assert ctx(".staging-a-b-1").checkpoint_dir.name == "a-b"
    assert ctx("somewhere").checkpoint_dir.name == "somewhere"


def test_lora_ema_reference_swaps_ema_weights_in_and_restores_the_policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    reference = ppo._adapter_reference(policy, decay=0.75)
    name, weight = next((n, w) for n, w in policy.named_parameters() if "lora_B" in n)
    assert torch.all(reference.ema[name] == 0)  # LoRA B starts at zero: the EMA reference starts at SFT

    with torch.no_grad():
        weight.fill_(1.0)  # "training" moved the policy
    reference.update_ema()
    torch.testing.assert_close(reference.ema[name], torch.full_like(weight, 0.25))  # 0.75 * 0 + 0.25 * 1
    with reference.activate():
        torch.testing.assert_close(weight.detach(), torch.full_like(weight, 0.25))
    torch.testing.assert_close(weight.detach(), torch.ones_like(weight))


# --------------------------------------------------------------------------------------------------
# Doing less work: the shared prompt prefix and pi_old from sampling
# --------------------------------------------------------------------------------------------------
def test_shared_prefix_length_leaves_every_row_a_token():
    assert ppo.shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert ppo.shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not 3: row 0 keeps one token
    assert ppo.shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert ppo.shared_prefix_length([[5]]) == 0


def _lora_policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, weight in policy.named_parameters():
        if "lora_B" in name:  # B starts at 0; make the adapter matter
            torch.nn.init.normal_(weight, std=0.5)
    return policy.eval()


def _unshared(sequences: ppo.Sequences) -> ppo.Sequences:
    """The same batch with the prefix written into every row (the plain left-padded layout)."""
    prefix = sequences.prefix_ids.expand(len(sequences.query_ids), -1)
    return sequences._replace(prefix_ids=sequences.prefix_ids[:0],
                              query_ids=torch.cat([prefix, sequences.query_ids], dim=1),
                              query_mask=torch.cat([prefix >= 0, sequences.query_mask], dim=1))


def test_shared_prefix_forward_matches_the_full_rows_in_value_and_gradient(tiny_model_dir):
    from transformers import AutoTokenizer

    from stages.config import GenerationConfig
    from stages.generation import sample

    policy, tokenizer = _lora_policy(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": f"Continue this movie review: {opening}"}] for opening in OPENINGS]
    samples = sample(policy, tokenizer, prompts, 1, GenerationConfig(max_new_tokens=6, temperature=1.5), seed=0)
    shared = ppo.to_sequences(samples, tokenizer.pad_token_id, torch.device("cpu"))
    assert shared.prefix_ids.shape[0] >= 10  # the chat header, system prompt and instruction
    assert shared.query_mask.sum(-1).min() >= 1

    lora = next(w for n, w in policy.named_parameters() if "lora_A" in n and "layers.0." in n)
    results = []
    for sequences in (shared, _unshared(shared)):
        policy.zero_grad()
        logits = ppo.response_logits(policy, sequences)
        logprobs = torch.where(sequences.response_mask,
                               ppo.gather_log_probs(logits, sequences.response_ids, 1.5), 0.0)
        logprobs.sum().backward()
        results.append((logprobs.detach(), lora.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_sampling_log_probs_and_entropy_are_those_of_a_forward_pass(tiny_model_dir):
    from transformers import AutoTokenizer

    from stages.config import GenerationConfig
    from stages.generation import pad_rows, sample
    from stages.losses import entropy_from_logits

    policy, tokenizer = _lora_policy(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": opening}] for opening in OPENINGS]
    samples = sample(policy, tokenizer, prompts, 2, GenerationConfig(max_new_tokens=7, temperature=0.7), seed=3,
                     with_logprobs=True)
    assert [len(x) for x in samples.logprobs] == [len(x) for x in samples.response_ids] == \
        [len(x) for x in samples.entropies]
    sequences = ppo.to_sequences(samples, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = ppo.response_logits(policy, sequences)
    mask = sequences.response_mask
    forward_logprobs = torch.where(mask, ppo.gather_log_probs(logits, sequences.response_ids, 0.7), 0.0)
    forward_entropy = torch.where(mask, entropy_from_logits(logits / 0.7), 0.0)
    sampled_logprobs, _ = pad_rows(samples.logprobs, 0, torch.device("cpu"), "right", dtype=torch.float32)
    sampled_entropy, _ = pad_rows(samples.entropies, 0, torch.device("cpu"), "right", dtype=torch.float32)
    torch.testing.assert_close(sampled_logprobs, forward_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sampled_entropy, forward_entropy, atol=1e-4, rtol=1e-4)


def test_bf16_mixed_precision_trains_float32_weights(tmp_path, tiny_model_dir, inputs):
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params={"updates": 1}, run={"mixed_precision": "bf16"})
    output = ppo.run(ctx)
    assert output.metrics["weight_change"] > 0
    assert math.isfinite(output.metrics["ppo/kl"]) and math.isfinite(output.metrics["ppo/score_mean"])
    saved = load_file(ctx.out_dir / "model" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # autocast: the weights stay float32


# --------------------------------------------------------------------------------------------------
# The reward's scale, the critic's start, and what each update reports
# --------------------------------------------------------------------------------------------------
def test_scores_are_standardised_on_sft_samples_and_the_critic_starts_at_their_mean(tmp_path, tiny_model_dir, inputs):
    """The reward model's scores of 8 SFT samples give (mean, std); every rollout score PPO optimises is
    (raw - mean) / std, and the critic's zero head puts every value at the standardised SFT mean, 0."""
    tracker = RecordingTracker()
    ctx = make_ctx(tmp_path, tiny_model_dir, inputs, ppo_params={"updates": 1}, tracker=tracker)
    models = ppo.build_models(ctx)
    prompts = ppo.load_prompts(inputs["prepare"].path / "train.jsonl", None)
    scale = ppo.measure_score_scale(models, prompts, ctx.config.ppo, seed=0)
    assert scale.std > 0 and math.isfinite(scale.mean)
    raw = torch.tensor([scale.mean, scale.mean + scale.std, scale.mean - 2 * scale.std])
    assert torch.allclose(scale.apply(raw), torch.tensor([0.0, 1.0, -2.0]), atol=1e-5)

    head = [weight for weight in models.critic.head.parameters()]
    assert head and all(torch.count_nonzero(weight) == 0 for weight in head)
    rollout, metrics = ppo.collect_rollout(models, prompts[:4], ctx.config.ppo, 0.05, seed=1, device=ctx.device)
    assert torch.count_nonzero(rollout.values) == 0  # the values start at the (standardised) SFT mean
    ppo.set_score_scale(models, scale, ctx.config.ppo)
    rollout, metrics = ppo.collect_rollout(models, prompts[:4], ctx.config.ppo, 0.05, seed=1, device=ctx.device)
    assert metrics["ppo/normalized_score_mean"] == pytest.approx((metrics["ppo/score_mean"] - scale.mean) / scale.std,
                                                                 abs=1e-5)

    # Without normalisation the values start at the raw SFT mean instead
    raw_cfg = ctx.config.ppo.model_copy(update={"reward_normalization": "none"})
    ppo.set_score_scale(models, ppo.ScoreScale(mean=1.5), raw_cfg)
    rollout, _ = ppo.collect_rollout(models, prompts[:4], raw_cfg, 0.05, seed=1, device=ctx.device)
    mask = rollout.sequences.response_mask
    assert torch.allclose(rollout.values[mask], torch.full_like(rollout.values[mask], 1.5))

    # The stage records the scale, and each update its approx-KL at ratio 1 and the value-clip fraction
    output = ppo.run(ctx)
    assert output.metrics["ppo/sft_score_std"] > 0
    [(_, logged)] = tracker.calls
    assert logged["ppo/approx_kl_first"] == pytest.approx(0.0, abs=1e-5)  # float32: sampling = training
    assert 0.0 <= logged["ppo/value_clip_fraction"] <= 1.0 and math.isfinite(logged["ppo/explained_variance"])


def test_ppo_refuses_a_nucleus_and_its_adaptive_kl_defaults_can_move():
    from stages.config import ConfigError, PPOConfig
    from stages.losses import make_kl_controller

    with pytest.raises(ConfigError, match="ppo.generation.top_p is 0.9: PPO's ratio .* ignores the nucleus"):
        validate({"ppo": {"generation": {"top_p": 0.9}}})
    validate({"evaluate": {"generation": {"top_p": 0.9}}})  # sampling for evaluation may use one
    defaults = PPOConfig()
    controller = make_kl_controller("adaptive", 0.05, defaults.kl_target, defaults.kl_horizon)
    controller.update(2 * defaults.kl_target, defaults.rollout_batch_size)  # KL at twice the target
    # beta grows by 0.2 x 32 / 160 = 4% per update (Ziegler's 10000-sample horizon moved it by 0.064%)
    assert controller.value == pytest.approx(0.05 * 1.04)
    assert "value_coef" not in PPOConfig.model_fields  # separate optimisers: a weight would do nothing
