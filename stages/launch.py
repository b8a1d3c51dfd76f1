"""Training stages on several processes: ``accelerate launch`` runs the stage's own ``run(ctx)`` in each.

The flow's process stays the coordinator. :func:`launch` writes what the stage needs (params, inputs,
staging directory, the stage's MLflow run) to ``<staging>/.launch.json`` and starts

    accelerate launch --num_processes N [--config_file F | --multi_gpu] ... -m stages.launch <spec>

Each process (:func:`main`) rebuilds the :class:`~stages.runner.StageContext`; accelerate's
``PartialState`` sets up the process group (gloo on CPU, NCCL on GPUs). The TRL trainers then run
data-parallel by themselves, and :mod:`stages.ppo` shards its loop. Rank 0 alone logs to the stage's
MLflow run and writes the output, then hands its metrics back in ``<staging>/.launch-output.json``;
the coordinator finishes the stage as for an in-process run (result file, atomic rename, registry).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

SPEC_FILE = ".launch.json"
OUTPUT_FILE = ".launch-output.json"


def launch(ctx) -> object:
    """Run ``ctx``'s stage under ``accelerate launch`` and return the :class:`StageOutput` rank 0 produced."""
    from stages.runner import StageOutput

    launch_cfg = ctx.config.launch
    spec = {
        "stage": ctx.name,
        "config": ctx.config.model_dump(mode="json"),
        "inputs": {name: asdict(result) for name, result in ctx.inputs.items()},
        "out_dir": str(ctx.out_dir),
        "root": str(ctx.root),
        "device": ctx.device.type,
        "run_id": ctx.tracker.run_id if ctx.tracker is not None else None,
    }
    (ctx.out_dir / SPEC_FILE).write_text(json.dumps(spec))
    command = launch_command(ctx.config, ctx.root, ctx.device.type, ctx.out_dir / SPEC_FILE)
    print(f"[alignflow] {ctx.name}: {launch_cfg.num_processes} processes: {' '.join(command[2:])}", flush=True)
    completed = subprocess.run(command, cwd=ctx.root, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{ctx.name}: `accelerate launch` on {launch_cfg.num_processes} processes failed with exit code "
            f"{completed.returncode}; the processes' errors are in the log above. A re-run resumes from the "
            "stage's last checkpoint."
        )
    output = json.loads((ctx.out_dir / OUTPUT_FILE).read_text())
    for name in (SPEC_FILE, OUTPUT_FILE):
        (ctx.out_dir / name).unlink()
    return StageOutput(metrics=output["metrics"], info=output["info"])


def launch_command(config, root: Path, device: str, spec: Path) -> list[str]:
    """The ``accelerate launch`` command line for ``config.launch`` (DDP when no config file is given)."""
    from stages.models import resolve_precision

    launch_cfg = config.launch
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch_cfg.num_processes),
               "--num_machines", "1", "--dynamo_backend", "no",
               "--mixed_precision", launch_cfg.mixed_precision or resolve_precision(config.run),
               "--main_process_port", str(launch_cfg.main_process_port or _free_port())]
    if launch_cfg.config_file:
        path = (root / launch_cfg.config_file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"launch.config_file {launch_cfg.config_file!r}: no such file under {root} "
                                    "(the shipped ones are in configs/accelerate/)")
        command += ["--config_file", str(path)]
    else:
        # DDP; torch.distributed.run starts the processes, which pick gloo when there is no GPU
        command += ["--multi_gpu"]
    if device == "cpu":
        cores = os.cpu_count() or 1
        command += ["--num_cpu_threads_per_process", str(max(1, (config.run.num_threads or cores)
                                                              // launch_cfg.num_processes))]
    return [*command, "-m", "stages.launch", str(spec)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> int:
    """One process of a launched stage."""
    import torch
    from accelerate import PartialState

    from stages.config import Config
    from stages.models import setup_runtime
    from stages.runner import STAGES, StageContext, StageResult
    from stages.tracking import Tracker

    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    state = PartialState(cpu=spec["device"] == "cpu")
    config = Config.model_validate(spec["config"])
    setup_runtime(config.run.model_copy(update={"num_threads": None}))  # accelerate set each process's threads
    root = Path(spec["root"])
    tracker = Tracker.attach(config.run, root, spec["run_id"]) if state.is_main_process and spec["run_id"] else None
    device = torch.device("cpu") if spec["device"] == "cpu" else state.device
    inputs = {name: StageResult(**result) for name, result in spec["inputs"].items()}
    ctx = StageContext(spec["stage"], config, inputs, Path(spec["out_dir"]), root, device, tracker)

    output = STAGES[ctx.name].function()(ctx)

    state.wait_for_everyone()
    if state.is_main_process:
        tmp = spec_path.with_name(OUTPUT_FILE + ".tmp")
        tmp.write_text(json.dumps({"metrics": output.metrics, "info": output.info}))
        os.replace(tmp, spec_path.with_name(OUTPUT_FILE))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
