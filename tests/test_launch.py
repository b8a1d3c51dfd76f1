"""SFT, DPO and PPO on 2 CPU processes (``accelerate launch``, gloo) match the single-process run.

Batch sizes in params are global, so the 2-process run optimises the same objective on the same data
order; what may differ is the order of floating-point sums. Rank 0 alone logs to MLflow and writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from stages.config import ConfigError, validate
from stages.launch import launch_command
from stages.runner import STAGES, run_stage
from tests.conftest import make_project, tiny_params

STAGES_UNDER_TEST = ("sft", "dpo", "ppo")


def _params(model_dir: Path, root: Path, processes: int) -> dict:
    train = {"batch_size": 4, "max_steps": 4, "save_steps": 2}
    return tiny_params(
        model_dir, root,
        run={"dvc": False, "output_dir": f"out-{processes}", "method": "both", "num_threads": 2},
        launch={"num_processes": processes},
        model={"name": str(model_dir), "cache_dir": str(root / "model-cache"),
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},  # no dropout: the runs can be compared
        sft=train, reward=train, dpo={**train, "shared_reference": False},
        ppo={"updates": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """Every stage up to PPO on one process; then SFT, DPO and PPO again on two processes, each on the
    very inputs its single-process run had (so that each comparison isolates one stage)."""
    root = tmp_path_factory.mktemp("launch")
    make_project(root, _params(tiny_model_dir, root, 1))
    config = validate(_params(tiny_model_dir, root, 1))
    one: dict = {}
    for stage in ("prepare", "base", "sft", "label", "reward", "dpo", "ppo"):
        one[stage] = run_stage(stage, config, {n: one[n] for n in STAGES[stage].inputs(config)}, root)
    launched = validate(_params(tiny_model_dir, root, 2))
    two = {stage: run_stage(stage, launched, {n: one[n] for n in STAGES[stage].inputs(launched)}, root)
           for stage in STAGES_UNDER_TEST}
    return {"root": root, 1: one, 2: two}


@pytest.mark.parametrize("stage", STAGES_UNDER_TEST)
def test_two_processes_match_one(runs, stage):
    one, two = runs[1][stage], runs[2][stage]
    weights_one = load_file(Path(one.output_dir) / "model" / "model.safetensors")
    weights_two = load_file(Path(two.output_dir) / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    largest = max(float((weights_one[n] - weights_two[n]).abs().max()) for n in weights_one)
    print(f"{stage}: largest weight difference, 2 processes vs 1: {largest:.3g}")
    assert largest <= 1e-4
    assert one.metrics["weight_change"] > 0
    assert two.metrics["weight_change"] == pytest.approx(one.metrics["weight_change"], rel=1e-3)


@pytest.mark.parametrize("stage", STAGES_UNDER_TEST)
def test_only_rank_zero_logs_to_mlflow(runs, stage):
    client = MlflowClient(tracking_uri=f"sqlite:///{runs['root'] / 'mlflow.db'}")
    key = "loss" if stage != "ppo" else "ppo/kl"
    histories = {n: client.get_metric_history(runs[n][stage].info["mlflow_run_id"], key) for n in (1, 2)}
    steps = {n: sorted(m.step for m in history) for n, history in histories.items()}
    assert steps[1] and steps[2] == steps[1]  # one value per step: a second rank logging would double them
    assert all(torch.isfinite(torch.tensor([m.value for m in histories[2]])))


def test_launch_command_uses_ddp_or_the_config_file(tmp_path, tiny_model_dir):
    config = validate(_params(tiny_model_dir, tmp_path, 2))
    command = launch_command(config, tmp_path, "cpu", tmp_path / "spec.json")
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "2" and command[-3:-1] == ["-m", "stages.launch"]
    shipped = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    for name in ("ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        assert yaml.safe_load((shipped / name).read_text())["distributed_type"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fsdp.yaml").write_text((shipped / "fsdp.yaml").read_text())
    fsdp = config.launch.model_copy(update={"config_file": "configs/fsdp.yaml"})
    with_file = config.model_copy(update={"launch": fsdp})
    command = launch_command(with_file, tmp_path, "cuda", tmp_path / "spec.json")
    assert "--multi_gpu" not in command and command[command.index("--config_file") + 1].endswith("fsdp.yaml")


def test_global_batches_must_divide_over_the_processes(tmp_path, tiny_model_dir):
    params = _params(tiny_model_dir, tmp_path, 3)
    with pytest.raises(ConfigError, match="sft.batch_size 4 is the global batch"):
        validate(params)
