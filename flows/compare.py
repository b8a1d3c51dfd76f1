"""The ``compare`` flow: the DPO-vs-PPO arena on the user's own model and data.

Every policy of the grid in ``params.compare`` (DPO at several beta and loss types, PPO at several KL
coefficients, PPO on the gold reward, RLOO/GRPO, the reference-free SimPO and ORPO) is trained from the
**same** cached SFT model and reward model, then scored by the ``score`` stage exactly as the SFT model
is: same held-out prompts, same sampling seed, same judge, KL always against the SFT policy. Each
training run and each scoring is a cached Prefect task, so re-running after adding one ``beta`` value
trains and scores that one policy only; the DPO runs share one ``dpo_reference`` computation.

The report (``stages.report``) goes to ``<compare.report_dir>/<sweep>-<flow run>/``, to the parent
MLflow run as artifacts, and to Prefect as a table and a markdown artifact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.pipeline import run_stages, run_task
from stages.config import Config, ConfigError, apply_overrides, load_config, validate
from stages.judges import gold_judge
from stages.models import setup_runtime
from stages.preflight import preflight
from stages.records import read_jsonl
from stages.report import PolicyPoint, Report, build_report
from stages.runner import STAGES, StageResult, pipeline_order
from stages.tracking import Tracker

# Training curves drawn in the report, where a run logged them (TRL trainers' names, then the PPO stage's).
CURVE_METRICS = ["loss", "rewards/margins", "rewards/accuracies", "reward", "kl", "ppo/score_mean", "ppo/kl",
                 "ppo/rlhf_reward_mean"]


@dataclass(frozen=True)
class Variant:
    """One grid point: which stage trains it, with which overrides of its params section."""

    name: str  # unique, e.g. "dpo sigmoid β=0.1"
    method: str  # dpo | ppo | ppo-gold | rloo | grpo | simpo | orpo
    stage: str
    overrides: tuple[str, ...] = ()  # "section.key=value", as --set takes them
    setting: dict[str, Any] = field(default_factory=dict)

    def tags(self, sweep: str) -> dict[str, str]:
        return {"alignflow.sweep": sweep, "alignflow.method": self.method, "alignflow.variant": self.name,
                **{f"alignflow.{key}": str(value) for key, value in self.setting.items()}}


def grid(config: Config) -> list[Variant]:
    """The policies ``params.compare`` asks for, in a fixed order."""
    cmp, variants = config.compare, []
    for loss in cmp.dpo_loss_types:
        for beta in cmp.dpo_beta:
            variants.append(Variant(f"dpo {loss} β={beta:g}", "dpo", "dpo",
                                    (f"dpo.beta={beta}", f"dpo.loss_type={loss}"), {"beta": beta, "loss_type": loss}))
    for kl in cmp.ppo_kl_coef:
        variants.append(Variant(f"ppo kl={kl:g}", "ppo", "ppo", (f"ppo.kl_coef={kl}", "ppo.reward_source=reward_model"),
                                {"kl_coef": kl}))
    if cmp.ppo_gold:
        kl = config.ppo.kl_coef
        variants.append(Variant(f"ppo-gold kl={kl:g}", "ppo-gold", "ppo", ("ppo.reward_source=gold",),
                                {"kl_coef": kl, "reward_source": "gold"}))
    for method in (*cmp.online, *cmp.reference_free):
        beta = getattr(config, method).beta
        variants.append(Variant(f"{method} β={beta:g}", method, method, (), {"beta": beta}))
    return variants


def check_grid(config: Config) -> list[Variant]:
    """The grid, refused before anything trains when a point cannot run."""
    variants = grid(config)
    if not variants:
        raise ConfigError("compare: the grid is empty; set compare.dpo_beta, ppo_kl_coef, online or reference_free")
    needs_gold = [v.name for v in variants if v.method == "ppo-gold" or getattr(
        getattr(config, v.stage), "reward_source", None) == "gold"]
    if needs_gold and gold_judge(config.data.task) is None:
        raise ConfigError(f"compare: {needs_gold} need a gold judge, but data.task {config.data.task!r} has none; "
                          "set compare.ppo_gold: false (and reward_source: reward_model)")
    return variants


def variant_config(config: Config, variant: Variant) -> Config:
    return validate(apply_overrides(config.model_dump(mode="json"), list(variant.overrides)),
                    source=f"compare variant {variant.name!r}")


# --------------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------------
@flow(name="compare")
def compare(params: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict[str, Any]:
    """Train and score every policy of ``params.compare`` from one SFT model and reward model, and
    write the comparison report; return the report's location and the policies table.

    Args:
        params: The params file, relative to root; its compare section is the grid of policies.
        overrides: Changes to the params file, one section.key=value each (for example
            compare.dpo_beta=[0.05, 0.1]), checked like the file itself.
        root: The project directory holding the params file, data/ and dvc.yaml.
    """
    project = Path(root).resolve()
    config = load_config(project / params, overrides or [])
    variants = check_grid(config)
    preflight(config, project)  # an unreachable MLflow server or DVC remote stops the run before training
    setup_runtime(config.run)
    run_name = flow_run.get_name() or time.strftime("local-%Y%m%d-%H%M%S")
    sweep = config.compare.sweep
    tracker = Tracker.start(config.run, project, f"compare-{run_name}",
                            tags={"alignflow.flow": "compare", "alignflow.sweep": sweep,
                                  "prefect.flow_run_id": str(flow_run.get_id())})
    logger = get_run_logger()
    logger.info("MLflow parent run: %s; %d policies: %s", tracker.url, len(variants), [v.name for v in variants])
    trained: list[str] = []
    try:
        report = _run(config, variants, project, tracker, sweep, run_name, trained)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    logger.info("ran (not cached): %s", ", ".join(trained) or "nothing")
    logger.info("report: %s", report.index_html)
    return {"mlflow_run_id": tracker.run_id, "report": str(report.index_html), "policies": report.policies,
            "frontier": [(p.name, p.kl, p.score) for p in report.frontier], "ran": trained}


def _run(config: Config, variants: list[Variant], project: Path, tracker: Tracker, sweep: str,
         run_name: str, ran: list[str]) -> Report:
    # The shared part: data, SFT model, preference pairs, reward model, and the SFT model's scores.
    shared = [s for s in pipeline_order(config) if s in ("base", "prepare", "prepare_sft", "sft", "label", "reward")]
    results, cached = run_stages(config, project, tracker, shared)
    ran += [stage for stage in shared if stage not in cached]
    base_inputs = {name: results[name] for name in STAGES["score"].inputs(config)}
    sft_tags = {"alignflow.sweep": sweep, "alignflow.method": "sft", "alignflow.variant": "sft"}
    sft_score, hit = run_task("score", config, base_inputs, project, tracker, tags=sft_tags, name="score sft")
    ran += [] if hit else ["score sft"]
    points = [_point("sft", "sft", {}, sft_score, None, tracker)]

    for variant in variants:
        cfg = variant_config(config, variant)
        tags = variant.tags(sweep)
        known = dict(results)
        for stage in _chain(variant.stage, cfg, known):
            inputs = {name: known[name] for name in STAGES[stage].inputs(cfg)}
            name = f"train {variant.name}" if stage == variant.stage else stage
            known[stage], hit = run_task(stage, cfg, inputs, project, tracker, name=name,
                                         tags=tags if stage == variant.stage else {"alignflow.sweep": sweep})
            ran += [] if hit else [name]
        policy = known[variant.stage]
        scored, hit = run_task("score", cfg, base_inputs | {"policy": policy}, project, tracker, tags=tags,
                               name=f"score {variant.name}")
        ran += [] if hit else [f"score {variant.name}"]
        points.append(_point(variant.name, variant.method, variant.setting, scored, policy, tracker))

    out_dir = project / config.compare.report_dir / f"{sweep}-{run_name}"
    prompts = [row["prompt"] for row in read_jsonl(sft_score.path / sft_score.info["samples"])]
    report = build_report(points, prompts, out_dir, title=f"alignflow compare: {sweep} ({run_name})",
                          judged_by=sft_score.info["judged_by"], max_examples=config.compare.max_examples)
    _publish(report, tracker, points)
    return report


def _chain(stage: str, config: Config, known: dict[str, StageResult]) -> list[str]:
    """``stage`` and the stages it needs that are not in ``known``, in dependency order."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in known or name in order:
            return
        for dependency in STAGES[name].inputs(config):
            visit(dependency)
        order.append(name)

    known.pop(stage, None)  # the policy itself always comes from this variant's config
    visit(stage)
    return order


