"""The independent judge and what the verdict is measured with: which judge scores policies, the held-out
judge's data, the KL at the sampling temperature, float32 scoring, explicit generation, final metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages import prepare
from stages.config import validate
from stages.evaluate import build_judge
from stages.generation import sample, sequence_log_probs
from stages.judges import JudgeError, judge_kind
from stages.runner import STAGES, StageContext, StageResult, pipeline_order
from tests.conftest import tiny_params


def config(**sections):
    return validate({name: values for name, values in sections.items()})


# --------------------------------------------------------------------------------------------------
# Which judge
# --------------------------------------------------------------------------------------------------
def test_auto_is_the_gold_judge_where_the_task_has_one_and_the_held_out_judge_elsewhere():
    assert judge_kind(config()) == "gold"
    preference = config(data={"task": "preference", "source": "pairs.jsonl"})
    assert judge_kind(preference) == "held_out_rm"
    assert "judge" in pipeline_order(preference)  # its own cached stage
    assert "judge" not in pipeline_order(config())  # the gold judge needs none
    assert "judge" in STAGES["score"].inputs(preference)


def test_gold_is_refused_for_a_task_without_one():
    with pytest.raises(JudgeError, match="data.task 'preference' has no gold judge"):
        judge_kind(config(data={"task": "preference", "source": "x.jsonl"}, evaluate={"judge": "gold"}))


def test_the_training_reward_model_is_refused_as_a_judge_unless_named_explicitly(tmp_path):
    """Its path in evaluate.judge is refused; evaluate.judge: training_rm is the explicit setting, and then
    the judge says it is not independent."""
    reward_dir = tmp_path / "reward" / "model"
    reward_dir.mkdir(parents=True)
    reward = StageResult("reward", "k", str(tmp_path / "reward"), "c", {"eval_pair_accuracy": 0.7, "eval_pairs": 21.0},
                         {"model": "model"})
    by_path = config(evaluate={"judge": str(reward_dir)})
    assert judge_kind(by_path) == "model"
    ctx = StageContext("score", by_path, {"reward": reward}, tmp_path / "out", tmp_path, torch.device("cpu"), None)
    with pytest.raises(JudgeError, match="is this run's training reward model.*evaluate.judge: training_rm"):
        build_judge(ctx, reward_model=None, tokenizer=None)

    explicit = config(evaluate={"judge": "training_rm"})
    ctx = StageContext("score", explicit, {"reward": reward}, tmp_path / "out", tmp_path, torch.device("cpu"), None)
    judge = build_judge(ctx, reward_model=None, tokenizer=None)
    assert judge.kind == "training_rm" and judge.independent is False
    assert judge.describe() == {"name": "training_rm", "kind": "training_rm", "independent": False,
                                "pair_accuracy": 0.7, "pairs": 21}


def test_unknown_judge_strings_are_model_paths_and_splits_must_leave_training_rows(tmp_path):
    assert judge_kind(config(evaluate={"judge": "org/some-reward-model"})) == "model"
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _pairs(20)))
    data = config(data={"task": "preference", "source": "pairs.jsonl", "eval_fraction": 0.5,
                        "judge_fraction": 0.5}).data
    with pytest.raises(prepare.DataError, match=r"data.eval_fraction \(0.5\) \+ data.judge_fraction \(0.5\)"):
        prepare.prepare_data(data, tmp_path / "out", seed=0, root=tmp_path, judge_split=True)


# --------------------------------------------------------------------------------------------------
# The held-out judge never sees a policy's pairs
# --------------------------------------------------------------------------------------------------
def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(n)]


def test_prepare_keeps_the_judge_split_apart_from_train_and_eval(tmp_path):
    """With the held-out judge, data.judge_fraction of the pairs go to judge.jsonl, none of them (nor their
    prompts) in train.jsonl, which every policy and the training reward model learn from; the eval split is
    the same as without a judge split."""
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _pairs(200)))
    data = config(data={"task": "preference", "source": "pairs.jsonl", "judge_fraction": 0.3}).data
    with_judge = prepare.prepare_data(data, tmp_path / "a", seed=0, root=tmp_path, judge_split=True)
    without = prepare.prepare_data(data, tmp_path / "b", seed=0, root=tmp_path, judge_split=False)

    def rows(directory: str, name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / directory / name).read_text().splitlines()]

    train, evaluation, judged = rows("a", "train.jsonl"), rows("a", "eval.jsonl"), rows("a", "judge.jsonl")
    assert with_judge.judge_rows == len(judged) and 40 <= len(judged) <= 80  # ~30% of 200
    assert len(train) + len(evaluation) + len(judged) == 200 == with_judge.kept
    prompts = {side: {json.dumps(r["prompt"]) for r in split} for side, split in
               (("train", train), ("eval", evaluation), ("judge", judged))}
    assert not prompts["judge"] & prompts["train"] and not prompts["judge"] & prompts["eval"]
    assert rows("b", "eval.jsonl") == evaluation  # the eval prompts do not move
    assert rows("b", "judge.jsonl") == [] and without.judge_rows == 0


def test_label_splits_prompts_three_ways_for_a_held_out_judge():
    from stages.label import _bucket

    buckets = [_bucket(f"p{i}", 0) for i in range(1000)]
    assert all(0.0 <= b < 1.0 for b in buckets)
    assert 200 < sum(0.1 <= b < 0.35 for b in buckets) < 300  # the judge's 25% after eval's 10%


# --------------------------------------------------------------------------------------------------
# The reward model's own pairs (reward.pairing) and its head's rate
# --------------------------------------------------------------------------------------------------
def _scored_samples() -> list[dict]:
    """label's samples.jsonl: 6 prompts x 4 scored samples; prompts 0-2 train, 3-4 eval, 5 judge."""
    splits = ["train", "train", "train", "eval", "eval", "judge"]
    scores = [0.9, 0.5, 0.45, -0.7]  # the 0.5 / 0.45 pair is within min_gap 0.1
    return [{"prompt_id": f"p{i}", "split": split, "prompt": [{"role": "user", "content": f"Continue: film {i}"}],
             "completion": f"reply {i}.{k} " + ("great" if score > 0 else "awful"), "score": score, "ended": True}
            for i, split in enumerate(splits) for k, score in enumerate(scores)]


