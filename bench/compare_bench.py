"""Compare benchmark (`make bench-compare`): the default `make run` and then the default `alignflow compare`
on its outputs, timed in this one run, beside this machine's fp32 and bf16 matmul rates.

Targets (issue 13, 2-core machine): `make run` <= 15 min; the default compare after make run's outputs
exist <= 30 min and <= 8 GiB. Printed: the two wall times and peak RSS, the matmul rates measured just
before, each policy's seconds and gold-judge calls from the report's verdict.json, the reward model's and
the judge's held-out accuracy, and the verdict with its intervals.

Usage: python bench/compare_bench.py [--params params.yaml] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline_bench import matmul_peak_gflops  # noqa: E402


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) of the largest child so far, and stdout of ``alignflow COMMAND``."""
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "alignflow"), *command], cwd=ROOT, check=True,
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = ROOT / "bench-results" / f"compare-{stamp}"
    bench_dir.mkdir(parents=True)
    overrides = [f"run.output_dir={bench_dir / 'outputs'}", f"run.tracking_uri=sqlite:///{bench_dir / 'mlflow.db'}",
                 "run.dvc_push=false", f"compare.report_dir={bench_dir / 'reports'}", *args.overrides]
    set_args = ["--params", args.params, *(arg for o in overrides for arg in ("--set", o))]

    rates = {"fp32": matmul_peak_gflops(), "bf16": matmul_peak_gflops(dtype="bfloat16")}
    run_wall, run_rss, _ = timed(["run", *set_args])
    compare_wall, compare_rss, _ = timed(["compare", *set_args])
    verdict_file = max((bench_dir / "reports").glob("*/verdict.json"), key=lambda p: p.stat().st_mtime)
    verdict = json.loads(verdict_file.read_text())
    results = {p.stem: json.loads(p.read_text()) for p in (bench_dir / "outputs" / "results").glob("*.json")}
    reward = results.get("reward", {}).get("metrics", {})

    report = {
        "matmul_gflops": rates, "run_seconds": run_wall, "compare_seconds": compare_wall,
        "peak_rss_gib": max(run_rss, compare_rss), "reward_eval_pair_accuracy": reward.get("eval_pair_accuracy"),
        "reward_eval_pairs": reward.get("eval_pairs"), "verdict": verdict, "report": str(verdict_file.parent),
    }
    (bench_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"matmul fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    print(f"make run {run_wall / 60:.1f} min | compare {compare_wall / 60:.1f} min | peak RSS "
          f"{report['peak_rss_gib']:.2f} GiB")
    print(f"reward model: held-out pair accuracy {reward.get('eval_pair_accuracy')} on "
          f"{reward.get('eval_pairs')} pairs")
    print(f"judge: {verdict['judge']} (independent: {verdict['judge_independent']})")
    for p in verdict["policies"]:
        seconds = "–" if p["seconds"] is None else f"{p['seconds']:.0f} s"
        print(f"  {p['name']:22s} {p['judge_score_mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]  "
              f"KL {p['kl_to_sft']:.3f}  vs SFT {p['vs_sft']['difference']:+.3f} "
              f"[{p['vs_sft']['ci95'][0]:+.3f}, {p['vs_sft']['ci95'][1]:+.3f}]  gold calls {p['gold_calls']}  "
              f"{seconds}")
    print(f"verdict: {verdict['verdict']}")
    print(f"report: {report['report']}")


if __name__ == "__main__":
    main()
