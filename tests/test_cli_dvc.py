"""`alignflow stage NAME` and `dvc repro`: the same stages, the same params.yaml, no second implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, tiny_params

BIN = Path(sys.executable).parent


def sh(project: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dvc-project")
    return make_project(root, tiny_params(tiny_model_dir, root, run={"dvc_push": False}))


def test_stage_without_its_inputs_says_which_to_run_first(project):
    done = sh(project, "alignflow", "stage", "dpo", "--no-track")
    assert done.returncode != 0
    assert "run `alignflow stage" in done.stderr


def test_bad_override_fails_before_anything_runs(project):
    done = sh(project, "alignflow", "stage", "prepare", "--set", "data.eval_fraction=2")
    assert done.returncode == 2
    assert "data.eval_fraction" in done.stderr
    assert not (project / "outputs").exists()


def test_dvc_repro_runs_every_stage_through_the_cli(project):
    done = sh(project, sys.executable, "-m", "dvc", "repro")
    assert done.returncode == 0, done.stderr[-3000:]
    results = project / "outputs" / "results"
    for stage in ("base", "sft", "label", "reward", "dpo_reference", "dpo", "evaluate"):
        assert json.loads((results / f"{stage}.json").read_text())["stage"] == stage
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared"]
    assert prepared and prepared[0]["md5"].endswith(".dir")
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert {"sft", "dpo"} <= set(metrics)

    # the same stage again: found at its key's location, nothing trained
    again = sh(project, "alignflow", "stage", "dpo", "--no-track")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "dpo: cache hit" in again.stdout
    status = sh(project, sys.executable, "-m", "dvc", "status")
    assert "changed" not in status.stdout


def test_prefect_defaults_reach_prefects_settings_and_yield_to_the_users():
    """The CLI's Prefect defaults (a longer ephemeral-server start, no telemetry) are settings Prefect reads,
    and a value the user exported wins."""
    code = ("from flows.cli import apply_prefect_defaults; apply_prefect_defaults(); "
            "from prefect.settings import Settings; s = Settings(); "
            "print(s.server.ephemeral.startup_timeout_seconds, s.server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["180", "False"]
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["45", "False"]
