"""`recolor export`: parsing and printing only (the work is `export.py`)."""

from __future__ import annotations


def add_export_parser(subparsers) -> None:
    from ingest.cli import positive_int
    from pipeline.colorize.cli import MODEL_HELP, TRUST_PICKLE_HELP
    from pipeline.evaluation.cli import TRACKING_HELP
    from pipeline.serving import EXPORT_FORMATS, TOLERANCE

    export = subparsers.add_parser(
        "export",
        help="write a generator as ONNX or a torch.export program (pt2), checked against PyTorch",
        description="Export a generator for other runtimes. Input `L`: float32 (N, 1, S, S) in [-1, 1], the "
        "photo's L/50 - 1 at the side S the model trained at (printed); output `ab`: (N, 2, S, S) in [-1, 1], "
        "times 110 for Lab units. N is dynamic. The export is run beside PyTorch on a check batch "
        f"(onnxruntime for ONNX) and kept only if they agree to {TOLERANCE:.0e}. --format mlflow writes a new MLflow "
        "model folder from the verified weights, with recolor's serving code only: serve it with `mlflow models "
        "serve -m FOLDER --env-manager local`.",
        epilog="Example: recolor export --model models:/colorizer@champion --format onnx -o colorizer.onnx",
    )
    export.add_argument("--model", required=True, help=MODEL_HELP)
    export.add_argument("--format", dest="export_format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("-o", "--out", required=True, help="the file to write (--format mlflow: the model folder)")
    export.add_argument("--size", type=positive_int, help="input side S (default: the model's training side)")
    export.add_argument("--overwrite", action="store_true", help="replace the file -o names if it exists")
    export.add_argument("--tracking-uri", help=TRACKING_HELP)
    export.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    export.set_defaults(handler=run_export)


def run_export(args) -> int:
    from ingest.errors import ConfigError
    from pipeline.models.saved import min_side
    from pipeline.serving.export import export_generator
    from pipeline.tracking.registry import load_generator_for_inference

    generator, side, _ = load_generator_for_inference(args.model, args.tracking_uri, trust_pickle=args.trust_pickle)
    side = args.size or side
    if side < min_side(generator) or side % min_side(generator):
        raise ConfigError(f"--size must be a multiple of {min_side(generator)} for this generator, got {side}")
    metadata = {"model": args.model, "input": f"L (N, 1, {side}, {side}) in [-1, 1]", "output": "ab in [-1, 1], x 110"}
    result = export_generator(
        generator, side, args.export_format, args.out, metadata=metadata, overwrite=args.overwrite
    )
    if result.export_format == "mlflow":
        print(f"exported {args.model} as an MLflow model folder to {result.path} (recolor's serving code only, "
              f"loaded back identical): mlflow models serve -m {result.path} --env-manager local")  # fmt: skip
        return 0
    print(
        f"exported {args.model} as {result.export_format} to {result.path}: input (N, 1, {side}, {side}), "
        f"max abs difference from PyTorch {result.max_abs_diff:.1e}"
    )
    return 0
