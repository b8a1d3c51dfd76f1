"""The comparison report of the DPO-vs-PPO arena: every policy on one KL-reward frontier, with error bars.

Input: one ``PolicyPoint`` per policy (the SFT policy included), each scored the same way by the same
judge on the same held-out samples (sample i of every policy answers prompt i; several training seeds
of a policy each score those same samples). Every number is computed here from the per-sample scores
that were given, and every comparison carries its 95% bootstrap interval (:mod:`stages.bootstrap`:
prompts resampled as clusters, paired between the two policies, training seeds resampled where
several ran). Output, in ``out_dir``:

- ``verdict.json``: the judge and whether it is independent of every policy, one entry per policy
  (mean judge score with ``ci95``, KL to SFT, gold-judge calls, seconds, difference to SFT with
  ``ci95``), the head-to-heads of the methods' best policies, and ``verdict``: a sentence computed
  from those intervals;
- ``frontier.png``: judge score (with its interval) against KL to the SFT reference, one curve per
  method over its settings, as Fig. 2 of Rafailov et al. 2023 (DPO);
- ``curves.png``: training curves, one subplot per curve metric, one line per policy;
- ``policies.csv`` / ``policies.json`` / ``head_to_head.json``: the tables, for machines;
- ``summary.md`` and ``index.html`` (self-contained: images as data URIs, no script, no network), which
  open with the verdict.

The "best" policy of a method is the one with the highest mean judge score on these same samples, so
a head-to-head of bests favours methods with more grid points (selection on the test prompts); the
arena profile (``params/arena.yaml``) chooses settings on validation prompts instead.

Pure: no Prefect, no MLflow; the caller logs the files and turns ``Report``'s tables into artifacts.
Plots use matplotlib's ``Figure`` directly (Agg canvas), so no pyplot state or backend is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stages.bootstrap import (
    Interval,
    as_scores,
    difference_interval,
    mean_interval,
    verdict,
    win_rate_interval,
)

SFT = "sft"
Y_METRIC = "judge_score_mean"
KL_LABEL = "KL to the SFT policy at the sampling temperature (kl_to_sft, nats)"
REQUIRED_METRICS = ("kl_to_sft",)
OPTIONAL_COLUMNS = ("gold_reward_mean", "rm_score_mean", "implicit_pair_accuracy", "response_tokens_mean",
                    "distinct_2")
JUDGE_KINDS = {"gold": "the task's gold judge",
               "held_out_rm": "a held-out reward model (trained on pairs no policy saw)",
               "model": "a reward model named in evaluate.judge",
               "training_rm": "the training reward model, which PPO optimised against (NOT independent)"}
RESAMPLES = 2000

# One colour per method, the same in every plot whichever methods a report holds (tab10 colours).
METHOD_COLORS = {
    SFT: "#000000", "dpo": "#1f77b4", "ppo": "#ff7f0e", "ppo-gold": "#d62728", "rloo": "#2ca02c",
    "rloo-gold": "#17becf", "grpo": "#9467bd", "simpo": "#8c564b", "orpo": "#e377c2",
}
EXTRA_COLORS = ("#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5")
LINE_STYLES = ("-", "--", ":", "-.")
SETTING_SYMBOLS = {"beta": "β", "kl_coef": "kl", "gamma": "γ", "lam": "λ", "alpha": "α", "learning_rate": "lr"}
# the methods a verdict is about first: DPO against PPO (on the reward model, and the gold-judge oracle)
VERDICT_PAIRS = (("dpo", "ppo"), ("dpo", "ppo-gold"), ("dpo", "rloo-gold"))


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyPoint:
    """One evaluated policy: its per-sample judge scores, where it sits on the frontier, what it cost."""

    name: str  # unique label, e.g. "dpo β=0.1"; "sft" for the SFT policy
    method: str  # "sft" | "dpo" | "ppo" | "ppo-gold" | "rloo" | "rloo-gold" | "grpo" | "simpo" | "orpo" | other
    setting: dict[str, Any]  # e.g. {"beta": 0.1, "loss_type": "sigmoid"}; {} for sft
    metrics: dict[str, float]  # at least "kl_to_sft"; optional OPTIONAL_COLUMNS
    scores: list[float]  # per-sample judge score of the first training seed, (num_samples,), same order for all
    samples: list[str]  # the first seed's completions, same order as scores
    curves: dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)]; {} for sft
    run_id: str | None = None  # MLflow run id of the (first seed's) training run
    seed_scores: list[list[float]] = field(default_factory=list)  # every seed's scores ([] -> [scores])
    samples_per_prompt: int = 1  # K: sample (p, k) is at index p * K + k
    gold_calls: float | None = None  # calls of the gold judge this policy's training cost (labels or rollouts)
    seconds: float | None = None  # wall time to produce it from the SFT model (generation included), per seed
    oracle: bool = False  # trained on the judge itself (PPO-GT, RLOO-GT): a reference, not a contender
    reward_source: str | None = None  # what it optimised: "pairs", "reward_model", "gold"

    def score_matrix(self) -> np.ndarray:
        """(S, P, K) judge scores: S training seeds, P prompts, K samples per prompt."""
        return as_scores(self.seed_scores or [self.scores], self.samples_per_prompt)


@dataclass(frozen=True)
class FrontierPoint:
    """One marker as drawn on ``frontier.png`` (read back from the plot, not from the input)."""

    name: str
    method: str
    kl: float
    score: float
    label: str  # the annotation beside the marker, e.g. "β=0.1"
    low: float  # the error bar's ends (95% interval of the mean judge score)
    high: float


@dataclass(frozen=True)
class Report:
    """The files written and the tables, as lists of dicts (one dict per row)."""

    out_dir: Path
    frontier_png: Path
    curves_png: Path
    summary_md: Path
    index_html: Path
    policies_csv: Path
    policies_json: Path
    head_to_head_json: Path
    verdict_json: Path
    y_metric: str  # "judge_score_mean": the frontier's y and the "best" criterion
    frontier: tuple[FrontierPoint, ...]  # one per policy, in input order
    policies: list[dict[str, Any]]  # one row per policy, in input order
    head_to_head: list[dict[str, Any]]  # every policy vs the best policy of every other method
    best_per_method: dict[str, str]  # method -> name of its best policy (highest mean judge score)
    findings: tuple[str, ...]  # the plain sentences of the summary, each computed from the numbers
    verdict: dict[str, Any]  # what verdict.json holds

    @property
    def files(self) -> dict[str, Path]:
        return {path.name: path for path in (self.frontier_png, self.curves_png, self.summary_md, self.index_html,
                                             self.policies_csv, self.policies_json, self.head_to_head_json,
                                             self.verdict_json)}


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
def setting_label(setting: dict[str, Any]) -> str:
    """A short label for a setting: {"beta": 0.1, "loss_type": "sigmoid"} -> "β=0.1 sigmoid"."""
    parts = []
    for key, value in setting.items():
        if isinstance(value, str):
            parts.append(value)  # loss_type, reward name...: the value says what it is
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{SETTING_SYMBOLS.get(key, key)}={shown}")
    return " ".join(parts)


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """Colour of each method: fixed for the known methods, the next free colour for others (sorted)."""
    colors = {m: METHOD_COLORS[m] for m in methods if m in METHOD_COLORS}
    others = sorted({m for m in methods if m not in METHOD_COLORS})
    colors.update({m: EXTRA_COLORS[i % len(EXTRA_COLORS)] for i, m in enumerate(others)})
    return colors


def _methods(points: Sequence[PolicyPoint]) -> list[str]:
    """Methods in order of first appearance."""
    return list(dict.fromkeys(p.method for p in points))


@dataclass(frozen=True)
class Scored:
    """A policy's intervals, computed once: mean judge score, and difference and win rate against SFT."""

    mean: Interval
    vs_sft: Interval
    win_vs_sft: Interval


