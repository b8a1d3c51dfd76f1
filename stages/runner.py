"""Run one stage: cache key, output location, MLflow child run, atomic output.

This is the single way a stage runs, whoever calls it: the Prefect flow's tasks, ``alignflow stage
NAME`` and therefore ``dvc repro``. The cache key of a stage is a hash of the stage's name, the
version of its code (a hash of its source files), its params sections and the content keys of its
inputs; its output lives in ``<run.output_dir>/<stage>/<key>/``, is written to a staging directory
and renamed into place when complete, and is never overwritten afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from stages.config import Config, stage_params
from stages.tracking import Tracker

RESULT_FILE = "result.json"
SHARED_CODE = (
    "config.py", "models.py", "generation.py", "judges.py", "losses.py", "runner.py", "training.py",
    "records.py",
)


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageResult:
    """What a finished stage hands to the stages after it (and what its result.json holds)."""

    stage: str
    key: str  # cache key
    output_dir: str
    content_key: str  # identity of the output's content
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.output_dir)

    @property
    def model_dir(self) -> Path:
        """The saved model of a training stage."""
        return self.path / self.info["model"]

    @classmethod
    def load(cls, output_dir: Path) -> StageResult:
        return cls(**json.loads((output_dir / RESULT_FILE).read_text()))


@dataclass(frozen=True)
class StageOutput:
    """What a stage function returns: metrics, and facts for later stages (paths are relative)."""

    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage function gets."""

    name: str
    config: Config
    inputs: dict[str, StageResult]
    out_dir: Path  # staging directory; becomes the final output directory when the stage succeeds
    root: Path  # project root (params, data/, dvc.yaml)
    device: torch.device
    tracker: Tracker | None

    @property
    def num_processes(self) -> int:
        """Processes running this stage together (under ``accelerate launch``); 1 in the flow."""
        from stages.models import process_group

        return process_group()[1]

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes the output (always, in the flow)."""
        from stages.models import process_group

        return process_group()[0] == 0

    @property
    def key(self) -> str:
        """The stage's cache key, parsed from the staging directory ``.staging-<key>-<pid>``."""
        match = re.fullmatch(r"\.staging-(.+)-[^-]+", self.out_dir.name)
        return match.group(1) if match else self.out_dir.name

    @property
    def checkpoint_dir(self) -> Path:
        """``<run.output_dir>/checkpoints/<stage>/<key>``: where a training stage checkpoints. It outlives a
        crash (the staging directory does not) and is removed once the stage's output is in place."""
        return checkpoint_dir(self.name, self.key, self.config, self.root)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    def callbacks(self) -> list:
        return [self.tracker.training_callback()] if self.tracker is not None else []


@dataclass(frozen=True)
class StageSpec:
    module: str  # stages.<module> holds `run(ctx) -> StageOutput`
    inputs: Callable[[Config], tuple[str, ...]]
    trains: bool = False  # uses the model (GPU when there is one): tagged `gpu` in the flows
    launchable: bool = False  # a training loop that runs data-parallel under `accelerate launch`
    autocasts: bool = False  # computes under run.mixed_precision (label, evaluate and score stay float32)
    code: tuple[str, ...] = ()  # other stage modules it imports, part of its code version
    # data sources it reads besides its inputs (paths under the root, hub ids); local ones join its cache key
    sources: Callable[[Config], tuple[str | None, ...]] = lambda c: ()

    def function(self) -> Callable[[StageContext], StageOutput]:
        return importlib.import_module(f"stages.{self.module}").run


def pairs_source(config: Config) -> str:
    """Where preference pairs come from: labelled by the gold judge, or the prepared data itself."""
    return "label" if config.data.task == "sentiment" else "prepare"


def _sft_data(config: Config) -> str:
    """SFT's data: its own source (``data.sft_source``, stable across preference drops) or the prepared data."""
    return "prepare_sft" if config.data.sft_source else "prepare"


def _dpo_reference(config: Config) -> tuple[str, ...]:
    return ("dpo_reference",) if config.dpo.shared_reference else ()


def _reward_model(section) -> tuple[str, ...]:
    """The reward stage, for an RL section that optimises the reward model (not the gold judge)."""
    return ("reward",) if section.reward_source == "reward_model" else ()


def _judge(config: Config) -> tuple[str, ...]:
    """The held-out judge's stage when ``evaluate.judge`` resolves to it."""
    from stages.judges import judge_kind

    return ("judge",) if judge_kind(config) == "held_out_rm" else ()


