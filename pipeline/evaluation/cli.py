"""`recolor evaluate`, `recolor runs compare`: parsing and printing only."""

from __future__ import annotations

import json
import sys

from ingest.cli import fraction, positive_int
from ingest.errors import ConfigError
from pipeline.config import MAX_BAD_FRACTION
from pipeline.sweep.ranking import metric_name
from pipeline.tracking.uri import DEFAULT_EXPERIMENT

TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"


def add_model_parsers(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a generator on a lake dataset; optionally promote it to champion",
        description="Compute FID and KID (the field's Inception network), colorfulness, PSNR, SSIM, L1 ab and AuC, "
        "each beside the gray baseline, on "
        "a lake dataset with the same code as training, log an evaluation run to MLflow, and with --promote move the "
        "registry alias `champion` to the model only if it beats the current champion on the same data.",
    )
    evaluate.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/generator, a model folder or a checkpoint path",
    )
    evaluate.add_argument("--dataset", required=True, metavar="NAME[@VERSION]")
    evaluate.add_argument("--lake", help="lake URI (default: $RECOLOR_LAKE, else ./lake)")
    evaluate.add_argument("--split", choices=("val", "train"), default="val")
    evaluate.add_argument("--promote", action="store_true", help="move alias champion here if it beats the champion")
    evaluate.add_argument(
        "--metric", default="l1_ab", help="promotion metric: l1_ab (default), psnr, ssim, auc, colorfulness_abs_diff"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=16)
    evaluate.add_argument(
        "--max-bad-fraction",
        type=fraction,
        default=MAX_BAD_FRACTION,
        help=f"stop when more of the split is corrupt (default: {MAX_BAD_FRACTION}); --promote refuses any corrupt "
        "sample",
    )
    evaluate.add_argument("--max-batches", type=positive_int, help="evaluate at most N batches (quick checks)")
    evaluate.add_argument("--device", type=device_arg, default=None,
                          help="cpu, cuda or cuda:N (default: cuda when there is one)")  # fmt: skip
    evaluate.add_argument("--tracking-uri", help=TRACKING_HELP)
    evaluate.add_argument("--experiment", default="recolor-evaluation")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load models of the old pickled format (that runs code stored in them: only a registry you trust)",
    )
    evaluate.add_argument(
        "--dropout", action="store_true", help="score with the generator's dropout on, as pix2pix tests (seeded)"
    )
    evaluate.add_argument(
        "--protocol",
        choices=("crop", "resize"),
        help="insist on how the photos were cut: crop (short side, centre crop; ImageNet val5k as CT2/DDColor) or "
        "resize (whole photo squashed; val50k, COCO-Stuff as ColorFormer/DDColor); default: the dataset's",
    )
    evaluate.add_argument("--no-fid", action="store_true", help="skip FID and KID (the Inception pass)")
    evaluate.set_defaults(handler=run_evaluate)

    runs = subparsers.add_parser("runs", help="compare training runs from MLflow in the terminal")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    compare = runs_commands.add_parser("compare", help="runs side by side: differing params, final metrics")
    compare.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    compare.add_argument("--tracking-uri", help=TRACKING_HELP)
    compare.add_argument("--max-runs", type=positive_int, default=10)
    compare.add_argument("--json", action="store_true")
    compare.add_argument("--sweep", metavar="NAME", help="rank the trials of sweep NAME (see recolor sweep)")
    compare.add_argument("--metric", type=metric_name, help="with --sweep: the ranking's metric (default: the sweep's)")
    compare.set_defaults(handler=run_compare)