def score_policies(points: Sequence[PolicyPoint], sft: PolicyPoint) -> dict[str, Scored]:
    baseline = sft.score_matrix()
    return {p.name: Scored(mean_interval(p.score_matrix(), resamples=RESAMPLES),
                           difference_interval(p.score_matrix(), baseline, resamples=RESAMPLES),
                           win_rate_interval(p.score_matrix(), baseline, resamples=RESAMPLES))
            for p in points}


def best_per_method(points: Sequence[PolicyPoint], scored: dict[str, Scored]) -> dict[str, PolicyPoint]:
    """Per method, the policy with the highest mean judge score; ties go to the lower KL, then the earlier."""
    best: dict[str, PolicyPoint] = {}
    for p in points:
        current = best.get(p.method)
        if current is None or _rank(p, scored) > _rank(current, scored):
            best[p.method] = p
    return best


def _rank(point: PolicyPoint, scored: dict[str, Scored]) -> tuple[float, float]:
    return scored[point.name].mean.estimate, -point.metrics["kl_to_sft"]


def dominations(points: Sequence[PolicyPoint], scored: dict[str, Scored]) -> list[tuple[PolicyPoint, str]]:
    """(point, beaten method) where the point has a higher mean judge score AND a lower KL than every policy
    of that method. One entry per (method, beaten method) pair: the dominating point of highest score.
    Point estimates only: the head-to-heads say whether a gap is beyond the noise."""
    found = []
    for method in _methods(points):
        for beaten in _methods(points):
            if beaten == method:
                continue
            others = [p for p in points if p.method == beaten]
            top_y = max(scored[p.name].mean.estimate for p in others)
            low_kl = min(p.metrics["kl_to_sft"] for p in others)
            winners = [p for p in points if p.method == method
                       and scored[p.name].mean.estimate > top_y and p.metrics["kl_to_sft"] < low_kl]
            if winners:
                found.append((max(winners, key=lambda p: _rank(p, scored)), beaten))
    return found


