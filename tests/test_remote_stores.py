"""Beyond one machine: the stages log to a real MLflow tracking server (runs, params, metrics, artifacts and
the registered model travel over HTTP; artifacts land in the server's --artifacts-destination), and the
prepared data is pushed to whichever DVC remote the project's DVC config makes the default."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stages.config import validate
from stages.preflight import PreflightError, check_dvc_remote, check_tracking, preflight
from stages.runner import STAGES, pipeline_order, run_stage
from stages.tracking import Tracker
from stages.versioning import locked_out_md5
from tests.conftest import make_project, tiny_params

# preference pairs (no label stage, SFT on the chosen replies) and 2 optimiser steps per training stage
TRACKED_STAGES = ["base", "prepare", "sft", "reward", "dpo_reference", "dpo"]
SHORT = {"max_steps": 2}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1: SQLite backend store and a local artifacts destination,
    both in a temporary directory, artifacts proxied by the server (``mlflow-artifacts:/``)."""
    home = tmp_path_factory.mktemp("mlflow-server")
    artifacts = home / "artifacts"
    url = f"http://127.0.0.1:{_free_port()}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{home / 'backend.db'}",
               "--artifacts-destination", str(artifacts), "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes on a 2-core machine
    log = home / "server.log"
    with log.open("w") as out:
        # a session of its own, so that teardown stops the server and its uvicorn worker, and only them
        process = subprocess.Popen(command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server at {url} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "artifacts": artifacts, "log": log}
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    for signum, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signum)  # the group start_new_session made: this server's processes
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _write_pairs(path: Path, rows: int) -> None:
    lines = [json.dumps({"prompt": f"Review {i}: the film was", "chosen": f" wonderful, scene {i} moved me.",
                         "rejected": f" dull; I left at scene {i}."}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def _run_stages(stages: list[str], config, root: Path, parent_run_id: str | None) -> dict:
    results = {}
    for name in pipeline_order(config):
        if name not in stages:
            continue
        inputs = {i: results[i] for i in STAGES[name].inputs(config)}
        results[name] = run_stage(name, config, inputs, root, parent_run_id=parent_run_id)
    return results


# --------------------------------------------------------------------------------------------------
# MLflow tracking server
# --------------------------------------------------------------------------------------------------
def test_stages_log_runs_params_metrics_artifacts_and_models_to_a_tracking_server(
    tmp_path, tiny_model_dir, mlflow_server
):
    from mlflow import MlflowClient

    url, artifacts = mlflow_server["url"], mlflow_server["artifacts"]
    params = tiny_params(tiny_model_dir, tmp_path / "p", run={"tracking_uri": url, "dvc": False},
                         data={"task": "preference", "source": "pairs.jsonl"}, sft={"source": "chosen", **SHORT},
                         reward=SHORT, dpo=SHORT)
    project = make_project(tmp_path / "p", params)
    _write_pairs(project / "pairs.jsonl", 24)
    config = validate(params)
    preflight(config, project)  # the server answers its health check

    parent = Tracker.start(config.run, project, "pipeline-remote-test", tags={"alignflow.flow": "test"})
    results = _run_stages(TRACKED_STAGES, config, project, parent.run_id)
    parent.finish()

    # Runs: a child run per stage under the parent, all finished, all on the server
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name(config.run.experiment)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server proxies the artifacts
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_stage = {run.data.tags["alignflow.stage"]: run for run in children}
    assert sorted(by_stage) == sorted(TRACKED_STAGES)
    assert {run.info.status for run in children} == {"FINISHED"}
    for stage, result in results.items():
        assert result.info["mlflow_run_id"] == by_stage[stage].info.run_id

    # Params: each stage's own sections, flattened
    sft = by_stage["sft"]
    assert sft.data.params["sft.learning_rate"] == str(config.sft.learning_rate)
    assert sft.data.params["model.name"] == str(tiny_model_dir)

    # Metrics: the stage's summary and the trainer's step-wise curve
    assert sft.data.metrics["stage_seconds"] > 0
    assert len(client.get_metric_history(sft.info.run_id, "loss")) >= 1
    assert by_stage["dpo"].data.metrics["stage_seconds"] > 0

    # Artifacts: listed and downloaded through the server, stored under its artifacts destination
    assert "resolved_params.yaml" in {item.path for item in client.list_artifacts(sft.info.run_id)}
    downloaded = client.download_artifacts(sft.info.run_id, "resolved_params.yaml", str(tmp_path))
    assert yaml.safe_load(Path(downloaded).read_text()) == config.model_dump(mode="json")
    stored = artifacts / experiment.experiment_id / sft.info.run_id / "artifacts" / "resolved_params.yaml"
    assert stored.is_file()

    # The DPO policy: registered on the server, its weights in the artifacts destination
    version = client.get_model_version(config.run.registered_model, results["dpo"].info["registered_version"])
    assert version.run_id == by_stage["dpo"].info.run_id
    weights = [path for path in artifacts.rglob("model.safetensors") if path.stat().st_size > 0]
    assert weights, f"no model weights under {artifacts}"

    # Nothing fell back to a local store in the project
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()


# --------------------------------------------------------------------------------------------------
# A second DVC remote
# --------------------------------------------------------------------------------------------------
def _dvc(project: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True, text=True)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _object(remote: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object in a remote: files/md5/<first 2 hex digits>/<the rest>."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def test_prepared_data_is_pushed_to_the_remote_dvc_config_makes_default(tmp_path, tiny_model_dir, mlflow_server):
    from mlflow import MlflowClient

    url = mlflow_server["url"]
    params = tiny_params(tiny_model_dir, tmp_path / "p", run={"tracking_uri": url, "dvc": True, "dvc_push": True})
    project = make_project(tmp_path / "p", params)  # its default remote is 'local' (<project>/dvc-remote)
    second = tmp_path / "second-remote"
    _dvc(project, "remote", "add", "--local", "second", str(second))  # this checkout only: .dvc/config.local
    _dvc(project, "remote", "default", "--local", "second")
    config = validate(params)
    preflight(config, project)

    prepared = run_stage("prepare", config, {}, project)

    md5 = locked_out_md5(project, "prepare", config.data.prepared_dir)
    assert md5 and md5.endswith(".dir") and prepared.info["dataset_md5"] == md5
    assert _object(second, md5).is_file()  # the directory listing
    files = sorted(path for path in (project / config.data.prepared_dir).rglob("*") if path.is_file())
    assert files
    for path in files:
        assert _object(second, _md5(path)).is_file(), f"{path.name} not in the second remote"
    assert not (project / "dvc-remote").exists()  # the committed default was not used, nor changed
    assert "second" not in (project / ".dvc" / "config").read_text()

    # The dataset version on the tracking server is that md5
    run = MlflowClient(tracking_uri=url).get_run(prepared.info["mlflow_run_id"])
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [md5]


def test_preflight_checks_the_remote_dvc_will_push_to(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir, tmp_path / "p")
    project = make_project(tmp_path / "p", params)
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the remote should be")
    _dvc(project, "remote", "add", "second", str(blocker / "remote"))
    _dvc(project, "remote", "default", "--local", "second")
    with pytest.raises(PreflightError, match=r"DVC remote 'second' \(.*a-file/remote\) cannot be reached"):
        check_dvc_remote(project)


def test_a_remote_whose_dvc_plugin_is_missing_is_named_with_the_package_to_install(tmp_path, tiny_model_dir):
    pytest.importorskip("dvc")
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("dvc-s3 is installed here")
    project = make_project(tmp_path / "p", tiny_params(tiny_model_dir, tmp_path / "p"))
    _dvc(project, "remote", "add", "-d", "bucket", "s3://alignflow-test/dvc")
    with pytest.raises(PreflightError, match=r"DVC remote 'bucket' \(s3://alignflow-test/dvc\).*pip install dvc-s3"):
        check_dvc_remote(project)


# --------------------------------------------------------------------------------------------------
# Credentials for the tracking server come from the environment
# --------------------------------------------------------------------------------------------------
class _BasicAuthServer(http.server.BaseHTTPRequestHandler):
    """What ``mlflow server --app-name basic-auth`` looks like from outside: an open /health, and an API that
    answers 401 without the right credentials (and 404 for an experiment that does not exist yet)."""

    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/health":
            status = 200
        elif self.path.startswith("/api/2.0/mlflow/experiments/get-by-name?experiment_name=alignflow"):
            status = 404 if self.headers.get("Authorization") == self.expected else 401
        else:
            status = 400
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"You are not authenticated." if status == 401 else b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tracking_credentials_come_from_the_environment(tmp_path, tiny_model_dir, auth_server, monkeypatch):
    """The health check sends what MLflow's client sends: the environment's credentials, else those of
    ~/.mlflow/credentials; a refusal names the variables and never echoes a password."""
    config = validate(tiny_params(tiny_model_dir, tmp_path, run={"tracking_uri": auth_server}))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials yet
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(PreflightError, match="refused the request.*MLFLOW_TRACKING_USERNAME") as refused:
        check_tracking(config, tmp_path)
    assert "401" in str(refused.value)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-pw-4711")
    with pytest.raises(PreflightError) as wrong:
        check_tracking(config, tmp_path)
    assert "not-the-pw-4711" not in str(wrong.value)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    check_tracking(config, tmp_path)

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = s3cret\n")
    check_tracking(config, tmp_path)
