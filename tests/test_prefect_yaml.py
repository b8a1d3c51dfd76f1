"""prefect.yaml: Prefect's own model accepts it; every deployment names a real flow that takes its parameters,
which are valid alignflow params; its job variables are variables that its work pool's base job template
(deploy/work-pools/) really uses, and they give every run a GPU; and a real Prefect server takes the whole
file through `prefect deploy --all`."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import load_config, stage_params

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "prefect.yaml"
POOL_TYPES = {"alignflow-docker": "docker", "alignflow-k8s": "kubernetes"}
DEPLOY_ENV = {"ALIGNFLOW_IMAGE": "registry.example.com/alignflow:test", "ALIGNFLOW_PROJECT_DIR": "/srv/alignflow"}


def _template(pool: str) -> dict:
    return json.loads((REPO / "deploy" / "work-pools" / f"{pool}.json").read_text())


@pytest.fixture(scope="module")
def deployments() -> list[dict]:
    """The deployments as `prefect deploy` sees them: validated by its model, env placeholders filled in."""
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates prefect.yaml with
    from prefect.utilities.templating import apply_values

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    configs = [d.model_dump(exclude_unset=True, mode="json") for d in model.deployments]
    saved = {name: os.environ.get(name) for name in DEPLOY_ENV}
    os.environ.update(DEPLOY_ENV)
    try:
        return [apply_values(config, os.environ, remove_notset=False) for config in configs]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _flow(entrypoint: str):
    from prefect.flows import Flow, load_flow_from_entrypoint

    path, _, name = entrypoint.partition(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    return flow


def _full_name(deployment: dict) -> str:
    return f"{_flow(deployment['entrypoint']).name}/{deployment['name']}"


# --------------------------------------------------------------------------------------------------
# Entrypoints and parameters
# --------------------------------------------------------------------------------------------------
def test_every_flow_is_deployed_on_both_pools_under_unique_names(deployments):
    names = [_full_name(d) for d in deployments]
    assert len(names) == len(set(names)), names
    flows = {(d["entrypoint"], d["work_pool"]["name"]) for d in deployments}
    for entrypoint in ("flows/pipeline.py:alignment_pipeline", "flows/compare.py:compare", "flows/retrain.py:retrain"):
        assert {(entrypoint, pool) for pool in POOL_TYPES} <= flows


def test_entrypoints_are_flows_that_take_the_deployment_parameters(deployments):
    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    workdir = pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    for deployment in deployments:
        flow = _flow(deployment["entrypoint"])
        parameters = deployment["parameters"]
        assert set(parameters) <= set(inspect.signature(flow.fn).parameters), deployment["name"]
        flow.validate_parameters(parameters)  # types, as the flow run will check them
        assert parameters["root"] == workdir  # the runs execute in, and read, the mounted checkout
        # the params file and overrides, validated as `alignflow run --params ... --set ...` validates them
        load_config(REPO / parameters["params"], parameters.get("overrides", []))


def test_compare_halves_split_the_grid_and_share_its_cache_keys(deployments):
    """The two halves are disjoint, together they are the whole grid, and every policy (and every shared
    stage) gets the same params, hence the same cache key, as in a full compare run."""
    from flows.compare import check_grid, variant_config

    full = load_config(REPO / "params.yaml")
    full_grid = {v.name: v for v in check_grid(full)}
    halves = {}
    for deployment in deployments:
        if deployment["name"].startswith(("dpo-", "ppo-")):
            config = load_config(REPO / deployment["parameters"]["params"], deployment["parameters"]["overrides"])
            halves.setdefault(deployment["name"].split("-")[0], []).append(config)
    assert set(halves) == {"dpo", "ppo"}
    grids = {}
    for half, configs in halves.items():
        grids[half] = {v.name: v for v in check_grid(configs[0])}
        assert all({v.name for v in check_grid(c)} == set(grids[half]) for c in configs)  # docker == k8s
        for stage in ("base", "prepare", "sft", "label", "reward", "score"):
            assert stage_params(configs[0], stage) == stage_params(full, stage), (half, stage)
        for name, variant in grids[half].items():
            assert stage_params(variant_config(configs[0], variant), variant.stage) == \
                stage_params(variant_config(full, full_grid[name]), variant.stage), name
    assert {v.method for v in grids["dpo"].values()} <= {"dpo", "simpo", "orpo"}
    assert {v.method for v in grids["ppo"].values()} <= {"ppo", "ppo-gold", "rloo", "rloo-gold", "grpo"}
    assert not set(grids["dpo"]) & set(grids["ppo"])
    assert set(grids["dpo"]) | set(grids["ppo"]) == set(full_grid)


def test_only_one_retrain_deployment_reacts_on_the_retrain_profile_cron_and_event(deployments):
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    from flows.serve import PREFERENCES_ARRIVED

    cron = load_config(REPO / "params/retrain.yaml").retrain.cron
    retrains = [d for d in deployments if d["entrypoint"] == "flows/retrain.py:retrain"]
    active = []
    for deployment in retrains:
        (schedule,) = deployment["schedules"]
        (trigger,) = deployment["triggers"]
        assert schedule["cron"] == cron and schedule["timezone"] == "UTC"
        parsed = TypeAdapter(DeploymentTriggerTypes).validate_python({"name": "t", **trigger})
        assert parsed.expect == {PREFERENCES_ARRIVED}
        assert schedule.get("active", True) == parsed.enabled
        active += [deployment["work_pool"]["name"]] if parsed.enabled else []
    assert len(active) == 1, active


# --------------------------------------------------------------------------------------------------
# Work pools and job variables
# --------------------------------------------------------------------------------------------------
def _rendered(pool: str, job_variables: dict) -> dict:
    """The job configuration a worker builds: variable defaults, then the deployment's job variables, into
    the template (as prefect.workers.base.BaseJobConfiguration.from_template_and_values does)."""
    from prefect.utilities.templating import apply_values

    template = _template(pool)
    values = {name: spec["default"] for name, spec in template["variables"]["properties"].items()
              if spec.get("default") is not None}
    return apply_values(copy.deepcopy(template["job_configuration"]), {**values, **job_variables})


def test_pool_templates_are_prefects_defaults_plus_gpu_variables():
    from prefect.server.api import collections_data

    bundled = Path(collections_data.__path__[0]) / "views" / "aggregate-worker-metadata.json"
    metadata = json.loads(bundled.read_text())
    workers = {name: worker for collection in metadata.values() for name, worker in collection.items()}
    for pool, kind in POOL_TYPES.items():
        default = workers[kind]["default_base_job_configuration"]
        ours = _template(pool)
        assert default["variables"]["properties"].items() <= ours["variables"]["properties"].items(), pool
        assert set(default["job_configuration"]) <= set(ours["job_configuration"]), pool


def test_job_variables_are_template_variables_and_request_a_gpu(deployments):
    from prefect.utilities.schema_tools import validate

    docker_types = pytest.importorskip("docker.types")
    gpu_ids = {}
    for deployment in deployments:
        pool, job_variables = deployment["work_pool"]["name"], deployment["work_pool"]["job_variables"]
        template = _template(pool)
        text = json.dumps(template["job_configuration"])
        for name in job_variables:  # a variable that the template does not use would be dropped without a word
            assert name in template["variables"]["properties"] and "{{ " + name + " }}" in text, (pool, name)
        validate(job_variables, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
                 allow_none_with_default=True)  # as the server validates a deployment's job variables
        rendered = _rendered(pool, job_variables)
        assert "{{" not in json.dumps(rendered)
        if POOL_TYPES[pool] == "docker":
            assert rendered["image"] == DEPLOY_ENV["ALIGNFLOW_IMAGE"]
            assert rendered["volumes"] == [f"{DEPLOY_ENV['ALIGNFLOW_PROJECT_DIR']}:/project"]
            requests = rendered["container_create_kwargs"]["device_requests"]
            (request,) = [docker_types.DeviceRequest(**r) for r in requests]  # as docker-py builds the HostConfig
            assert request["Capabilities"] == [["gpu"]] and (request["Count"] == 1 or len(request["DeviceIDs"]) == 1)
            gpu_ids[deployment["name"]] = request["DeviceIDs"]
        else:
            pod = rendered["job_manifest"]["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert container["image"] == DEPLOY_ENV["ALIGNFLOW_IMAGE"]
            assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
            assert container["volumeMounts"] == [{"name": "project", "mountPath": "/project"}]
            assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "alignflow-project"}
            assert container["envFrom"] == [{"secretRef": {"name": "alignflow-credentials", "optional": True}}]
    assert gpu_ids["dpo-docker"] and gpu_ids["ppo-docker"] and gpu_ids["dpo-docker"] != gpu_ids["ppo-docker"]


def test_no_secret_is_written_into_prefect_yaml():
    """Credentials reach the runs from the environment (a Kubernetes Secret, DVC's config.local), never from
    the deployments, whose parameters and job variables anyone with API access can read."""
    secret = ("password", "secret", "token", "access_key")

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("secretRef", "secretKeyRef"):  # a reference to a Kubernetes Secret, not its value
                    assert not any(word in str(key).lower() for word in secret), f"{where}.{key}"
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{where}[{index}]")
        elif isinstance(node, str):
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", node), f"{where}: a URL with a password"

    walk(yaml.safe_load(PREFECT_YAML.read_text()), "prefect.yaml")


# --------------------------------------------------------------------------------------------------
# The real thing: `prefect deploy --all` against a Prefect server
# --------------------------------------------------------------------------------------------------
def test_prefect_deploy_all_creates_every_deployment_on_a_real_server(tmp_path, deployments):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env |= DEPLOY_ENV | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
        prefect = [str(Path(sys.executable).parent / "prefect")]
        commands = [[*prefect, "work-pool", "create", pool, "--type", kind, "--base-job-template",
                     f"deploy/work-pools/{pool}.json"] for pool, kind in POOL_TYPES.items()]
        commands.append([*prefect, "--no-prompt", "deploy", "--all"])
        for command in commands:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

        async def read():
            async with get_client() as client:
                created = {}
                for deployment in await client.read_deployments():
                    flow = await client.read_flow(deployment.flow_id)
                    created[f"{flow.name}/{deployment.name}"] = deployment
                return created, await client.read_automations()

        created, automations = asyncio.run(read())
    assert set(created) == {_full_name(d) for d in deployments}
    for deployment in deployments:
        on_server = created[_full_name(deployment)]
        assert on_server.work_pool_name == deployment["work_pool"]["name"]
        assert on_server.parameters == deployment["parameters"]
        assert on_server.job_variables == deployment["work_pool"]["job_variables"]
        assert on_server.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/project"}}]
    assert sorted(a.enabled for a in automations) == [False, True]
