"""alignflow as a service: deployments run through the Prefect API (the call the UI's Run button makes), the
``gpu`` tag concurrency limit across flow runs, and ``alignflow serve`` end to end with the Prefect UI's
custom-run form opened in headless chromium (skipped without chromium unless CI_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from prefect import flow, task

from flows.serve import PREFERENCES_ARRIVED
from stages.config import ConfigError, load_config
from tests.conftest import make_project, tiny_params

REPO = Path(__file__).resolve().parent.parent
HOLD_SECONDS = 3.0


# --------------------------------------------------------------------------------------------------
# A flow whose only task holds the gpu tag for a few seconds (served below, run twice at once)
# --------------------------------------------------------------------------------------------------
@task(tags=["gpu"])
def hold_gpu(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@flow(name="gpu_hold")
def gpu_hold(seconds: float = HOLD_SECONDS) -> float:
    return hold_gpu(seconds)


# --------------------------------------------------------------------------------------------------
# Unit level: config, child-process plumbing, parameter schemas
# --------------------------------------------------------------------------------------------------
def test_database_url_is_named_by_an_env_var_and_never_echoed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"serve": {"prefect_database_env": "postgresql+asyncpg://u:s3cret@db/prefect"}}))
    with pytest.raises(ConfigError, match=r"serve\.prefect_database_env") as error:
        load_config(path)
    assert "s3cret" not in str(error.value) and "environment variable" in str(error.value)


def test_prefect_server_gets_its_database_and_address_from_the_environment(tmp_path):
    from flows.serve import mlflow_service, prefect_service

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"serve": {"prefect_port": 4321, "prefect_database_env": "MY_PREFECT_DB"}}))
    config = load_config(path)
    env = prefect_service(config, tmp_path, {"PREFECT_API_URL": "http://elsewhere/api"}).env
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == f"sqlite+aiosqlite:///{tmp_path / '.serve' / 'prefect.db'}"
    assert env["PREFECT_SERVER_API_PORT"] == "4321" and "PREFECT_API_URL" not in env  # the UI calls this server
    url = "postgresql+asyncpg://u:p@db/prefect"
    assert prefect_service(config, tmp_path, {"MY_PREFECT_DB": url}).env["PREFECT_API_DATABASE_CONNECTION_URL"] == url
    mlflow = mlflow_service(config, tmp_path, {})
    store = mlflow.command[mlflow.command.index("--backend-store-uri") + 1]
    assert store == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store the flows log to (stages.tracking)
    remote = load_config(path, ["run.tracking_uri=http://mlflow.internal:5000"])
    assert mlflow_service(remote, tmp_path, {}) is None


def test_a_server_that_dies_or_hangs_fails_naming_url_and_log(tmp_path):
    from flows.serve import ServeError, Service, stop_service, wait_until_healthy

    def service(code: str) -> Service:
        log = tmp_path / f"{len(code)}.log"
        return Service("Fake server", 1, "fake_port", [sys.executable, "-c", code], "http://127.0.0.1:1/health",
                       "http://127.0.0.1:1", log, dict(os.environ))

    dead = service("print('no such database'); raise SystemExit(3)")
    dead.start(tmp_path)
    with pytest.raises(ServeError, match=r"(?s)exited with code 3 .*127\.0\.0\.1:1/health.*\.log:.*no such database"):
        wait_until_healthy([dead], timeout=30)
    hung = service("import time; time.sleep(60)")
    hung.start(tmp_path)
    try:
        with pytest.raises(ServeError, match=r"not up after 1 s .*did not answer http://127\.0\.0\.1:1/health "
                                             r"\(log: .*\.log\)"):
            wait_until_healthy([hung], timeout=1)
    finally:
        stop_service(hung, timeout=5)
    assert hung.process.poll() is not None


def test_flow_parameters_render_as_a_form_with_descriptions_and_defaults(tmp_path):
    """What the UI's custom-run form is built from: every parameter has a type, a default and the description
    from the flow's docstring; the deployment's defaults point at the project."""
    from flows.serve import deployments

    config = load_config(REPO / "params.yaml")
    served = {d.name: d for d in deployments(config, tmp_path, "params.yaml", ["run.device=cpu"])}
    assert {"alignment-pipeline", "compare"} <= set(served)
    for deployment in served.values():
        schema = deployment._parameter_openapi_schema.model_dump()
        assert set(schema["properties"]) == {"params", "overrides", "root"}, deployment.name
        for name, prop in schema["properties"].items():
            assert len(prop.get("description", "")) > 20, f"{deployment.name}.{name} has no description"
            assert "default" in prop and prop.get("type") or prop.get("anyOf"), f"{deployment.name}.{name}"
        assert schema["properties"]["root"]["default"] == "."
        assert deployment.parameters == {"params": "params.yaml", "overrides": ["run.device=cpu"],
                                         "root": str(tmp_path)}
        assert "alignflow" in deployment.tags
    for name in ("alignment-pipeline", "compare"):
        assert served[name]._parameter_openapi_schema.properties["params"]["default"] == "params.yaml"


def test_retrain_is_scheduled_and_triggered_by_arriving_preferences(tmp_path):
    retrain_module = pytest.importorskip("flows.retrain", reason="flows/retrain.py not written yet")
    from flows.serve import deployments

    assert PREFERENCES_ARRIVED == retrain_module.ARRIVED  # the event `alignflow ingest` emits
    config = load_config(REPO / "params.yaml")
    retrain = {d.name: d for d in deployments(config, tmp_path)}["retrain"]
    assert [t.expect for t in retrain.triggers] == [{PREFERENCES_ARRIVED}]
    assert [s.schedule.cron for s in retrain.schedules] == [config.retrain.cron]
    # a project with the retrain profile: the deployment runs on it, on its schedule
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "retrain.yaml").write_text(yaml.safe_dump({"retrain": {"cron": "15 4 * * 1"}}))
    retrain = {d.name: d for d in deployments(config, tmp_path)}["retrain"]
    assert retrain.parameters["params"] == "params/retrain.yaml"
    assert [s.schedule.cron for s in retrain.schedules] == ["15 4 * * 1"]


# --------------------------------------------------------------------------------------------------
# Deployments served by a Runner against a real Prefect test server
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("served-project")
    return make_project(root, tiny_params(tiny_model_dir, root))


@pytest.fixture(scope="module")
def runner(prefect_server, project):
    """`alignflow serve`'s deployments (plus gpu_hold), served by a Runner in a background thread, as
    `prefect.serve` serves them; the flow runs it starts run in subprocesses, as they do under serve."""
    from prefect.runner import Runner

    from flows.serve import deployments

    served = [d for d in deployments(load_config(project / "params.yaml"), project) if d.name == "alignment-pipeline"]
    served.append(gpu_hold.to_deployment("gpu-hold"))
    runner = Runner(query_seconds=1, pause_on_shutdown=False)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def serve() -> None:
        for deployment in served:
            await runner.add_deployment(deployment)
        started.set()
        await runner.start()

    # A copy of this thread's context: the harness's settings (its API URL) are context variables.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(loop.run_until_complete, serve()), daemon=True)
    thread.start()
    assert started.wait(60), "runner did not register its deployments"
    yield runner
    asyncio.run_coroutine_threadsafe(runner.astop(), loop).result(timeout=60)
    thread.join(timeout=60)


@pytest.mark.slow
def test_deployment_run_from_the_api_completes_like_alignflow_run(runner, project):
    """The UI's Run button creates a flow run of the deployment through the API; the served runner picks
    it up and runs the real pipeline with the deployment's defaults (root = the project)."""
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment

    flow_run = run_deployment("alignment_pipeline/alignment-pipeline", timeout=600, poll_interval=2)
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"
    assert flow_run.parameters["root"] == str(project)
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert set(metrics) == {"sft", "dpo"}
    assert (project / "dvc.lock").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alignflow")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_gpu_concurrency_limit_serialises_gpu_tasks_across_flow_runs(runner):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    from flows.serve import set_gpu_limit

    set_gpu_limit(1)
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
    started = time.monotonic()
    runs = [run_deployment("gpu_hold/gpu-hold", timeout=0) for _ in range(2)]
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 180
        while not all(client.read_flow_run(run.id).state.is_final() for run in runs):
            assert time.monotonic() < deadline, "gpu_hold runs did not finish within 180 s"
            time.sleep(1)
        states = [client.read_flow_run(run.id).state for run in runs]
        assert all(state.is_completed() for state in states), states
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
    assert len(task_runs) == 2 and all("gpu" in t.tags for t in task_runs)
    first, second = sorted(task_runs, key=lambda t: t.start_time)
    assert first.end_time - first.start_time >= _seconds(HOLD_SECONDS - 0.1)
    assert second.start_time >= first.end_time, (
        f"gpu tasks overlapped: {first.start_time}..{first.end_time} and {second.start_time}..{second.end_time}")
    assert time.monotonic() - started >= 2 * HOLD_SECONDS


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)


