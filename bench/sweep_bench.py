"""DPO sweep benchmark (`make bench-sweep`): a 3-value beta sweep with the shared reference log-probs
against three independent DPO runs (each with its reference forward pass in every step), on the same
SFT model and pairs, measured in this one run.

Setup (not timed): base, prepare, sft and label of the embedded task in a scratch directory, with the
default params except fewer prompts, so the sweep takes minutes. Then, timed:
- shared: the ``dpo_reference`` stage once, then ``dpo`` at each beta (``dpo.shared_reference: true``);
- independent: ``dpo`` at each beta with ``dpo.shared_reference: false`` (TRL's reference pass per step).
Both run through ``stages.runner.run_stage`` exactly as the flows run them (without MLflow).

Usage: python bench/sweep_bench.py [--betas 0.05 0.1 0.5] [--mixed-precision no]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()

    from stages.config import validate
    from stages.models import resolve_device, setup_runtime
    from stages.runner import STAGES, pipeline_order, run_stage

    scratch = Path(tempfile.mkdtemp(prefix="sweep-bench-"))

    def config(**dpo):
        return validate({
            "run": {"output_dir": str(scratch / "outputs"), "dvc": False, "mixed_precision": args.mixed_precision},
            "data": {"prepared_dir": str(scratch / "prepared"), "quarantine_dir": str(scratch / "quarantine")},
            "sft": {"max_prompts": 32},
            "label": {"max_prompts": 64},
            "dpo": dpo,
        })

    base = config()
    setup_runtime(base.run)
    device = resolve_device(base.run)
    results: dict = {}

    def run(stage: str, cfg) -> float:
        started = time.perf_counter()
        inputs = {name: results[name] for name in STAGES[stage].inputs(cfg)}
        results[stage] = run_stage(stage, cfg, inputs, ROOT, track=False, device=device)
        return time.perf_counter() - started

    for stage in pipeline_order(base):
        if stage in ("dpo_reference", "dpo"):
            break
        run(stage, base)

    shared = {"dpo_reference": run("dpo_reference", base)}
    for beta in args.betas:
        shared[f"dpo beta={beta}"] = run("dpo", config(beta=beta))
    independent = {f"dpo beta={beta}": run("dpo", config(beta=beta, shared_reference=False)) for beta in args.betas}

    report = {
        "pairs": results["label"].metrics.get("pairs_train"),
        "shared_seconds": shared, "independent_seconds": independent,
        "shared_total": sum(shared.values()), "independent_total": sum(independent.values()),
    }
    report["ratio"] = report["shared_total"] / report["independent_total"]
    out = ROOT / "bench-results" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{len(args.betas)}-value beta sweep: shared reference {report['shared_total']:.1f} s "
          f"(reference {shared['dpo_reference']:.1f} s) vs independent runs {report['independent_total']:.1f} s "
          f"-> ratio {report['ratio']:.2f} (target <= 0.85)")


if __name__ == "__main__":
    main()
