"""The comparison report of the DPO-vs-PPO arena: every policy on one KL-reward frontier.

Input: one ``PolicyPoint`` per policy (the SFT policy included), each evaluated the same way on the
same held-out samples (sample i of every policy answers prompt i). Output, in ``out_dir``:

- ``frontier.png``: judge score (gold reward mean when every policy has one, else reward-model score
  mean) against KL to the SFT reference, one point per policy, one colour per method; as Fig. 2 of
  Rafailov et al. 2023 (DPO).
- ``curves.png``: training curves, one subplot per curve metric, one line per policy.
- ``policies.csv`` / ``policies.json`` / ``head_to_head.json``: the tables, for machines.
- ``summary.md``: best policy per method, the policies table, and sentences computed from the numbers.
- ``index.html``: one self-contained page (images as data URIs, no script, no network) with all of
  the above and side-by-side sample generations.

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
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stages.evaluate import win_rate

SFT = "sft"
JUDGES = {"gold": "the gold judge", "reward_model": "the reward model"}
REQUIRED_METRICS = ("kl_to_sft", "rm_score_mean")
GOLD_METRIC = "gold_reward_mean"
OPTIONAL_COLUMNS = ("response_tokens_mean", "distinct_2")
Y_LABELS = {GOLD_METRIC: "mean gold reward", "rm_score_mean": "mean reward-model score"}
KL_LABEL = "KL to the SFT reference (kl_to_sft)"

# One colour per method, the same in every plot whichever methods a report holds (tab10 colours).
METHOD_COLORS = {
    SFT: "#000000", "dpo": "#1f77b4", "ppo": "#ff7f0e", "ppo-gold": "#d62728", "rloo": "#2ca02c",
    "grpo": "#9467bd", "simpo": "#8c564b", "orpo": "#e377c2",
}
EXTRA_COLORS = ("#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5")
LINE_STYLES = ("-", "--", ":", "-.")
SETTING_SYMBOLS = {"beta": "β", "kl_coef": "kl", "gamma": "γ", "lam": "λ", "alpha": "α", "learning_rate": "lr"}


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyPoint:
    """One evaluated policy: where it sits on the frontier, its per-sample scores and its training curves."""

    name: str  # unique label, e.g. "dpo beta=0.1 sigmoid"; "sft" for the SFT policy
    method: str  # "sft" | "dpo" | "ppo" | "ppo-gold" | "rloo" | "grpo" | "simpo" | "orpo" | any other string
    setting: dict[str, Any]  # e.g. {"beta": 0.1, "loss_type": "sigmoid"}; {} for sft
    metrics: dict[str, float]  # at least "kl_to_sft", "rm_score_mean"; "gold_reward_mean" with a gold judge
    scores: list[float]  # per-sample judge score, (num_samples,), same order for every policy
    samples: list[str]  # the completions, same order as scores
    curves: dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)]; {} for sft
    run_id: str | None = None  # MLflow run id of the training run


@dataclass(frozen=True)
class FrontierPoint:
    """One marker as drawn on ``frontier.png`` (read back from the plot, not from the input)."""

    name: str
    method: str
    kl: float
    score: float
    label: str  # the annotation beside the marker, e.g. "β=0.1 sigmoid"


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
    y_metric: str  # "gold_reward_mean" or "rm_score_mean": the frontier's y and the "best" criterion
    frontier: tuple[FrontierPoint, ...]  # one per policy, in input order
    policies: list[dict[str, Any]]  # one row per policy, in input order
    head_to_head: list[dict[str, Any]]  # every policy vs the best policy of every other method
    best_per_method: dict[str, str]  # method -> name of its best policy (highest y_metric)
    findings: tuple[str, ...]  # the plain sentences of the summary, each computed from the numbers

    @property
    def files(self) -> dict[str, Path]:
        return {path.name: path for path in (self.frontier_png, self.curves_png, self.summary_md, self.index_html,
                                             self.policies_csv, self.policies_json, self.head_to_head_json)}


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


def frontier_metric(points: Sequence[PolicyPoint]) -> str:
    """The frontier's y: the gold reward when every policy has one, else the reward-model score."""
    return GOLD_METRIC if all(GOLD_METRIC in p.metrics for p in points) else "rm_score_mean"


