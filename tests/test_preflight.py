"""Outages are found before training: an unreachable MLflow server or DVC remote stops the run at once,
with a message naming the URL."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from stages.config import validate
from stages.preflight import PreflightError, check_dvc_remote, preflight
from tests.conftest import make_project, tiny_params


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_tracking_server_is_named_before_anything_runs(tmp_path, tiny_model_dir):
    url = f"http://127.0.0.1:{_closed_port()}"
    config = validate(tiny_params(tiny_model_dir, tmp_path, run={"tracking_uri": url}))
    started = time.perf_counter()
    with pytest.raises(PreflightError, match=f"MLflow tracking server {url} cannot be reached"):
        preflight(config, tmp_path)
    assert time.perf_counter() - started < 15


def test_pipeline_flow_stops_before_training_when_the_server_is_down(tmp_path, tiny_model_dir):
    from flows.pipeline import alignment_pipeline

    url = f"http://127.0.0.1:{_closed_port()}"
    project = make_project(tmp_path / "p", tiny_params(tiny_model_dir, tmp_path / "p", run={"tracking_uri": url}))
    with pytest.raises(PreflightError, match=url):
        alignment_pipeline.fn(params="params.yaml", root=str(project))
    assert not (project / "outputs").exists()  # nothing prepared, nothing trained


def test_dvc_remote_that_cannot_be_written_is_named(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "p", tiny_params(tiny_model_dir, tmp_path / "p"))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the remote should be")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(blocker / "remote")],
                   cwd=project, check=True, capture_output=True)
    with pytest.raises(PreflightError, match=r"DVC remote 'local' \(.*not-a-directory/remote\) cannot be reached"):
        check_dvc_remote(project)


def test_reachable_local_stores_pass(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "p", tiny_params(tiny_model_dir, tmp_path / "p"))
    preflight(validate(tiny_params(tiny_model_dir, project)), project)
