"""``alignflow serve``: the Prefect server and UI, the MLflow UI and the flows as deployments, in one command.

What it starts, bound to ``serve.host`` (127.0.0.1 unless configured), each in its own process group with
its log under ``serve.log_dir`` (``.serve/``):

- ``prefect server start`` on ``serve.prefect_port``. Its database is the URL in the environment variable
  that ``serve.prefect_database_env`` names (PostgreSQL; a password never goes into params), else SQLite at
  ``<log_dir>/prefect.db``, so each project keeps its own deployments and runs;
- ``mlflow server`` on ``serve.mlflow_port`` over ``run.tracking_uri``, resolved as the flows resolve it
  (``stages.tracking.tracking_uri``), so every run a flow logs shows up in the MLflow UI. Not started when
  ``run.tracking_uri`` is itself a server (http/https) or ``serve.mlflow`` is false.

Once both answer their health checks it points Prefect at its own server (``PREFECT_API_URL``), sets the
tag concurrency limit ``gpu`` (the tag of every training and generation task) to ``serve.gpu_slots`` and
serves the deployments ``alignment-pipeline``, ``compare`` and ``retrain`` (``retrain.cron`` schedule, and
a trigger on the event ``alignflow.preferences.arrived`` that ``alignflow ingest`` emits) from this process.
Their default ``root`` is the project directory, so a run started from the UI behaves like ``alignflow run``
here. Ctrl-C or SIGTERM stops the flow runs in progress, then the servers (SIGTERM to each process group,
SIGKILL after ``serve.stop_timeout``).
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from stages.config import Config, load_config
from stages.tracking import tracking_uri

logger = logging.getLogger("alignflow.serve")

PREFERENCES_ARRIVED = "alignflow.preferences.arrived"
GPU_TAG = "gpu"
DEPLOYMENT_TAGS = ["alignflow"]
# Health checks go straight to our own servers, whatever HTTP(S)_PROXY says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Tracking URIs that already name a server: the flows log there, nothing for us to start.
REMOTE_TRACKING = ("http://", "https://", "databricks")


class ServeError(RuntimeError):
    """A server could not be started or did not come up; the message names the URL and the log file."""


# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------
@dataclass
class Service:
    """One server we start: its command, the URL that answers when it is up, and its log file."""

    name: str
    port: int
    port_key: str  # its key in the serve section, named in errors
    command: list[str]
    health_url: str
    ui_url: str
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} alignflow serve: {' '.join(self.command)}\n")
            log.flush()
            # A session of its own: the terminal's Ctrl-C reaches only us, and we stop the servers in order.
            self.process = subprocess.Popen(self.command, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with _DIRECT.open(self.health_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_healthy(services: list[Service], timeout: float, poll: float = 0.5) -> None:
    """Return once every service answers its health URL; fail naming the URL and the log file if one exits
    or does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for service in list(pending):
            code = service.process.poll() if service.process else None
            if code is not None:
                raise ServeError(f"{service.name} exited with code {code} before answering {service.health_url}; "
                                 f"see {service.log_path}:\n{service.log_tail()}")
            if service.healthy():
                logger.info("%s is up: %s", service.name, service.ui_url)
                pending.remove(service)
        if pending and time.monotonic() > deadline:
            names = "; ".join(f"{s.name} did not answer {s.health_url} (log: {s.log_path})" for s in pending)
            raise ServeError(f"not up after {timeout:.0f} s (serve.startup_timeout): {names}")
        if pending:
            time.sleep(poll)


