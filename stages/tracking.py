"""MLflow helpers: one parent run per flow run, one child run per stage, explicit run ids.

Everything goes through ``MlflowClient`` with explicit run ids rather than MLflow's thread-local
"active run", because Prefect runs tasks in worker threads.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from stages.config import Config, RunConfig

SQLITE_PREFIX = "sqlite:///"


def tracking_uri(run: RunConfig, root: Path) -> str:
    """The tracking URI; a relative SQLite path is taken relative to the project root."""
    uri = run.tracking_uri
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return SQLITE_PREFIX + str((root / uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def _serving_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("torch", "transformers", "safetensors", "tokenizers", "accelerate")]


class Tracker:
    """Logs to one MLflow run (a flow's parent run or a stage's child run)."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.last_step = 0  # the highest step logged so far: a run's final metrics go there

    # ---- creation ------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        run: RunConfig,
        root: Path,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        import mlflow
        from mlflow import MlflowClient

        uri = tracking_uri(run, root)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(run.experiment)
        if experiment is None:
            location = (root / "mlartifacts").resolve().as_uri() if uri.startswith(SQLITE_PREFIX) else None
            experiment_id = client.create_experiment(run.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        created = client.create_run(experiment_id, run_name=name, tags=all_tags)
        return cls(client, created.info.run_id, experiment_id, uri)

    @classmethod
    def attach(cls, run: RunConfig, root: Path, run_id: str) -> Tracker:
        """A tracker for an existing run (e.g. to tag the run that produced a cached output)."""
        import mlflow
        from mlflow import MlflowClient

        uri = tracking_uri(run, root)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        return cls(client, run_id, client.get_run(run_id).info.experiment_id, uri)

    def for_run(self, run_id: str) -> Tracker:
        """A tracker for another run of the same store."""
        return Tracker(self.client, run_id, self.experiment_id, self.uri)

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Step-wise values of those ``keys`` the run logged: key -> [(step, value)], by step."""
        logged = self.client.get_run(self.run_id).data.metrics
        return {key: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
                for key in keys if key in logged}

    @property
    def url(self) -> str:
        return f"{self.uri} experiment {self.experiment_id} run {self.run_id}"

    # ---- logging -------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(key, value[:6000]) for key, value in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log ``metrics`` at ``step``; without one, at the highest step this tracker logged (0 at first)."""
        import time

        from mlflow.entities import Metric

        # Without a step (a stage's final metrics) the values go to the last step logged, not to step 0,
        # where a final value logged under a curve's name would make the curve start at its end.
        step = (self.last_step or self._last_logged_step()) if step is None else step
        self.last_step = max(self.last_step, step)
        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(float(value))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def _last_logged_step(self) -> int:
        """The highest step any metric of the run has (other processes, e.g. ``accelerate launch`` ranks, may
        have logged it); 0 for a run with none."""
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, data: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_text(json.dumps(data, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(file))

    def log_config(self, config: Config) -> None:
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "resolved_params.yaml"
            file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            self.client.log_artifact(self.run_id, str(file))

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """A table that the MLflow UI shows in its artifact view (and ``mlflow.load_table`` reads)."""
        if not rows:
            return
        columns = list(rows[0])
        self.client.log_table(self.run_id, {c: [row.get(c) for row in rows] for c in columns}, name)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Record a dataset version (the DVC md5) as an MLflow dataset input of this run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name, digest=digest, source_type="dvc", source=json.dumps({"path": source})
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # ---- models --------------------------------------------------------------------------------
    def log_policy(self, model_dir: Path, registered_model: str) -> str:
        """Log a saved policy as an MLflow transformers model and register a new version of it."""
        import mlflow
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with mlflow.start_run(run_id=self.run_id, experiment_id=self.experiment_id, nested=True):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="policy",
                task="text-generation",
                pip_requirements=_serving_requirements(),  # explicit: MLflow's inference probes torchvision
                registered_model_name=registered_model,
            )
        return str(info.registered_model_version)

    def training_callback(self):
        """A transformers ``TrainerCallback`` that streams the trainer's logs as step-wise metrics."""
        from transformers import TrainerCallback

        tracker = self

        class MlflowStepLogger(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    tracker.log_metrics(logs, step=state.global_step)

        return MlflowStepLogger()
