"""Tests for stages/report.py on hand-made policies: sft, two DPO and two PPO policies on four samples.

Per-sample judge scores (sample i of every policy answers prompt i):

    sft          [ 0.0, 0.5, 1.0, 0.2]
    dpo β=0.1    [ 0.5, 0.5, 0.0, 0.9]   vs sft: win, tie, loss, win   -> (1 + .5 + 0 + 1) / 4 = 0.625
    dpo β=0.5    [ 1.0, 0.0, 1.0, 0.1]   vs sft: win, loss, tie, loss  -> (1 + 0 + .5 + 0) / 4 = 0.375
    ppo kl=0.05  [ 0.1, 0.6, 1.5, 0.2]   vs sft: win, win, win, tie    -> (1 + 1 + 1 + .5) / 4 = 0.875
    ppo kl=0.2   [-1.0, 0.5, 1.0, 0.3]   vs sft: loss, tie, tie, win   -> (0 + .5 + .5 + 1) / 4 = 0.5

Frontier (kl_to_sft, gold_reward_mean, rm_score_mean): sft (0, .30, .10), dpo β=0.1 (2, .55, .50),
dpo β=0.5 (1, .40, .60), ppo 0.05 (4, .70, .90), ppo 0.2 (3, .20, .20). Best by gold: dpo β=0.1 and
ppo 0.05; by reward model: dpo β=0.5 and ppo 0.05. Nothing dominates on either axis pair: the best PPO
score needs the highest KL, and no point has a KL below the SFT policy's 0.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re

import pytest

from stages.report import FrontierPoint, PolicyPoint, build_report, dominations, setting_label, win_rate

PROMPTS = ["Write a happy review.", "Describe the film.", "What did you think?", "Tell me about <b>it</b>."]
SCRIPT = "<script>alert('x')</script> & more"


def make_points(gold: bool = True) -> list[PolicyPoint]:
    def point(name, method, setting, kl, gold_mean, rm, scores, curves=None):
        metrics = {"kl_to_sft": kl, "rm_score_mean": rm, "win_rate_vs_sft": 0.5, "response_tokens_mean": 12.0}
        if gold:
            metrics["gold_reward_mean"] = gold_mean
        samples = [f"{name} answer {i}" for i in range(len(scores))]
        return PolicyPoint(name, method, setting, metrics, scores, samples, curves or {}, run_id=None)

    dpo_curve = {"train/loss": [(1, 0.69), (2, 0.5), (3, 0.4)], "train/reward_margin": [(1, 0.0), (3, 0.8)]}
    ppo_curve = {"train/loss": [(1, 1.0), (2, 0.8)], "ppo/score_mean": [(1, 0.1), (2, 0.4), (3, 0.6)]}
    points = [
        point("sft", "sft", {}, 0.0, 0.30, 0.10, [0.0, 0.5, 1.0, 0.2]),
        point("dpo beta=0.1 sigmoid", "dpo", {"beta": 0.1, "loss_type": "sigmoid"}, 2.0, 0.55, 0.50,
              [0.5, 0.5, 0.0, 0.9], dpo_curve),
        point("dpo beta=0.5 sigmoid", "dpo", {"beta": 0.5, "loss_type": "sigmoid"}, 1.0, 0.40, 0.60,
              [1.0, 0.0, 1.0, 0.1], dpo_curve),
        point("ppo kl=0.05", "ppo", {"kl_coef": 0.05}, 4.0, 0.70, 0.90, [0.1, 0.6, 1.5, 0.2], ppo_curve),
        point("ppo kl=0.2", "ppo", {"kl_coef": 0.2}, 3.0, 0.20, 0.20, [-1.0, 0.5, 1.0, 0.3], ppo_curve),
    ]
    # a completion that would run as script if the page did not escape it
    points[1] = dataclasses.replace(points[1], samples=[SCRIPT, *points[1].samples[1:]])
    return points


def table_rows(page: str, table_id: str) -> list[str]:
    """The <tr> elements of a table's tbody."""
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert table, f"no table {table_id} in index.html"
    body = re.search(r"<tbody>(.*?)</tbody>", table.group(1), re.S).group(1)
    return re.findall(r"<tr>.*?</tr>", body, re.S)


@pytest.fixture
def report(tmp_path):
    return build_report(make_points(), PROMPTS, tmp_path / "report", title="DPO vs PPO arena", judged_by="gold",
                        max_examples=3)


# --------------------------------------------------------------------------------------------------
# Win rates
# --------------------------------------------------------------------------------------------------
def test_win_rate_counts_ties_as_half():
    """[3, 1, 2] vs [1, 1, 5]: win, tie, loss -> (1 + 0.5 + 0) / 3 = 0.5."""
    assert win_rate([3.0, 1.0, 2.0], [1.0, 1.0, 5.0]) == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 0.0]) == 1.0
    assert win_rate([0.0], [0.0]) == 0.5


