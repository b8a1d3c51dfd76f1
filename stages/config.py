"""params.yaml -> typed, validated, frozen configuration.

Every section of ``params.yaml`` is one pydantic model below. Models are frozen and refuse unknown
keys, so a typo such as ``dpo.bta`` fails at load time with a message that names the key, before
any model is loaded. CLI/UI overrides (``--set dpo.beta=0.2``) go through the same validation.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
def _precision_no(value: object) -> object:
    """YAML (and ``--set run.mixed_precision=no``) reads an unquoted ``no`` as false: it means "no"."""
    return "no" if value is False else value


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
    # Mixed precision for training and rollouts: weights and optimiser stay float32, matmuls run in
    # bf16/fp16 under torch.autocast (CPUs with AVX512-BF16/AMX and GPUs run them several times faster).
    # auto: bf16 where the device computes it natively (see stages.models.resolve_precision), else no.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    _unquoted_no = field_validator("mixed_precision", mode="before")(lambda value: _precision_no(value))


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
    eval_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    # share of the preference rows kept apart to train the held-out judge (evaluate.judge: held_out_rm), which
    # no policy and no training reward model sees; 0 of them are carved out for any other judge
    judge_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_rows: int | None = Field(default=None, ge=1)
    prepared_dir: str = "data/prepared"
    quarantine_dir: str = "data/quarantine"
    prompt_template: str = "Continue this movie review in one or two sentences: {text}"
    # SFT's own source, prepared by the prepare_sft stage: SFT then does not depend on data.source, so new
    # preference data (alignflow retrain) leaves the SFT model cached. None: SFT uses data.source.
    sft_source: str | None = None


class GenerationConfig(Section):
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.8, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=64, ge=1)


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
    save_steps: int = Field(default=10, ge=0)  # optimiser steps between checkpoints (0: none)
    seed: int | None = None  # this training run's seed (null: run.seed); compare.seeds sets it per run


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
    pairing: Literal["rank", "all"] = "rank"  # rank: best-worst and 2nd-3rd | all: every two completions
    min_gap: float = Field(default=0.1, ge=0.0)
    generation: GenerationConfig = GenerationConfig()


class RewardConfig(TrainConfig):
    learning_rate: float = Field(default=1e-4, gt=0.0)
    # the scalar head starts random while the backbone is pretrained: its own, higher rate (null: learning_rate)
    head_learning_rate: float | None = Field(default=None, gt=0.0)
    # pairs from label's scored samples (tasks with a gold judge): rank | all; null: label's pairs, as DPO gets them
    pairing: Literal["rank", "all"] | None = None


class DPOConfig(TrainConfig):
    beta: float = Field(default=0.1, gt=0.0)
    loss_type: Literal[
        # TRL 1.16's DPOTrainer loss types (see its DPOConfig.loss_type)
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    learning_rate: float = Field(default=2e-4, gt=0.0)
    shared_reference: bool = True


class PPOConfig(Section):
    """RLHF with PPO (Ziegler et al. 2019; Huang et al. 2024 "The N+ implementation details")."""

    reward_source: Literal["reward_model", "gold"] = "reward_model"
    seed: int | None = None  # this training run's seed (null: run.seed); compare.seeds sets it per run
    updates: int = Field(default=10, ge=1)
    rollout_batch_size: int = Field(default=32, ge=1)
    mini_batch_size: int = Field(default=8, ge=1)
    ppo_epochs: int = Field(default=2, ge=1)
    max_prompts: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0.0)  # LoRA; full fine-tuning wants ~1e-5
    value_learning_rate: float = Field(default=1e-4, gt=0.0)
    kl_coef: float = Field(default=0.05, ge=0.0)
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = "k1"
    adaptive_kl: bool = False
    # adaptive controller: beta moves by at most 0.2 * rollout_batch_size / kl_horizon per update (4% here);
    # Ziegler et al.'s horizon of 10000 samples suits runs of millions of samples, not of a few hundred
    kl_target: float = Field(default=1.0, gt=0.0)
    kl_horizon: int = Field(default=160, ge=1)
    gamma: float = Field(default=1.0, gt=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    clip_range: float = Field(default=0.2, gt=0.0)
    clip_range_value: float = Field(default=0.2, gt=0.0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    # scores standardised by their mean and std over SFT samples drawn before training (Huang et al. 2024):
    # the critic then starts on the reward's scale, and kl_coef means the same for every reward source
    reward_normalization: Literal["sft", "none"] = "sft"
    normalization_samples: int = Field(default=64, ge=2)
    ref_ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    checkpoint_every: int = Field(default=5, ge=1)
    # recompute the policy's and critic's activations in backward (less memory, ~30% slower optimisation)
    gradient_checkpointing: bool = False
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _minibatches_divide(self) -> PPOConfig:
        if self.generation.top_p < 1.0:
            raise ValueError(
                f"ppo.generation.top_p is {self.generation.top_p}: PPO's ratio is taken over the full "
                "temperature-scaled distribution and ignores the nucleus, so its rollouts must sample from all "
                "of it; set ppo.generation.top_p to 1.0"
            )
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"ppo.mini_batch_size ({self.mini_batch_size})"
            )
        return self


class SimPOConfig(TrainConfig):
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-likelihood margin (TRL's CPOTrainer)."""

    beta: float = Field(default=2.0, gt=0.0)
    simpo_gamma: float = Field(default=0.5, ge=0.0)  # TRL CPOConfig's name for the target margin gamma
    learning_rate: float = Field(default=2e-4, gt=0.0)


