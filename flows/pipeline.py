"""The ``alignment_pipeline`` flow: prepare -> SFT -> (label) -> reward -> DPO -> evaluate.

The flow only wires stages. Each stage is one Prefect task whose cache key is the stage's own key
(stage, code version, params sections, input content keys; see ``stages.runner.stage_key``), with
the result persisted under ``<run.output_dir>/.prefect``, so a re-run with nothing changed shows every
stage as ``Cached`` and trains nothing, and a change of ``dpo.beta`` re-runs DPO and evaluate only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stages.config import Config, load_config
from stages.models import setup_runtime
from stages.preflight import preflight
from stages.runner import (
    RESULT_FILE,
    STAGES,
    StageResult,
    output_dir,
    output_root,
    pipeline_order,
    run_stage,
    stage_key,
)
from stages.tracking import Tracker


def _cache_key(_context, parameters: dict[str, Any]) -> str:
    return f"alignflow-{parameters['stage']}-{parameters['key']}"


@task(
    name="stage",
    task_run_name="{stage}",
    cache_key_fn=_cache_key,
    persist_result=True,
    retries=1,
    retry_delay_seconds=10,
)
def stage_task(
    stage: str, key: str, config: Config, inputs: dict[str, StageResult], root: str, parent_run_id: str,
    tags: dict[str, str] | None = None,
) -> StageResult:
    result = run_stage(stage, config, inputs, Path(root), parent_run_id=parent_run_id, tags=tags)
    if result.key != key:
        raise RuntimeError(f"{stage}: cache key changed during the run ({key} -> {result.key})")
    return result


def run_task(stage: str, config: Config, inputs: dict[str, StageResult], root: Path, tracker: Tracker, *,
             tags: dict[str, str] | None = None, name: str | None = None) -> tuple[StageResult, bool]:
    """Run one stage as a cached Prefect task; return its result and whether it was a cache hit."""
    key = stage_key(stage, config, inputs, root)
    missing = not (output_dir(stage, key, config, root) / RESULT_FILE).is_file()
    configured = stage_task.with_options(
        task_run_name=name or stage,
        tags=["gpu"] if STAGES[stage].trains else [],
        result_storage=output_root(config, root) / ".prefect",  # a Path: Prefect stores results there as files
        refresh_cache=missing,  # a cache record whose output was deleted is not trusted
    )
    state = configured(stage=stage, key=key, config=config, inputs=inputs, root=str(root),
                       parent_run_id=tracker.run_id, tags=tags, return_state=True)
    result = state.result()
    if state.name == "Cached":
        get_run_logger().info("%s: cache hit (key %s), nothing to run; output at %s", name or stage, key,
                              result.output_dir)
    return result, state.name == "Cached"


def run_stages(config: Config, root: Path, tracker: Tracker, stages: list[str] | None = None,
               results: dict[str, StageResult] | None = None) -> tuple[dict[str, StageResult], list[str]]:
    """Run (or take from cache) ``stages`` (default: every stage the config's pipeline needs) in order,
    each given the results of its inputs; return all results and the names of the cached stages."""
    results = dict(results or {})
    cached: list[str] = []
    for stage in stages or pipeline_order(config):
        inputs = {name: results[name] for name in STAGES[stage].inputs(config)}
        results[stage], hit = run_task(stage, config, inputs, root, tracker)
        if hit:
            cached.append(stage)
    return results, cached


def _record_on_parent(tracker: Tracker, config: Config, results: dict[str, StageResult], cached: list[str]):
    tracker.log_params(config.model_dump(mode="json"))
    tracker.log_config(config)
    prepared = results["prepare"]
    if prepared.info.get("dataset_md5"):
        tracker.log_dataset(prepared.info["dataset_name"], prepared.info["dataset_md5"],
                            prepared.info["dataset_path"], context="train")
    tracker.set_tags({
        "alignflow.method": config.run.method,
        "alignflow.cached_stages": ",".join(cached) or "none",
        "alignflow.dataset_md5": prepared.info.get("dataset_md5", "unversioned"),
        **{f"alignflow.{s}.key": r.key for s, r in results.items()},
    })
    tracker.log_metrics(results["evaluate"].metrics)
    for stage, result in results.items():
        tracker.log_metrics({f"{stage}/stage_seconds": result.metrics.get("stage_seconds", 0.0)})


@flow(name="alignment_pipeline")
def alignment_pipeline(
    params: str = "params.yaml", overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """Run the whole pipeline for a params file and overrides; return each stage's output directory and
    the evaluation metrics. Stages whose inputs and params are unchanged are taken from cache.

    Args:
        params: The params file, relative to root (for example params.yaml or params/hh.yaml).
        overrides: Changes to the params file, one section.key=value each (for example dpo.beta=0.2), checked
            like the file itself.
        root: The project directory holding the params file, data/ and dvc.yaml.
    """
    project = Path(root).resolve()
    config = load_config(project / params, overrides or [])
    preflight(config, project)  # an unreachable MLflow server or DVC remote stops the run before training
    setup_runtime(config.run)
    tracker = Tracker.start(config.run, project, f"pipeline-{flow_run.get_name() or 'local'}",
                            tags={"alignflow.flow": "alignment_pipeline",
                                  "prefect.flow_run_id": str(flow_run.get_id())})
    logger = get_run_logger()
    logger.info("MLflow parent run: %s", tracker.url)
    try:
        results, cached = run_stages(config, project, tracker)
        _record_on_parent(tracker, config, results, cached)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    logger.info("outputs under %s; metrics in %s", output_root(config, project),
                output_root(config, project) / "metrics.json")
    logger.info("cached stages: %s", ", ".join(cached) or "none")
    return {
        "mlflow_run_id": tracker.run_id,
        "cached": cached,
        "outputs": {stage: result.output_dir for stage, result in results.items()},
        "metrics": results["evaluate"].metrics,
    }
