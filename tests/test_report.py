"""Tests for stages/report.py on hand-made policies: sft, two DPO and two PPO policies on four samples.

Per-sample judge scores (sample i of every policy answers prompt i):

    sft          [ 0.0, 0.5, 1.0, 0.2]
    dpo β=0.1    [ 0.5, 0.5, 0.0, 0.9]   vs sft: win, tie, loss, win   -> (1 + .5 + 0 + 1) / 4 = 0.625
    dpo β=0.5    [ 1.0, 0.0, 1.0, 0.1]   vs sft: win, loss, tie, loss  -> (1 + 0 + .5 + 0) / 4 = 0.375
    ppo kl=0.05  [ 0.1, 0.6, 1.5, 0.2]   vs sft: win, win, win, tie    -> (1 + 1 + 1 + .5) / 4 = 0.875
    ppo kl=0.2   [-1.0, 0.5, 1.0, 0.3]   vs sft: loss, tie, tie, win   -> (0 + .5 + .5 + 1) / 4 = 0.5

Frontier (kl_to_sft, mean judge score = mean of the four scores): sft (0, .425), dpo β=0.1 (2, .475),
dpo β=0.5 (1, .525), ppo 0.05 (4, .600), ppo 0.2 (3, .200). Best per method: dpo β=0.5 and ppo 0.05.
Nothing dominates: the best PPO score needs the highest KL, and no point has a KL below SFT's 0.

The verdict tests use a second, larger set (200 prompts) built so that the answer is known.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from stages.bootstrap import win_rate
from stages.report import PolicyPoint, build_report, setting_label

PROMPTS = ["Write a happy review.", "Describe the film.", "What did you think?", "Tell me about <b>it</b>."]
SCRIPT = "<script>alert('x')</script> & more"
GOLD = {"name": "vader", "kind": "gold", "independent": True, "pair_accuracy": None, "pairs": None}
TRAINING_RM = {"name": "training_rm", "kind": "training_rm", "independent": False, "pair_accuracy": 0.7, "pairs": 21}


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
    return build_report(make_points(), PROMPTS, tmp_path / "report", title="DPO vs PPO arena", judge=GOLD,
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
# The report on four samples: tables and files
# --------------------------------------------------------------------------------------------------
def test_report_writes_every_file(report):
    for name in ("frontier.png", "curves.png", "summary.md", "index.html", "policies.csv", "policies.json",
                 "head_to_head.json", "verdict.json"):
        path = report.out_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert report.files[name] == path
    for png in (report.frontier_png, report.curves_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_is_the_mean_judge_score_of_the_given_samples_with_its_interval(report):
    """y is computed from the scores, never copied from a metric: sft .425, dpo .475/.525, ppo .6/.2."""
    assert report.y_metric == "judge_score_mean"
    drawn = {p.name: (p.kl, p.score, p.label) for p in report.frontier}
    assert drawn == {
        "sft": (0.0, pytest.approx(0.425), "SFT"),
        "dpo beta=0.1 sigmoid": (2.0, pytest.approx(0.475), "β=0.1 sigmoid"),
        "dpo beta=0.5 sigmoid": (1.0, pytest.approx(0.525), "β=0.5 sigmoid"),
        "ppo kl=0.05": (4.0, pytest.approx(0.6), "kl=0.05"),
        "ppo kl=0.2": (3.0, pytest.approx(0.2), "kl=0.2"),
    }
    for p in report.frontier:  # the error bar holds the estimate and spans the spread of four samples
        assert p.low <= p.score <= p.high and p.high - p.low > 0


def test_policies_table_win_rates_by_hand(report):
    rows = {row["policy"]: row for row in report.policies}
    assert list(rows) == ["sft", "dpo beta=0.1 sigmoid", "dpo beta=0.5 sigmoid", "ppo kl=0.05", "ppo kl=0.2"]
    expected = {"sft": 0.5, "dpo beta=0.1 sigmoid": 0.625, "dpo beta=0.5 sigmoid": 0.375, "ppo kl=0.05": 0.875,
                "ppo kl=0.2": 0.5}
    assert {name: row["win_rate_vs_sft"] for name, row in rows.items()} == pytest.approx(expected)
    assert rows["ppo kl=0.05"]["judge_score_mean"] == pytest.approx((0.1 + 0.6 + 1.5 + 0.2) / 4)
    assert rows["ppo kl=0.05"]["vs_sft"] == pytest.approx(0.6 - 0.425)
    assert rows["sft"]["vs_sft"] == 0.0 and rows["sft"]["vs_sft_ci95_low"] == rows["sft"]["vs_sft_ci95_high"] == 0.0
    assert rows["dpo beta=0.1 sigmoid"]["setting"] == "β=0.1 sigmoid"
    assert rows["ppo kl=0.2"]["gold_reward_mean"] == 0.20
    assert rows["sft"]["response_tokens_mean"] == 12.0
    assert rows["sft"]["n"] == 4 and rows["sft"]["seeds"] == 1
    assert json.loads(report.policies_json.read_text()) == report.policies
    with report.policies_csv.open() as handle:
        assert [row["policy"] for row in csv.DictReader(handle)] == list(rows)


def test_head_to_head_against_best_of_every_other_method(report):
    """Best by judge score: dpo β=0.5 (.525), ppo 0.05 (.6), sft itself. 5 policies x 2 other methods = 10 rows.

    dpo β=0.5 [1, 0, 1, .1] vs ppo 0.05 [.1, .6, 1.5, .2]: win, loss, loss, loss -> 0.25
    sft [0, .5, 1, .2] vs dpo β=0.5: loss, win, tie, win -> 0.625
    ppo 0.2 [-1, .5, 1, .3] vs dpo β=0.5: loss, win, tie, win -> 0.625
    """
    assert report.best_per_method == {"sft": "sft", "dpo": "dpo beta=0.5 sigmoid", "ppo": "ppo kl=0.05"}
    table = {(row["policy"], row["opponent"]): row for row in report.head_to_head}
    assert len(report.head_to_head) == 10
    assert table[("dpo beta=0.5 sigmoid", "ppo kl=0.05")]["win_rate"] == pytest.approx(0.25)
    assert table[("sft", "dpo beta=0.5 sigmoid")]["win_rate"] == pytest.approx(0.625)
    assert table[("ppo kl=0.2", "dpo beta=0.5 sigmoid")]["win_rate"] == pytest.approx(0.625)
    assert table[("ppo kl=0.05", "sft")]["win_rate"] == pytest.approx(0.875)
    assert table[("ppo kl=0.05", "sft")]["difference"] == pytest.approx(0.175)
    assert ("dpo beta=0.1 sigmoid", "dpo beta=0.5 sigmoid") not in table  # never against its own method
    assert json.loads(report.head_to_head_json.read_text()) == report.head_to_head


def test_four_samples_give_no_verdict(report):
    """dpo β=0.5 - ppo 0.05 = -0.075 on four samples: far inside the noise."""
    record = json.loads(report.verdict_json.read_text())
    assert record["verdict"].startswith("no significant difference between dpo beta=0.5 sigmoid and ppo kl=0.05")
    assert record["judge"] == GOLD and record["judge_independent"] is True
    [pair] = record["head_to_head"]
    assert pair["difference"] == pytest.approx(-0.075) and pair["ci95"][0] < 0 < pair["ci95"][1]
    assert pair["significant"] is False


def test_index_html_opens_with_the_verdict_and_is_self_contained(report):
    page = report.index_html.read_text()
    assert page.index('id="verdict"') < page.index('id="frontier"') < page.index('id="policies"')
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
    assert text.startswith("# DPO vs PPO arena\n\n**Verdict:** no significant difference")
    assert "Judge: vader, the task's gold judge." in text
    assert report.findings[0].startswith("The highest mean judge score, 0.600 [")
    assert "by ppo kl=0.05 (ppo) at KL 4.000 to the SFT policy." in report.findings[0]
    # ppo kl=0.05 - sft = [.1, .1, .5, 0]: never below 0, so every resample's mean is above 0 but one in 256
    assert "1 of 4 trained policies score above the SFT policy beyond the noise (95% interval of the " \
           "difference above 0): ppo kl=0.05." in text
    assert all(finding in text for finding in report.findings)


def test_sft_only_report_has_no_curves_but_renders(tmp_path):
    report = build_report(make_points()[:1], PROMPTS, tmp_path, title="t", judge=GOLD)
    assert report.curves_png.read_bytes()[:4] == b"\x89PNG"
    assert report.head_to_head == []
    assert len(report.frontier) == 1
    assert report.verdict["verdict"] == "Only the SFT policy was scored."


# --------------------------------------------------------------------------------------------------
# Verdicts with a known answer (200 prompts)
# --------------------------------------------------------------------------------------------------
def big_points(dpo_shift: float, ppo_shift: float, ppo_seeds: int = 1, oracle: bool = False) -> list[PolicyPoint]:
    """sft ~ N(0, 1) per prompt; dpo = sft + dpo_shift + noise(0.1); ppo = sft + ppo_shift + noise(0.1) per seed.

    The policies share each prompt's level (the paired part), so the difference of two policies has a
    standard error of about 0.1 * sqrt(2 / 200) = 0.01: a gap of 0.3 is far outside the noise, 0.0 inside.
    """
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, 200)

    def point(name, method, scores_by_seed, kl, **extra):
        return PolicyPoint(name, method, {}, {"kl_to_sft": kl}, list(scores_by_seed[0]), [name] * 200, {},
                           seed_scores=[list(s) for s in scores_by_seed], **extra)

    dpo = [base + dpo_shift + rng.normal(0, 0.1, 200)]
    ppo = [base + ppo_shift + rng.normal(0, 0.1, 200) for _ in range(ppo_seeds)]
    return [point("sft", "sft", [base], 0.0), point("dpo β=0.1", "dpo", dpo, 1.0, gold_calls=480.0, seconds=100.0),
            point("ppo-gold kl=0.05", "ppo-gold" if oracle else "ppo", ppo, 2.0, gold_calls=480.0, seconds=300.0,
                  oracle=oracle)]


def test_verdict_names_the_winner_with_the_interval_of_the_difference(tmp_path):
    report = build_report(big_points(0.3, 0.0), ["p"] * 200, tmp_path, title="t", judge=GOLD)
    record = report.verdict
    pattern = r"dpo β=0\.1 ahead of ppo-gold kl=0\.05 by 0\.[23]\d\d \[0\.\d{3}, 0\.\d{3}\]\."
    assert re.fullmatch(pattern, record["verdict"]), record["verdict"]
    [pair] = record["head_to_head"]
    assert pair["significant"] and 0.25 < pair["ci95"][0] < pair["difference"] < pair["ci95"][1] < 0.35
    policies = {p["name"]: p for p in record["policies"]}
    assert policies["dpo β=0.1"]["gold_calls"] == 480.0 and policies["dpo β=0.1"]["seconds"] == 100.0
    assert policies["dpo β=0.1"]["vs_sft"]["ci95"][0] > 0.25  # above SFT beyond the noise
    assert policies["dpo β=0.1"]["n"] == 200
    assert "1 of 2 trained policies score above the SFT policy beyond the noise" in " ".join(report.findings)


def test_no_verdict_when_the_interval_holds_zero(tmp_path):
    report = build_report(big_points(0.0, 0.0), ["p"] * 200, tmp_path, title="t", judge=GOLD)
    assert report.verdict["verdict"].startswith("no significant difference between dpo β=0.1 and ppo-gold kl=0.05 "
                                                "at this budget (dpo β=0.1 - ppo-gold kl=0.05: ")


def test_seeds_widen_the_interval_and_count_in_n(tmp_path):
    """Three PPO seeds scored on the same 200 samples: n = 600, and the seeds' spread (levels -0.2, 0, +0.2)
    enters the interval of the difference to SFT, which the shared prompt levels leave ~0.03 wide for one seed."""
    one = build_report(big_points(0.0, 0.0, ppo_seeds=1), ["p"] * 200, tmp_path / "one", title="t", judge=GOLD)
    points = big_points(0.0, 0.0, ppo_seeds=3)
    offsets = [-0.2, 0.0, 0.2]  # seeds that train to different levels
    points[2] = dataclasses.replace(points[2], seed_scores=[[s + o for s in seed] for seed, o in
                                                            zip(points[2].seed_scores, offsets, strict=True)])
    three = build_report(points, ["p"] * 200, tmp_path / "three", title="t", judge=GOLD)
    width = {name: (row["vs_sft_ci95_high"] - row["vs_sft_ci95_low"]) for name, row in
             (("one", one.policies[2]), ("three", three.policies[2]))}
    assert three.policies[2]["n"] == 600 and three.policies[2]["seeds"] == 3
    assert width["one"] < 0.05 and width["three"] > 4 * width["one"]


def test_oracles_and_a_dependent_judge_are_marked(tmp_path):
    report = build_report(big_points(0.3, 0.0, oracle=True), ["p"] * 200, tmp_path, title="t", judge=TRAINING_RM)
    assert report.verdict["verdict"].startswith("NOT INDEPENDENT: judged by the training reward model")
    assert "ppo-gold kl=0.05 (oracle)" in report.verdict["verdict"]
    assert report.verdict["judge_independent"] is False
    policies = {p["name"]: p for p in report.verdict["policies"]}
    assert policies["ppo-gold kl=0.05"]["oracle"] is True and policies["dpo β=0.1"]["oracle"] is False
    text = report.summary_md.read_text()
    assert "NOT independent" in text and "held-out preference accuracy is 0.700 on 21 pairs" in text


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_empty_points(tmp_path):
    with pytest.raises(ValueError, match="no policies given"):
        build_report([], PROMPTS, tmp_path, title="t", judge=GOLD)


def test_mismatched_scores_name_the_policy(tmp_path):
    points = make_points()
    points[2] = dataclasses.replace(points[2], scores=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"policy 'dpo beta=0.5 sigmoid' \(dpo\): 3 scores \(seed #0\) for 4"):
        build_report(points, PROMPTS, tmp_path, title="t", judge=GOLD)


def test_mismatched_samples_name_the_policy(tmp_path):
    points = make_points()
    points[4] = dataclasses.replace(points[4], samples=["only one"])
    with pytest.raises(ValueError, match=r"policy 'ppo kl=0.2' \(ppo\): 1 samples for 4 prompts"):
        build_report(points, PROMPTS, tmp_path, title="t", judge=GOLD)


def test_missing_metric_names_policy_and_key(tmp_path):
    points = make_points()
    points[3] = dataclasses.replace(points[3], metrics={"rm_score_mean": 0.9})
    with pytest.raises(ValueError, match=r"policy 'ppo kl=0.05' \(ppo\): metric 'kl_to_sft' missing"):
        build_report(points, PROMPTS, tmp_path, title="t", judge=GOLD)


def test_non_finite_value_names_policy(tmp_path):
    points = make_points()
    points[1] = dataclasses.replace(points[1], scores=[0.0, math.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"policy 'dpo beta=0.1 sigmoid' \(dpo\): scores\[1\] = nan"):
        build_report(points, PROMPTS, tmp_path, title="t", judge=GOLD)


@pytest.mark.parametrize(("change", "message"), [
    (lambda pts: pts[1:], "exactly one policy with method 'sft'"),
    (lambda pts: [*pts, pts[1]], "repeated: \\['dpo beta=0.1 sigmoid'\\]"),
])
def test_reference_and_names_are_checked(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_report(change(make_points()), PROMPTS, tmp_path, title="t", judge=GOLD)


def test_judge_kind_is_checked(tmp_path):
    with pytest.raises(ValueError, match="judge kind 'human'; expected one of"):
        build_report(make_points(), PROMPTS, tmp_path, title="t", judge={"name": "h", "kind": "human"})
