"""Gold judges: reward functions whose value is known, used to label pairs and to evaluate.

A judge maps completions to scalar scores (higher is better). The embedded task's judge is VADER's
compound sentiment score in [-1, 1] (Hutto & Gilbert 2014), the DPO paper's controlled-sentiment
setting with a lexicon judge in place of a trained classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


GOLD_JUDGES: dict[str, Callable[[], Judge]] = {
    # data.task -> the task's gold judge; tasks without one are judged by the reward model
    "sentiment": SentimentJudge,
}


def gold_judge(task: str) -> Judge | None:
    factory = GOLD_JUDGES.get(task)
    return factory() if factory else None