def test_reward_pairs_every_two_samples_of_its_split_only():
    from stages.label import split_pairs

    samples = _scored_samples()
    train = split_pairs(samples, "train", 0.1, "all")
    assert len(train) == 3 * 5  # 6 pairs per prompt, less the one within the gap
    assert {row["id"].split("-")[0] for row in train} == {"p0", "p1", "p2"}
    assert all(row["score_chosen"] - row["score_rejected"] > 0.1 for row in train)
    assert len(split_pairs(samples, "train", 0.1, "rank")) == 3 * 1  # best-worst; 2nd-3rd is within the gap
    judge = split_pairs(samples, "judge", 0.1, "all")
    assert {row["id"].split("-")[0] for row in judge} == {"p5"}  # the judge's prompt, never a policy's


def test_reward_stage_trains_on_its_own_pairing_with_the_head_at_its_own_rate(tiny_model_dir, tmp_path, monkeypatch):
    from stages import reward
    from stages.label import rank_pairs, split_pairs
    from stages.records import write_jsonl

    samples = _scored_samples()
    label_dir = tmp_path / "label"
    label_dir.mkdir()
    write_jsonl(label_dir / "samples.jsonl", samples)
    for split, name in (("train", "train.jsonl"), ("eval", "eval.jsonl")):  # label's own rank pairs
        write_jsonl(label_dir / name, [pair for i in range(6) if samples[4 * i]["split"] == split
                                       for pair in rank_pairs(samples[4 * i]["prompt"],
                                                              [s["completion"] for s in samples[4 * i: 4 * i + 4]],
                                                              [s["score"] for s in samples[4 * i: 4 * i + 4]], 0.1)])
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "model").symlink_to(tiny_model_dir)
    made, original = [], reward.head_optimizer
    monkeypatch.setattr(reward, "head_optimizer", lambda model, cfg: made.append(original(model, cfg)) or made[-1])

    cfg = validate(tiny_params(tiny_model_dir, tmp_path, label={"min_gap": 0.1},
                               reward={"pairing": "all", "head_learning_rate": 0.05, "learning_rate": 1e-3,
                                       "max_steps": 2, "batch_size": 2, "save_steps": 0}))
    inputs = {"sft": StageResult("sft", "k", str(sft_dir), "c", info={"model": "model"}),
              "label": StageResult("label", "k", str(label_dir), "c")}
    out = tmp_path / "reward-out"
    out.mkdir()
    metrics = reward.run(StageContext("reward", cfg, inputs, out, tmp_path, torch.device("cpu"), None)).metrics

    assert metrics["train_pairs"] == len(split_pairs(samples, "train", 0.1, "all")) == 15  # not label's 3
    assert metrics["eval_pairs"] == len(split_pairs(samples, "eval", 0.1, "all")) == 10
    (optimizer,) = made
    body, head = optimizer.param_groups
    assert (body["initial_lr"], head["initial_lr"]) == (1e-3, 0.05)
    assert sum(p.numel() for p in head["params"]) == 32  # score.weight (1, 32): the tiny model's hidden size