# --------------------------------------------------------------------------------------------------
# `alignflow serve` end to end, and the Prefect UI in headless chromium
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode()


def _wait_for_deployments(process: subprocess.Popen, api: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"alignflow serve exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            _, body = _get(f"{api}/deployments/filter", b"{}")
            if {"alignment-pipeline", "compare"} <= {d["name"] for d in json.loads(body)}:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"alignflow serve not serving after {timeout} s:\n{log.read_text()[-3000:]}")


def _deployment(api: str, name: str) -> dict:
    _, body = _get(f"{api}/deployments/filter", json.dumps({"deployments": {"name": {"any_": [name]}}}).encode())
    (deployment,) = json.loads(body)
    return deployment


def _wait_for_final_run(api: str, deployment_id: str, log: Path, timeout: float) -> dict:
    """The first finished run of a deployment that its schedule did not create (the cron's runs are days
    ahead and stay Scheduled)."""
    final = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
    query = json.dumps({"flow_runs": {"deployment_id": {"any_": [deployment_id]},
                                      "state": {"type": {"any_": final}}}}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = _get(f"{api}/flow_runs/filter", query)
        runs = [run for run in json.loads(body) if not run["auto_scheduled"]]
        if runs:
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished run of deployment {deployment_id} after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def browser():
    from tests.test_report_browser import CHROMEDRIVER, CHROMIUM, REQUIRED, _browser_or_skip

    _browser_or_skip()
    if REQUIRED:
        from selenium import webdriver
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_alignflow_serve_end_to_end_in_the_browser(tmp_path, tiny_model_dir, browser):
    """Start `alignflow serve` on free ports, open alignment-pipeline's custom-run form in the Prefect UI (the
    page http://host:port/ leads to), start a retrain run by its event, check the MLflow UI answers, then
    Ctrl-C: every process it started is gone."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    project = make_project(tmp_path / "project", tiny_params(tiny_model_dir, tmp_path / "project"))
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    log = tmp_path / "serve.out"
    command = [str(Path(sys.executable).parent / "alignflow"), "serve", "--set", f"serve.prefect_port={prefect_port}",
               "--set", f"serve.mlflow_port={mlflow_port}"]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        ui, api = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{prefect_port}/api"
        _wait_for_deployments(process, api, log, timeout=240)
        children = psutil.Process(process.pid).children(recursive=True)
        assert {"prefect", "mlflow"} <= {word for c in children for word in c.cmdline()}

        # The Prefect UI: Deployments > alignment-pipeline > Run > Custom run. The pages re-render while
        # data arrives, so each step finds and clicks in one go and is retried on a stale element.
        wait = WebDriverWait(browser, 60, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException])
        browser.get(ui + "/")
        for selector, text in (("a", "Deployments"), ("a", "alignment-pipeline"), ("button", "Run"),
                               ("[role=menuitem]", "Custom run")):
            wait.until(lambda d, selector=selector, text=text: _click(d, selector, text),
                       message=f"no {selector} {text!r} on {browser.current_url}")
        fields = wait.until(lambda d: _form_fields(d, ("params", "overrides", "root")),
                            message=f"no custom-run form with params/overrides/root on {browser.current_url}")
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "The params file, relative to root" in body and "one section.key=value each" in body
        assert fields["params"] == "params.yaml"
        assert fields["root"] == str(project)  # a UI run finds this project's params.yaml

        # retrain: on its cron, and started by the event `alignflow ingest` sends (nothing dropped: no new data)
        deployment = _deployment(api, "retrain")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        emit = [str(Path(sys.executable).parent / "prefect"), "event", "emit", PREFERENCES_ARRIVED,
                "--resource-id", "alignflow.incoming.new-pairs.jsonl"]
        emitted = subprocess.run(emit, env=env | {"PREFECT_API_URL": api}, capture_output=True, text=True, timeout=60)
        assert emitted.returncode == 0, emitted.stdout + emitted.stderr
        retrain_run = _wait_for_final_run(api, deployment["id"], log, timeout=180)
        assert retrain_run["state_type"] == "COMPLETED", retrain_run["state"]
        assert retrain_run["parameters"]["root"] == str(project)

        # The MLflow UI over the project's tracking store
        status, page = _get(f"http://127.0.0.1:{mlflow_port}/")
        assert status == 200 and "mlflow" in page.lower()
        status, body = _get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=5")
        assert status == 200 and "experiments" in json.loads(body)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, log.read_text()[-3000:]
    left = [c for c in children if _alive(c)]
    assert not left, f"still running after Ctrl-C: {[c.cmdline() for c in left]}"
    assert (project / ".serve" / "prefect.log").stat().st_size > 0
    assert (project / ".serve" / "mlflow.log").stat().st_size > 0


def _click(driver, selector: str, text: str) -> bool:
    """Click the first visible ``selector`` element whose text is ``text``; False while there is none."""
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.CSS_SELECTOR, selector):
        if element.text.strip() == text and element.is_displayed():
            element.click()
            return True
    return False


def _form_fields(driver, names: tuple[str, ...]) -> dict[str, str | None] | None:
    """The form's fields by label ("params (Optional)" -> params) and their values (None for a list
    widget), read in one script so that a re-render cannot interleave; None until all ``names`` show."""
    fields = driver.execute_script("""
        const fields = {};
        for (const label of document.querySelectorAll('label')) {
            const input = label.htmlFor ? document.getElementById(label.htmlFor) : null;
            fields[label.innerText.trim().split(' ')[0]] = input && 'value' in input ? input.value : null;
        }
        return fields;""")
    return fields if set(names) <= set(fields) else None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
