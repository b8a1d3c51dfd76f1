"""Config validation: unknown keys, wrong types and impossible values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.config import Config, ConfigError, load_config, parse_override, stage_params
from stages.models import resolve_precision
from stages.runner import STAGES, pipeline_order, stage_key

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("params", ["params.yaml", "params/hh.yaml"])
def test_shipped_params_files_are_valid(params):
    config = load_config(REPO / params)
    assert isinstance(config, Config)


def test_shipped_params_yaml_spells_out_every_default():
    """params.yaml is the documentation of every key: it must list them all, with the defaults."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert written == Config().model_dump(mode="json")


def test_every_key_in_params_yaml_has_a_comment():
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"params.yaml line {number} has no comment: {line!r}"


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'dpo\.bta'"):
        load_config(write(tmp_path, {"dpo": {"bta": 0.1}}))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'dpoo'"):
        load_config(write(tmp_path, {"dpoo": {}}))


def test_wrong_type_is_named_with_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'sft\.batch_size'.*got 'eight'"):
        load_config(write(tmp_path, {"sft": {"batch_size": "eight"}}))


@pytest.mark.parametrize("override, key", [
    ("dpo.beta=-0.1", "dpo.beta"),
    ("label.samples_per_prompt=1", "label.samples_per_prompt"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("run.device=tpu", "run.device"),
    ("dpo.loss_type=nonsense", "dpo.loss_type"),
    ("model.lora.r=0", "model.lora.r"),
])
def test_impossible_values_fail_before_any_model_loads(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "params.yaml", [override])


def test_overrides_are_validated_and_applied():
    config = load_config(REPO / "params.yaml", ["dpo.beta=0.25", "model.lora.enabled=false"])
    assert config.dpo.beta == 0.25 and config.model.lora.enabled is False


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("dpo.beta")
    with pytest.raises(ConfigError, match="name a section and a key"):
        parse_override("beta=1")


def test_sft_dataset_source_needs_a_dataset():
    with pytest.raises(ConfigError, match="sft.dataset must name a dataset"):
        load_config(REPO / "params.yaml", ["sft.source=dataset"])


def test_config_is_frozen():
    config = load_config(REPO / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
        config.dpo.beta = 1.0  # type: ignore[misc]


def test_cache_keys_follow_params_sections():
    """A dpo.beta change changes the dpo key only; stage order follows the data task."""
    base = load_config(REPO / "params.yaml")
    changed = load_config(REPO / "params.yaml", ["dpo.beta=0.3"])
    for stage in ("sft", "label", "reward"):
        assert stage_params(base, stage) == stage_params(changed, stage)
        assert stage_key(stage, base, {}) == stage_key(stage, changed, {})
    assert stage_key("dpo", base, {}) != stage_key("dpo", changed, {})
    assert stage_key("dpo_reference", base, {}) == stage_key("dpo_reference", changed, {})  # shared by a sweep
    bf16 = load_config(REPO / "params.yaml", ["run.mixed_precision=bf16"])
    fp32 = load_config(REPO / "params.yaml", ["run.mixed_precision=no"])
    assert stage_key("sft", fp32, {}) != stage_key("sft", bf16, {})  # other numerics, other output
    assert stage_key("prepare", fp32, {}) == stage_key("prepare", bf16, {})
    # auto is keyed by what it resolves to on this machine: the same numerics share one output
    resolved = {"bf16": bf16, "no": fp32}[resolve_precision(base.run)]
    assert base.run.mixed_precision == "auto" and stage_key("sft", base, {}) == stage_key("sft", resolved, {})
    cut = load_config(REPO / "params.yaml", ["dpo.max_length=64"])
    assert stage_key("dpo_reference", base, {}) != stage_key("dpo_reference", cut, {})
    assert pipeline_order(base) == ["prepare", "base", "sft", "label", "reward", "dpo_reference", "dpo", "evaluate"]
    preference = load_config(REPO / "params/hh.yaml")
    assert "label" not in pipeline_order(preference)
    assert set(pipeline_order(base)) <= set(STAGES)


# --------------------------------------------------------------------------------------------------
# Secrets: from the environment only, never echoed
# --------------------------------------------------------------------------------------------------
SECRET = "s3cr3t-Xq9"


@pytest.mark.parametrize("override", [
    f"run.tracking_uri=https://alice:{SECRET}@mlflow.example.com",
    f"data.source=s3://AKIAEXAMPLE:{SECRET}@bucket/prefs.jsonl",
    f"model.name=https://huggingface.co/x?token={SECRET}",
])
def test_credentials_in_params_are_refused_without_being_echoed(override, capsys):
    from flows.cli import main

    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "params.yaml", [override])
    assert key in str(error.value) and "environment variable" in str(error.value)
    assert SECRET not in str(error.value)

    assert main(["validate", "--set", override]) != 0  # the CLI's message, on either stream
    printed = capsys.readouterr()
    assert key in printed.out + printed.err and SECRET not in printed.out + printed.err


def test_other_errors_do_not_echo_a_secret_given_beside_them():
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "params.yaml", ["dpo.beta=-1", f"run.api_token={SECRET}"])
    assert "dpo.beta" in str(error.value) and SECRET not in str(error.value)


def test_names_that_merely_contain_token_are_not_taken_for_secrets():
    config = load_config(REPO / "params.yaml", ["sft.generation.max_new_tokens=12"])
    assert config.sft.generation.max_new_tokens == 12


def test_secrets_in_the_environment_never_reach_mlflow(tmp_path, tiny_model_dir, monkeypatch):
    """A tracked stage with credentials in the environment: none of its params, tags or artifacts hold them."""
    import mlflow

    from stages.config import validate
    from stages.runner import run_stage
    from tests.conftest import make_project, tiny_params

    for name in ("MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRET)
    root = make_project(tmp_path / "p", tiny_params(tiny_model_dir, tmp_path / "p", run={"dvc": False}))
    config = validate(yaml.safe_load((root / "params.yaml").read_text()))
    result = run_stage("prepare", config, {}, root)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(result.info["mlflow_run_id"])
    recorded = [*run.data.params.items(), *run.data.tags.items()]
    for artifact in client.list_artifacts(run.info.run_id):
        if not artifact.is_dir:
            recorded.append((artifact.path, Path(client.download_artifacts(run.info.run_id, artifact.path,
                                                                          str(tmp_path))).read_text()))
    assert len(recorded) > 10
    assert not [name for name, value in recorded if SECRET in str(value)]


def test_auto_precision_is_bf16_exactly_where_the_device_computes_it_natively(monkeypatch):
    import torch

    from stages import models

    run = load_config(REPO / "params.yaml").run
    assert run.mixed_precision == "auto"
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(models, "native_bf16", lambda device, native=native: native)
        assert models.resolve_precision(run) == expected
        assert models.autocast(run, torch.device("cpu")).fast_dtype == torch.bfloat16
        assert models.autocast(run, torch.device("cpu"))._enabled is native
    monkeypatch.undo()
    for explicit in ("no", "bf16", "fp16"):  # an explicit setting is never second-guessed
        assert models.resolve_precision(load_config(REPO / "params.yaml", [f"run.mixed_precision={explicit}"]).run) \
            == explicit
    # this machine: the probe agrees with what the CPU advertises
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags and not torch.cuda.is_available():
        assert models.native_bf16(torch.device("cpu")) == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