def head_to_heads(best: dict[str, PolicyPoint]) -> list[tuple[PolicyPoint, PolicyPoint, Interval, Interval]]:
    """(a, b, difference of mean judge scores a - b, win rate of a over b) for every pair of the methods' best
    policies, SFT excluded, in method order."""
    contenders = [p for method, p in best.items() if method != SFT]
    pairs = []
    for i, a in enumerate(contenders):
        for b in contenders[i + 1:]:
            pairs.append((a, b, difference_interval(a.score_matrix(), b.score_matrix(), resamples=RESAMPLES),
                          win_rate_interval(a.score_matrix(), b.score_matrix(), resamples=RESAMPLES)))
    return pairs


def verdict_sentence(pairs: Sequence[tuple[PolicyPoint, PolicyPoint, Interval, Interval]], judge: dict[str, Any],
                     scored: dict[str, Scored], sft: PolicyPoint) -> str:
    """The verdict, computed from the intervals: DPO against PPO (and the oracles) where both ran, else every
    head-to-head of the methods' best policies, else the best policy against SFT."""
    chosen = [pair for pair in pairs if (pair[0].method, pair[1].method) in VERDICT_PAIRS
              or (pair[1].method, pair[0].method) in VERDICT_PAIRS] or list(pairs)
    sentences = [verdict(_display(a), _display(b), difference) for a, b, difference, _ in chosen]
    if not sentences:
        trained = [name for name in scored if name != sft.name]
        sentences = [verdict(name, sft.name, scored[name].vs_sft) for name in trained]
    text = "; ".join(sentences) + "." if sentences else "Only the SFT policy was scored."
    if not judge.get("independent", True):
        text = ("NOT INDEPENDENT: judged by the training reward model, which PPO optimised against. " + text)
    return text


def _display(point: PolicyPoint) -> str:
    return point.name + (" (oracle)" if point.oracle else "")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_inputs(points: Sequence[PolicyPoint], prompts: Sequence[str], judge: dict[str, Any],
                  max_examples: int) -> None:
    if not points:
        raise ValueError("build_report: no policies given; pass the SFT policy and the trained policies")
    if judge.get("kind") not in JUDGE_KINDS:
        raise ValueError(f"build_report: judge kind {judge.get('kind')!r}; expected one of {sorted(JUDGE_KINDS)}")
    if max_examples < 0:
        raise ValueError(f"build_report: max_examples={max_examples}; expected 0 or more")
    if not prompts:
        raise ValueError("build_report: no prompts; the report needs at least one held-out sample")
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"build_report: policy names must be unique; repeated: {duplicates}")
    sft = [p.name for p in points if p.method == SFT]
    if len(sft) != 1:
        raise ValueError(f"build_report: need exactly one policy with method {SFT!r} (the reference); got {sft}")
    for point in points:
        _check_point(point, len(prompts))