class ORPOConfig(TrainConfig):
    """ORPO (Hong et al. 2024): SFT loss plus beta (the paper's lambda) times an odds-ratio loss."""

    beta: float = Field(default=0.1, gt=0.0)
    learning_rate: float = Field(default=2e-4, gt=0.0)


class OnlineRLConfig(TrainConfig):
    """RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024): online RL with groups of samples per prompt."""

    reward_source: Literal["reward_model", "gold"] = "reward_model"
    num_generations: int = Field(default=4, ge=2)
    beta: float = Field(default=0.05, ge=0.0)
    max_prompts: int | None = Field(default=64, ge=1)
    max_completion_length: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.8, gt=0.0)
    learning_rate: float = Field(default=1e-4, gt=0.0)
    max_steps: int = 8

    @model_validator(mode="after")
    def _groups_fit(self) -> OnlineRLConfig:
        completions = self.batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps ({completions} completions per optimiser step) must "
                f"be a multiple of num_generations ({self.num_generations}), so that each step holds whole groups"
            )
        if self.max_completion_length >= self.max_length:
            raise ValueError(
                f"max_completion_length ({self.max_completion_length}) must be below max_length "
                f"({self.max_length}), which also has to hold the prompt"
            )
        return self


JUDGE_CHOICES = ("auto", "gold", "held_out_rm", "training_rm")


class EvaluateConfig(Section):
    max_prompts: int = Field(default=64, ge=1)
    samples_per_prompt: int = Field(default=4, ge=1)
    num_examples: int = Field(default=20, ge=0)
    # What scores the policies: auto (the task's gold judge, else held_out_rm) | gold | held_out_rm (a reward
    # model trained on data.judge_fraction of the pairs, which no policy sees) | training_rm (the reward
    # model PPO trains against: not independent, marked so everywhere) | a path or hub id of a
    # sequence-classification reward model
    judge: str = Field(default="auto", min_length=1)
    implicit_max_pairs: int = Field(default=128, ge=0)  # held-out pairs for the implicit-reward accuracy (0: off)
    generation: GenerationConfig = GenerationConfig()


DPO_LOSS_TYPES = get_args(DPOConfig.model_fields["loss_type"].annotation)


class CompareConfig(Section):
    """The grid of ``alignflow compare``: every policy trained from the same SFT model and reward model.

    Each entry overrides one key of its method's own section (``dpo.beta``, ``ppo.kl_coef``, ...);
    every other setting comes from that section, so a grid point is exactly ``alignflow run`` with
    ``--set section.key=value``, cached under the same key. Each method is a curve over its settings
    (the DPO paper's Fig. 2); ``seeds`` trains every point once per training seed.
    """

    sweep: str = "default"  # a name for this grid; tagged on every run of it (alignflow.sweep)
    dpo_beta: list[float] = [0.05, 0.1, 0.5]
    dpo_loss_types: list[str] = ["sigmoid"]
    ppo_kl_coef: list[float] = [0.05]  # PPO on the training reward model
    ppo_gold_kl_coef: list[float] = [0.02, 0.05, 0.2]  # PPO on the gold judge ("PPO-GT", an oracle reference)
    rloo_gold: bool = True  # RLOO on the gold judge: the critic-free oracle reference
    online: list[Literal["rloo", "grpo"]] = []
    reference_free: list[Literal["simpo", "orpo"]] = []
    seeds: list[int] = []  # training seeds of every grid point (each sets <section>.seed); []: the section's own
    # PPO-GT's updates and RLOO-GT's steps set so that they call the gold judge as often as labelling the
    # pairs did (what DPO, the reward model and PPO on it were trained from)
    equal_gold_budget: bool = True
    report_dir: str = "reports"
    max_examples: int = Field(default=8, ge=0)

    @model_validator(mode="after")
    def _valid_grid(self) -> CompareConfig:
        unknown = sorted(set(self.dpo_loss_types) - set(DPO_LOSS_TYPES))
        if unknown:
            raise ValueError(f"compare.dpo_loss_types: unknown {unknown}; TRL's DPO losses are {list(DPO_LOSS_TYPES)}")
        for name in ("dpo_beta", "ppo_kl_coef", "ppo_gold_kl_coef", "seeds"):
            values = getattr(self, name)
            if any(value < 0 for value in values) or len(set(values)) != len(values):
                raise ValueError(f"compare.{name} must hold distinct values >= 0, got {values}")
        if self.dpo_beta and not self.dpo_loss_types:
            raise ValueError("compare.dpo_beta is set but compare.dpo_loss_types is empty")
        return self


