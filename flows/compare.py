"""The ``compare`` flow: the DPO-vs-PPO arena on the user's own model and data.

Every policy of the grid in ``params.compare`` (DPO at several beta and loss types, PPO on the reward
model and on the gold judge at several KL coefficients, RLOO on the gold judge, RLOO/GRPO on the reward
model, the reference-free SimPO and ORPO; each once per training seed of ``compare.seeds``) is trained
from the **same** cached SFT model and reward model, then scored by the ``score`` stage exactly as the
SFT model is: same held-out prompts, same sampling seeds, same independent judge (``evaluate.judge``),
KL always against the SFT policy at the sampling temperature. With ``compare.equal_gold_budget`` PPO-GT
and RLOO-GT call the gold judge as often as labelling the pairs did, and every policy records its
gold-judge calls and seconds. Each training run and each scoring is a cached Prefect task, so
re-running after adding one ``beta`` value trains and scores that one policy only; the DPO runs share
one ``dpo_reference`` computation.

The report (``stages.report``: the verdict with 95% intervals, the frontier with error bars) goes to
``<compare.report_dir>/<sweep>-<flow run>/``, to the parent MLflow run as artifacts, tags and one
metric set per policy, and to Prefect as tables and markdown artifacts.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.pipeline import run_stages, run_task
from stages.config import Config, ConfigError, apply_overrides, load_config, validate
from stages.judges import gold_judge, judge_kind
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
    """One grid point: which stage trains it, with which overrides of its params section, and its training seed."""

    name: str  # unique per setting, e.g. "dpo β=0.1" (the seeds of one setting share it)
    method: str  # dpo | ppo | ppo-gold | rloo | rloo-gold | grpo | simpo | orpo
    stage: str
    overrides: tuple[str, ...] = ()  # "section.key=value", as --set takes them
    setting: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # <stage>.seed; None: the section's own
    oracle: bool = False  # trained on the gold judge, which also judges it
    reward_source: str = "pairs"  # pairs | reward_model | gold

    @property
    def run_name(self) -> str:
        return self.name if self.seed is None else f"{self.name} seed={self.seed}"

    def tags(self, sweep: str) -> dict[str, str]:
        return {"alignflow.sweep": sweep, "alignflow.method": self.method, "alignflow.variant": self.name,
                "alignflow.oracle": str(self.oracle), "alignflow.reward_source": self.reward_source,
                **({"alignflow.train_seed": str(self.seed)} if self.seed is not None else {}),
                **{f"alignflow.{key}": str(value) for key, value in self.setting.items()}}


def gold_budget_overrides(config: Config, gold_calls: float | None) -> dict[str, tuple[str, ...]]:
    """PPO-GT's updates and RLOO-GT's steps that spend ``gold_calls`` (the labelling budget) on the gold judge.

    PPO-GT calls it once per rollout response and once per sample of its reward scale; RLOO-GT once per
    completion, ``batch_size x gradient_accumulation_steps`` per optimiser step.
    """
    if not config.compare.equal_gold_budget or not gold_calls:
        return {"ppo-gold": (), "rloo-gold": ()}
    ppo, rloo = config.ppo, config.rloo
    scale = ppo.normalization_samples if ppo.reward_normalization == "sft" else 0
    updates = max(1, round((gold_calls - scale) / ppo.rollout_batch_size))
    steps = max(1, round(gold_calls / (rloo.batch_size * rloo.gradient_accumulation_steps)))
    return {"ppo-gold": (f"ppo.updates={updates}",), "rloo-gold": (f"rloo.max_steps={steps}",)}


def grid(config: Config, gold_calls: float | None = None) -> list[Variant]:
    """The policies ``params.compare`` asks for, in a fixed order; ``gold_calls`` is the labelling budget
    that PPO-GT and RLOO-GT are matched to (``compare.equal_gold_budget``)."""
    cmp, settings = config.compare, []
    budget = gold_budget_overrides(config, gold_calls)
    for loss in cmp.dpo_loss_types:
        for beta in cmp.dpo_beta:
            name = f"dpo β={beta:g}" if cmp.dpo_loss_types == ["sigmoid"] else f"dpo {loss} β={beta:g}"
            settings.append(Variant(name, "dpo", "dpo", (f"dpo.beta={beta}", f"dpo.loss_type={loss}"),
                                    {"beta": beta, "loss_type": loss}))
    for kl in cmp.ppo_kl_coef:
        settings.append(Variant(f"ppo kl={kl:g}", "ppo", "ppo", (f"ppo.kl_coef={kl}", "ppo.reward_source=reward_model"),
                                {"kl_coef": kl}, reward_source="reward_model"))
    for kl in cmp.ppo_gold_kl_coef:
        settings.append(Variant(f"ppo-gold kl={kl:g}", "ppo-gold", "ppo",
                                (f"ppo.kl_coef={kl}", "ppo.reward_source=gold", *budget["ppo-gold"]),
                                {"kl_coef": kl}, oracle=True, reward_source="gold"))
    if cmp.rloo_gold:
        beta = config.rloo.beta
        settings.append(Variant(f"rloo-gold β={beta:g}", "rloo-gold", "rloo",
                                ("rloo.reward_source=gold", *budget["rloo-gold"]), {"beta": beta}, oracle=True,
                                reward_source="gold"))
    for method in cmp.online:
        beta = getattr(config, method).beta
        settings.append(Variant(f"{method} β={beta:g}", method, method, (f"{method}.reward_source=reward_model",),
                                {"beta": beta}, reward_source="reward_model"))
    for method in cmp.reference_free:
        beta = getattr(config, method).beta
        settings.append(Variant(f"{method} β={beta:g}", method, method, (), {"beta": beta}))
    if not cmp.seeds:
        return settings
    return [replace(v, overrides=(*v.overrides, f"{v.stage}.seed={seed}"), seed=seed)
            for v in settings for seed in cmp.seeds]


def check_grid(config: Config) -> list[Variant]:
    """The grid, refused before anything trains when a point cannot run."""
    variants = grid(config)
    if not variants:
        raise ConfigError("compare: the grid is empty; set compare.dpo_beta, ppo_kl_coef, ppo_gold_kl_coef, rloo_gold, "
                          "online or reference_free")
    needs_gold = sorted({v.name for v in variants if v.reward_source == "gold"})
    if needs_gold and gold_judge(config.data.task) is None:
        raise ConfigError(f"compare: {needs_gold} need a gold judge, but data.task {config.data.task!r} has none; "
                          "set compare.ppo_gold_kl_coef: [] and compare.rloo_gold: false")
    judge_kind(config)  # an impossible evaluate.judge fails here, before training
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


SHARED = ("base", "prepare", "prepare_sft", "sft", "label", "reward", "judge")  # what every policy of a grid shares
NOT_CHARGED = ("base", "prepare", "prepare_sft", "sft", "judge")  # stages no method is charged for: SFT and the judge


def _run(config: Config, variants: list[Variant], project: Path, tracker: Tracker, sweep: str,
         run_name: str, ran: list[str]) -> Report:
    # The shared part: data, SFT model, preference pairs, reward model, judge, and the SFT model's scores.
    shared = [s for s in pipeline_order(config) if s in SHARED]
    results, cached = run_stages(config, project, tracker, shared)
    ran += [stage for stage in shared if stage not in cached]
    if "label" in results:  # PPO-GT and RLOO-GT get the labelling's gold-judge budget
        variants = grid(config, results["label"].metrics.get("gold_calls"))
    base_inputs = {name: results[name] for name in STAGES["score"].inputs(config)}
    sft_tags = {"alignflow.sweep": sweep, "alignflow.method": "sft", "alignflow.variant": "sft"}
    sft_score, hit = run_task("score", config, base_inputs, project, tracker, tags=sft_tags, name="score sft")
    ran += [] if hit else ["score sft"]
    runs: dict[str, list[PolicyRun]] = {}  # setting name -> one run per training seed

    for variant in variants:
        cfg = variant_config(config, variant)
        tags = variant.tags(sweep)
        known = dict(results)
        for stage in _chain(variant.stage, cfg, known):
            inputs = {name: known[name] for name in STAGES[stage].inputs(cfg)}
            name = f"train {variant.run_name}" if stage == variant.stage else stage
            known[stage], hit = run_task(stage, cfg, inputs, project, tracker, name=name,
                                         tags=tags if stage == variant.stage else {"alignflow.sweep": sweep})
            ran += [] if hit else [name]
        policy = known[variant.stage]
        scored, hit = run_task("score", cfg, base_inputs | {"policy": policy}, project, tracker, tags=tags,
                               name=f"score {variant.run_name}")
        ran += [] if hit else [f"score {variant.run_name}"]
        runs.setdefault(variant.name, []).append(PolicyRun(variant, policy, scored, *_cost(variant.stage, cfg, known)))

    points = [_sft_point(sft_score)] + [_point(group, tracker) for group in runs.values()]
    out_dir = project / config.compare.report_dir / f"{sweep}-{run_name}"
    prompts = [row["prompt"] for row in read_jsonl(sft_score.path / sft_score.info["samples"])]
    report = build_report(points, prompts, out_dir, title=f"alignflow compare: {sweep} ({run_name})",
                          judge=sft_score.info["judge"], max_examples=config.compare.max_examples)
    _publish(report, tracker, points)
    return report


@dataclass(frozen=True)
class PolicyRun:
    """One trained policy of the grid (one training seed of one setting) and how it was scored."""

    variant: Variant
    policy: StageResult
    scored: StageResult
    seconds: float  # its training stage and the stages only the pair-trained or RM-trained methods need
    gold_calls: float  # gold-judge calls behind it: the labels it learned from, or its own rollouts


def _cost(stage: str, config: Config, known: dict[str, StageResult]) -> tuple[float, float]:
    """(seconds, gold-judge calls) to produce ``stage``'s policy from the SFT model: the sum over the stages it
    depends on, SFT and the judge excepted (label's sampling, the reward model, DPO's reference pass, and its
    own training, generation included). A stage shared by several policies is charged to each of them."""
    closure: list[str] = []

    def visit(name: str) -> None:
        if name in closure or name in NOT_CHARGED:
            return
        closure.append(name)
        for dependency in STAGES[name].inputs(config):
            visit(dependency)

    visit(stage)
    return (sum(known[name].metrics.get("stage_seconds", 0.0) for name in closure),
            sum(known[name].metrics.get("gold_calls", 0.0) for name in closure))


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


def _rows(scored: StageResult) -> list[dict[str, Any]]:
    return read_jsonl(scored.path / scored.info["samples"])


def _sft_point(scored: StageResult) -> PolicyPoint:
    rows = _rows(scored)
    return PolicyPoint(name="sft", method="sft", setting={}, metrics=dict(scored.metrics),
                       scores=[float(row["judge"]) for row in rows], samples=[row["completion"] for row in rows],
                       curves={}, samples_per_prompt=int(scored.info["samples_per_prompt"]))


def _point(group: list[PolicyRun], tracker: Tracker) -> PolicyPoint:
    """One setting of the grid over its training seeds: every seed's scores, the seeds' mean metrics and
    costs, the first seed's samples and training curves."""
    first = group[0]
    seed_rows = [_rows(run.scored) for run in group]
    keys = set.intersection(*(set(run.scored.metrics) for run in group))
    metrics = {key: statistics.fmean(run.scored.metrics[key] for run in group) for key in keys}
    run_id = first.policy.info.get("mlflow_run_id")
    curves = tracker.for_run(run_id).metric_history(CURVE_METRICS) if run_id else {}
    variant = first.variant
    return PolicyPoint(
        name=variant.name, method=variant.method, setting=variant.setting, metrics=metrics,
        scores=[float(row["judge"]) for row in seed_rows[0]], samples=[row["completion"] for row in seed_rows[0]],
        curves=curves, run_id=run_id, seed_scores=[[float(row["judge"]) for row in rows] for rows in seed_rows],
        samples_per_prompt=int(first.scored.info["samples_per_prompt"]),
        gold_calls=statistics.fmean(run.gold_calls for run in group),
        seconds=statistics.fmean(run.seconds for run in group), oracle=variant.oracle,
        reward_source=variant.reward_source,
    )


