"""params.yaml -> typed, validated, frozen configuration.

Every section of ``params.yaml`` is one pydantic model below. Models are frozen and refuse unknown
keys, so a typo such as ``dpo.bta`` fails at load time with a message that names the key, before
any model is loaded. CLI/UI overrides (``--set dpo.beta=0.2``) go through the same validation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A params file or override is invalid; the message names the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def digest(self) -> str:
        """Stable hash of this section's resolved values (part of every cache key)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
class RunConfig(Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    method: Literal["dpo", "ppo", "both"] = "dpo"
    output_dir: str = "outputs"
    experiment: str = "alignflow"
    tracking_uri: str = "sqlite:///mlflow.db"
    registered_model: str = "alignflow-policy"
    dvc: bool = True
    dvc_push: bool = True
    num_threads: int | None = Field(default=None, ge=1)


class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str = "~/.cache/alignflow/models"
    lora: LoraConfig = LoraConfig()


class DataConfig(Section):
    task: Literal["sentiment", "preference"] = "sentiment"
    source: str = "builtin:sentiment-openings"
    format: Literal["auto", "standard", "conversational", "hh", "prompt_only", "sft"] = "auto"
    split: str = "train"
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    max_rows: int | None = Field(default=None, ge=1)
    prepared_dir: str = "data/prepared"
    quarantine_dir: str = "data/quarantine"
    prompt_template: str = "Continue this movie review in one or two sentences: {text}"


class GenerationConfig(Section):
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.8, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=32, ge=1)


class TrainConfig(Section):
    learning_rate: float = Field(default=5e-5, gt=0.0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int = -1
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=192, ge=8)
    logging_steps: int = Field(default=5, ge=1)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False


class SFTConfig(TrainConfig):
    source: Literal["self_samples", "chosen", "dataset"] = "self_samples"
    max_prompts: int | None = Field(default=120, ge=1)
    dataset: str | None = None
    samples_per_prompt: int = Field(default=1, ge=1)
    require_eos: bool = True
    learning_rate: float = Field(default=1e-4, gt=0.0)
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _dataset_given(self) -> SFTConfig:
        if self.source == "dataset" and not self.dataset:
            raise ValueError("sft.dataset must name a dataset when sft.source is 'dataset'")
        return self


class LabelConfig(Section):
    max_prompts: int | None = Field(default=120, ge=1)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    samples_per_prompt: int = Field(default=4, ge=2)
    min_gap: float = Field(default=0.1, ge=0.0)
    generation: GenerationConfig = GenerationConfig()


class RewardConfig(TrainConfig):
    learning_rate: float = Field(default=1e-4, gt=0.0)


class DPOConfig(TrainConfig):
    beta: float = Field(default=0.1, gt=0.0)
    loss_type: Literal[
        # TRL 1.16's DPOTrainer loss types (see its DPOConfig.loss_type)
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    learning_rate: float = Field(default=2e-4, gt=0.0)


class PPOConfig(Section):
    """RLHF with PPO (Ziegler et al. 2019; Huang et al. 2024 "The N+ implementation details")."""

    reward_source: Literal["reward_model", "gold"] = "reward_model"
    updates: int = Field(default=10, ge=1)
    rollout_batch_size: int = Field(default=32, ge=1)
    mini_batch_size: int = Field(default=8, ge=1)
    ppo_epochs: int = Field(default=2, ge=1)
    max_prompts: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=3e-5, gt=0.0)
    value_learning_rate: float = Field(default=1e-4, gt=0.0)
    kl_coef: float = Field(default=0.05, ge=0.0)
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = Field(default=6.0, gt=0.0)
    kl_horizon: int = Field(default=10000, ge=1)
    gamma: float = Field(default=1.0, gt=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    clip_range: float = Field(default=0.2, gt=0.0)
    clip_range_value: float = Field(default=0.2, gt=0.0)
    value_coef: float = Field(default=0.1, ge=0.0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = -1.0
    ref_ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    checkpoint_every: int = Field(default=5, ge=1)
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _minibatches_divide(self) -> PPOConfig:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"ppo.mini_batch_size ({self.mini_batch_size})"
            )
        return self


class EvaluateConfig(Section):
    max_prompts: int = Field(default=64, ge=1)
    samples_per_prompt: int = Field(default=2, ge=1)
    num_examples: int = Field(default=20, ge=0)
    generation: GenerationConfig = GenerationConfig()


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    label: LabelConfig = LabelConfig()
    reward: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    # The params sections each stage's cache key covers (besides its inputs' content keys).
    "base": ("model",),
    "prepare": ("data",),
    "sft": ("model", "sft"),
    "label": ("label", "data"),
    "reward": ("model", "reward"),
    "dpo": ("model", "dpo"),
    "ppo": ("model", "ppo"),
    "evaluate": ("evaluate", "data"),
}


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"dpo.beta=0.2"`` -> (["dpo", "beta"], 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(f"override {text!r}: key must name a section and a key, e.g. dpo.beta")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid params"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (check the spelling; see params.yaml for valid keys)")
        else:
            given = item.get("input")
            lines.append(f"  - '{key}': {item['msg']} (got {given!r})")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "<params>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read a params file, apply ``section.key=value`` overrides, and validate the result."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    return validate(apply_overrides(raw, overrides or []), source)


def stage_params(config: Config, stage: str) -> dict[str, Any]:
    """The params sections a stage depends on, as plain data (logged to MLflow, hashed in keys)."""
    return {name: getattr(config, name).model_dump(mode="json") for name in STAGE_SECTIONS[stage]}
