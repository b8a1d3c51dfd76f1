"""``alignflow``: the command line. ``run`` runs the pipeline flow; ``compare`` the compare flow (the
grid of methods in ``params.compare``, one report); ``serve`` starts the Prefect and MLflow UIs and serves
the flows as deployments; ``stage NAME`` runs one stage alone on the outputs of the stages before it (this
is what ``dvc.yaml``'s stages call). ``retrain`` ingests new preference files and retrains behind the
promotion gate; ``ingest FILE...`` drops files for it; ``promote VERSION`` and ``rollback`` move the
champion by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stages.config import ConfigError, load_config


def _common(parser: argparse.ArgumentParser, params: str = "params.yaml") -> None:
    parser.add_argument("--params", default=params, help=f"params file (default: {params})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value, validated like the file (repeatable)")
    parser.add_argument("--root", default=".", help="project root holding data/ and dvc.yaml (default: .)")


def _run(args: argparse.Namespace) -> int:
    from flows.pipeline import alignment_pipeline

    root = Path(args.root).resolve()
    load_config(root / args.params, args.overrides)  # fail on bad params before Prefect starts
    summary = alignment_pipeline(params=args.params, overrides=args.overrides, root=str(root))
    print(json.dumps(summary["metrics"], indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from flows.compare import check_grid, compare

    root = Path(args.root).resolve()
    check_grid(load_config(root / args.params, args.overrides))  # fail on bad params before Prefect starts
    summary = compare(params=args.params, overrides=args.overrides, root=str(root))
    for row in summary["policies"]:
        print("  ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in row.items() if key != "run_id"))
    print(f"report: {summary['report']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeError, serve

    root = Path(args.root).resolve()
    load_config(root / args.params, args.overrides)  # fail on bad params before any server starts
    try:
        return serve(params=args.params, overrides=args.overrides, root=str(root))
    except ServeError as error:
        print(f"alignflow serve: {error}", file=sys.stderr)
        return 1


def _retrain(args: argparse.Namespace) -> int:
    from flows.retrain import retrain

    root = Path(args.root).resolve()
    load_config(root / args.params, args.overrides)  # fail on bad params before Prefect starts
    summary = retrain(params=args.params, overrides=args.overrides, root=str(root))
    print(json.dumps({key: summary.get(key) for key in ("status", "champion", "cached", "decisions")}
                     | {"ingest": {key: summary["ingest"][key] for key in ("rows_in", "kept", "refused", "duplicates",
                                                                          "new", "dataset_rows", "dataset_md5")}},
                     indent=2, default=str))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from flows.retrain import announce_arrivals
    from stages.ingest import IngestError, drop_files

    root = Path(args.root).resolve()
    config = load_config(root / args.params, args.overrides)
    try:
        names = drop_files(args.files, config, root)
    except IngestError as error:
        print(f"alignflow ingest: {error}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name} -> {config.retrain.incoming}/{name}")
    sent = announce_arrivals(names, config.retrain.incoming)
    print(f"event alignflow.preferences.arrived sent for {len(names)} files" if sent else
          "no Prefect server configured (PREFECT_API_URL): no event sent; the files wait for the next retrain")
    return 0


def _promotion(args: argparse.Namespace) -> int:
    from stages import promotion

    root = Path(args.root).resolve()
    config = load_config(root / args.params, args.overrides)
    try:
        if args.command == "promote":
            decision, run_id = promotion.promote(config, root, args.version, args.reason)
        else:
            decision, run_id = promotion.rollback(config, root, args.reason)
    except promotion.PromotionError as error:
        print(f"alignflow {args.command}: {error}", file=sys.stderr)
        return 1
    print(decision.markdown())
    print(f"recorded as MLflow run {run_id} in experiment {config.run.experiment!r}")
    return 0


def _stage(args: argparse.Namespace) -> int:
    from stages.models import setup_runtime
    from stages.runner import resolve_inputs, run_stage

    root = Path(args.root).resolve()
    config = load_config(root / args.params, args.overrides)
    setup_runtime(config.run)
    result = run_stage(args.name, config, resolve_inputs(args.name, config, root), root,
                       track=not args.no_track)
    print(json.dumps({"stage": result.stage, "output_dir": result.output_dir, "metrics": result.metrics},
                     indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    config = load_config(Path(args.root) / args.params, args.overrides)
    print(f"{args.params}: valid ({len(config.model_dump())} sections)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stages.runner import STAGES

    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the alignment_pipeline flow")
    _common(run)
    run.set_defaults(handler=_run)
    compare = commands.add_parser("compare", help="run the compare flow: the params.compare grid of methods, "
                                                  "one report")
    _common(compare)
    compare.set_defaults(handler=_compare)
    serve = commands.add_parser("serve", help="start the Prefect UI and the MLflow UI and serve the flows as "
                                              "deployments (alignment-pipeline, compare, retrain) until Ctrl-C")
    _common(serve)
    serve.set_defaults(handler=_serve)
    stage = commands.add_parser("stage", help="run one stage on the outputs of the stages before it")
    stage.add_argument("name", choices=sorted(STAGES))
    stage.add_argument("--no-track", action="store_true", help="do not log this stage to MLflow")
    _common(stage)
    stage.set_defaults(handler=_stage)
    validate = commands.add_parser("validate", help="check a params file (and overrides) and exit")
    _common(validate)
    validate.set_defaults(handler=_validate)
    _retrain_commands(commands)
    return parser


def _retrain_commands(commands) -> None:
    """retrain, ingest, promote, rollback: their params default to the retrain profile."""
    retrain_params = "params/retrain.yaml"
    retrain = commands.add_parser("retrain", help="run the retrain flow: ingest new preference files, retrain, "
                                                  "and gate the new policy (champion/challenger)")
    _common(retrain, retrain_params)
    retrain.set_defaults(handler=_retrain)
    ingest = commands.add_parser("ingest", help="copy preference files into retrain.incoming and emit the "
                                                "alignflow.preferences.arrived event")
    ingest.add_argument("files", nargs="+", metavar="FILE", help="preference files (.jsonl/.json/.parquet/.csv)")
    _common(ingest, retrain_params)
    ingest.set_defaults(handler=_ingest)
    promote = commands.add_parser("promote", help="make a registered policy version the champion by hand")
    promote.add_argument("version", help="version of run.registered_model")
    promote.add_argument("--reason", help="why (recorded with the decision)")
    _common(promote, retrain_params)
    promote.set_defaults(handler=_promotion)
    rollback = commands.add_parser("rollback", help="champion back to the previous champion")
    rollback.add_argument("--reason", help="why (recorded with the decision)")
    _common(rollback, retrain_params)
    rollback.set_defaults(handler=_promotion)


# Prefect waits 20 s for its ephemeral server; on a fresh install of a 2-core machine the first start (its
# database migrations, with every module compiled for the first time) took longer and `make run` died with
# "Timed out while attempting to connect to ephemeral Prefect API server". Set before Prefect is imported.
# And the Prefect server's telemetry heartbeat posts to prefect.io: off unless the user turns it on (no network
# beyond the package registry), which also keeps it from racing those first migrations ("database is locked").
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def apply_prefect_defaults(environ=os.environ) -> None:
    """:data:`PREFECT_DEFAULTS` where the environment does not set them already (the user's values win)."""
    for name, value in PREFECT_DEFAULTS.items():
        environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_prefect_defaults()
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"alignflow: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