def _check_point(point: PolicyPoint, num_samples: int) -> None:
    where = f"policy {point.name!r} ({point.method})"
    for seed, scores in enumerate(point.seed_scores or [point.scores]):
        if len(scores) != num_samples:
            raise ValueError(f"{where}: {len(scores)} scores (seed #{seed}) for {num_samples} samples; every policy "
                             "must score the same held-out samples in the same order")
        for i, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: scores[{i}] = {value!r}; expected a finite number")
    if len(point.samples) != num_samples:
        raise ValueError(f"{where}: {len(point.samples)} samples for {num_samples} prompts")
    for key in REQUIRED_METRICS:
        if key not in point.metrics:
            raise ValueError(f"{where}: metric {key!r} missing; has {sorted(point.metrics)}")
    for key in (*REQUIRED_METRICS, *OPTIONAL_COLUMNS):
        value = point.metrics.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} = {value!r}; expected a finite number")
    for metric, curve in point.curves.items():
        if any(len(pair) != 2 for pair in curve):
            raise ValueError(f"{where}: curve {metric!r} must be a list of (step, value) pairs")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def policies_table(points: Sequence[PolicyPoint], scored: dict[str, Scored]) -> list[dict[str, Any]]:
    """One row per policy; optional metrics get a column when any policy has them (None where missing)."""
    optional = [key for key in OPTIONAL_COLUMNS if any(key in p.metrics for p in points)]
    rows = []
    for p in points:
        s, matrix = scored[p.name], p.score_matrix()
        row = {
            "policy": p.name, "method": p.method, "setting": setting_label(p.setting), "oracle": p.oracle,
            "seeds": matrix.shape[0], "n": int(matrix.size),
            "judge_score_mean": s.mean.estimate, "ci95_low": s.mean.low, "ci95_high": s.mean.high,
            "vs_sft": s.vs_sft.estimate, "vs_sft_ci95_low": s.vs_sft.low, "vs_sft_ci95_high": s.vs_sft.high,
            "win_rate_vs_sft": s.win_vs_sft.estimate, "win_ci95_low": s.win_vs_sft.low,
            "win_ci95_high": s.win_vs_sft.high, "kl_to_sft": p.metrics["kl_to_sft"],
            "gold_calls": p.gold_calls, "seconds": p.seconds,
        }
        row.update({key: p.metrics.get(key) for key in optional})
        row["run_id"] = p.run_id
        rows.append(row)
    return rows


def head_to_head_table(points: Sequence[PolicyPoint], best: dict[str, PolicyPoint]) -> list[dict[str, Any]]:
    """Every policy against the best policy of every other method (sft counts as a method), with intervals."""
    rows = []
    for p in points:
        for method, opponent in best.items():
            if method == p.method:
                continue
            wins = win_rate_interval(p.score_matrix(), opponent.score_matrix(), resamples=RESAMPLES)
            difference = difference_interval(p.score_matrix(), opponent.score_matrix(), resamples=RESAMPLES)
            rows.append({"policy": p.name, "method": p.method, "opponent": opponent.name, "opponent_method": method,
                         "win_rate": wins.estimate, "win_ci95_low": wins.low, "win_ci95_high": wins.high,
                         "difference": difference.estimate, "ci95_low": difference.low, "ci95_high": difference.high,
                         "significant": difference.excludes_zero()})
    return rows


def verdict_record(points: Sequence[PolicyPoint], scored: dict[str, Scored], judge: dict[str, Any],
                   pairs: Sequence[tuple[PolicyPoint, PolicyPoint, Interval, Interval]], sentence: str) -> dict:
    """What ``verdict.json`` holds (see the module docstring)."""
    def policy(p: PolicyPoint) -> dict[str, Any]:
        s = scored[p.name]
        return {"name": p.name, "method": p.method, "reward_source": p.reward_source, "oracle": p.oracle,
                "setting": p.setting, "seeds": int(p.score_matrix().shape[0]), "n": int(p.score_matrix().size),
                "judge_score_mean": s.mean.estimate, "ci95": [s.mean.low, s.mean.high],
                "kl_to_sft": p.metrics["kl_to_sft"], "gold_calls": p.gold_calls, "seconds": p.seconds,
                "implicit_pair_accuracy": p.metrics.get("implicit_pair_accuracy"),
                "vs_sft": {"difference": s.vs_sft.estimate, "ci95": [s.vs_sft.low, s.vs_sft.high]},
                "win_rate_vs_sft": {"estimate": s.win_vs_sft.estimate, "ci95": [s.win_vs_sft.low, s.win_vs_sft.high]}}

    return {
        "judge": judge, "judge_independent": bool(judge.get("independent", True)),
        "policies": [policy(p) for p in points],
        "head_to_head": [{"a": a.name, "b": b.name, "difference": d.estimate, "ci95": [d.low, d.high],
                          "significant": d.excludes_zero(), "win_rate": w.estimate, "win_ci95": [w.low, w.high]}
                         for a, b, d, w in pairs],
        "verdict": sentence,
    }


