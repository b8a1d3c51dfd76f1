"""A training stage killed with SIGKILL resumes from its last checkpoint when it is run again.

Each stage runs as ``alignflow stage NAME`` in a child process, which is killed with SIGKILL as soon
as a complete checkpoint is on disk (the run then still has most of its steps to go). The re-run must:
find no finished output (the killed run's staging directory is never taken for one), resume from that
checkpoint (at most one checkpoint interval repeated), reach the configured number of steps, remove the
checkpoints once the output is in place, and for SFT give the same weights as a run never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.config import validate
from stages.runner import RESULT_FILE, STAGES, checkpoint_dir, output_dir, resolve_inputs, run_stage, stage_key
from tests.conftest import make_project, tiny_params

STEPS, EVERY = 40, 3  # optimiser steps (PPO: updates) per run, and the checkpoint interval


def _params(model_dir: Path, project: Path) -> dict:
    train = {"max_steps": STEPS, "save_steps": EVERY, "batch_size": 2, "logging_steps": 10}  # eval every 40
    return tiny_params(model_dir, project, run={"dvc": False}, sft=train, reward=train,
                       dpo={**train, "shared_reference": False},
                       ppo={"updates": STEPS, "checkpoint_every": EVERY, "rollout_batch_size": 2,
                            "mini_batch_size": 2, "ppo_epochs": 1})


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project whose stages up to the labelled pairs have run, SFT included."""
    path = tmp_path_factory.mktemp("crash")
    root = make_project(path, _params(tiny_model_dir, path))
    _run_upstream(root, ("prepare", "base", "sft", "label"))
    return root


def _kill_after_first_checkpoint(stage: str, root: Path, pattern: str, complete: str) -> tuple[Path, int]:
    """Start ``alignflow stage <stage>``, SIGKILL it once a complete checkpoint exists; return the
    checkpoint directory and the step of the newest complete checkpoint left behind."""
    config = validate(yaml.safe_load((root / "params.yaml").read_text()))
    key = stage_key(stage, config, resolve_inputs(stage, config, root), root)
    checkpoints = checkpoint_dir(stage, key, config, root)
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "stage", stage, "--root", str(root), "--params", str(root / "params.yaml")],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not any((found / complete).is_file() for found in checkpoints.glob(pattern)):
            assert child.poll() is None, f"{stage} ended before its first checkpoint:\n{child.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage}: no checkpoint after 300 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    final = output_dir(stage, key, config, root)
    assert not (final / RESULT_FILE).exists()  # a killed run never leaves a finished-looking output
    assert list(final.parent.glob(f".staging-{key}-{child.pid}"))  # its half-written output is left in staging
    steps = [int(found.name.split("-")[-1]) for found in checkpoints.glob(pattern) if (found / complete).is_file()]
    return checkpoints, max(steps)


def _rerun(stage: str, root: Path):
    config = validate(yaml.safe_load((root / "params.yaml").read_text()))
    return run_stage(stage, config, resolve_inputs(stage, config, root), root, track=False)


def _run_upstream(root: Path, stages: tuple[str, ...]) -> dict:
    config = validate(yaml.safe_load((root / "params.yaml").read_text()))
    results: dict = {}
    for stage in stages:
        inputs = {name: results[name] for name in STAGES[stage].inputs(config)}
        results[stage] = run_stage(stage, config, inputs, root, track=False)
    return results


def _check_resumed(result, step: int, checkpoints: Path) -> None:
    assert result.metrics["resumed_from_step"] == step  # the newest complete checkpoint: < EVERY steps repeated
    assert result.metrics["train_steps"] == STEPS
    assert not checkpoints.exists()  # the finished output supersedes the checkpoints
    assert not list(Path(result.output_dir).parent.glob(f".staging-{result.key}-*"))  # the dead run's is gone


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_killed_trl_stage_resumes_from_its_last_checkpoint(project, stage):
    checkpoints, step = _kill_after_first_checkpoint(stage, project, "checkpoint-*", "trainer_state.json")
    assert 0 < step < STEPS
    _check_resumed(_rerun(stage, project), step, checkpoints)


def test_killed_sft_resumes_to_the_weights_of_an_uninterrupted_run(project, tiny_model_dir, tmp_path):
    """Resuming restores optimiser, scheduler, RNG and data order: the same weights as ``project``'s SFT,
    which ran the same params without a stop."""
    from safetensors.torch import load_file

    root = make_project(tmp_path / "p", _params(tiny_model_dir, project))
    _run_upstream(root, ("prepare", "base"))
    checkpoints, step = _kill_after_first_checkpoint("sft", root, "checkpoint-*", "trainer_state.json")
    assert 0 < step < STEPS

    result = _rerun("sft", root)

    _check_resumed(result, step, checkpoints)
    resumed = load_file(Path(result.output_dir) / "model" / "model.safetensors")
    straight = _rerun("sft", project)
    expected = load_file(Path(straight.output_dir) / "model" / "model.safetensors")
    assert straight.metrics["resumed_from_step"] == 0
    for name, weight in expected.items():
        assert (resumed[name] - weight).abs().max() <= 1e-6, name


def test_killed_ppo_resumes_from_its_last_checkpoint(project):
    _run_upstream(project, ("prepare", "base", "sft", "label", "reward"))  # a cache hit after the reward test
    checkpoints, update = _kill_after_first_checkpoint("ppo", project, "update-*", "state.json")
    assert 0 < update < STEPS

    result = _rerun("ppo", project)

    assert result.metrics["resumed_from_update"] == update
    assert result.metrics["updates_done"] == STEPS
    assert not checkpoints.exists()


def test_a_finished_stage_is_a_cache_hit_and_starts_nothing(project, capsys):
    result = _rerun("label", project)
    assert "cache hit" in capsys.readouterr().out
    assert json.loads((Path(result.output_dir) / RESULT_FILE).read_text())["key"] == result.key


def test_an_upload_that_fails_after_training_loses_no_weights(project, monkeypatch):
    """MLflow goes away while the trained policy is being registered: the run fails, but the weights are
    on disk (the final checkpoint); the re-run trains nothing more and registers them."""
    from stages.tracking import Tracker

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dpo"]["beta"] = 0.3  # a DPO output of its own (the kill test made the default one)
    config = validate(params)
    inputs = resolve_inputs("dpo", config, project)
    key = stage_key("dpo", config, inputs, project)

    def unreachable(*args, **kwargs):
        raise ConnectionError("MLflow tracking server went away")

    monkeypatch.setattr(Tracker, "log_policy", unreachable)
    with pytest.raises(ConnectionError):
        run_stage("dpo", config, inputs, project)
    assert (checkpoint_dir("dpo", key, config, project) / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()
    assert not (output_dir("dpo", key, config, project) / RESULT_FILE).exists()

    monkeypatch.undo()
    result = run_stage("dpo", config, inputs, project)
    assert result.metrics["resumed_from_step"] == STEPS  # nothing retrained
    assert result.info["registered_version"]
