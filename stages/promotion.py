"""Champion and challenger: which registered policy version is in service, and the gate that changes it.

Aliases of ``run.registered_model`` in the MLflow model registry:

- ``challenger``: the newest policy version that a retrain produced;
- ``champion``: the version in service (``models:/<name>@champion``). The versions that held it, oldest
  first, are the registered model's tag ``alignflow.champion_history``; a rollback goes back one.

The gate (:func:`gate`) compares the challenger with the champion on the held-out prompts of the
retrain run. Both policies are sampled there with the same seed, so sample ``i`` of each answers the
same prompt, and each sample is scored by ``evaluate.judge``: the task's gold judge, or, where the task
has none, the held-out judge (a reward model trained on pairs that neither policy nor the training reward
model saw), never by the reward model a policy was trained against unless that is asked for explicitly.
``retrain.gate_metric`` picks the comparison (one function per metric in ``GATE_METRICS``); the
challenger becomes champion only when its score is above the bar:

- ``win_rate_vs_champion``: the share of prompts where the challenger's sample scores higher (a tie
  counts one half); bar ``0.5 + retrain.gate_margin``;
- ``judge_score_mean``: the mean score of its samples; bar the champion's mean ``+ retrain.gate_margin``.

With no champion yet, the first challenger becomes champion. Every decision (the gate's, and the
manual ones of ``alignflow promote`` / ``alignflow rollback``) is a :class:`Decision` whose tags and
metrics go on an MLflow run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.config import Config, RunConfig

if TYPE_CHECKING:
    from stages.runner import StageResult

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "alignflow.champion_history"


class PromotionError(ValueError):
    """A promotion or rollback cannot be done; the message says why."""


# --------------------------------------------------------------------------------------------------
# Gate metrics: per-sample judge scores of both policies -> (challenger score, champion score, bar)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateScores:
    challenger: float
    champion: float
    bar: float  # the challenger's score must be above this to become champion


def _win_rate_gate(challenger: Sequence[float], champion: Sequence[float], margin: float) -> GateScores:
    from stages.bootstrap import win_rate

    rate = win_rate(list(challenger), list(champion))
    return GateScores(challenger=rate, champion=1.0 - rate, bar=0.5 + margin)


def _mean_gate(challenger: Sequence[float], champion: Sequence[float], margin: float) -> GateScores:
    champion_mean = statistics.fmean(champion)
    return GateScores(challenger=statistics.fmean(challenger), champion=champion_mean, bar=champion_mean + margin)


GATE_METRICS: dict[str, Callable[[Sequence[float], Sequence[float], float], GateScores]] = {
    "win_rate_vs_champion": _win_rate_gate,
    "judge_score_mean": _mean_gate,
}


# --------------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """One change (or non-change) of the champion, and why."""

    decision: str  # promoted | rejected | unchanged (gate); manual_promote | rollback (CLI)
    reason: str
    champion_before: str | None
    champion_after: str | None
    challenger: str | None = None
    policy: str | None = None  # the stage that trained the challenger (dpo, ppo)
    metric: str | None = None
    margin: float | None = None
    challenger_score: float | None = None
    champion_score: float | None = None
    bar: float | None = None
    samples: int | None = None
    judged_by: str | None = None  # the judge's name: the gold judge's, held_out_rm, a model path, or training_rm
    dataset_md5: str | None = None  # DVC version of the preference data the challenger was trained on
    actor: str | None = None  # who ran a manual decision

    @property
    def changed(self) -> bool:
        return self.champion_after != self.champion_before

    def tags(self, prefix: str = "alignflow.") -> dict[str, str]:
        values = {
            "decision": self.decision, "reason": self.reason,
            "champion_version": self.champion_after, "previous_champion_version": self.champion_before,
            "challenger_version": self.challenger, "policy": self.policy, "gate_metric": self.metric,
            "gate_margin": self.margin, "judged_by": self.judged_by, "dataset_md5": self.dataset_md5,
            "actor": self.actor,
        }
        return {f"{prefix}{key}": "none" if value is None else str(value)[:4900] for key, value in values.items()
                if value is not None or key in ("champion_version", "previous_champion_version")}

    def metrics(self, prefix: str = "gate/") -> dict[str, float]:
        values = {"challenger_score": self.challenger_score, "champion_score": self.champion_score,
                  "bar": self.bar, "samples": self.samples, "promoted": float(self.changed)}
        return {f"{prefix}{key}": float(value) for key, value in values.items() if value is not None}

    def markdown(self) -> str:
        def score(value: float | None) -> str:
            return "—" if value is None else f"{value:.4f}"

        lines = [f"## Promotion decision: **{self.decision}**", "", self.reason, ""]
        if self.metric:
            lines += [f"| | version | {self.metric} |", "|---|---|---|",
                      f"| challenger ({self.policy or 'policy'}) | {self.challenger or '—'} | "
                      f"{score(self.challenger_score)} |",
                      f"| champion before | {self.champion_before or '—'} | {score(self.champion_score)} |", "",
                      f"Bar: above {score(self.bar)} (margin {self.margin}); {self.samples or 0} same-prompt samples "
                      f"judged by {self.judged_by or '—'}.", ""]
        lines += [f"- champion now: version {self.champion_after or '—'} (before: {self.champion_before or 'none'})"]
        if self.dataset_md5:
            lines.append(f"- preference data: DVC md5 `{self.dataset_md5}`")
        if self.actor:
            lines.append(f"- by: {self.actor}")
        return "\n".join(lines)


def gate(metric: str, margin: float, *, challenger: str, champion: str | None,
         challenger_scores: Sequence[float] | None = None, champion_scores: Sequence[float] | None = None,
         judged_by: str | None = None, dataset_md5: str | None = None, policy: str | None = None) -> Decision:
    """The gate's decision for ``challenger`` against ``champion`` (None: there is none yet).

    ``challenger_scores[i]`` and ``champion_scores[i]`` are the judge's scores of the two policies'
    samples for the same prompt; they are needed only when there is a champion other than the challenger.
    """
    common = {"challenger": challenger, "policy": policy, "metric": metric, "margin": margin,
              "judged_by": judged_by, "dataset_md5": dataset_md5, "champion_before": champion}
    if champion is None:
        return Decision("promoted", f"no champion yet: challenger version {challenger} becomes the first champion",
                        champion_after=challenger, **common)
    if champion == challenger:
        return Decision("unchanged", f"version {challenger} is already the champion (its policy was cached)",
                        champion_after=champion, **common)
    if not challenger_scores or champion_scores is None:
        raise PromotionError("the gate needs the judge's scores of both policies' samples")
    if len(challenger_scores) != len(champion_scores):
        raise PromotionError(f"the gate compares samples pairwise: {len(challenger_scores)} challenger scores "
                             f"against {len(champion_scores)} champion scores")
    scores = GATE_METRICS[metric](challenger_scores, champion_scores, margin)
    promoted = scores.challenger > scores.bar
    verdict = ("challenger becomes champion" if promoted else "champion stays")
    reason = (f"challenger version {challenger}: {metric} {scores.challenger:.4f} "
              f"{'>' if promoted else '<='} bar {scores.bar:.4f} against champion version {champion} "
              f"({scores.champion:.4f}, margin {margin}, n={len(challenger_scores)}): {verdict}")
    return Decision("promoted" if promoted else "rejected", reason,
                    champion_after=challenger if promoted else champion, challenger_score=scores.challenger,
                    champion_score=scores.champion, bar=scores.bar, samples=len(challenger_scores), **common)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
class Registry:
    """Aliases and champion history of one registered model."""

    def __init__(self, client, name: str, uri: str):
        self.client = client
        self.name = name
        self.uri = uri  # tracking and registry URI

    @classmethod
    def open(cls, run: RunConfig, root: Path) -> Registry:
        from mlflow import MlflowClient

        from stages.tracking import tracking_uri

        uri = tracking_uri(run, root)
        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri), run.registered_model, uri)

    def version(self, version: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise PromotionError(f"registered model {self.name!r} has no version {version!r}") from None

    def alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:  # no such alias (or no such registered model)
            return None

    def champion(self) -> str | None:
        return self.alias(CHAMPION)

    def history(self) -> list[str]:
        """Versions that were champion, oldest first, ending with the current one."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        history = [str(version) for version in json.loads(tags.get(HISTORY_TAG, "[]"))]
        current = self.champion()
        if current is not None and (not history or history[-1] != current):
            history.append(current)  # the alias was moved by hand (MLflow UI): it still counts
        return history

    def set_challenger(self, version: str) -> None:
        self.version(version)
        self.client.set_registered_model_alias(self.name, CHALLENGER, str(version))

    def tag_version(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value)[:4900])

    def make_champion(self, version: str) -> str | None:
        """Give ``version`` the champion alias; return the previous champion."""
        self.version(version)
        previous, history = self.champion(), self.history()
        if previous == str(version):
            raise PromotionError(f"version {version} of {self.name!r} is already the champion")
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))
        self._set_history([*history, str(version)])
        return previous

    def rollback(self) -> tuple[str, str]:
        """Champion back to the previous champion; return (the version rolled back, the champion now)."""
        current, history = self.champion(), self.history()
        if current is None:
            raise PromotionError(f"registered model {self.name!r} has no champion to roll back")
        if len(history) < 2:
            raise PromotionError(f"version {current} of {self.name!r} is the first champion: there is no previous "
                                 "champion to roll back to (promote a version instead: alignflow promote VERSION)")
        previous = history[-2]
        self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        self._set_history(history[:-1])
        self.tag_version(current, {"alignflow.rolled_back": datetime.now(UTC).isoformat(timespec="seconds")})
        return current, previous

    def _set_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))