ENV_VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


class ServeConfig(Section):
    """``alignflow serve``: the Prefect server and UI, the MLflow UI, and the served deployments.

    Secrets never live in params: the Prefect database URL (PostgreSQL, with its password) is read from
    the environment variable that ``prefect_database_env`` names; unset, Prefect uses SQLite under
    ``log_dir``.
    """

    host: str = "127.0.0.1"
    prefect_port: int = Field(default=4200, ge=1, le=65535)
    mlflow_port: int = Field(default=5000, ge=1, le=65535)
    mlflow: bool = True
    gpu_slots: int = Field(default=1, ge=1)
    prefect_database_env: str = Field(default="PREFECT_API_DATABASE_CONNECTION_URL", pattern=f"^{ENV_VAR_NAME}$")
    log_dir: str = ".serve"
    startup_timeout: float = Field(default=180.0, gt=0.0)
    stop_timeout: float = Field(default=20.0, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _no_secret_in_params(cls, data: Any) -> Any:
        # A database URL pasted here may hold a password: fail on it without echoing it into logs.
        value = data.get("prefect_database_env") if isinstance(data, dict) else None
        if isinstance(value, str) and not re.fullmatch(ENV_VAR_NAME, value):
            data = {**data, "prefect_database_env": "<not shown: must be the NAME of an environment variable "
                                                    "that holds the database URL>"}
        return data


class RetrainConfig(Section):
    """``alignflow retrain``: ingest new preference files, retrain, and gate the new policy (champion/challenger)."""

    incoming: str = "data/incoming"  # a directory under the project root or any fsspec URL
    dataset: str = "data/preferences/preferences.jsonl"
    git_commit: bool = False
    gate_metric: Literal["win_rate_vs_champion", "judge_score_mean"] = "win_rate_vs_champion"
    gate_margin: float = Field(default=0.02, ge=0.0)
    cron: str = "0 3 * * *"

    @model_validator(mode="after")
    def _checked(self) -> RetrainConfig:
        if "://" in self.dataset or Path(self.dataset).is_absolute() or ".." in Path(self.dataset).parts:
            raise ValueError(f"retrain.dataset must be a path inside the project (DVC tracks it), got {self.dataset!r}")
        if self.gate_metric == "win_rate_vs_champion" and self.gate_margin >= 0.5:
            raise ValueError(f"retrain.gate_margin must be below 0.5 for a win rate, got {self.gate_margin}")
        if len(self.cron.split()) != 5:
            raise ValueError(f"retrain.cron must be a 5-field cron expression such as '0 3 * * *', got {self.cron!r}")
        return self


class LaunchConfig(Section):
    """How training stages run: in the flow's process, or under ``accelerate launch`` on several processes.

    With ``num_processes`` > 1 the training stages (sft, reward, dpo, ppo, simpo, orpo, rloo, grpo) run
    data-parallel (DDP by default; FSDP or DeepSpeed with ``config_file``, see ``configs/accelerate/``).
    Batch sizes in params stay global: each process takes ``batch_size / num_processes`` rows per step,
    so the run optimises what the single-process run does. Rank 0 alone logs to MLflow and writes outputs.
    """

    num_processes: int = Field(default=1, ge=1)
    # accelerate's --mixed_precision; null: run.mixed_precision (the stages autocast by that one)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    _unquoted_no = field_validator("mixed_precision", mode="before")(lambda value: _precision_no(value))
    config_file: str | None = None  # an accelerate config file (relative to the project root), e.g. FSDP
    main_process_port: int | None = Field(default=None, ge=1, le=65535)  # null: a free port


class Config(Section):
    run: RunConfig = RunConfig()
    launch: LaunchConfig = LaunchConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    label: LabelConfig = LabelConfig()
    reward: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    rloo: OnlineRLConfig = OnlineRLConfig()
    grpo: OnlineRLConfig = OnlineRLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    retrain: RetrainConfig = RetrainConfig()
    compare: CompareConfig = CompareConfig()
    serve: ServeConfig = ServeConfig()


    @model_validator(mode="after")
    def _launch_fits(self) -> Config:
        processes = self.launch.num_processes
        if self.launch.mixed_precision not in (None, self.run.mixed_precision):
            raise ValueError(f"launch.mixed_precision {self.launch.mixed_precision!r} differs from "
                             f"run.mixed_precision {self.run.mixed_precision!r}, which the stages autocast by: "
                             "set run.mixed_precision (launch.mixed_precision may then stay null)")
        if processes > 1:
            for name in ("sft", "reward", "dpo", "simpo", "orpo", "rloo", "grpo"):
                batch = getattr(self, name).batch_size
                if batch % processes:
                    raise ValueError(f"{name}.batch_size {batch} is the global batch: it must divide evenly over "
                                     f"launch.num_processes {processes}")
            if self.ppo.mini_batch_size < processes:
                raise ValueError(f"ppo.mini_batch_size {self.ppo.mini_batch_size} is smaller than "
                                 f"launch.num_processes {processes}: every process needs a row of each mini-batch")
        return self


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    # The params sections each stage's cache key covers (besides its inputs' content keys).
    "base": ("model",),
    "prepare": ("data", "evaluate.judge"),  # the judge decides whether a judge split is carved out
    # data.sft_source, prepared as data.source is but in any row format and without max_rows
    "prepare_sft": ("data.sft_source", "data.split", "data.eval_fraction", "data.quarantine_dir"),
    "sft": ("model", "sft"),
    "label": ("label", "data", "evaluate.judge"),
    "reward": ("model", "reward", "label.min_gap"),  # min_gap: reward.pairing pairs label's samples with it
    "dpo": ("model", "dpo"),
    "ppo": ("model", "ppo"),
    "simpo": ("model", "simpo"),
    "orpo": ("model", "orpo"),
    "rloo": ("model", "rloo"),
    "grpo": ("model", "grpo"),
    "evaluate": ("evaluate", "data"),
    # One policy (or the SFT model) scored on the held-out prompts, as evaluate scores each.
    "score": ("evaluate", "data"),
    # the held-out judge: a reward model (the reward section's recipe) on the judge split of the pairs
    "judge": ("model", "reward", "label.min_gap"),
    # The SFT model's log-probs of the DPO pairs: they depend on how pairs are cut, not on beta or the
    # loss, so every DPO run of a sweep shares them. "section.key" entries name single keys.
    "dpo_reference": ("model", "dpo.max_length"),
}


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Secrets: never in params, never echoed
# --------------------------------------------------------------------------------------------------
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<name>[\w.-]*(?:token(?!s|iz)|password|passwd|secret|api[_-]?key|access[_-]?key|credentials?)[\w.-]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^\s&'\",}]+)"
)
SECRETS_HELP = ("secrets come from environment variables, never from params: MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for MLflow, HF_TOKEN for the hub, "
                "`dvc remote modify --local` or the cloud SDK's variables for DVC")