def _scoring_inputs(config: Config) -> tuple[str, ...]:
    """What scoring a policy reads: held-out prompts, the SFT reference, the training reward model (a
    diagnostic, or the judge when explicitly chosen), the held-out judge, and the held-out pairs (for the
    judge-free implicit-reward accuracy)."""
    return tuple(dict.fromkeys(("prepare", "sft", "reward", *_judge(config), pairs_source(config))))


def _policies(config: Config) -> tuple[str, ...]:
    return {"dpo": ("dpo",), "ppo": ("ppo",), "both": ("dpo", "ppo")}[config.run.method]


TRAINING = {"trains": True, "autocasts": True, "launchable": True}  # a training loop (TRL's or PPO's)

STAGES: dict[str, StageSpec] = {
    "base": StageSpec("base", lambda c: ()),
    "prepare": StageSpec("prepare", lambda c: (), sources=lambda c: (c.data.source,)),
    "prepare_sft": StageSpec("prepare_sft", lambda c: (), code=("prepare.py",), sources=lambda c: (c.data.sft_source,)),
    "sft": StageSpec("sft", lambda c: ("base", _sft_data(c)), **TRAINING),
    "label": StageSpec("label", lambda c: ("sft", "prepare"), trains=True),
    # label.py: reward.pairing pairs label's samples with its split_pairs
    "reward": StageSpec("reward", lambda c: ("sft", pairs_source(c)), **TRAINING, code=("label.py",)),
    # the held-out judge: the reward stage's recipe on the judge split of the pairs, which nothing else trains on
    "judge": StageSpec("reward", lambda c: ("sft", pairs_source(c)), **TRAINING, code=("label.py",)),
    "dpo_reference": StageSpec("dpo_reference", lambda c: ("sft", pairs_source(c)), trains=True, autocasts=True),
    "dpo": StageSpec("dpo", lambda c: ("sft", pairs_source(c), *_dpo_reference(c)), **TRAINING,
                     code=("dpo_reference.py",)),
    # on the gold judge they need no reward model (PPO's critic then starts from the SFT backbone), so they
    # spend no label: their gold-judge calls are their own
    "ppo": StageSpec("ppo", lambda c: ("sft", *_reward_model(c.ppo), "prepare"), **TRAINING),
    "simpo": StageSpec("simpo", lambda c: ("sft", pairs_source(c)), **TRAINING),
    "orpo": StageSpec("orpo", lambda c: ("sft", pairs_source(c)), **TRAINING),
    "rloo": StageSpec("rloo", lambda c: ("sft", *_reward_model(c.rloo), "prepare"), **TRAINING),
    "grpo": StageSpec("grpo", lambda c: ("sft", *_reward_model(c.grpo), "prepare"), **TRAINING),
    "evaluate": StageSpec("evaluate", lambda c: (*_scoring_inputs(c), *_policies(c)), trains=True,
                          code=("bootstrap.py",)),
    # one policy (input "policy"; the SFT model when there is none) scored like evaluate scores each
    "score": StageSpec("score", _scoring_inputs, trains=True, code=("evaluate.py", "bootstrap.py")),
}


def pipeline_order(config: Config) -> list[str]:
    """The stages a pipeline run needs, in dependency order."""
    order: list[str] = []

    def visit(stage: str) -> None:
        for dependency in STAGES[stage].inputs(config):
            visit(dependency)
        if stage not in order:
            order.append(stage)

    visit("evaluate")
    return order


# --------------------------------------------------------------------------------------------------
# Keys and locations
# --------------------------------------------------------------------------------------------------
PAIR_TRAINERS = ("reward", "dpo", "simpo", "orpo")  # stages that train on the preference pairs


def check_pair_batches(config: Config, pairs: int, source: str, judge_pairs: int | None = None) -> None:
    """Fail before any model trains when a stage of this pipeline has a batch larger than its training pairs
    (the held-out judge trains on ``judge_pairs``, with the reward section's batch size)."""
    too_large = [f"{stage}.batch_size ({getattr(config, stage).batch_size})" for stage in pipeline_order(config)
                 if stage in PAIR_TRAINERS and getattr(config, stage).batch_size > pairs]
    if too_large:
        raise ValueError(f"{source}: {pairs} training pairs, fewer than {', '.join(too_large)}; lower the batch "
                         "size or give it more data")
    if judge_pairs is not None and "judge" in pipeline_order(config) and config.reward.batch_size > judge_pairs:
        raise ValueError(f"{source}: {judge_pairs} pairs for the held-out judge, fewer than reward.batch_size "
                         f"({config.reward.batch_size}), which it trains with; raise data.judge_fraction (now "
                         f"{config.data.judge_fraction}) or give it more data")


