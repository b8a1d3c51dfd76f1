"""Judges: the gold judges (reward functions whose value is known, used to label pairs and to evaluate),
and the judge that scores policies for evaluation (``evaluate.judge``: gold, the held-out reward model,
a reward model the user names, or, explicitly, the training reward model).

A judge maps completions to scalar scores (higher is better). The embedded task's judge is VADER's
compound sentiment score in [-1, 1] (Hutto & Gilbert 2014), the DPO paper's controlled-sentiment
setting with a lexicon judge in place of a trained classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Judge(Protocol):
    name: str

    def score(self, completions: Sequence[str]) -> list[float]: ...


class SentimentJudge:
    """VADER compound sentiment of the completion text: +1 most positive, -1 most negative."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, completions: Sequence[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in completions]


class CountingJudge:
    """A judge that counts its calls: one per completion scored (the gold-judge budget a method spends)."""

    def __init__(self, judge: Judge) -> None:
        self.name, self._judge, self.calls = judge.name, judge, 0

    def score(self, completions: Sequence[str]) -> list[float]:
        self.calls += len(completions)
        return self._judge.score(completions)


GOLD_JUDGES: dict[str, Callable[[], Judge]] = {
    # data.task -> the task's gold judge; tasks without one are judged by the reward model
    "sentiment": SentimentJudge,
}


def gold_judge(task: str) -> Judge | None:
    factory = GOLD_JUDGES.get(task)
    return factory() if factory else None


# --------------------------------------------------------------------------------------------------
# The judge that scores policies (evaluate, score, the compare report, the retrain gate)
# --------------------------------------------------------------------------------------------------
Messages = list[dict[str, str]]
JUDGE_KINDS = ("gold", "held_out_rm", "training_rm", "model")


class JudgeError(ValueError):
    """``evaluate.judge`` names a judge this run cannot have; the message says what would work."""


def judge_kind(config) -> str:
    """``evaluate.judge`` resolved: "gold" | "held_out_rm" | "training_rm" | "model" (a path or hub id).

    ``auto`` is the task's gold judge where it has one, else ``held_out_rm``: a policy is never judged
    by a model it was trained against unless ``training_rm`` says so explicitly.
    """
    choice, task = config.evaluate.judge, config.data.task
    if choice == "auto":
        return "gold" if task in GOLD_JUDGES else "held_out_rm"
    if choice == "gold" and task not in GOLD_JUDGES:
        raise JudgeError(f"evaluate.judge is 'gold' but data.task {task!r} has no gold judge (tasks with one: "
                         f"{sorted(GOLD_JUDGES)}); use 'held_out_rm', or the path of a reward model")
    return choice if choice in ("gold", "held_out_rm", "training_rm") else "model"


def carves_judge_split(config) -> bool:
    """Whether the pairs are split three ways (train, eval, judge): only for the held-out judge."""
    return judge_kind(config) == "held_out_rm"


@dataclass(frozen=True)
class PolicyJudge:
    """What scores sampled responses for evaluation, and what the verdict says about it."""

    name: str  # "vader", "held_out_rm", "training_rm" or the model's path / hub id
    kind: str  # one of JUDGE_KINDS
    score: Callable[[list[Messages], list[str]], list[float]]  # (prompts, responses) -> one score each
    pair_accuracy: float | None = None  # held-out preference accuracy where it was measured (RM judges)
    pairs: int | None = None  # how many held-out pairs that accuracy is over

    @property
    def independent(self) -> bool:
        """False only for the training reward model: PPO (and RLOO/GRPO) optimised against it."""
        return self.kind != "training_rm"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "independent": self.independent,
                "pair_accuracy": self.pair_accuracy, "pairs": self.pairs}


def reward_model_judge(name: str, kind: str, model, tokenizer, *, accuracy: float | None = None,
                       pairs: int | None = None, batch_size: int = 16) -> PolicyJudge:
    """A judge that reads a sequence-classification reward model's score of prompt + response (float32)."""
    from stages.generation import reward_scores

    def score(prompts: list[Messages], responses: list[str]) -> list[float]:
        conversations = [[*prompt, {"role": "assistant", "content": text}]
                         for prompt, text in zip(prompts, responses, strict=True)]
        return reward_scores(model, tokenizer, conversations, batch_size=batch_size).tolist()

    return PolicyJudge(name, kind, score, accuracy, pairs)


def gold_policy_judge(task: str) -> PolicyJudge:
    judge = gold_judge(task)
    if judge is None:
        raise JudgeError(f"data.task {task!r} has no gold judge")
    return PolicyJudge(judge.name, "gold", lambda prompts, responses: judge.score(responses))