# --------------------------------------------------------------------------------------------------
# KL at the sampling temperature, in float32
# --------------------------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A 'language model' whose next-token logits are the same at every position: (V,) ``logits``."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_kl_is_measured_at_the_sampling_temperature():
    """p = softmax([2, 1, 0] / T), q = softmax([0, 1, 2] / T). For one-token responses y, weighting
    log p_T(y) - log q_T(y) by p_T(y) gives KL(p_T || q_T) exactly. Both log-normalisers are equal (the
    logits are a permutation), so log p_T(y) - log q_T(y) = (z_p(y) - z_q(y)) / T = [2, 0, -2] / T and
    KL = (p_T(0) - p_T(2)) * 2 / T. At T = 0.5: p = softmax([4, 2, 0]) = [.8668, .1173, .0159], KL = 3.4037 nats;
    at T = 1 (what scoring at temperature 1 measures) p = [.6652, .2447, .0900], KL = 1.1504: not the KL
    between the distributions that sampled at 0.5."""
    policy, reference = FixedLogits([2.0, 1.0, 0.0]), FixedLogits([0.0, 1.0, 2.0])
    prompts, responses = [[5], [5], [5]], [[0], [1], [2]]
    for temperature, expected in ((0.5, 3.4037), (1.0, 1.1504)):
        logp = sequence_log_probs(policy, prompts, responses, pad_id=9, temperature=temperature)  # (3,)
        logq = sequence_log_probs(reference, prompts, responses, pad_id=9, temperature=temperature)
        assert logp.dtype == torch.float32
        assert torch.allclose(logp.exp().sum(), torch.tensor(1.0))  # a distribution over the three replies
        kl = float((logp.exp() * (logp - logq)).sum())
        assert kl == pytest.approx(expected, abs=1e-3)
        z_p, z_q = torch.tensor([2.0, 1.0, 0.0]) / temperature, torch.tensor([0.0, 1.0, 2.0]) / temperature
        reference_kl = float((z_p.softmax(0) * (z_p.log_softmax(0) - z_q.log_softmax(0))).sum())
        assert kl == pytest.approx(reference_kl, abs=1e-5)


def test_sequence_log_probs_stay_float32_under_autocast(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8]]
    plain = sequence_log_probs(model, prompts, responses, pad_id=0, temperature=0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sequence_log_probs(model, prompts, responses, pad_id=0, temperature=0.8)
    assert torch.equal(plain, under)


def test_sampled_log_probs_are_the_scored_log_probs_at_the_sampling_temperature(tiny_model_dir):
    """evaluate takes a policy's log-probs for its KL from the sampling pass (left-padded, KV-cached) instead
    of a second forward pass: they must equal sequence_log_probs at the same temperature, and differ from
    the temperature-1 figure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.config import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "Say something."}], [{"role": "user", "content": "A longer prompt here, "
                                                                  "so that the batch is left-padded."}]]
    generation = GenerationConfig(max_new_tokens=12, temperature=0.7, batch_size=4)
    drawn = sample(model, tokenizer, prompts, 2, generation, seed=11, with_logprobs=True)
    sampled = torch.tensor([sum(row) for row in drawn.logprobs])
    scored = sequence_log_probs(model, drawn.prompt_ids, drawn.response_ids, pad_id=tokenizer.pad_token_id,
                                temperature=0.7)
    torch.testing.assert_close(sampled, scored, atol=1e-3, rtol=1e-4)
    at_one = sequence_log_probs(model, drawn.prompt_ids, drawn.response_ids, pad_id=tokenizer.pad_token_id)
    assert not torch.allclose(sampled, at_one, atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Sampling is what was configured, whatever the model's own generation config says
# --------------------------------------------------------------------------------------------------
def test_a_models_repetition_penalty_does_not_reach_the_sampler(tiny_model_dir, tmp_path):
    """A generation_config.json with repetition_penalty 10 and no_repeat_ngram_size 1 would reshape every
    step's distribution (and forbid every repeated token); sampling passes its own full config instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.config import GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "Say something."}]] * 2
    generation = GenerationConfig(max_new_tokens=24, temperature=0.05, batch_size=2)  # near-greedy: it loops
    clean = sample(model, tokenizer, prompts, 2, generation, seed=3)
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.no_repeat_ngram_size = 1
    assert sample(model, tokenizer, prompts, 2, generation, seed=3).response_ids == clean.response_ids
    assert model.generation_config.repetition_penalty == 10.0  # the model's own config is put back
    repeats = any(len(set(ids)) < len(ids) for ids in clean.response_ids)
    assert repeats  # a near-greedy random model repeats tokens, which no_repeat_ngram_size 1 would forbid


# --------------------------------------------------------------------------------------------------
# Final metrics do not become the first point of a curve
# --------------------------------------------------------------------------------------------------
def test_final_metrics_are_logged_at_the_last_step(tmp_path):
    from stages.tracking import Tracker

    run = validate(tiny_params(Path("unused"), tmp_path)).run
    tracker = Tracker.start(run, tmp_path, "curve")
    tracker.log_metrics({"ppo/kl": 0.1}, step=1)
    tracker.log_metrics({"ppo/kl": 0.3}, step=2)
    tracker.log_metrics({"ppo/kl": 0.3, "stage_seconds": 5.0})  # the stage's summary
    history = tracker.metric_history(["ppo/kl", "stage_seconds"])
    tracker.finish()
    assert history["ppo/kl"][0] == (1, 0.1)  # the curve starts where training started
    assert [step for step, _ in history["ppo/kl"]] == [1, 2, 2]
    assert history["stage_seconds"] == [(2, 5.0)]
    assert math.isfinite(history["ppo/kl"][-1][1])