def code_version(stage: str) -> str:
    """Hash of the source files a stage's behaviour depends on."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in (f"{STAGES[stage].module}.py", *STAGES[stage].code, *SHARED_CODE):
        file = here / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def source_fingerprint(source: str | None, root: Path) -> str | None:
    """Identity of a local file or directory source: each file's name, size and modification time, so that
    edited or appended data (``alignflow retrain``) re-runs the stage that reads it. None for builtin
    sources and hub ids. A mere touch re-runs the stage too; its content key then keeps the stages after
    it cached."""
    if not source or source.startswith("builtin:"):
        return None
    path = (root / Path(source).expanduser()).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def stage_key(stage: str, config: Config, inputs: dict[str, StageResult], root: Path | None = None) -> str:
    """The cache key; with ``root``, the local data sources the stage reads (``StageSpec.sources``) join it."""
    from stages.models import resolve_precision

    payload = {
        "stage": stage,
        "code": code_version(stage),
        "params": stage_params(config, stage),
        "seed": config.run.seed,
        # numerics of the model stages: autocast changes what they compute
        "precision": resolve_precision(config.run) if STAGES[stage].autocasts else None,
        "inputs": {name: inputs[name].content_key for name in sorted(inputs)},
    }
    sources = [source_fingerprint(source, root) for source in STAGES[stage].sources(config)] if root else []
    if any(sources):
        payload["sources"] = sources
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def output_root(config: Config, root: Path) -> Path:
    return (root / config.run.output_dir).resolve()


def output_dir(stage: str, key: str, config: Config, root: Path) -> Path:
    return output_root(config, root) / stage / key


def checkpoint_dir(stage: str, key: str, config: Config, root: Path) -> Path:
    return output_root(config, root) / "checkpoints" / stage / key


def hash_files(directory: Path, names: tuple[str, ...]) -> str:
    """Content key of some files of a directory: sha256 over their names and bytes."""
    digest = hashlib.sha256()
    for name in names:
        file = directory / name
        digest.update(name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def _publish_pointer(result: StageResult, config: Config, root: Path) -> None:
    """``outputs/results/<stage>.json``: the latest result of a stage (what dvc.yaml tracks)."""
    pointer_dir = output_root(config, root) / "results"
    pointer_dir.mkdir(parents=True, exist_ok=True)
    writer = f"{os.getpid()}-{threading.get_ident()}"  # concurrent tasks publish the same names
    tmp = pointer_dir / f".{result.stage}.json.tmp-{writer}"
    tmp.write_text(json.dumps(asdict(result), indent=2))
    os.replace(tmp, pointer_dir / f"{result.stage}.json")
    for name in result.info.get("publish", []):  # e.g. evaluate's metrics.json, DVC's metrics file
        tmp = output_root(config, root) / f".{name}.tmp-{writer}"
        shutil.copyfile(result.path / name, tmp)
        os.replace(tmp, output_root(config, root) / name)


def run_stage(
    stage: str,
    config: Config,
    inputs: dict[str, StageResult],
    root: Path,
    *,
    parent_run_id: str | None = None,
    track: bool = True,
    device: torch.device | None = None,
    tags: dict[str, str] | None = None,
) -> StageResult:
    """Run ``stage`` on its inputs, or return the finished output already at its key's location.

    ``tags`` go on the stage's MLflow run (e.g. a sweep's method and setting); on a cache hit they
    are set on the run that produced the output.
    """
    key = stage_key(stage, config, inputs, root)
    final_dir = output_dir(stage, key, config, root)
    if (final_dir / RESULT_FILE).is_file():
        return _cache_hit(stage, config, root, final_dir, tags if track else None)

    # One process at a time per output: a second run of the same stage and key (another flow, a retry)
    # waits here, then finds the first one's output. The OS releases the lock of a killed process.
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final_dir.parent / f".{key}.lock"):
        if (final_dir / RESULT_FILE).is_file():
            return _cache_hit(stage, config, root, final_dir, tags if track else None)
        _remove_dead_staging(final_dir.parent, key)
        result = _run_uncached(stage, config, inputs, root, key, final_dir, parent_run_id=parent_run_id,
                               track=track, device=device, tags=tags)
    _publish_pointer(result, config, root)
    print(f"[alignflow] {stage}: done in {result.metrics['stage_seconds']:.1f}s, output at {final_dir}")
    return result


def _cache_hit(stage: str, config: Config, root: Path, final_dir: Path, tags: dict[str, str] | None) -> StageResult:
    """The finished output at ``final_dir``; ``tags`` go on the MLflow run that produced it."""
    result = StageResult.load(final_dir)
    if tags and result.info.get("mlflow_run_id"):
        Tracker.attach(config.run, root, result.info["mlflow_run_id"]).set_tags(tags)
    _publish_pointer(result, config, root)
    print(f"[alignflow] {stage}: cache hit, output at {final_dir}")
    return result


def _run_uncached(stage: str, config: Config, inputs: dict[str, StageResult], root: Path, key: str,
                  final_dir: Path, *, parent_run_id: str | None, track: bool, device: torch.device | None,
                  tags: dict[str, str] | None) -> StageResult:
    """Run the stage into ``.staging-<key>-<pid>`` and rename that into place when it is complete."""
    from stages.models import resolve_device, resolve_precision

    staging = final_dir.parent / f".staging-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    device = device or resolve_device(config.run)
    precision = resolve_precision(config.run, device) if STAGES[stage].autocasts else None
    tracker = (
        Tracker.start(
            config.run, root, stage, parent_run_id=parent_run_id,
            tags={"alignflow.stage": stage, "alignflow.cache_key": key, **(tags or {}),
                  **({"alignflow.precision": precision} if precision else {})},
        )
        if track
        else None
    )
    ctx = StageContext(stage, config, inputs, staging, root, device, tracker)
    if precision:
        how = f" (run.mixed_precision {config.run.mixed_precision})" if config.run.mixed_precision == "auto" else ""
        print(f"[alignflow] {stage}: {ctx.device.type}, matmul precision "
              f"{'float32' if precision == 'no' else precision}{how}")
    started = time.perf_counter()
    try:
        if tracker is not None:
            tracker.log_params(stage_params(config, stage))
            tracker.log_config(config)
        if STAGES[stage].launchable and config.launch.num_processes > 1:
            from stages.launch import launch

            output = launch(ctx)
        else:
            output = STAGES[stage].function()(ctx)
        metrics = {**output.metrics, "stage_seconds": time.perf_counter() - started}
        result = StageResult(
            stage=stage,
            key=key,
            output_dir=str(final_dir),
            # a stage's output is written once at its key's location, so the key names its content;
            # stages whose output can repeat under other keys (prepared data, the base) hash it instead
            content_key=output.info.pop("content_key", None) or key,
            metrics=metrics,
            info={**output.info, "mlflow_run_id": tracker.run_id if tracker else None},
        )
        # the weights are on disk (staging, then the checkpoint) before any upload: a failed upload loses nothing
        if tracker is not None and result.info.get("policy"):
            version = tracker.log_policy(staging / result.info["model"], config.run.registered_model)
            result.info["registered_version"] = version
            print(f"[alignflow] {stage}: registered {config.run.registered_model} version {version}")
        (staging / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))
        staging.rename(final_dir)  # atomic: a half-written output is never taken for a finished one
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the output supersedes its checkpoints
        if tracker is not None:
            tracker.log_metrics(metrics)
            tracker.finish()
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _remove_dead_staging(directory: Path, key: str) -> None:
    """Staging directories of ``key`` left by processes that no longer run (a SIGKILL leaves them)."""
    for leftover in directory.glob(f".staging-{key}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_inputs(stage: str, config: Config, root: Path) -> dict[str, StageResult]:
    """The finished results of a stage's inputs, found by recomputing their cache keys."""
    results: dict[str, StageResult] = {}
    for name in STAGES[stage].inputs(config):
        upstream = resolve_inputs(name, config, root)
        location = output_dir(name, stage_key(name, config, upstream, root), config, root)
        if not (location / RESULT_FILE).is_file():
            raise FileNotFoundError(
                f"stage {stage!r} needs the output of {name!r} for these params, which is not at "
                f"{location}: run `alignflow stage {name}` (or `alignflow run`) first"
            )
        results[name] = StageResult.load(location)
    return results
