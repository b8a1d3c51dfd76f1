"""Shared fixtures: a tiny random-init Llama with SmolLM2's real tokenizer, and project skeletons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import validate

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama (random weights) saved with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.models import packaged_gguf

    gguf = packaged_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_params(model_dir: Path, project: Path, **sections) -> dict:
    """Params for a fast run of every stage on the tiny model, inside ``project``."""
    generation = {"max_new_tokens": 16, "temperature": 1.5, "top_p": 1.0, "batch_size": 16}
    train = {"batch_size": 4, "max_length": 96, "logging_steps": 1, "learning_rate": 1e-3}
    params = {
        "run": {"seed": 0, "device": "cpu", "tracking_uri": "sqlite:///mlflow.db", "num_threads": 2,
                # float32 whatever the CPU: tests compare weights and log-probs at float32 tolerances
                "mixed_precision": "no"},
        "model": {"name": str(model_dir), "cache_dir": str(project / "model-cache"),
                  "lora": {"r": 4, "alpha": 8}},
        "data": {"eval_fraction": 0.25, "max_rows": 48},
        "sft": {"max_prompts": 8, "require_eos": False, "generation": generation, **train},
        "label": {"max_prompts": 16, "eval_fraction": 0.3, "samples_per_prompt": 4, "min_gap": 0.0,
                  "generation": generation},
        "reward": dict(train),
        "dpo": dict(train),
        "ppo": {"updates": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "learning_rate": 1e-3,
                "normalization_samples": 8, "generation": generation},
        "evaluate": {"max_prompts": 6, "samples_per_prompt": 1, "num_examples": 3, "generation": generation},
    }
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def make_project(path: Path, params: dict) -> Path:
    """A fresh git + DVC repository holding the project's dvc.yaml and the given params."""
    path.mkdir(parents=True, exist_ok=True)
    run = lambda *cmd: subprocess.run(cmd, cwd=path, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(path / "dvc-remote"))
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    # dvc.yaml's stages depend on the stage sources; a copy keeps `dvc commit` honest
    shutil.copytree(REPO / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    # every key spelled out, as in the shipped params.yaml (dvc.yaml's params refer to them)
    full = validate(params).model_dump(mode="json")
    (path / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prefect_server():
    """A real Prefect server (Prefect's test harness, SQLite) for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class RecordingTracker:
    """Test double of stages.tracking.Tracker: records log_metrics calls instead of writing to MLflow,
    and the trainer's arguments and model as training begins."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, dict[str, float]]] = []
        self.train_args = None
        self.checkpointing: bool | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def training_callback(self):
        from stages.tracking import Tracker

        callback = Tracker.training_callback(self)  # the real callback, logging into this double

        def on_train_begin(args, state, control, model=None, **kwargs):
            self.train_args, self.checkpointing = args, model.is_activation_checkpointing

        callback.on_train_begin = on_train_begin
        return callback
