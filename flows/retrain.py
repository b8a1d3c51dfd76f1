"""The ``retrain`` flow: new preference files in, a retrained policy through the promotion gate out.

1. Under the dataset's file lock (``stages.ingest.dataset_lock``; a run started meanwhile waits, then
   finds only what is still new), ingest ``retrain.incoming`` into ``retrain.dataset``: every row
   validated as ``prepare`` validates, bad rows quarantined, duplicates dropped, the dataset a new DVC
   version, each file moved to ``processed/`` or ``rejected/``.
2. Nothing new: log it and return ``"no new data"``. Nothing trains and nothing goes to MLflow.
3. Otherwise run the pipeline's stages (``flows.pipeline.run_stages``) on the params with
   ``data.task: preference`` and ``data.source: <retrain.dataset>``. Stages whose inputs did not change
   stay cached (SFT too, when ``data.sft_source`` gives it its own data, as ``params/retrain.yaml``
   does); the reward model and the policy retrain, and the runner registers the new policy version.
4. The promotion gate (``stages.promotion``): the new version gets the alias ``challenger``; the
   ``score`` stage samples it and the champion on the held-out prompts with the same seed (judged by
   ``evaluate.judge``: the gold judge, else the held-out judge, a reward model trained on pairs no
   policy saw); it becomes ``champion`` only above the bar.
5. The decision, both scores, the versions and the data version go on the retrain's MLflow run (tags
   and metrics), on the model versions (tags) and into a Prefect markdown artifact.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.pipeline import run_stages, run_task
from stages.config import Config, load_config, validate
from stages.ingest import PROCESSED, IngestSummary, dataset_lock, ingest
from stages.models import setup_runtime
from stages.preflight import preflight
from stages.promotion import Decision, Registry, apply, gate, policy_result
from stages.records import read_jsonl
from stages.runner import STAGES, StageResult
from stages.tracking import Tracker

NO_NEW_DATA = "no new data"
RETRAINED = "retrained"


def retrain_config(config: Config) -> Config:
    """``config`` as the retrain trains on it: preference pairs from ``retrain.dataset``."""
    raw = config.model_dump(mode="json")
    raw["data"] |= {"task": "preference", "source": config.retrain.dataset}
    return validate(raw, source="retrain params (data.task=preference, data.source=retrain.dataset)")


@flow(name="retrain")
def retrain(
    params: str = "params/retrain.yaml", overrides: list[str] | None = None, root: str = "."
) -> dict[str, Any]:
    """Ingest new preference files, retrain on them, and let the promotion gate pick the champion.

    Args:
        params: Params file, relative to `root`. The default is the retrain profile, which gives SFT its own
            data (`data.sft_source`) so that it is trained once and stays cached across drops.
        overrides: `section.key=value` overrides, validated like the file, e.g. `retrain.gate_margin=0.05`
            or `retrain.incoming=s3://bucket/incoming`.
        root: Project root that holds `data/`, `dvc.yaml` and the params file.

    Returns:
        `status` ("no new data" or "retrained"), the ingestion summary, the gate decisions and the champion.
    """
    project = Path(root).resolve()
    loaded = load_config(project / params, overrides or [])
    config = retrain_config(loaded)
    preflight(config, project)  # an unreachable MLflow server or DVC remote stops the run before it ingests
    setup_runtime(config.run)
    logger = get_run_logger()
    if loaded.data.source != config.data.source:
        logger.info("data.source %r replaced by retrain.dataset %r", loaded.data.source, config.data.source)
    with dataset_lock(config.retrain, project):  # held to the end: retrain runs on one dataset never overlap
        summary = ingest(config, project)
        _report_ingest(summary, logger)
        if summary.no_new_data:
            logger.info("%s in %s: nothing trains", NO_NEW_DATA, config.retrain.incoming)
            return {"status": NO_NEW_DATA, "ingest": summary.as_dict(), "decisions": [], "champion": None}
        tracker = Tracker.start(config.run, project, f"retrain-{flow_run.get_name() or 'local'}",
                                tags={"alignflow.flow": "retrain", "prefect.flow_run_id": str(flow_run.get_id())})
        logger.info("MLflow parent run: %s", tracker.url)
        try:
            results, cached = run_stages(config, project, tracker)
            registry = Registry.open(config.run, project)
            decisions = [_gate(stage, config, project, tracker, results, registry, summary)
                         for stage in results if results[stage].info.get("policy")]
            _record(tracker, config, results, cached, summary, decisions)
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish()
    logger.info("cached stages: %s", ", ".join(cached) or "none")
    return {
        "status": RETRAINED,
        "mlflow_run_id": tracker.run_id,
        "cached": cached,
        "outputs": {stage: result.output_dir for stage, result in results.items()},
        "ingest": summary.as_dict(),
        "decisions": [asdict(decision) for decision in decisions],
        "champion": decisions[-1].champion_after if decisions else None,
        "metrics": results["evaluate"].metrics,
    }


def _report_ingest(summary: IngestSummary, logger) -> None:
    logger.info("ingest: %s", summary.describe())
    for report in summary.files:
        if report.status != PROCESSED:
            logger.warning("ingest: %s %s: %s", report.status, report.name, report.reason)
    create_markdown_artifact(key="retrain-ingest", markdown=summary.markdown(),
                             description="Incoming preference files: rows in, kept, refused, duplicates, new")


# --------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------
def _gate(stage: str, config: Config, project: Path, tracker: Tracker, results: dict[str, StageResult],
          registry: Registry, summary: IngestSummary) -> Decision:
    logger = get_run_logger()
    challenger = results[stage]
    version = challenger.info.get("registered_version")
    if version is None:
        raise RuntimeError(f"{stage}: the policy at {challenger.output_dir} is not a registered model version, "
                           "so the gate cannot run")
    registry.set_challenger(version)
    champion = registry.champion()
    scores: dict[str, Any] = {}
    if champion not in (None, version):
        judged_by, challenger_scores = _scores("challenger", version, challenger, config, project, tracker, results)
        _, champion_scores = _scores("champion", champion, policy_result(registry, champion, config, project),
                                     config, project, tracker, results)
        scores = {"challenger_scores": challenger_scores, "champion_scores": champion_scores, "judged_by": judged_by}
    decision = gate(config.retrain.gate_metric, config.retrain.gate_margin, challenger=version, champion=champion,
                    dataset_md5=summary.dataset_md5, policy=stage, **scores)
    apply(registry, decision)
    logger.info("gate (%s): %s", stage, decision.reason)
    return decision


def _scores(role: str, version: str, policy: StageResult, config: Config, project: Path, tracker: Tracker,
            results: dict[str, StageResult]) -> tuple[str, list[float]]:
    """One policy's samples on the held-out prompts, scored by the score stage (a cached task)."""
    inputs = {name: results[name] for name in STAGES["score"].inputs(config)} | {"policy": policy}
    scored, _ = run_task("score", config, inputs, project, tracker, name=f"gate: score {role} v{version}",
                         tags={"alignflow.gate": role, "alignflow.model_version": str(version)})
    return scored.info["judged_by"], [float(row["judge"]) for row in read_jsonl(scored.path / scored.info["samples"])]


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def _record(tracker: Tracker, config: Config, results: dict[str, StageResult], cached: list[str],
            summary: IngestSummary, decisions: list[Decision]) -> None:
    tracker.log_params(config.model_dump(mode="json"))
    tracker.log_config(config)
    if summary.versioned and summary.dataset_md5:
        tracker.log_dataset("preferences", summary.dataset_md5, config.retrain.dataset, context="train")
    tracker.set_tags({
        "alignflow.method": config.run.method,
        "alignflow.cached_stages": ",".join(cached) or "none",
        "alignflow.prepared_md5": results["prepare"].info.get("dataset_md5") or "unversioned",
        **{f"alignflow.{stage}.key": result.key for stage, result in results.items()},
    })
    tracker.log_metrics(results["evaluate"].metrics | summary.as_metrics())
    for decision in decisions:
        if len(decisions) > 1:  # one set per policy (run.method: both); the plain set is the last one's
            tracker.set_tags(decision.tags(prefix=f"alignflow.gate.{decision.policy}."))
            tracker.log_metrics(decision.metrics(prefix=f"gate/{decision.policy}/"))
    if decisions:
        tracker.set_tags(decisions[-1].tags())
        tracker.log_metrics(decisions[-1].metrics())
    tracker.set_tags({"alignflow.dataset_md5": summary.dataset_md5 or "none"})
    tracker.log_json({"ingest": summary.as_dict(), "decisions": [asdict(d) for d in decisions]}, "retrain.json")
    markdown = "\n\n".join([*(decision.markdown() for decision in decisions), summary.markdown()])
    create_markdown_artifact(key="retrain-decision", markdown=markdown,
                             description="Promotion gate: decision, both scores, versions and data version")


# --------------------------------------------------------------------------------------------------
# Events: `alignflow ingest` announces new files (a deployment trigger can start the retrain on them)
# --------------------------------------------------------------------------------------------------
ARRIVED = "alignflow.preferences.arrived"


def announce_arrivals(names: list[str], incoming: str) -> bool:
    """Emit one ``alignflow.preferences.arrived`` event per file (resource ``alignflow.incoming.<name>``)
    to the Prefect server at ``PREFECT_API_URL``; False, and nothing sent, when no server is configured
    (an ephemeral one would have no trigger listening)."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker, should_emit_events_to_running_server

    if not should_emit_events_to_running_server():
        return False
    for name in names:
        emit_event(event=ARRIVED,
                   resource={"prefect.resource.id": f"alignflow.incoming.{name}", "prefect.resource.name": name},
                   payload={"incoming": incoming, "name": name})
    EventsWorker.drain_all(timeout=30, at_exit=False)  # send now: the CLI exits right after
    return True