def _cell_interval(value: Any) -> Any:
    """A [low, high] pair as one table cell, "[0.030, 0.110]"; anything else as it is."""
    return f"[{value[0]:.3f}, {value[1]:.3f}]" if isinstance(value, list) else value


def findings(points: Sequence[PolicyPoint], scored: dict[str, Scored], sft: PolicyPoint) -> list[str]:
    """Plain sentences, each computed from the numbers and their intervals."""
    top = max(points, key=lambda p: _rank(p, scored))
    sentences = [
        f"The highest mean judge score, {scored[top.name].mean.format()}, was reached by {_display(top)} "
        f"({top.method}) at KL {top.metrics['kl_to_sft']:.3f} to the SFT policy."
    ]
    trained = [p for p in points if p is not sft]
    if trained:
        above = [p.name for p in trained if scored[p.name].vs_sft.low > 0]
        below = [p.name for p in trained if scored[p.name].vs_sft.high < 0]
        sentences.append(f"{len(above)} of {len(trained)} trained policies score above the SFT policy beyond the "
                         f"noise (95% interval of the difference above 0)" + (f": {', '.join(above)}" if above else "")
                         + "." + (f" Below it: {', '.join(below)}." if below else ""))
    for point, beaten in dominations(points, scored):
        sentences.append(f"{point.method} dominates {beaten} on point estimates: {point.name} has a higher mean "
                         f"judge score ({scored[point.name].mean.estimate:.3f}) and a lower KL "
                         f"({point.metrics['kl_to_sft']:.3f}) than every {beaten} policy.")
    budgets = [(p.name, p.gold_calls) for p in trained if p.gold_calls is not None]
    if budgets:
        sentences.append("Gold-judge calls spent in training: " + ", ".join(f"{n} {c:.0f}" for n, c in budgets) + ".")
    return sentences


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def plot_frontier(points: Sequence[PolicyPoint], scored: dict[str, Scored], colors: dict[str, str],
                  title: str) -> tuple[bytes, tuple[FrontierPoint, ...]]:
    """The KL-reward frontier with 95% error bars; returns the PNG and the coordinates read back from the plot.

    Each method's policies are joined in order of KL (its curve over its settings); oracles (trained on
    the judge itself) are drawn dashed with hollow markers.
    """
    fig = Figure(figsize=(8.5, 5.8), layout="constrained")
    ax = fig.add_subplot()
    drawn: dict[str, FrontierPoint] = {}
    for method in _methods(points):
        members = sorted((p for p in points if p.method == method), key=lambda p: p.metrics["kl_to_sft"])
        is_sft, oracle = method == SFT, any(p.oracle for p in members)
        xs = [p.metrics["kl_to_sft"] for p in members]
        ys = [scored[p.name].mean.estimate for p in members]
        errors = [[y - scored[p.name].mean.low for p, y in zip(members, ys, strict=True)],
                  [scored[p.name].mean.high - y for p, y in zip(members, ys, strict=True)]]
        container = ax.errorbar(
            xs, ys, yerr=errors, color=colors[method], fmt="*" if is_sft else "o", markersize=14 if is_sft else 6,
            linestyle="none" if is_sft or len(members) == 1 else ("--" if oracle else "-"), linewidth=1.2,
            capsize=3, markerfacecolor="white" if oracle else colors[method], zorder=3,
            label="SFT (reference)" if is_sft else method + (" (oracle: trained on the judge)" if oracle else ""),
        )
        line = container.lines[0]
        for p, x, y in zip(members, line.get_xdata(), line.get_ydata(), strict=True):
            label = "SFT" if is_sft else setting_label(p.setting) or p.name
            s = scored[p.name].mean
            drawn[p.name] = FrontierPoint(p.name, method, float(x), float(y), label, s.low, s.high)
            ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, color=colors[method])
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(f"mean judge score ({Y_METRIC}), 95% interval")
    ax.set_title(title)
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(title="method", fontsize=8)
    return _png(fig), tuple(drawn[p.name] for p in points)


