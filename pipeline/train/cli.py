"""`recolor train`: argument parsing and printing around `pipeline.train.driver.run_training`."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.tracking.uri import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a colorizer with Ray Train DDP from lake datasets",
        description="Train the pix2pix colorizer (U-Net + PatchGAN, or the ResNet18-encoder U-Net) with Ray Train "
        "DDP, streaming samples from lake shards (local or s3://). Rerunning with the same --name resumes from the "
        "run's latest checkpoint.",
        epilog="examples:\n"
        "  recolor train configs/demo.yaml\n"
        "  recolor train configs/pix2pix_unet.yaml --dataset imagenet-5k@1 --workers 4 --gpu stages.0.epochs=100\n"
        "  recolor train configs/pix2pix_unet.yaml --dataset imagenet-5k --workers 2-8 --gpu max_failures=-1\n"
        "  recolor train configs/pix2pix_unet.yaml --dataset imagenet-5k:0.8 --dataset coco:0.2\n"
        "  recolor train configs/resnet18_unet.yaml model.backbone_weights=s3://weights/resnet18.pth",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.batch_size=8 stages.0.epochs=3")
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME[@VERSION][:WEIGHT]",
        help="training data (repeatable); with weights on all of them, each epoch draws from each in proportion "
        "(a mixture: data.mix; its length data.epoch_samples, default the datasets' total)",
    )
    parser.add_argument(
        "--workers",
        type=worker_counts,
        metavar="N | MIN-MAX",
        help="Ray Train workers (DDP ranks); MIN-MAX: an elastic group that starts with what the cluster gives, goes "
        "on with fewer when nodes are lost and grows when they come back, each step the same global batch",
    )
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (NCCL, bf16 autocast)")
    parser.add_argument("--lake", help="lake URI (default: $RECOLOR_LAKE, else ./lake)")
    parser.add_argument(
        "--storage", help="checkpoints: a folder or s3:// URI (default: $RECOLOR_STORAGE, else ./ray_results)"
    )
    parser.add_argument("--name", help="run name; an existing run of this name is resumed")
    parser.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow: a server URL or sqlite:///file (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help=f"registered model name (default: {DEFAULT_MODEL_NAME})"
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_train_command)


def worker_counts(text: str) -> int | list[int]:
    """`--workers 4` or `--workers 2-8`."""
    import argparse

    low, dash, high = text.partition("-")
    try:
        counts = [int(low), int(high)] if dash else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (4) or a range (2-8), got {text!r}") from None
    if min(counts if dash else [counts]) < 1:
        raise argparse.ArgumentTypeError(f"worker counts start at 1, got {text!r}")
    return counts


def dataset_override(datasets: list[str]) -> list[str]:
    """`--dataset a --dataset b` as data.datasets; `--dataset a:0.8 --dataset b:0.2` as data.mix. Either replaces
    the preset's choice of data whole: a preset's mixture (and its epoch length) or datasets do not linger.

    Raises:
        ConfigError: weights on some datasets only, or a weight that is not a positive number.
    """
    from ingest.errors import ConfigError
    from pipeline.config import weight_problem

    weighted = [name.rpartition(":") for name in datasets]
    names = [name if sep else weight for name, sep, weight in weighted]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"--dataset {twice[0]} is given {names.count(twice[0])} times: name each dataset once "
                          "(its weight is its share of the mixture)")  # fmt: skip
    if not any(sep for _, sep, _ in weighted):
        return [f"data.datasets={json.dumps(datasets)}", "data.mix=null", "data.epoch_samples=null"]
    mix = {}
    for name, sep, weight in weighted:
        if not sep:
            raise ConfigError(f"--dataset {weight}: give every dataset of a mixture a weight (NAME:WEIGHT), or none")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise ConfigError(f"--dataset {name}:{weight}: the weight must be a number, e.g. {name}:0.2") from None
        why = weight_problem(mix[name])
        if why:
            raise ConfigError(f"--dataset {name}:{weight}: the weight {why}, e.g. {name}:0.2")
    return [f"data.mix={json.dumps(mix)}", "data.datasets=[]"]


def config_from_args(args):
    # --dataset first: KEY=VALUE overrides (data.epoch_samples=...) come after it and win.
    overrides = [*(dataset_override(args.dataset) if args.dataset else []), *args.overrides]
    for flag, key in (("workers", "workers"), ("lake", "data.lake"), ("storage", "storage"), ("name", "name")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.gpu:
        overrides.append("use_gpu=true")
    return load_config(args.config, overrides)


def run_train_command(args) -> int:
    from pipeline.train.driver import TrackingOptions, run_training

    config = config_from_args(args)
    tracking = TrackingOptions(
        enabled=not args.no_tracking,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        model_name=args.model_name,
        preset=args.config,
    )
    # A failed run raises (DataError: exit 2, TrainingError: exit 1, one line each; see pipeline.cli.main).
    result = run_training(config, ray_address=args.ray_address, tracking=tracking)
    summary = {
        "mlflow_run_id": result.run_id,
        "model_version": result.model_version,
        "name": result.name,
        "storage": result.storage,
        "checkpoint": result.checkpoint,
        "datasets": result.plan.refs,
        "metrics": result.metrics,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        metrics = result.metrics
        shown = ", ".join(
            f"{k} {metrics[k]:.4g}" for k in ("val/l1_ab", "val/psnr", "val/ssim", "val/auc") if k in metrics
        )
        print(f"run {result.name}: {', '.join(result.plan.refs)} -> {result.storage}")
        if shown:
            print(f"  validation: {shown}")
        print(f"  latest checkpoint: {result.checkpoint}")
        if result.run_id:
            print(
                f"  MLflow run {result.run_id}; registered {args.model_name} version {result.model_version} "
                "(alias candidate)"
            )
    return 0
