"""DPO with the shared, precomputed reference log-probs trains exactly like DPO with a reference pass in
every step, and a beta change reuses the reference stage's output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stages.config import validate
from stages.runner import STAGES, pipeline_order, run_stage, stage_key
from tests.conftest import make_project, tiny_params


def _run_to(stage: str, config, root):
    results = {}
    for name in pipeline_order(config):
        results[name] = run_stage(name, config, {i: results[i] for i in STAGES[name].inputs(config)}, root,
                                  track=False)
        if name == stage:
            return results


def test_shared_reference_trains_like_an_inline_reference(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir, tmp_path, run={"dvc": False})
    root = make_project(tmp_path / "p", params)
    shared = validate(params)
    inline = validate(tiny_params(tiny_model_dir, tmp_path, run={"dvc": False}, dpo={"shared_reference": False}))

    with_shared = _run_to("dpo", shared, root)
    assert "dpo_reference" in with_shared and "dpo_reference" not in STAGES["dpo"].inputs(inline)
    with_inline = _run_to("dpo", inline, root)
    assert with_inline["sft"].output_dir == with_shared["sft"].output_dir  # same SFT model and pairs

    a, b = with_shared["dpo"], with_inline["dpo"]
    assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], abs=1e-4)
    weights_a = load_file(a.model_dir / "model.safetensors")
    weights_b = load_file(b.model_dir / "model.safetensors")
    for name, weight in weights_a.items():
        torch.testing.assert_close(weight, weights_b[name], atol=1e-4, rtol=1e-4)

    # another beta: a new DPO key, the same reference output
    beta = validate(tiny_params(tiny_model_dir, tmp_path, run={"dvc": False}, dpo={"beta": 0.7}))
    inputs = {i: with_shared[i] for i in STAGES["dpo_reference"].inputs(beta)}
    assert stage_key("dpo_reference", beta, inputs) == with_shared["dpo_reference"].key
