"""Pipeline benchmark (`make bench`): every figure below is measured in this one run.

1. Peak fp32 matmul throughput of this machine (a large square matmul loop), the MFU denominator.
2. A full `alignflow run` of the default params into a fresh output directory: wall time, peak RSS
   of the process tree, and each stage's wall time, training tokens/s and model-FLOPs utilisation.
3. The same run again with nothing changed: wall time as a share of the first.
4. Pipeline overhead on training stages: the stage run through the flow (Prefect task, MLflow child
   run, atomic output, model registration) against the same stage function called bare on the same
   inputs.

Usage: python bench/pipeline_bench.py [--overhead-stages sft dpo] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_peak_gflops(size: int = 2048, seconds: float = 5.0, dtype: str = "float32") -> float:
    """GFLOP/s of a square ``dtype`` matmul loop on the CPU: the machine's rate, printed beside wall times."""
    import torch

    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    torch.mm(a, b)  # warm-up
    done, started = 0, time.perf_counter()
    while not done or time.perf_counter() - started < seconds:  # at least one: a CPU without native bf16
        torch.mm(a, b)                                           # takes longer than `seconds` for one
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def timed_pipeline(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of `alignflow run ARGS` in a child process."""
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "alignflow"), "run", *args], cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 2**20


def stage_overhead(stage: str, config, results: dict, scratch: Path) -> dict[str, float]:
    """Seconds of `stage` bare (stage function, no tracking) and through a one-task Prefect flow."""
    from prefect import flow

    from flows.pipeline import stage_task
    from stages.config import validate
    from stages.models import resolve_device
    from stages.runner import STAGES, StageContext, stage_key

    inputs = {name: results[name] for name in STAGES[stage].inputs(config)}

    bare_dir = scratch / f"bare-{stage}"
    bare_dir.mkdir(parents=True)
    ctx = StageContext(stage, config, inputs, bare_dir, ROOT, resolve_device(config.run), tracker=None)
    started = time.perf_counter()
    STAGES[stage].function()(ctx)
    bare = time.perf_counter() - started

    raw = config.model_dump(mode="json")
    raw["run"]["output_dir"] = str(scratch / f"flow-{stage}")  # a new location: the stage really runs
    flow_config = validate(raw)

    @flow(name=f"bench-{stage}")
    def one_stage():
        key = stage_key(stage, flow_config, inputs)
        return stage_task.with_options(result_storage=scratch / ".prefect")(
            stage=stage, key=key, config=flow_config, inputs=inputs, root=str(ROOT), parent_run_id=None
        )

    started = time.perf_counter()
    one_stage()
    piped = time.perf_counter() - started
    return {"bare_seconds": bare, "pipeline_seconds": piped, "overhead": piped / bare - 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--overhead-stages", nargs="*", default=["sft", "dpo"])
    args = parser.parse_args()

    from stages.config import load_config
    from stages.runner import StageResult

    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = ROOT / "bench-results" / stamp
    bench_dir.mkdir(parents=True)
    overrides = [f"run.output_dir={bench_dir / 'outputs'}",
                 f"run.tracking_uri=sqlite:///{bench_dir / 'mlflow.db'}", "run.dvc_push=false"]
    set_args = [arg for o in overrides for arg in ("--set", o)]

    peak = matmul_peak_gflops()
    first_wall, first_rss = timed_pipeline(["--params", args.params, *set_args])
    second_wall, _ = timed_pipeline(["--params", args.params, *set_args])

    config = load_config(ROOT / args.params, overrides)
    results = {p.stem: StageResult(**json.loads(p.read_text()))
               for p in (bench_dir / "outputs" / "results").glob("*.json")}
    stages = {}
    for name, result in results.items():
        m = result.metrics
        row = {"seconds": m.get("stage_seconds")}
        if "train_tokens_per_second" in m:
            row["train_tokens_per_second"] = m["train_tokens_per_second"]
            row["mfu"] = m["train_model_flops_per_second"] / (peak * 1e9)
        stages[name] = row

    scratch = Path(tempfile.mkdtemp(prefix="overhead-", dir=bench_dir))
    overhead = {stage: stage_overhead(stage, config, results, scratch) for stage in args.overhead_stages}
    shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "matmul_fp32_gflops": peak,
        "first_run_seconds": first_wall,
        "first_run_peak_rss_gib": first_rss,
        "second_run_seconds": second_wall,
        "second_over_first": second_wall / first_wall,
        "stages": stages,
        "overhead": overhead,
    }
    (bench_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\nmatmul peak {peak:.0f} GFLOP/s | first run {first_wall / 60:.1f} min, peak RSS {first_rss:.2f} GiB"
          f" | second run {second_wall:.1f} s = {100 * second_wall / first_wall:.1f}% of the first")
    for name, row in stages.items():
        extra = (f", {row['train_tokens_per_second']:.0f} train tok/s, MFU {100 * row['mfu']:.1f}%"
                 if "mfu" in row else "")
        print(f"  {name:9s} {row['seconds']:7.1f} s{extra}")
    for stage, o in overhead.items():
        print(f"  overhead {stage}: bare {o['bare_seconds']:.1f} s, pipeline {o['pipeline_seconds']:.1f} s "
              f"-> {100 * o['overhead']:+.1f}%")


if __name__ == "__main__":
    main()