def _methods(points: Sequence[PolicyPoint]) -> list[str]:
    """Methods in order of first appearance."""
    return list(dict.fromkeys(p.method for p in points))


def best_per_method(points: Sequence[PolicyPoint], y_metric: str) -> dict[str, PolicyPoint]:
    """Per method, the policy with the highest y; ties go to the lower KL, then to the earlier policy."""
    best: dict[str, PolicyPoint] = {}
    for p in points:
        current = best.get(p.method)
        if current is None or _rank(p, y_metric) > _rank(current, y_metric):
            best[p.method] = p
    return best


def _rank(point: PolicyPoint, y_metric: str) -> tuple[float, float]:
    return point.metrics[y_metric], -point.metrics["kl_to_sft"]


def dominations(points: Sequence[PolicyPoint], y_metric: str) -> list[tuple[PolicyPoint, str]]:
    """(point, beaten method) where the point has a higher y AND a lower KL than every policy of that method.

    One entry per (method, beaten method) pair: the dominating point of highest y.
    """
    found = []
    for method in _methods(points):
        for beaten in _methods(points):
            if beaten == method:
                continue
            others = [p for p in points if p.method == beaten]
            top_y = max(p.metrics[y_metric] for p in others)
            low_kl = min(p.metrics["kl_to_sft"] for p in others)
            winners = [p for p in points if p.method == method
                       and p.metrics[y_metric] > top_y and p.metrics["kl_to_sft"] < low_kl]
            if winners:
                found.append((max(winners, key=lambda p: _rank(p, y_metric)), beaten))
    return found


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_inputs(points: Sequence[PolicyPoint], prompts: Sequence[str], judged_by: str, max_examples: int) -> None:
    if not points:
        raise ValueError("build_report: no policies given; pass the SFT policy and the trained policies")
    if judged_by not in JUDGES:
        raise ValueError(f"build_report: judged_by={judged_by!r}; expected one of {sorted(JUDGES)}")
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
    if len(point.scores) != num_samples:
        raise ValueError(f"{where}: {len(point.scores)} scores for {num_samples} prompts; every policy must score "
                         "the same held-out samples in the same order")
    if len(point.samples) != num_samples:
        raise ValueError(f"{where}: {len(point.samples)} samples for {num_samples} prompts")
    for key in REQUIRED_METRICS:
        if key not in point.metrics:
            raise ValueError(f"{where}: metric {key!r} missing; has {sorted(point.metrics)}")
    used = [(key, point.metrics[key]) for key in (*REQUIRED_METRICS, GOLD_METRIC, *OPTIONAL_COLUMNS)
            if key in point.metrics]
    for key, value in [*used, *((f"scores[{i}]", s) for i, s in enumerate(point.scores))]:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} = {value!r}; expected a finite number")
    for metric, curve in point.curves.items():
        if any(len(pair) != 2 for pair in curve):
            raise ValueError(f"{where}: curve {metric!r} must be a list of (step, value) pairs")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def policies_table(points: Sequence[PolicyPoint], sft: PolicyPoint) -> list[dict[str, Any]]:
    """One row per policy; optional metrics get a column when any policy has them (None where missing)."""
    gold = all(GOLD_METRIC in p.metrics for p in points)
    optional = [key for key in OPTIONAL_COLUMNS if any(key in p.metrics for p in points)]
    rows = []
    for p in points:
        row = {
            "policy": p.name, "method": p.method, "setting": setting_label(p.setting),
            "judge_score_mean": statistics.fmean(p.scores), "kl_to_sft": p.metrics["kl_to_sft"],
            "win_rate_vs_sft": win_rate(p.scores, sft.scores), "rm_score_mean": p.metrics["rm_score_mean"],
        }
        if gold:
            row[GOLD_METRIC] = p.metrics[GOLD_METRIC]
        row.update({key: p.metrics.get(key) for key in optional})
        row["run_id"] = p.run_id
        rows.append(row)
    return rows