def test_win_rate_rejects_mismatched_or_empty_scores():
    with pytest.raises(ValueError, match="3 scores against 2"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no scores"):
        win_rate([], [])


def test_setting_label_is_short():
    assert setting_label({"beta": 0.1, "loss_type": "sigmoid"}) == "β=0.1 sigmoid"
    assert setting_label({"kl_coef": 0.05}) == "kl=0.05"
    assert setting_label({}) == ""


# --------------------------------------------------------------------------------------------------
# Report with a gold judge
# --------------------------------------------------------------------------------------------------
def test_report_writes_every_file(report):
    for name in ("frontier.png", "curves.png", "summary.md", "index.html", "policies.csv", "policies.json",
                 "head_to_head.json"):
        path = report.out_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert report.files[name] == path
    for png in (report.frontier_png, report.curves_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_has_one_point_per_policy_at_its_kl_and_gold_reward(report):
    assert report.y_metric == "gold_reward_mean"
    assert report.frontier == (
        FrontierPoint("sft", "sft", 0.0, 0.30, "SFT"),
        FrontierPoint("dpo beta=0.1 sigmoid", "dpo", 2.0, 0.55, "β=0.1 sigmoid"),
        FrontierPoint("dpo beta=0.5 sigmoid", "dpo", 1.0, 0.40, "β=0.5 sigmoid"),
        FrontierPoint("ppo kl=0.05", "ppo", 4.0, 0.70, "kl=0.05"),
        FrontierPoint("ppo kl=0.2", "ppo", 3.0, 0.20, "kl=0.2"),
    )


def test_policies_table_win_rates_by_hand(report):
    rows = {row["policy"]: row for row in report.policies}
    assert list(rows) == ["sft", "dpo beta=0.1 sigmoid", "dpo beta=0.5 sigmoid", "ppo kl=0.05", "ppo kl=0.2"]
    expected = {"sft": 0.5, "dpo beta=0.1 sigmoid": 0.625, "dpo beta=0.5 sigmoid": 0.375, "ppo kl=0.05": 0.875,
                "ppo kl=0.2": 0.5}
    assert {name: row["win_rate_vs_sft"] for name, row in rows.items()} == pytest.approx(expected)
    assert rows["ppo kl=0.05"]["judge_score_mean"] == pytest.approx((0.1 + 0.6 + 1.5 + 0.2) / 4)
    assert rows["dpo beta=0.1 sigmoid"]["setting"] == "β=0.1 sigmoid"
    assert rows["ppo kl=0.2"]["gold_reward_mean"] == 0.20
    assert rows["sft"]["response_tokens_mean"] == 12.0
    assert json.loads(report.policies_json.read_text()) == report.policies
    with report.policies_csv.open() as handle:
        assert [row["policy"] for row in csv.DictReader(handle)] == list(rows)


def test_head_to_head_against_best_of_every_other_method(report):
    """Best by gold: dpo β=0.1 (.55), ppo 0.05 (.70), sft itself. 5 policies x 2 other methods = 10 rows.

    dpo β=0.5 [1, 0, 1, .1] vs ppo 0.05 [.1, .6, 1.5, .2]: win, loss, loss, loss -> 0.25
    sft [0, .5, 1, .2] vs dpo β=0.1 [.5, .5, 0, .9]: loss, tie, win, loss -> 0.375
    ppo 0.2 [-1, .5, 1, .3] vs dpo β=0.1: loss, tie, win, loss -> 0.375
    """
    assert report.best_per_method == {"sft": "sft", "dpo": "dpo beta=0.1 sigmoid", "ppo": "ppo kl=0.05"}
    table = {(row["policy"], row["opponent"]): row["win_rate"] for row in report.head_to_head}
    assert len(report.head_to_head) == 10
    assert table[("dpo beta=0.5 sigmoid", "ppo kl=0.05")] == pytest.approx(0.25)
    assert table[("sft", "dpo beta=0.1 sigmoid")] == pytest.approx(0.375)
    assert table[("ppo kl=0.2", "dpo beta=0.1 sigmoid")] == pytest.approx(0.375)
    assert table[("ppo kl=0.05", "sft")] == pytest.approx(0.875)
    assert ("dpo beta=0.5 sigmoid", "dpo beta=0.1 sigmoid") not in table  # never against its own method
    assert json.loads(report.head_to_head_json.read_text()) == report.head_to_head


def test_index_html_is_self_contained_and_escaped(report):
    page = report.index_html.read_text()
    assert len(table_rows(page, "policies")) == 5
    assert len(table_rows(page, "head-to-head")) == 10
    assert len(table_rows(page, "samples")) == 3  # max_examples
    for image in ("frontier", "curves"):
        assert re.search(rf'<img id="{image}" [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)
    # no server, no network, no script: every src/href is a data URI
    assert not re.search(r'(?:src|href)="(?!data:)', page)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "Tell me about &lt;b&gt;it&lt;/b&gt;." not in page  # the 4th prompt is past max_examples
    assert "score 0.500" in page


def test_summary_states_computed_facts(report):
    text = report.summary_md.read_text()
    assert text.startswith("# DPO vs PPO arena\n")
    assert "scored by the gold judge" in text
    assert ("The highest mean gold reward (0.700) was reached by ppo kl=0.05 (ppo) at KL 4.000 to the SFT policy."
            in report.findings)
    assert "2 of 4 trained policies beat the SFT policy" in text  # 0.625 and 0.875; 0.5 is not more than half
    assert any(f.startswith("No method dominates another") for f in report.findings)
    assert "| dpo | dpo beta=0.1 sigmoid | 0.550 | 2.000 |" in text
    assert all(finding in text for finding in report.findings)


# --------------------------------------------------------------------------------------------------
# Report without a gold judge
# --------------------------------------------------------------------------------------------------
def test_without_gold_the_frontier_uses_the_reward_model(tmp_path):
    report = build_report(make_points(gold=False), PROMPTS, tmp_path, title="RM only", judged_by="reward_model")
    assert report.y_metric == "rm_score_mean"
    assert [(p.kl, p.score) for p in report.frontier] == [(0.0, 0.1), (2.0, 0.5), (1.0, 0.6), (4.0, 0.9), (3.0, 0.2)]
    assert report.best_per_method["dpo"] == "dpo beta=0.5 sigmoid"
    assert "gold_reward_mean" not in report.policies[0]
    assert "scored by the reward model" in report.summary_md.read_text()
    assert len(table_rows(report.index_html.read_text(), "samples")) == 4  # default max_examples=8 > 4 prompts


def test_gold_used_only_when_every_policy_has_it(tmp_path):
    points = make_points()
    points[0] = dataclasses.replace(points[0], metrics={"kl_to_sft": 0.0, "rm_score_mean": 0.1})
    report = build_report(points, PROMPTS, tmp_path, title="t", judged_by="gold")
    assert report.y_metric == "rm_score_mean"


def test_domination_is_reported(tmp_path):
    """dpo β=0.5 at (KL 1, rm .6) beats every ppo point: rm .5 and .2 (< .6) at KL 4 and 3 (> 1)."""
    points = make_points(gold=False)
    points[3] = dataclasses.replace(points[3], metrics={**points[3].metrics, "rm_score_mean": 0.5})
    assert [(p.name, beaten) for p, beaten in dominations(points, "rm_score_mean")] == [
        ("dpo beta=0.5 sigmoid", "ppo")]
    report = build_report(points, PROMPTS, tmp_path, title="t", judged_by="reward_model")
    assert ("dpo dominates ppo: dpo beta=0.5 sigmoid has a higher mean reward-model score (0.600) and a lower KL "
            "(1.000) than every ppo policy.") in report.findings


def test_sft_only_report_has_no_curves_but_renders(tmp_path):
    report = build_report(make_points()[:1], PROMPTS, tmp_path, title="t", judged_by="gold")
    assert report.curves_png.read_bytes()[:4] == b"\x89PNG"
    assert report.head_to_head == []
    assert len(report.frontier) == 1


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_empty_points(tmp_path):
    with pytest.raises(ValueError, match="no policies given"):
        build_report([], PROMPTS, tmp_path, title="t", judged_by="gold")


def test_mismatched_scores_name_the_policy(tmp_path):
    points = make_points()
    points[2] = dataclasses.replace(points[2], scores=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"policy 'dpo beta=0.5 sigmoid' \(dpo\): 3 scores for 4 prompts"):
        build_report(points, PROMPTS, tmp_path, title="t", judged_by="gold")


def test_mismatched_samples_name_the_policy(tmp_path):
    points = make_points()
    points[4] = dataclasses.replace(points[4], samples=["only one"])
    with pytest.raises(ValueError, match=r"policy 'ppo kl=0.2' \(ppo\): 1 samples for 4 prompts"):
        build_report(points, PROMPTS, tmp_path, title="t", judged_by="gold")


def test_missing_metric_names_policy_and_key(tmp_path):
    points = make_points()
    points[3] = dataclasses.replace(points[3], metrics={"rm_score_mean": 0.9})
    with pytest.raises(ValueError, match=r"policy 'ppo kl=0.05' \(ppo\): metric 'kl_to_sft' missing"):
        build_report(points, PROMPTS, tmp_path, title="t", judged_by="gold")


def test_non_finite_value_names_policy(tmp_path):
    points = make_points()
    points[1] = dataclasses.replace(points[1], scores=[0.0, math.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"policy 'dpo beta=0.1 sigmoid' \(dpo\): scores\[1\] = nan"):
        build_report(points, PROMPTS, tmp_path, title="t", judged_by="gold")


@pytest.mark.parametrize(("change", "message"), [
    (lambda pts: pts[1:], "exactly one policy with method 'sft'"),
    (lambda pts: [*pts, pts[1]], "repeated: \\['dpo beta=0.1 sigmoid'\\]"),
])
def test_reference_and_names_are_checked(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_report(change(make_points()), PROMPTS, tmp_path, title="t", judged_by="gold")


def test_judged_by_is_checked(tmp_path):
    with pytest.raises(ValueError, match="judged_by='human'; expected one of \\['gold', 'reward_model'\\]"):
        build_report(make_points(), PROMPTS, tmp_path, title="t", judged_by="human")