def _point(name: str, method: str, setting: dict[str, Any], scored: StageResult, policy: StageResult | None,
           tracker: Tracker) -> PolicyPoint:
    rows = read_jsonl(scored.path / scored.info["samples"])
    judge = "gold" if scored.info["judged_by"] == "gold" else "rm"
    curves: dict[str, list[tuple[int, float]]] = {}
    run_id = policy.info.get("mlflow_run_id") if policy else None
    if run_id:
        curves = tracker.for_run(run_id).metric_history(CURVE_METRICS)
    return PolicyPoint(name=name, method=method, setting=setting, metrics=dict(scored.metrics),
                       scores=[float(row[judge]) for row in rows], samples=[row["completion"] for row in rows],
                       curves=curves, run_id=run_id)


def _publish(report: Report, tracker: Tracker, points: list[PolicyPoint]) -> None:
    """The report to the parent MLflow run (files, tables, one metric set per policy) and to Prefect."""
    for file in report.files.values():
        tracker.log_artifact(file, "report")
    tracker.log_table(report.policies, "policies.json")
    tracker.log_table(report.head_to_head, "head_to_head.json")
    tracker.set_tags({"alignflow.report": str(report.index_html), "alignflow.policies": str(len(points))})
    create_table_artifact(key="compare-policies", table=_plain(report.policies),
                          description="One row per policy: judge score, KL to the SFT policy, win rate vs SFT")
    create_table_artifact(key="compare-head-to-head", table=_plain(report.head_to_head),
                          description="Win rate of every policy against the best policy of each other method")
    create_markdown_artifact(key="compare-summary", markdown=report.summary_md.read_text(),
                             description=f"Report: {report.index_html}")


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(rows, default=str))