def apply(registry: Registry, decision: Decision) -> None:
    """Carry a gate decision out in the registry: the champion alias (when it changes) and version tags."""
    if decision.challenger:
        registry.tag_version(decision.challenger, {
            "alignflow.gate.decision": decision.decision, "alignflow.gate.reason": decision.reason,
            "alignflow.dataset_md5": decision.dataset_md5 or "none",
            **({"alignflow.gate.score": f"{decision.challenger_score:.4f}"}
               if decision.challenger_score is not None else {}),
        })
    if decision.changed and decision.champion_after:
        registry.make_champion(decision.champion_after)


# --------------------------------------------------------------------------------------------------
# Manual decisions: `alignflow promote VERSION`, `alignflow rollback`
# --------------------------------------------------------------------------------------------------
def _actor() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        return "unknown"


def promote(config: Config, root: Path, version: str, reason: str | None = None) -> tuple[Decision, str]:
    """Make ``version`` the champion by hand; record the decision as an MLflow run. Return it and the run id."""
    registry = Registry.open(config.run, root)
    previous = registry.make_champion(str(version))
    decision = Decision("manual_promote", reason or f"version {version} promoted by hand",
                        champion_before=previous, champion_after=str(version), challenger=str(version),
                        actor=_actor())
    registry.tag_version(str(version), {"alignflow.gate.decision": decision.decision,
                                        "alignflow.gate.reason": decision.reason})
    return decision, record(config, root, decision, f"promote-v{version}")


