"""PPO benchmark (`make bench-ppo`): every figure below is measured in this one run.

1. Rollout generation throughput: batched, KV-cached sampling of a rollout batch against generating
   the same responses one sequence at a time with the same model (generated tokens per second).
2. Seconds per PPO update of alignflow's PPO stage on the peer's shape (SmolLM2-135M, LoRA r16 on all
   linear layers, rollout batch 32, 48 new tokens, 2 PPO epochs, 4 minibatches, an untrained reward
   model and critic from the base weights), with the wall time split into generation, scoring,
   reference/critic forward passes and optimisation, and the peak RSS of this process; in float32
   (like for like with the peer's default) and with bf16 autocast (``run.mixed_precision: bf16``).
   alignflow's default, ``run.mixed_precision: auto``, is one of the two on any machine (bf16 where the
   device computes it natively): the report names which, and gives the default-vs-default ratio.
3. The same shape on TRL 1.12's PPOTrainer (the last TRL with PPO), in its own virtual
   environment (`.bench/trl112`, created on first use), via ../shared/bench/ppo_baseline_trl112.py:
   once on its own prompts (4 short raw openings, ~8 tokens) and once with that script's prompt line
   swapped for alignflow's chat-rendered prompts (~50 tokens), so both do the same work; float32, and
   on our prompts once more with ``bf16=True`` in its PPOConfig, against our bf16 run.

Usage: python bench/ppo_bench.py [--updates 2] [--skip-peer]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEER_SCRIPT = ROOT.parent / "shared" / "bench" / "ppo_baseline_trl112.py"
PEER_VENV = ROOT / ".bench" / "trl112"
PEER_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "peft==0.21.2", "datasets==5.2.0", "accelerate==1.15.0"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_config(updates: int, mixed_precision: str = "no"):
    from stages.config import validate

    return validate({
        "run": {"device": "cpu", "mixed_precision": mixed_precision},
        "model": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}},
        "ppo": {"updates": updates, "rollout_batch_size": 32, "mini_batch_size": 8, "ppo_epochs": 2,
                "checkpoint_every": 1000,
                "generation": {"max_new_tokens": 48, "temperature": 0.8, "batch_size": 32}},
    })


def generation_throughput(model_dir: str, config) -> dict[str, float]:
    from stages.generation import sample
    from stages.models import load_causal_lm, load_tokenizer, resolve_device
    from stages.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(config.data, Path(tmp), seed=0, root=ROOT)
        prompts = [json.loads(line)["prompt"] for line in (Path(tmp) / "train.jsonl").open()][:32]
    model = load_causal_lm(model_dir, config.model, resolve_device(config.run))
    tokenizer = load_tokenizer(model_dir, config.model)
    generation = config.ppo.generation
    batched = sample(model, tokenizer, prompts, 1, generation, seed=0, desc="batched (32 per call)")
    single = sample(model, tokenizer, prompts, 1, generation.model_copy(update={"batch_size": 1}), seed=0,
                    desc="one sequence at a time")
    return {"batched_tokens_per_second": batched.tokens_per_second,
            "sequential_tokens_per_second": single.tokens_per_second,
            "speedup": batched.tokens_per_second / single.tokens_per_second}


def ours(model_dir: str, config) -> dict[str, float]:
    """alignflow's PPO stage, called bare on the peer's shape."""
    from stages.models import resolve_device
    from stages.prepare import prepare_data
    from stages.runner import STAGES, StageContext, StageResult

    scratch = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    prepare_data(config.data, scratch / "prepare", seed=0, root=ROOT)
    model_link = scratch / "base"
    model_link.mkdir()
    (model_link / "model").symlink_to(model_dir)
    base = StageResult("sft", "bench", str(model_link), "bench", info={"model": "model"})
    inputs = {"sft": base, "reward": base,
              "prepare": StageResult("prepare", "bench", str(scratch / "prepare"), "bench")}
    out_dir = scratch / ".staging-bench-0"
    out_dir.mkdir()
    ctx = StageContext("ppo", config, inputs, out_dir, scratch, resolve_device(config.run), tracker=None)
    started = time.perf_counter()
    metrics = STAGES["ppo"].function()(ctx).metrics
    metrics["stage_seconds"] = time.perf_counter() - started
    metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


PEER_PROMPTS_LINE = 'prompts = [f"{openings[i % len(openings)]}" for i in range(batch * updates)]'


def rendered_prompts(model_dir: str, config, count: int) -> list[str]:
    """alignflow's first ``count`` training prompts as the chat-rendered text its PPO stage samples from."""
    from stages.models import load_tokenizer
    from stages.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(config.data, Path(tmp), seed=0, root=ROOT)
        chats = [json.loads(line)["prompt"] for line in (Path(tmp) / "train.jsonl").open()][:count]
    tokenizer = load_tokenizer(model_dir, config.model)
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    for chat, text in zip(chats, texts, strict=True):  # the peer tokenizes the text: it must get the same ids
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        if tokenizer(text)["input_ids"] != list(ids["input_ids"]):
            raise RuntimeError("re-tokenizing the rendered prompt gives other token ids: an unfair comparison")
    return texts


PEER_CPU_FLAG = "use_cpu=True,"