def head_to_head_table(points: Sequence[PolicyPoint], best: dict[str, PolicyPoint]) -> list[dict[str, Any]]:
    """Every policy against the best policy of every other method (sft counts as a method)."""
    return [
        {"policy": p.name, "method": p.method, "opponent": opponent.name, "opponent_method": method,
         "win_rate": win_rate(p.scores, opponent.scores)}
        for p in points for method, opponent in best.items() if method != p.method
    ]


def findings(points: Sequence[PolicyPoint], y_metric: str, sft: PolicyPoint) -> list[str]:
    """Plain sentences, each computed from the numbers."""
    y_name = Y_LABELS[y_metric]
    top = max(points, key=lambda p: _rank(p, y_metric))
    sentences = [
        f"The highest {y_name} ({top.metrics[y_metric]:.3f}) was reached by {top.name} ({top.method}) "
        f"at KL {top.metrics['kl_to_sft']:.3f} to the SFT policy."
    ]
    trained = [p for p in points if p is not sft]
    if trained:
        beating = [p.name for p in trained if win_rate(p.scores, sft.scores) > 0.5]
        sentences.append(f"{len(beating)} of {len(trained)} trained policies beat the SFT policy on more than half "
                         "of the held-out samples (win rate > 0.5).")
    dominated = dominations(points, y_metric)
    for point, beaten in dominated:
        sentences.append(f"{point.method} dominates {beaten}: {point.name} has a higher {y_name} "
                         f"({point.metrics[y_metric]:.3f}) and a lower KL ({point.metrics['kl_to_sft']:.3f}) "
                         f"than every {beaten} policy.")
    if not dominated and len(_methods(points)) > 1:
        sentences.append(f"No method dominates another: no policy has both a higher {y_name} and a lower KL "
                         "than every policy of another method.")
    return sentences


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def plot_frontier(points: Sequence[PolicyPoint], y_metric: str, colors: dict[str, str],
                  title: str) -> tuple[bytes, tuple[FrontierPoint, ...]]:
    """The KL-reward frontier; returns the PNG and the coordinates read back from the drawn markers."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    drawn: dict[str, FrontierPoint] = {}
    for method in _methods(points):
        members = [p for p in points if p.method == method]
        is_sft = method == SFT
        collection = ax.scatter(
            [p.metrics["kl_to_sft"] for p in members], [p.metrics[y_metric] for p in members],
            color=colors[method], marker="*" if is_sft else "o", s=220 if is_sft else 60,
            edgecolors="white" if is_sft else "none", zorder=3, label="SFT (reference)" if is_sft else method,
        )
        for p, (x, y) in zip(members, collection.get_offsets().tolist(), strict=True):
            label = "SFT" if is_sft else setting_label(p.setting) or p.name
            drawn[p.name] = FrontierPoint(p.name, method, float(x), float(y), label)
            ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, color=colors[method])
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(f"{Y_LABELS[y_metric]} ({y_metric})")
    ax.set_title(title)
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(title="method")
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
def _judge_sentence(judged_by: str, num_samples: int, y_metric: str) -> str:
    return (f"Each of the {num_samples} held-out samples was scored by {JUDGES[judged_by]}; a win rate compares two "
            f"policies' scores on the same sample (a tie counts one half). The frontier plots {y_metric} against "
            "kl_to_sft; the best policy of a method is the one with the highest "
            f"{y_metric}.")


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(title: str, judge_sentence: str, best_rows: list[dict[str, Any]],
                     policies: list[dict[str, Any]], sentences: Sequence[str]) -> str:
    return (f"# {title}\n\n{judge_sentence}\n\n## Best policy per method\n\n{_md_table(best_rows)}\n"
            "## Findings\n\n" + "".join(f"- {s}\n" for s in sentences)
            + f"\n## Policies\n\n{_md_table(policies)}")


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
"""


