"""Checks that run before any model loads: can the run record what it trains, and version its data?

An MLflow tracking server or DVC remote that cannot be reached would otherwise fail a run after the
training it paid for (MLflow's client also retries for minutes before it gives up). Each check fails
fast with a message that names the URL and what to do.

Credentials are read where the MLflow client and DVC read them, never from params: the health check of a
tracking server goes through MLflow's own HTTP client (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
or ``MLFLOW_TRACKING_TOKEN`` from the environment or ``~/.mlflow/credentials``, MLflow's TLS settings), and a
DVC remote's credentials stay in DVC's own config (``.dvc/config.local``) or the cloud SDK's environment.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from stages.config import Config
from stages.tracking import tracking_uri
from stages.versioning import inside_dvc_repro, is_dvc_repo

if TYPE_CHECKING:
    from mlflow.utils.rest_utils import MlflowHostCreds

TIMEOUT_SECONDS = 10.0


class PreflightError(RuntimeError):
    """A store the run needs is not reachable; the message names it."""


def preflight(config: Config, root: Path) -> None:
    """Every check the config calls for (the tracking store; the DVC remote when pushing)."""
    check_tracking(config, root)
    if config.run.dvc and config.run.dvc_push and is_dvc_repo(root) and not inside_dvc_repro():
        check_dvc_remote(root)


def check_tracking(config: Config, root: Path) -> None:
    uri = tracking_uri(config.run, root)
    if uri.startswith(("http://", "https://")):
        _check_tracking_server(uri, config.run.experiment)
    elif uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(directory if directory.exists() else directory.parent, os.W_OK):
            raise PreflightError(f"MLflow store {uri}: cannot write to {directory}")


def _check_tracking_server(uri: str, experiment: str) -> None:
    """Ask the server twice, once each (no retries) and through MLflow's own HTTP client, so with exactly the
    credentials and TLS settings of the run's MLflow client: ``/health`` (is it up?), then a read of the
    experiment (does it let us in? ``/health`` is open even where ``mlflow server --app-name basic-auth`` or a
    proxy checks credentials)."""
    from mlflow.utils.credentials import get_default_host_creds

    credentials = get_default_host_creds(uri)
    _ask(uri, credentials, "/health", {}, accept=(200,))
    _ask(uri, credentials, "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": experiment},
         accept=(200, 404))  # 404: the experiment does not exist yet; the first run creates it


def _ask(uri: str, credentials: MlflowHostCreds, endpoint: str, query: dict[str, str], accept: tuple[int, ...]) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request

    url = f"{uri.rstrip('/')}{endpoint}"
    try:
        response = http_request(credentials, endpoint, "GET", max_retries=0, timeout=TIMEOUT_SECONDS,
                                raise_on_status=False, params=query)
    except (MlflowException, OSError) as error:  # requests' errors are OSErrors
        raise PreflightError(
            f"MLflow tracking server {uri} cannot be reached ({error}); start it (e.g. `make serve`) or "
            "point run.tracking_uri at a running one. Nothing was trained."
        ) from error
    if response.status_code in (401, 403):
        said = " ".join(response.text.split())[:200]
        raise PreflightError(
            f"MLflow tracking server {uri} refused the request ({response.status_code} at {url}: {said!r}). "
            "Credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in "
            "the environment of the run, or in ~/.mlflow/credentials; they never go into params. A server that "
            "refuses this host name needs it in `mlflow server --allowed-hosts`. Nothing was trained."
        )
    if response.status_code not in accept:
        raise PreflightError(f"MLflow tracking server {uri} answered {response.status_code} at {url}. "
                             "Nothing was trained.")


def check_dvc_remote(root: Path) -> None:
    """The default DVC remote answers (a listing of its root) within the timeout."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise PreflightError(f"{root}: DVC has no default remote to push to; add one "
                                 "(`dvc remote add -d NAME URL`) or set run.dvc_push: false")
        url = repo.config["remote"][name]["url"]
        try:
            remote = repo.cloud.get_remote(name)
        except ImportError as error:  # an s3://, gs://, ssh://... remote without its DVC plugin
            plugin = re.search(r"'(dvc-[a-z0-9]+)'", str(error))
            install = f"`pip install {plugin.group(1)}` into this environment" if plugin else "install its DVC plugin"
            raise PreflightError(f"DVC remote {name!r} ({url}) needs a DVC plugin: {error}; {install}, or set "
                                 "run.dvc_push: false. Nothing was trained.") from None
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(_reachable, remote.fs, remote.path)
            try:
                problem = future.result(timeout=TIMEOUT_SECONDS)
            except concurrent.futures.TimeoutError:
                problem = f"no answer within {TIMEOUT_SECONDS:.0f} s"
    if problem:
        raise PreflightError(f"DVC remote {name!r} ({url}) cannot be reached: {problem}. Fix the remote or set "
                             "run.dvc_push: false. Nothing was trained.")


def _reachable(fs, path: str) -> str | None:
    """None when ``path`` exists (or, on a local disk, can be created); else why not."""
    try:
        if fs.exists(path):
            return None if fs.isdir(path) else "it is a file, not a directory"
        if fs.protocol in ("local", "file") or "local" in getattr(fs, "protocol", ()):
            parent = Path(path).parent
            while not parent.exists():
                parent = parent.parent
            return None if parent.is_dir() and os.access(parent, os.W_OK) else f"cannot create {path}"
        return None  # object stores: an absent prefix is created by the first push
    except Exception as error:  # noqa: BLE001 (any client error means "not reachable"; its text is the reason)
        return f"{type(error).__name__}: {error}"