def _publish(report: Report, tracker: Tracker, points: list[PolicyPoint]) -> None:
    """The report to the parent MLflow run (files, tables, one metric set per policy) and to Prefect."""
    for file in report.files.values():
        tracker.log_artifact(file, "report")
    tracker.log_table(report.policies, "policies.json")
    tracker.log_table(report.head_to_head, "head_to_head.json")
    verdict = report.verdict
    tracker.set_tags({"alignflow.report": str(report.index_html), "alignflow.policies": str(len(points)),
                      "alignflow.verdict": verdict["verdict"][:4000], "alignflow.judge": verdict["judge"]["name"],
                      "alignflow.judge_independent": str(verdict["judge_independent"])})
    for policy in verdict["policies"]:  # one metric set per policy: compare them side by side in MLflow
        prefix = _metric_name(policy["name"])
        tracker.log_metrics({f"{prefix}/judge_score_mean": policy["judge_score_mean"],
                             f"{prefix}/judge_score_ci95_low": policy["ci95"][0],
                             f"{prefix}/judge_score_ci95_high": policy["ci95"][1],
                             f"{prefix}/vs_sft": policy["vs_sft"]["difference"],
                             f"{prefix}/kl_to_sft": policy["kl_to_sft"],
                             **({f"{prefix}/gold_calls": policy["gold_calls"]} if policy["gold_calls"] is not None
                                else {}),
                             **({f"{prefix}/seconds": policy["seconds"]} if policy["seconds"] is not None else {})})
    create_markdown_artifact(key="compare-verdict", markdown=f"**Verdict:** {verdict['verdict']}",
                             description=f"judge: {verdict['judge']['name']} "
                                         f"(independent: {verdict['judge_independent']})")
    create_table_artifact(key="compare-policies", table=_plain(report.policies),
                          description="One row per policy: mean judge score with its 95% interval, difference and win "
                                      "rate vs SFT, KL to the SFT policy, gold-judge calls and seconds")
    create_table_artifact(key="compare-head-to-head", table=_plain(report.head_to_head),
                          description="Every policy against the best policy of each other method, with 95% intervals")
    create_markdown_artifact(key="compare-summary", markdown=report.summary_md.read_text(),
                             description=f"Report: {report.index_html}")


def _metric_name(policy: str) -> str:
    """A policy name as an MLflow metric prefix (letters, digits, _ - . / and spaces only)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", policy.replace("β", "beta").replace("=", "_"))


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(rows, default=str))