def plot_curves(points: Sequence[PolicyPoint], colors: dict[str, str]) -> bytes:
    """Training curves of every policy on one page: one subplot per metric name, one line per policy."""
    metrics = sorted({name for p in points for name in p.curves})
    if not metrics:
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no training curves were given", ha="center", va="center")
        return _png(fig)
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.6 * ncols + 2.5, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    styles = _line_styles(points)
    for ax, metric in zip(axes, metrics, strict=False):
        for p in points:
            if p.curves.get(metric):
                steps, values = zip(*p.curves[metric], strict=True)
                ax.plot(steps, values, color=colors[p.method], linestyle=styles[p.name], linewidth=1.3)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[p.method], linestyle=styles[p.name], label=p.name)
               for p in points if p.curves]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="policy")
    return _png(fig)


def _line_styles(points: Sequence[PolicyPoint]) -> dict[str, str]:
    """Policies of one method share a colour; their line styles tell them apart."""
    seen: dict[str, int] = {}
    styles = {}
    for p in points:
        index = seen.get(p.method, 0)
        styles[p.name] = LINE_STYLES[index % len(LINE_STYLES)]
        seen[p.method] = index + 1
    return styles


# --------------------------------------------------------------------------------------------------
# Markdown and HTML
# --------------------------------------------------------------------------------------------------
def judge_sentence(judge: dict[str, Any], num_samples: int, samples_per_prompt: int) -> str:
    accuracy = judge.get("pair_accuracy")
    measured = (f" Its held-out preference accuracy is {accuracy:.3f} on {judge.get('pairs')} pairs."
                if accuracy is not None else "")
    return (f"Judge: {judge.get('name')}, {JUDGE_KINDS[judge['kind']]}.{measured} Each policy was scored on the same "
            f"{num_samples} held-out samples ({num_samples // samples_per_prompt} prompts x {samples_per_prompt}, same "
            "sampling seeds); intervals are 95% bootstrap intervals over prompts (paired between policies; over "
            "training seeds too where several ran). A win rate compares two policies' scores of the same sample "
            "(a tie counts one half). The frontier's error bars are each policy's own interval; the interval of a "
            "difference between two policies is narrower, because the prompts' difficulty, which both share, "
            "cancels in it: overlapping bars do not mean no difference.")


def summary_markdown(title: str, verdict_text: str, judge_text: str, best_rows: list[dict[str, Any]],
                     policies: list[dict[str, Any]], sentences: Sequence[str]) -> str:
    return (f"# {title}\n\n**Verdict:** {verdict_text}\n\n{judge_text}\n\n## Best policy per method\n\n"
            f"{_md_table(best_rows)}\n## Findings\n\n" + "".join(f"- {s}\n" for s in sentences)
            + f"\n## Policies\n\n{_md_table(policies)}")


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(table_id: str, rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in columns) + "</tr>"
                     for row in rows)
    return f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _samples_table(points: Sequence[PolicyPoint], prompts: Sequence[str], max_examples: int) -> str:
    head = "<th>#</th><th>prompt</th>" + "".join(
        f"<th>{html.escape(p.name)}<br><span class=\"method\">{html.escape(p.method)}</span></th>" for p in points)
    rows = []
    for i, prompt in enumerate(prompts[:max_examples]):
        cells = "".join(
            f'<td><div class="text">{html.escape(p.samples[i])}</div>'
            f'<div class="score">score {p.scores[i]:.3f}</div></td>' for p in points)
        rows.append(f'<tr><td>{i}</td><td><div class="text">{html.escape(prompt)}</div></td>{cells}</tr>')
    body = "\n".join(rows)
    return f'<table id="samples">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 110em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
