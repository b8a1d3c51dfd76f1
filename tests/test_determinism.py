"""Same params, data and seed on the same machine: the same metrics on a re-run with caching off (two
fresh output directories), every stage of the pipeline, PPO included."""

from __future__ import annotations

import math

from stages.config import validate
from stages.runner import STAGES, pipeline_order, run_stage
from tests.conftest import make_project, tiny_params

# wall-clock figures differ between runs by nature; everything else must not
TIMING = ("seconds", "runtime", "per_second", "tokens_per_second", "flops", "mfu", "time/")


def _metrics(config, root) -> dict[str, float]:
    results: dict = {}
    for stage in pipeline_order(config):
        results[stage] = run_stage(stage, config, {i: results[i] for i in STAGES[stage].inputs(config)}, root,
                                   track=False)
    return {f"{stage}/{name}": value for stage, result in results.items() for name, value in result.metrics.items()
            if not any(part in name for part in TIMING)}


def test_a_rerun_without_cache_gives_the_same_metrics(tmp_path, tiny_model_dir):
    params = lambda out: tiny_params(tiny_model_dir, tmp_path, run={"dvc": False, "method": "both",  # noqa: E731
                                                                    "output_dir": out})
    root = make_project(tmp_path / "p", params("first"))
    first = _metrics(validate(params("first")), root)
    second = _metrics(validate(params("second")), root)
    assert set(first) == set(second) and len(first) > 40
    differences = {name: abs(first[name] - second[name]) for name in first
                   if not (math.isnan(first[name]) and math.isnan(second[name]))}
    largest = max(differences, key=differences.get)
    print(f"largest difference: {largest} {differences[largest]:.3g} over {len(differences)} metrics")
    assert differences[largest] <= 1e-6, (largest, first[largest], second[largest])