def device_arg(text: str) -> str:
    """An argparse type: `cpu`, `cuda` or `cuda:N` that this machine has (checked now, not at the first tensor)."""
    import argparse

    name, _, index = text.partition(":")
    if name not in ("cpu", "cuda") or (index and (name == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if name == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch sees none): use cpu")
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    return text


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def default_device(args) -> None:
    """`--device`'s default, decided when the command runs (not when the parser is built: that imports torch, a
    second every `recolor` command would wait): cuda where there is one, else cpu."""
    if args.device is None:
        args.device = "cuda" if cuda_available() else "cpu"


def run_evaluate(args) -> int:
    from pipeline.evaluation.promote import evaluate

    default_device(args)

    result = evaluate(
        args.model,
        args.dataset,
        lake=args.lake,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        promote=args.promote,
        metric=args.metric,
        max_batches=args.max_batches,
        trust_pickle=args.trust_pickle,
        max_bad_fraction=args.max_bad_fraction,
        dropout=args.dropout,
        fid=not args.no_fid,
        protocol=args.protocol,
    )
    refused = result.promotion.get("decision") == "refused"
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 1 if refused else 0
    from pipeline.evaluation.fid import MIN_IMAGES

    m = result.metrics
    skipped = f", {m['eval/bad_samples']:.0f} corrupt skipped" if m.get("eval/bad_samples") else ""
    print(f"{result.model_uri} on {result.dataset} ({result.split}, {m['eval/count']:.0f} of "
          f"{m['eval/expected']:.0f} images{skipped}, protocol {result.protocol}):")  # fmt: skip
    for name in ("fid", "kid", "colorfulness", "colorfulness_true", "psnr", "ssim", "l1_ab", "auc",
                 "colorfulness_abs_diff"):  # fmt: skip
        if f"eval/{name}" in m:
            gray = m.get(f"eval/gray_{name}")
            shown = f"   gray baseline {gray:10.4f}" if gray is not None and name != "colorfulness_true" else ""
            print(f"  {name:<22} {m[f'eval/{name}']:10.4f}{shown}")
    if not args.no_fid and "eval/fid" not in m and m["eval/count"] < MIN_IMAGES:
        print(f"  fid, kid               not scored: {m['eval/count']:.0f} image(s), they need at least {MIN_IMAGES}")
    if result.promotion:
        p = result.promotion
        print(f"  promotion: {p['decision']} ({p['reason']})")
    print(f"  evaluation run {result.run_id}")
    if refused:
        print(f"recolor: error: promotion refused: {result.promotion['reason']}", file=sys.stderr)
        return 1
    return 0


KEY_METRICS = (  # what users of colorizers compare first, then the pixel metrics and the losses
    "val/fid",
    "val/kid",
    "val/colorfulness",
    "val/l1_ab",
    "val/psnr",
    "val/ssim",
    "val/auc",
    "val/colorfulness_abs_diff",
    "train/loss_G_L1",
    "train/loss_D",
)


def run_compare(args) -> int:
    from mlflow import MlflowClient

    from pipeline.tracking.uri import connect_tracking

    client = MlflowClient(connect_tracking(args.tracking_uri))
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise ConfigError(f"no MLflow experiment {args.experiment!r} (train a model first, or pass --experiment)")
    if args.sweep:
        return _compare_sweep(client, experiment.experiment_id, args)
    runs = client.search_runs(
        [experiment.experiment_id], max_results=args.max_runs, order_by=["attributes.start_time DESC"]
    )
    keys = sorted({k for run in runs for k in run.data.params})
    differing = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    rows = [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "params": {k: run.data.params.get(k) for k in differing},
            "metrics": {k: run.data.metrics[k] for k in KEY_METRICS if k in run.data.metrics},
        }
        for run in runs
    ]
    if args.json:
        print(json.dumps({"experiment": args.experiment, "differing_params": differing, "runs": rows}, indent=2))
        return 0
    if not rows:
        print(f"experiment {args.experiment} has no runs")
        return 0
    columns = [row["name"][:18] for row in rows]
    width = max(24, *(len(k) for k in differing)) if differing else 24
    print(f"{'':<{width}} " + " ".join(f"{c:>18}" for c in columns))
    print(f"{'run id':<{width}} " + " ".join(f"{row['run_id'][:8]:>18}" for row in rows))
    for key in differing:
        print(f"{key:<{width}} " + " ".join(f"{str(row['params'][key])[:18]:>18}" for row in rows))
    for key in KEY_METRICS:
        values = [row["metrics"].get(key) for row in rows]
        if any(v is not None for v in values):
            print(f"{key:<{width}} " + " ".join(f"{v:>18.4f}" if v is not None else f"{'-':>18}" for v in values))
    return 0


def _compare_sweep(client, experiment_id: str, args) -> int:
    from pipeline.sweep.ranking import ROLE_TAG, SWEEP_TAG, format_table, metric_name, ranking

    parents = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{args.sweep}' and tags.`{ROLE_TAG}` = "
                                 "'parent'", max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
    if not parents:
        raise ConfigError(f"no sweep {args.sweep!r} in experiment {args.experiment!r} (see recolor sweep)")
    metric = args.metric or metric_name(parents[0].data.tags.get("recolor.sweep.metric", "val/l1_ab"))
    rows = ranking(client, experiment_id, args.sweep, metric)
    if args.json:
        print(json.dumps({"sweep": args.sweep, "metric": metric, "parent_run_id": parents[0].info.run_id,
                          "ranking": rows}, indent=2))  # fmt: skip
        return 0
    print(f"sweep {args.sweep} (MLflow run {parents[0].info.run_id}), ranked by {metric}:")
    print(format_table(rows, metric))
    return 0