def rollback(config: Config, root: Path, reason: str | None = None) -> tuple[Decision, str]:
    """Champion back to the previous champion; record the decision as an MLflow run. Return it and the run id."""
    registry = Registry.open(config.run, root)
    current, previous = registry.rollback()
    decision = Decision("rollback", reason or f"version {current} rolled back to version {previous}",
                        champion_before=current, champion_after=previous, actor=_actor())
    return decision, record(config, root, decision, f"rollback-v{current}-to-v{previous}")


def record(config: Config, root: Path, decision: Decision, run_name: str) -> str:
    """An MLflow run in ``run.experiment`` holding the decision's tags and metrics; return its id."""
    from stages.tracking import Tracker

    tracker = Tracker.start(config.run, root, run_name, tags={"alignflow.flow": "promotion", **decision.tags()})
    tracker.log_metrics(decision.metrics())
    tracker.finish()
    return tracker.run_id


# --------------------------------------------------------------------------------------------------
# A registered version as a stage result (what the score stage takes as its "policy" input)
# --------------------------------------------------------------------------------------------------
def policy_result(registry: Registry, version: str, config: Config, root: Path) -> StageResult:
    """The stage output that holds ``version``'s model: found by the tags of the MLflow run that
    registered it (its stage and cache key) under this project's outputs, else downloaded from the
    registry into ``<run.output_dir>/registry/<name>/<version>/``."""
    from stages.runner import RESULT_FILE, StageResult, output_dir, output_root

    model_version = registry.version(version)
    if model_version.run_id:
        tags = registry.client.get_run(model_version.run_id).data.tags
        stage, key = tags.get("alignflow.stage"), tags.get("alignflow.cache_key")
        if stage and key and (output_dir(stage, key, config, root) / RESULT_FILE).is_file():
            return StageResult.load(output_dir(stage, key, config, root))
    target = output_root(config, root) / "registry" / registry.name / str(version)
    if not target.is_dir():
        import mlflow

        staging = target.with_name(f".{target.name}.download")
        staging.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registry.name}/{version}", dst_path=str(staging),
                                            tracking_uri=registry.uri, registry_uri=registry.uri)
        staging.rename(target)
    weights = sorted(path.parent for path in target.rglob("config.json") if any(path.parent.glob("*.safetensors")))
    if not weights:
        raise PromotionError(f"version {version} of {registry.name!r} holds no safetensors model under {target}")
    return StageResult(stage=f"registry-v{version}", key=f"registry-{version}", output_dir=str(target),
                       content_key=f"registry-{registry.name}-{version}-{model_version.run_id}",
                       info={"model": str(weights[0].relative_to(target)), "policy": True,
                             "registered_version": str(version)})