def stop_processes(processes: Iterable[psutil.Process], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL what is left."""
    processes = list(processes)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        logger.warning("pid %d did not stop within %.0f s: killing it", process.pid, timeout)
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_service(service: Service, timeout: float) -> None:
    """Stop a server, its process group and any descendant that left the group."""
    if service.process is None:
        return
    tree = _tree(service.process.pid)
    try:
        os.killpg(service.process.pid, signal.SIGTERM)  # the group: uvicorn workers and job runners with it
    except (ProcessLookupError, PermissionError):
        pass
    stop_processes(tree, timeout)
    try:
        service.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()
    logger.info("%s stopped", service.name)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _log_to_stderr() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s alignflow serve: %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Prefect gives the root logger a handler of its own: one line, not two


def _raise_exit(signum: int, _frame: Any) -> None:
    # SIGTERM/SIGHUP end `alignflow serve` as Ctrl-C does: through the `finally` that stops the servers.
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------------------------------
def client_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _url(host: str, port: int) -> str:
    host = client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prefect_service(config: Config, root: Path, environ: dict[str, str]) -> Service:
    serve = config.serve
    log_dir = root / serve.log_dir
    env = dict(environ)
    # The UI asks this server's API, not one a PREFECT_API_URL in the caller's environment names.
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = (environ.get(serve.prefect_database_env)
                                                  or f"sqlite+aiosqlite:///{(log_dir / 'prefect.db').resolve()}")
    # The UI reads the API's address from these, not from `--port`: without them it would call :4200.
    env["PREFECT_SERVER_API_HOST"] = serve.host
    env["PREFECT_SERVER_API_PORT"] = str(serve.prefect_port)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no calls home
    env.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    url = _url(serve.host, serve.prefect_port)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", serve.host,
               "--port", str(serve.prefect_port)]
    return Service("Prefect server", serve.prefect_port, "prefect_port", command, f"{url}/api/health", url,
                   log_dir / "prefect.log", env)


def mlflow_service(config: Config, root: Path, environ: dict[str, str]) -> Service | None:
    serve = config.serve
    uri = tracking_uri(config.run, root)
    if not serve.mlflow or uri.startswith(REMOTE_TRACKING):
        return None
    env = dict(environ)
    # Job execution (GenAI judges, prompt optimisation) starts a dozen worker processes we do not use.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    url = _url(serve.host, serve.mlflow_port)
    command = [sys.executable, "-m", "mlflow", "server", "--host", serve.host, "--port", str(serve.mlflow_port),
               "--backend-store-uri", uri, "--artifacts-destination", str((root / "mlartifacts").resolve()),
               "--workers", "1"]
    return Service("MLflow server", serve.mlflow_port, "mlflow_port", command, f"{url}/health", url,
                   root / serve.log_dir / "mlflow.log", env)


def database_kind(config: Config, environ: dict[str, str]) -> str:
    """Which database the Prefect server uses, for the log: the URL's scheme, never the URL (it may hold a
    password)."""
    url = environ.get(config.serve.prefect_database_env)
    if not url:
        return f"SQLite in {config.serve.log_dir}/prefect.db"
    return f"{url.split(':', 1)[0]} (from ${config.serve.prefect_database_env})"


# --------------------------------------------------------------------------------------------------
# Prefect: concurrency limit and deployments
# --------------------------------------------------------------------------------------------------
def set_gpu_limit(slots: int) -> None:
    """The tag concurrency limit ``gpu``: at most ``slots`` training/generation tasks at once, across runs."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)  # creates or updates


def retrain_cron(config: Config) -> str | None:
    """``retrain.cron``, or None where the config has no such key (or leaves it empty)."""
    return getattr(getattr(config, "retrain", None), "cron", None) or None


def retrain_params(retrain_flow: Any, root: Path, params: str) -> str:
    """The params file the retrain deployment runs with: the retrain flow's own default (the retrain profile,
    ``params/retrain.yaml``) where the project has it, else the served params file."""
    own = inspect.signature(retrain_flow.fn).parameters["params"].default
    return own if isinstance(own, str) and (root / own).is_file() else params


def _retrain_flow() -> Any:
    try:
        from flows.retrain import retrain
    except ModuleNotFoundError as error:
        if error.name != "flows.retrain":
            raise
        return None
    return retrain