def index_html(title: str, judge_sentence: str, sentences: Sequence[str], frontier_png: bytes, curves_png: bytes,
               tables: dict[str, list[dict[str, Any]]], samples_table: str) -> str:
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
<p>{html.escape(judge_sentence)}</p>
<h2>Findings</h2>
<ul>{items}</ul>
<h2>KL-reward frontier</h2>
<img id="frontier" alt="judge score against KL to the SFT reference" src="{data_uri(frontier_png)}">
<h2>Best policy per method</h2>
{_html_table("best-per-method", tables["best"])}
<h2>Policies</h2>
<div class="scroll">{_html_table("policies", tables["policies"])}</div>
<h2>Head to head</h2>
<p>Every policy against the best policy of every other method: the share of samples it scores higher on
(a tie counts one half).</p>
{_html_table("head-to-head", tables["head_to_head"])}
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


def build_report(points: list[PolicyPoint], prompts: list[str], out_dir: Path, *, title: str, judged_by: str,
                 max_examples: int = 8) -> Report:
    """Write the comparison report of ``points`` (the SFT policy included) to ``out_dir``.

    ``prompts[i]`` is the prompt of sample i of every policy; ``judged_by`` ("gold" | "reward_model") says
    what produced the per-sample ``scores``. Raises ValueError naming the policy on inconsistent input.
    """
    _check_inputs(points, prompts, judged_by, max_examples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Numbers
    y_metric = frontier_metric(points)
    sft = next(p for p in points if p.method == SFT)
    best = best_per_method(points, y_metric)
    policies = policies_table(points, sft)
    head_to_head = head_to_head_table(points, best)
    best_rows = [{"method": m, "policy": p.name, y_metric: p.metrics[y_metric], "kl_to_sft": p.metrics["kl_to_sft"]}
                 for m, p in best.items()]
    sentences = findings(points, y_metric, sft)
    judge_sentence = _judge_sentence(judged_by, len(prompts), y_metric)

    # Plots
    colors = method_colors(_methods(points))
    frontier_png, frontier = plot_frontier(points, y_metric, colors, title)
    curves_png = plot_curves(points, colors)

    # Files
    paths = {name: out_dir / name for name in ("frontier.png", "curves.png", "summary.md", "index.html",
                                               "policies.csv", "policies.json", "head_to_head.json")}
    paths["frontier.png"].write_bytes(frontier_png)
    paths["curves.png"].write_bytes(curves_png)
    _write_csv(paths["policies.csv"], policies)
    paths["policies.json"].write_text(json.dumps(policies, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["head_to_head.json"].write_text(json.dumps(head_to_head, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    paths["summary.md"].write_text(summary_markdown(title, judge_sentence, best_rows, policies, sentences),
                                     encoding="utf-8")
    tables = {"best": best_rows, "policies": policies, "head_to_head": head_to_head}
    paths["index.html"].write_text(index_html(title, judge_sentence, sentences, frontier_png, curves_png, tables,
                                              _samples_table(points, prompts, max_examples)), encoding="utf-8")
    return Report(
        out_dir=out_dir, frontier_png=paths["frontier.png"], curves_png=paths["curves.png"],
        summary_md=paths["summary.md"], index_html=paths["index.html"], policies_csv=paths["policies.csv"],
        policies_json=paths["policies.json"], head_to_head_json=paths["head_to_head.json"], y_metric=y_metric,
        frontier=frontier, policies=policies, head_to_head=head_to_head,
        best_per_method={m: p.name for m, p in best.items()}, findings=tuple(sentences),
    )