#samples td { min-width: 16em; }
.text { white-space: pre-wrap; }
.score, .method { color: #666; font-size: 0.85em; }
.verdict { font-size: 1.15em; background: #f6f8ff; border-left: 4px solid #1f77b4; padding: 0.6em 0.9em; }
"""



def index_html(title: str, verdict_text: str, judge_text: str, sentences: Sequence[str], frontier_png: bytes,
               curves_png: bytes, tables: dict[str, list[dict[str, Any]]], samples_table: str) -> str:
    def data_uri(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    items = "".join(f"<li>{html.escape(s)}</li>" for s in sentences)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p id="verdict" class="verdict"><strong>Verdict:</strong> {html.escape(verdict_text)}</p>
<p>{html.escape(judge_text)}</p>
<h2>KL-reward frontier</h2>
<img id="frontier" alt="mean judge score with 95% intervals against KL to the SFT policy"
 src="{data_uri(frontier_png)}">
<h2>Findings</h2>
<ul>{items}</ul>
<h2>Head to head: the methods' best policies</h2>
{_html_table("verdict-pairs", tables["pairs"])}
<h2>Best policy per method</h2>
{_html_table("best-per-method", tables["best"])}
<h2>Policies</h2>
<div class="scroll">{_html_table("policies", tables["policies"])}</div>
<h2>Every policy against each method's best</h2>
<p>The share of samples it scores higher on (a tie counts one half), and the difference of mean judge scores,
each with its 95% paired-bootstrap interval.</p>
<div class="scroll">{_html_table("head-to-head", tables["head_to_head"])}</div>
<h2>Training curves</h2>
<img id="curves" alt="training curves of every policy" src="{data_uri(curves_png)}">
<h2>Sample generations</h2>
<div class="scroll">{samples_table}</div>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_report(points: list[PolicyPoint], prompts: list[str], out_dir: Path, *, title: str, judge: dict[str, Any],
                 max_examples: int = 8) -> Report:
    """Write the comparison report of ``points`` (the SFT policy included) to ``out_dir``.

    ``prompts[i]`` is the prompt of sample i of every policy; ``judge`` describes what produced the
    per-sample scores (``stages.judges.PolicyJudge.describe()``: name, kind, independent, pair_accuracy,
    pairs). Raises ValueError naming the policy on inconsistent input.
    """
    _check_inputs(points, prompts, judge, max_examples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Numbers
    sft = next(p for p in points if p.method == SFT)
    scored = score_policies(points, sft)
    best = best_per_method(points, scored)
    pairs = head_to_heads(best)
    verdict_text = verdict_sentence(pairs, judge, scored, sft)
    record = verdict_record(points, scored, judge, pairs, verdict_text)
    policies = policies_table(points, scored)
    head_to_head = head_to_head_table(points, best)
    best_rows = [{"method": m, "policy": p.name, Y_METRIC: scored[p.name].mean.estimate,
                  "ci95_low": scored[p.name].mean.low, "ci95_high": scored[p.name].mean.high,
                  "kl_to_sft": p.metrics["kl_to_sft"], "gold_calls": p.gold_calls, "seconds": p.seconds}
                 for m, p in best.items()]
    pair_rows = [{key: _cell_interval(value) for key, value in row.items()} for row in record["head_to_head"]]
    sentences = findings(points, scored, sft)
    judge_text = judge_sentence(judge, len(prompts), sft.samples_per_prompt)

    # Plots
    colors = method_colors(_methods(points))
    frontier_png, frontier = plot_frontier(points, scored, colors, title)
    curves_png = plot_curves(points, colors)

    # Files
    paths = {name: out_dir / name for name in ("frontier.png", "curves.png", "summary.md", "index.html",
                                               "policies.csv", "policies.json", "head_to_head.json", "verdict.json")}
    paths["frontier.png"].write_bytes(frontier_png)
    paths["curves.png"].write_bytes(curves_png)
    _write_csv(paths["policies.csv"], policies)
    for name, data in (("policies.json", policies), ("head_to_head.json", head_to_head), ("verdict.json", record)):
        paths[name].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["summary.md"].write_text(summary_markdown(title, verdict_text, judge_text, best_rows, policies, sentences),
                                   encoding="utf-8")
    tables = {"best": best_rows, "policies": policies, "head_to_head": head_to_head, "pairs": pair_rows}
    paths["index.html"].write_text(index_html(title, verdict_text, judge_text, sentences, frontier_png, curves_png,
                                              tables, _samples_table(points, prompts, max_examples)), encoding="utf-8")
    return Report(
        out_dir=out_dir, frontier_png=paths["frontier.png"], curves_png=paths["curves.png"],
        summary_md=paths["summary.md"], index_html=paths["index.html"], policies_csv=paths["policies.csv"],
        policies_json=paths["policies.json"], head_to_head_json=paths["head_to_head.json"],
        verdict_json=paths["verdict.json"], y_metric=Y_METRIC, frontier=frontier, policies=policies,
        head_to_head=head_to_head, best_per_method={m: p.name for m, p in best.items()}, findings=tuple(sentences),
        verdict=record,
    )