def deployments(config: Config, root: Path, params: str = "params.yaml",
                overrides: list[str] | None = None) -> list[Any]:
    """The served deployments. Their default parameters are this project's: a run started from the UI with
    the defaults is ``alignflow run --params PARAMS --set ...`` (``compare``, ``retrain`` alike) in ``root``.

    ``retrain`` runs on its own profile (see ``retrain_params``), on the cron ``retrain.cron`` of that
    profile, and on every ``alignflow.preferences.arrived`` event (``alignflow ingest`` sends one per file;
    runs started together queue on the dataset lock, and the later ones find nothing new)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from flows.compare import compare
    from flows.pipeline import alignment_pipeline

    overrides = list(overrides or [])
    common = {"tags": DEPLOYMENT_TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    defaults = {"params": params, "overrides": overrides, "root": str(root)}
    served = [
        alignment_pipeline.to_deployment("alignment-pipeline", parameters=defaults, **common),
        compare.to_deployment("compare", parameters=defaults, **common),
    ]
    retrain = _retrain_flow()
    if retrain is None:
        logger.warning("flows/retrain.py not found: the retrain deployment is not served")
        return served
    own_params = retrain_params(retrain, root, params)
    cron = retrain_cron(config if own_params == params else load_config(root / own_params, overrides))
    trigger = DeploymentEventTrigger(name=f"retrain on {PREFERENCES_ARRIVED}", expect={PREFERENCES_ARRIVED},
                                     match={"prefect.resource.id": "alignflow.incoming.*"})
    served.append(retrain.to_deployment("retrain", cron=cron, triggers=[trigger],
                                        parameters=defaults | {"params": own_params}, **common))
    return served


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def serve(params: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> int:
    """Start the servers, serve the deployments until Ctrl-C/SIGTERM, then stop everything started here.

    ``overrides`` other than ``serve.*`` become the deployments' default ``overrides``."""
    _log_to_stderr()
    project = Path(root).resolve()
    overrides = list(overrides or [])
    config = load_config(project / params, overrides)
    flow_overrides = [text for text in overrides if not text.strip().startswith("serve.")]
    environ = dict(os.environ)
    services = [s for s in (prefect_service(config, project, environ), mlflow_service(config, project, environ))
                if s is not None]
    for service in services:
        if not port_free(config.serve.host, service.port):
            raise ServeError(f"{service.name}: port {service.port} on {config.serve.host} is in use (another "
                             f"`alignflow serve`?); choose another with --set serve.{service.port_key}=PORT")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)
    try:
        for service in services:
            service.start(project)
        logger.info("Prefect database: %s; logs in %s", database_kind(config, environ), project / config.serve.log_dir)
        wait_until_healthy(services, config.serve.startup_timeout)
        _serve_deployments(config, project, params, flow_overrides, services)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut this short and orphan the servers; it takes stop_timeout at most.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("stopping (up to %.0f s per server)", config.serve.stop_timeout)
        # Flow runs in progress first (they talk to the servers), then the servers.
        servers = {p.pid for s in services if s.process for p in _tree(s.process.pid)}
        others = [p for p in psutil.Process().children(recursive=True) if p.pid not in servers]
        stop_processes(others, config.serve.stop_timeout)
        for service in reversed(services):
            stop_service(service, config.serve.stop_timeout)
    return 0


def _serve_deployments(config: Config, project: Path, params: str, overrides: list[str],
                       services: list[Service]) -> None:
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect's runner answers SIGTERM with `self.stop()` un-awaited inside its event loop; the shutdown works
    # (SystemExit reaches our `finally`), only the warning about it is noise.
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    api_url = services[0].ui_url + "/api"
    os.environ["PREFECT_API_URL"] = api_url  # for the flow-run processes the runner starts
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        set_gpu_limit(config.serve.gpu_slots)
        served = deployments(config, project, params, overrides)
        lines = [f"Prefect UI  {services[0].ui_url}  (Deployments > alignment-pipeline > Run)"]
        lines += [f"MLflow UI   {s.ui_url}" for s in services[1:]]
        lines += [f"gpu tag concurrency limit: {config.serve.gpu_slots} slot(s)", _retrain_line(served),
                  "Ctrl-C stops everything."]
        logger.info("\n  " + "\n  ".join(lines))
        prefect.serve(*served, pause_on_shutdown=True)


def _retrain_line(served: list[Any]) -> str:
    retrain = next((deployment for deployment in served if deployment.name == "retrain"), None)
    if retrain is None:
        return "retrain: not served (no flows/retrain.py)"
    crons = [schedule.schedule.cron for schedule in retrain.schedules]
    schedule = f"on cron {crons[0]!r} (UTC)" if crons else "on no schedule (retrain.cron is empty)"
    return f"retrain ({retrain.parameters['params']}): {schedule} and on each {PREFERENCES_ARRIVED} event"
