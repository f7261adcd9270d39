"""The `recolor` command: one entry point for ingest, the lake, training and colorize."""

from __future__ import annotations

import argparse
import sys

from infra.stack.cli import add_stack_parser
from ingest.cli import add_ingest_parser, add_lake_parser
from pipeline.evaluation.cli import add_model_parsers
from pipeline.remote.submit import add_submit_parser
from pipeline.train.cli import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recolor",
        description="Automatic image colorization at scale: ingest images into a Lab data lake, train pix2pix "
        "colorizers with Ray Train, track them in MLflow, colorize photos.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ingest_parser(subparsers)
    add_lake_parser(subparsers)
    add_train_parser(subparsers)
    add_model_parsers(subparsers)
    add_submit_parser(subparsers)
    add_stack_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit 2, without a traceback."""
    from ingest.lake import LakeError
    from ingest.sources import SourceError
    from ingest.storage import StorageError
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.train.failures import TrainingError, describe_failure

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`recolor train cfg.yaml --workers 2 data.batch_size=8`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (SourceError, LakeError, StorageError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"recolor: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        run = f"; MLflow run {e.run_id} marked FAILED" if e.run_id else ""
        advice = (
            "rerun the same command to resume"
            if e.rerunnable
            else "a rerun would fail the same way: fix the cause (config, data or code), then rerun to resume"
        )
        print(f"recolor: error: training failed: {e}{run}; {advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        name = getattr(e, "signal_name", "SIGINT")
        print(f"recolor: stopped by {name}; rerun the same command to resume", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:
        # Failures inside Ray tasks (a worker that kept crashing, a lost node) arrive as Ray errors
        # whose text is a remote traceback: one line naming the remote error is enough, the work done so far is kept.
        if type(e).__module__.startswith("ray."):
            print(f"recolor: error: {describe_failure(e)}; rerun the same command to resume", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
