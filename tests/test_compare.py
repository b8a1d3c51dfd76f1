"""The compare flow on a tiny model under a real Prefect test server, MLflow SQLite store and DVC repo:
one report with one point and one row per policy, tagged child runs, Prefect artifacts, and a re-run
with one more beta that trains and scores only that policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import make_project, tiny_params

GRID = {"sweep": "tiny", "dpo_beta": [0.1, 0.5], "dpo_loss_types": ["sigmoid"], "ppo_kl_coef": [0.05],
        "ppo_gold_kl_coef": [0.05], "rloo_gold": False, "online": [], "reference_free": [], "max_examples": 3}
POLICIES = ["sft", "dpo β=0.1", "dpo β=0.5", "ppo kl=0.05", "ppo-gold kl=0.05"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("compare")
    return make_project(root, tiny_params(tiny_model_dir, root, compare=GRID))


@pytest.fixture(scope="module")
def runs(project, prefect_server):
    from flows.compare import compare

    first = compare(params="params.yaml", root=str(project))
    second = compare(params="params.yaml", overrides=["compare.dpo_beta=[0.1, 0.5, 1.0]"], root=str(project))
    return first, second


def test_report_has_one_point_and_one_row_per_policy(runs):
    first, _ = runs
    index = Path(first["report"])
    for name in ("index.html", "frontier.png", "curves.png", "summary.md", "policies.csv", "head_to_head.json",
                 "verdict.json"):
        assert (index.parent / name).is_file(), name
    assert [row["policy"] for row in first["policies"]] == POLICIES
    assert [name for name, _, _ in first["frontier"]] == POLICIES
    html = index.read_text()
    policies_table = re.search(r'<table id="policies">.*?</table>', html, re.S).group(0)
    assert policies_table.count("<tr>") - 1 == len(POLICIES)  # minus the header row
    sft = next(row for row in first["policies"] if row["policy"] == "sft")
    assert sft["kl_to_sft"] == 0.0 and sft["win_rate_vs_sft"] == 0.5


def test_verdict_rests_on_the_gold_judge_with_equal_budgets_and_intervals(runs):
    """The tiny task labels 16 prompts x 4 samples = 64 gold calls; PPO-GT gets (64 - 8 reward-scale samples)
    / 4 per rollout = 14 updates, i.e. the same 64 calls. Every policy is scored on the same samples."""
    import json

    first, _ = runs
    record = json.loads((Path(first["report"]).parent / "verdict.json").read_text())
    assert record["judge"]["kind"] == "gold" and record["judge"]["name"] == "vader"
    assert record["judge_independent"] is True
    policies = {p["name"]: p for p in record["policies"]}
    assert list(policies) == POLICIES
    assert policies["dpo β=0.1"]["gold_calls"] == 64.0 and policies["ppo kl=0.05"]["gold_calls"] == 64.0
    assert policies["ppo-gold kl=0.05"]["gold_calls"] == 64.0 and policies["ppo-gold kl=0.05"]["oracle"] is True
    assert len({p["n"] for p in record["policies"]}) == 1  # the same number of held-out samples for all
    for p in record["policies"]:
        low, high = p["ci95"]
        assert low <= p["judge_score_mean"] <= high and p["seconds"] is None or p["seconds"] > 0
    assert record["verdict"] and "ci95" in json.dumps(record["head_to_head"])
    assert "Verdict:" in Path(first["report"]).read_text()


def test_child_runs_are_tagged_for_mlflow_compare(runs, project):
    first, _ = runs
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    children = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id],
                                  f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")
    trained = {(c.data.tags["alignflow.stage"], c.data.tags.get("alignflow.variant")): c for c in children}
    dpo = trained[("dpo", "dpo β=0.5")]
    assert dpo.data.tags["alignflow.method"] == "dpo" and dpo.data.tags["alignflow.beta"] == "0.5"
    assert dpo.data.tags["alignflow.sweep"] == "tiny" and dpo.data.params["dpo.beta"] == "0.5"
    assert trained[("ppo", "ppo-gold kl=0.05")].data.tags["alignflow.reward_source"] == "gold"
    assert {variant for stage, variant in trained if stage == "score"} == set(POLICIES)
    # one shared reference computation for both DPO runs
    assert sum(stage == "dpo_reference" for stage, _ in trained) == 1
    artifacts = client.list_artifacts(first["mlflow_run_id"], "report")
    assert {"index.html", "frontier.png", "curves.png"} <= {Path(a.path).name for a in artifacts}


def test_prefect_artifacts_show_the_table_and_summary(runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["compare-policies", "compare-summary", "compare-verdict"])))
    kinds = {a.key: a.type for a in artifacts}
    assert kinds == {"compare-policies": "table", "compare-summary": "markdown", "compare-verdict": "markdown"}


def test_adding_one_beta_trains_and_scores_only_that_policy(runs):
    _, second = runs
    assert sorted(second["ran"]) == ["score dpo β=1", "train dpo β=1"]
    assert len(second["policies"]) == len(POLICIES) + 1


def test_a_grid_that_needs_a_gold_judge_is_refused_before_training(tiny_model_dir, tmp_path):
    from flows.compare import check_grid
    from stages.config import ConfigError, validate

    config = validate(tiny_params(tiny_model_dir, tmp_path, data={"task": "preference"}, compare=GRID))
    with pytest.raises(ConfigError, match="gold judge"):
        check_grid(config)


def test_seeds_multiply_the_grid_and_gold_budgets_match_the_labels(tiny_model_dir, tmp_path):
    from flows.compare import grid
    from stages.config import validate

    config = validate(tiny_params(tiny_model_dir, tmp_path, compare=GRID | {"seeds": [0, 1], "rloo_gold": True},
                                  ppo={"rollout_batch_size": 8, "mini_batch_size": 2, "normalization_samples": 16}))
    variants = grid(config, gold_calls=480.0)
    assert [(v.name, v.seed) for v in variants][:2] == [("dpo β=0.1", 0), ("dpo β=0.1", 1)]
    assert len(variants) == 2 * 5  # 2 DPO, 1 PPO, 1 PPO-GT, 1 RLOO-GT; each on two seeds
    ppo_gold = next(v for v in variants if v.method == "ppo-gold")
    assert "ppo.updates=58" in ppo_gold.overrides  # (480 - 16) / 8
    assert "ppo.seed=0" in ppo_gold.overrides and ppo_gold.oracle
    rloo_gold = next(v for v in variants if v.method == "rloo-gold")
    assert "rloo.max_steps=60" in rloo_gold.overrides  # 480 / (rloo.batch_size 8 x accumulation 1)
    assert "rloo.reward_source=gold" in rloo_gold.overrides
