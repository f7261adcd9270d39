"""`recolor sweep`: parsing and printing only (the work is `driver.py`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from pipeline.sweep.ranking import metric_name
from pipeline.tracking.uri import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME


def add_sweep_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train many variants of a preset at once (Ray Tune over Ray Train), ranked in MLflow",
        description="Run one training a trial: every combination of the --grid values (or --random N of them), each "
        "a Ray Train run driven by Ray Tune and a child MLflow run of the sweep's parent run, ranked by --metric. "
        "The parent run holds the ranking (sweep/ranking.csv, sweep/metric_by_step.png) and the best trial's tags; "
        "the best trial's generator is registered (alias candidate). Rerunning the same command resumes: finished "
        "trials train nothing, unfinished ones resume from their checkpoints.",
        epilog="examples:\n"
        "  recolor sweep configs/demo.yaml --grid stages.0.lr=1e-4,2e-4 --grid model.norm=batch,instance\n"
        "  recolor sweep configs/pix2pix_unet.yaml --dataset imagenet-5k --grid stages.0.gan_mode=vanilla,lsgan \\\n"
        "      --grid stages.0.lr=1e-4,2e-4,4e-4 --random 4 --seed 1 --workers-per-trial 2 --max-concurrent 2 \\\n"
        "      --stop-early asha --gpu\n"
        "  recolor runs compare --sweep NAME",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every trial")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="an axis of the grid (repeatable): every combination is a trial")  # fmt: skip
    parser.add_argument("--random", type=int, metavar="N", help="run N combinations picked at random (see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="the --random pick (default: 0)")
    parser.add_argument("--metric", default="val/l1_ab", type=metric_name,
                        help="the ranking's validation metric (default: val/l1_ab)")  # fmt: skip
    parser.add_argument("--workers-per-trial", type=int, help="Ray Train workers of a trial (default: the preset's)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: 2)")
    parser.add_argument("--stop-early", choices=("asha", "median"), help="stop losing trials after a validation")
    parser.add_argument("--name", help="the sweep's name (default: the preset's and a digest of the grid)")
    parser.add_argument("--dataset", action="append", metavar="NAME[@VERSION][:WEIGHT]",
                        help="training data (repeatable; with weights, a mixture), as for recolor train")  # fmt: skip
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--lake", help="lake URI (default: $RECOLOR_LAKE, else ./lake)")
    parser.add_argument("--storage", help="checkpoints: a folder or s3:// URI (default: ./ray_results)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model of the best trial")
    parser.add_argument("--no-register", dest="register", action="store_false", help="register no generator")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    parser.set_defaults(handler=run_sweep_command)


def default_name(config: str, axes: list[str], random_count: int | None, seed: int, overrides: list[str]) -> str:
    """`demo-sweep-1a2b3c`: the same command names the same sweep (so a rerun resumes it), another grid another."""
    spec = json.dumps([axes, random_count, seed if random_count else None, overrides])
    return f"{Path(config).stem}-sweep-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def run_sweep_command(args) -> int:
    from pipeline.sweep.driver import SweepOptions, run_sweep
    from pipeline.sweep.space import build_trials
    from pipeline.train.driver import TrackingOptions

    overrides = list(args.overrides)
    if args.dataset:  # as `recolor train` takes it: it replaces a preset's datasets or mixture whole
        from pipeline.train.cli import dataset_override

        overrides = [*dataset_override(args.dataset), *overrides]
    for flag, key in (("lake", "data.lake"), ("storage", "storage")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.gpu:
        overrides.append("use_gpu=true")
    trials = build_trials(args.grid, args.random, args.seed)
    name = args.name or default_name(args.config, args.grid, args.random, args.seed, overrides)
    options = SweepOptions(
        name=name,
        metric=args.metric,
        workers_per_trial=args.workers_per_trial,
        max_concurrent=args.max_concurrent,
        stop_early=args.stop_early,
        register=args.register,
    )
    tracking = TrackingOptions(
        tracking_uri=args.tracking_uri, experiment=args.experiment, model_name=args.model_name, preset=args.config
    )
    print(f"sweep {name}: {len(trials)} trials, {args.max_concurrent} at once", file=sys.stderr, flush=True)
    result = run_sweep(args.config, overrides, trials, options, tracking, ray_address=args.ray_address)
    if args.json:
        print(json.dumps({"sweep": name, "parent_run_id": result.parent_run_id, "ranking": result.rows}, indent=2))
        return 0
    print(f"sweep {name} (MLflow run {result.parent_run_id}), ranked by {args.metric}:")
    print(result.table)
    if result.best:
        print(
            f"best: {result.best['name']} ({args.metric} {result.best[args.metric]:.4f}), run {result.best['run_id']}"
        )
    return 0