def redact(text: str) -> str:
    """``text`` with URL credentials (``scheme://user:pass@``) and ``token=...``-style values hidden."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}<credentials hidden>@", text)
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}<hidden>", text)


def _credential_keys(raw: Any, path: str = "") -> list[str]:
    """Dotted keys of ``raw`` whose string value holds credentials (redact would change it)."""
    if isinstance(raw, dict):
        return [key for name, value in raw.items() for key in _credential_keys(value, f"{path}.{name}".lstrip("."))]
    if isinstance(raw, list):
        return [key for i, value in enumerate(raw) for key in _credential_keys(value, f"{path}[{i}]")]
    return [path] if isinstance(raw, str) and redact(raw) != raw else []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"dpo.beta=0.2"`` -> (["dpo", "beta"], 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {redact(text)!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(f"override {redact(text)!r}: key must name a section and a key, e.g. dpo.beta")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {redact(text)!r}: {part!r} is not a section")
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
    return redact("\n".join(lines))


def validate(raw: dict[str, Any], source: str = "<params>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    if secrets := _credential_keys(raw):
        raise ConfigError(f"{redact(source)}: {', '.join(secrets)} hold(s) credentials (not shown here); "
                          f"remove them: {SECRETS_HELP}")
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
    source = str(path) + (f" with overrides {[redact(o) for o in overrides]}" if overrides else "")
    return validate(apply_overrides(raw, overrides or []), source)


def stage_params(config: Config, stage: str) -> dict[str, Any]:
    """The params sections a stage depends on, as plain data (logged to MLflow, hashed in keys)."""
    params: dict[str, Any] = {}
    for name in STAGE_SECTIONS[stage]:
        section, _, key = name.partition(".")
        value = getattr(config, section)
        params[name] = getattr(value, key) if key else value.model_dump(mode="json")
    return params