def peer(model_dir: str, updates: int, prompts: list[str] | None = None, bf16: bool = False) -> dict[str, float]:
    """TRL 1.12's PPOTrainer via the shared peer script: on its own prompts, or (``prompts``) on ours.

    For ours, the script runs unchanged except for its one line that builds the prompt list, which
    then reads ``prompts`` from a JSON file: same model, LoRA, batch, lengths, epochs and minibatches.
    ``bf16`` adds ``bf16=True`` to its PPOConfig (transformers' mixed precision: accelerate autocasts
    the forward passes), the peer's counterpart of ``run.mixed_precision: bf16``.
    """
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        script = PEER_SCRIPT
        if prompts is not None:
            source = PEER_SCRIPT.read_text()
            if source.count(PEER_PROMPTS_LINE) != 1:
                raise RuntimeError(f"{PEER_SCRIPT}: its prompt line changed; update PEER_PROMPTS_LINE")
            (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
            script = Path(tmp) / "peer_on_our_prompts.py"
            source = source.replace(
                PEER_PROMPTS_LINE, "import json; prompts = json.load(open('prompts.json'))[: batch * updates]")
            if bf16:
                if source.count(PEER_CPU_FLAG) != 1:
                    raise RuntimeError(f"{PEER_SCRIPT}: its PPOConfig changed; update PEER_CPU_FLAG")
                source = source.replace(PEER_CPU_FLAG, PEER_CPU_FLAG + " bf16=True,")
            script.write_text(source)
        done = subprocess.run([str(python), str(script), model_dir, str(updates)], cwd=tmp,
                              capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("trl-1.12 PPO"))
    seconds = float(re.search(r"([\d.]+) s/update", line).group(1))
    tokens = float(re.search(r"([\d.]+) generated tok/s", line).group(1))
    return {"seconds_per_update": seconds, "generated_tokens_per_second": tokens, "line": line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()

    from stages.models import resolve_base, resolve_precision

    config = bench_config(args.updates)
    model_dir = resolve_base(config.model)
    default = resolve_precision(bench_config(args.updates, "auto").run)  # what `auto` is on this machine
    default_key = {"no": "alignflow", "bf16": "alignflow_bf16"}[default]
    report: dict = {"default_precision": "float32" if default == "no" else default,
                    "generation": generation_throughput(model_dir, config)}
    report["alignflow"] = ours(model_dir, config)
    report["alignflow_bf16"] = ours(model_dir, bench_config(args.updates, "bf16"))
    if not args.skip_peer:
        report["trl_1_12"] = peer(model_dir, args.updates)
        prompts = rendered_prompts(model_dir, config, 32 * args.updates)
        report["trl_1_12_on_our_prompts"] = peer(model_dir, args.updates, prompts)
        report["trl_1_12_bf16_on_our_prompts"] = peer(model_dir, args.updates, prompts, bf16=True)
        for ours_key in ("alignflow", "alignflow_bf16"):
            seconds = report[ours_key]["time/update_mean"]
            report[f"ratio_{ours_key}_vs_trl_own_prompts"] = seconds / report["trl_1_12"]["seconds_per_update"]
            report[f"ratio_{ours_key}_vs_trl_same_prompts"] = (
                seconds / report["trl_1_12_on_our_prompts"]["seconds_per_update"])
        # like for like in precision too: both bf16 autocast, same prompts
        report["ratio_alignflow_bf16_vs_trl_bf16_same_prompts"] = (
            report["alignflow_bf16"]["time/update_mean"] / report["trl_1_12_bf16_on_our_prompts"]["seconds_per_update"])
        # each at its default precision (TRL's: float32), same prompts
        report["ratio_default_vs_trl_default_same_prompts"] = (
            report[default_key]["time/update_mean"] / report["trl_1_12_on_our_prompts"]["seconds_per_update"])
    out = ROOT / "bench-results" / f"ppo-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    g = report["generation"]
    print(f"\ngeneration: batched {g['batched_tokens_per_second']:.0f} tok/s vs one at a time "
          f"{g['sequential_tokens_per_second']:.0f} tok/s = {g['speedup']:.1f}x")
    for ours_key, label in (("alignflow", "float32"), ("alignflow_bf16", "bf16 autocast")):
        a = report[ours_key]
        print(f"alignflow PPO, {label}: {a['time/update_mean']:.1f} s/update (generation "
              f"{a['time/generation_mean']:.1f}, scoring {a['time/scoring_mean']:.1f}, ref/critic forward "
              f"{a['time/forward_mean']:.1f}, optimisation {a['time/optimisation_mean']:.1f}); peak RSS "
              f"{a['peak_rss_gib']:.2f} GiB (process so far)")
    if "trl_1_12" in report:
        print(f"TRL 1.12 PPO (float32), its own prompts: {report['trl_1_12']['seconds_per_update']:.1f} s/update; "
              f"on alignflow's prompts: {report['trl_1_12_on_our_prompts']['seconds_per_update']:.1f} s/update")
        for ours_key, label in (("alignflow", "float32"), ("alignflow_bf16", "bf16 autocast")):
            print(f"ratio alignflow {label} / TRL: same prompts "
                  f"{report[f'ratio_{ours_key}_vs_trl_same_prompts']:.2f}, TRL's own shorter prompts "
                  f"{report[f'ratio_{ours_key}_vs_trl_own_prompts']:.2f}")
        print(f"TRL 1.12 PPO with bf16=True on alignflow's prompts: "
              f"{report['trl_1_12_bf16_on_our_prompts']['seconds_per_update']:.1f} s/update; ratio alignflow bf16 / "
              f"TRL bf16, same prompts: {report['ratio_alignflow_bf16_vs_trl_bf16_same_prompts']:.2f}")
        print(f"each at its default precision (alignflow run.mixed_precision auto = {report['default_precision']} "
              f"here, TRL float32), same prompts: ratio {report['ratio_default_vs_trl_default_same_prompts']:.2f}")


if __name__ == "__main__":
    main()
