"""End to end: the alignment_pipeline flow under a real Prefect test server, a real MLflow SQLite store
and a real DVC repository in a temporary git repository, on a tiny random-init model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import make_project, tiny_params

ALL_STAGES = ["base", "prepare", "sft", "label", "reward", "dpo_reference", "dpo", "evaluate"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("project")
    return make_project(root, tiny_params(tiny_model_dir, root))


@pytest.fixture(scope="module")
def runs(project, prefect_server):
    """First run, an unchanged second run, and a third with dpo.beta changed."""
    from flows.pipeline import alignment_pipeline

    first = alignment_pipeline(params="params.yaml", root=str(project))
    second = alignment_pipeline(params="params.yaml", root=str(project))
    third = alignment_pipeline(params="params.yaml", overrides=["dpo.beta=0.5"], root=str(project))
    return first, second, third


def test_first_run_runs_every_stage_and_writes_outputs(runs, project):
    first, _, _ = runs
    assert first["cached"] == []
    assert set(first["outputs"]) == set(ALL_STAGES)
    for stage, location in first["outputs"].items():
        result = json.loads((project / "outputs" / stage / location.rsplit("/", 1)[-1] / "result.json").read_text())
        assert result["stage"] == stage
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert set(metrics) == {"sft", "dpo"}
    assert metrics["sft"]["kl_to_sft"] == 0.0
    assert math.isfinite(metrics["dpo"]["kl_to_sft"]) and metrics["dpo"]["kl_to_sft"] != 0.0
    assert 0.0 <= metrics["dpo"]["win_rate_vs_sft"] <= 1.0


def client_for(project) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def test_training_stages_changed_weights(runs, project):
    first, _, _ = runs
    client = client_for(project)
    for stage in ("sft", "reward", "dpo"):
        run_id = json.loads(open(f"{first['outputs'][stage]}/result.json").read())["info"]["mlflow_run_id"]
        run = client.get_run(run_id)
        assert run.data.metrics["weight_change"] > 0, stage
        history = client.get_metric_history(run_id, "loss")
        assert len(history) >= 2, f"{stage}: step-wise loss not logged"
    dpo_run = json.loads(open(f"{first['outputs']['dpo']}/result.json").read())["info"]["mlflow_run_id"]
    logged = client.get_run(dpo_run).data.metrics
    assert "rewards/accuracies" in logged and "rewards/margins" in logged
    reward_run = json.loads(open(f"{first['outputs']['reward']}/result.json").read())["info"]["mlflow_run_id"]
    assert 0.0 <= client.get_run(reward_run).data.metrics["eval_pair_accuracy"] <= 1.0


def test_second_run_is_all_cache_hits(runs):
    first, second, _ = runs
    assert sorted(second["cached"]) == sorted(ALL_STAGES)
    assert second["outputs"] == first["outputs"]
    assert second["metrics"] == first["metrics"]


def test_beta_change_reruns_only_dpo_and_evaluate(runs):
    first, _, third = runs
    # the SFT model's log-probs of the pairs do not depend on beta: the new DPO run reuses them
    assert sorted(third["cached"]) == sorted(["base", "prepare", "sft", "label", "reward", "dpo_reference"])
    assert third["outputs"]["dpo_reference"] == first["outputs"]["dpo_reference"]
    assert third["outputs"]["dpo"] != first["outputs"]["dpo"]
    assert third["outputs"]["evaluate"] != first["outputs"]["evaluate"]


def test_policy_registered_once_per_trained_policy(runs, project):
    client = client_for(project)
    versions = client.search_model_versions("name='alignflow-policy'")
    assert len(versions) == 2  # first run and the beta change; the cached re-run added none


def test_parent_runs_carry_dataset_digest_and_children(runs, project):
    first, _, _ = runs
    client = client_for(project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    parent = client.get_run(first["mlflow_run_id"])
    digests = [d.dataset.digest for d in parent.inputs.dataset_inputs]
    assert digests == [md5]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["alignflow.stage"] for c in children} == set(ALL_STAGES)
    assert (project / "dvc-remote").is_dir()  # dvc push reached the remote


HH_SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory, tiny_model_dir, prefect_server):
    """The real-data path: HH-RLHF pairs, no gold judge, SFT on the chosen replies."""
    from flows.pipeline import alignment_pipeline

    root = tmp_path_factory.mktemp("hh-project")
    shutil.copy(HH_SAMPLE, root / "hh.jsonl")
    long = {"max_length": 512}
    params = tiny_params(
        tiny_model_dir, root,
        run={"dvc_push": False, "method": "both"},
        data={"task": "preference", "source": "hh.jsonl", "format": "hh", "max_rows": 40},
        sft={"source": "chosen", **long}, reward=long, dpo=long,
    )
    make_project(root, params)
    return alignment_pipeline(root=str(root))


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason="shared HH sample not beside the checkout")
def test_preference_task_skips_label_and_is_judged_by_the_reward_model(hh_run):
    """method: both trains DPO and PPO from the same SFT and reward model; evaluate scores both."""
    assert "label" not in hh_run["outputs"]
    assert {"dpo", "ppo"} <= set(hh_run["outputs"])
    assert "ppo/win_rate_vs_sft" in hh_run["metrics"] and "ppo/kl_to_sft" in hh_run["metrics"]
    assert "dpo/win_rate_vs_sft" in hh_run["metrics"]
    assert "dpo/rm_score_mean" in hh_run["metrics"]
    assert not any(key.endswith("gold_reward_mean") for key in hh_run["metrics"])


def test_a_batch_larger_than_the_pairs_stops_at_prepare_before_any_model_loads(tmp_path, tiny_model_dir):
    from stages.config import validate
    from stages.runner import run_stage

    rows = [{"prompt": f"Question {i}?", "chosen": "A careful answer.", "rejected": "No."} for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = tiny_params(tiny_model_dir, tmp_path, run={"dvc": False},
                         data={"task": "preference", "source": "pairs.jsonl", "eval_fraction": 0.2},
                         dpo={"batch_size": 64})
    with pytest.raises(ValueError, match=r"pairs.jsonl \(prepared\): \d+ training pairs, fewer than .*dpo.batch_size"):
        run_stage("prepare", validate(params), {}, tmp_path, track=False)


def test_concurrent_tasks_publish_the_same_stage_pointer_safely(tmp_path):
    """A sweep's DPO tasks finish at once and each publishes outputs/results/dpo.json: no write may
    pull another's temporary file from under it, and the pointer is always one whole result."""
    from concurrent.futures import ThreadPoolExecutor

    from stages.config import validate
    from stages.runner import StageResult, _publish_pointer

    config = validate({"run": {"output_dir": "out"}})
    results = [StageResult("dpo", f"key{i}", str(tmp_path / "out" / "dpo" / f"key{i}"), f"key{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            list(pool.map(lambda result: _publish_pointer(result, config, tmp_path), results))
    pointer = json.loads((tmp_path / "out" / "results" / "dpo.json").read_text())
    assert pointer["key"] in {result.key for result in results}
    assert not list((tmp_path / "out" / "results").glob(".*tmp*"))
