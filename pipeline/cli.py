"""The `recolor` command: one entry point for ingest, the lake, training and colorize."""

from __future__ import annotations

import argparse
import sys

from infra.stack.cli import add_stack_parser
from ingest.cli import add_ingest_parser, add_lake_parser
from ingest.cluster import mask_secrets
from pipeline.colorize.cli import add_colorize_parser
from pipeline.evaluation.cli import add_model_parsers
from pipeline.remote.submit import add_submit_parser
from pipeline.serving.cli import add_export_parser
from pipeline.sweep.cli import add_sweep_parser
from pipeline.train.cli import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recolor",
        description="Automatic image colorization at scale: ingest images into a Lab data lake, train pix2pix "
        "colorizers with Ray Train, track them in MLflow, colorize photos (on one machine or a Ray cluster), export "
        "and serve the generators.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ingest_parser(subparsers)
    add_lake_parser(subparsers)
    add_train_parser(subparsers)
    add_sweep_parser(subparsers)
    add_model_parsers(subparsers)
    add_colorize_parser(subparsers)
    add_export_parser(subparsers)
    add_submit_parser(subparsers)
    add_stack_parser(subparsers)
    return parser


RESUMING = {"ingest", "train", "sweep", "colorize", "submit"}  # a rerun of these goes on where the last one stopped


def exit_code_and_message(error: BaseException, command: str | None = None) -> tuple[int, str] | None:
    """The one table from an error to what the user sees: (exit code, one line), or None for a bug (traceback).

    | error | exit | says |
    |---|---|---|
    | `Stopped` / KeyboardInterrupt | 130 (SIGINT), 143 (SIGTERM) | stopped; rerun to resume |
    | `TrainingError` | 1 | the worker's error; rerun to resume only when a rerun can succeed |
    | any other `RecolorError` (lake, source, storage, data, checkpoint, config, ...) | 2 | its message |
    | FileNotFoundError | 2 | the missing file |
    | an `MlflowException` (the server's answer) | 2 | its first line |
    | an error of Ray's own (a lost node, a task that kept crashing) | 1 | its root cause; rerun to resume |

    "Rerun to resume" is said of the commands that resume (`RESUMING`); the others are told to rerun. `recolor
    stack` prints its own `StackError` and exits 1 (the stack's processes, not the user's input, failed).
    """
    from ingest.cluster import mask_secrets
    from ingest.errors import RecolorError
    from pipeline.train.failures import TrainingError, describe_failure

    rerun = "rerun the same command to resume" if command is None or command in RESUMING else "rerun the same command"

    if isinstance(error, KeyboardInterrupt):
        name = getattr(error, "signal_name", "SIGINT")
        return getattr(error, "exit_code", 130), f"recolor: stopped by {name}; {rerun}"
    if isinstance(error, TrainingError):
        run = f"; MLflow run {error.run_id} marked FAILED" if error.run_id else ""
        advice = (
            "rerun the same command to resume"
            if error.rerunnable
            else "a rerun would fail the same way: fix the cause (config, data or code), then rerun to resume"
        )
        return 1, f"recolor: error: training failed: {error}{run}; {advice}"
    if isinstance(error, (RecolorError, FileNotFoundError)):
        return 2, f"recolor: error: {mask_secrets(str(error))}"
    if type(error).__name__ == "MlflowException" or type(error).__module__.startswith("mlflow."):
        # An answer of the tracking server (no such model, a refused request): its first line, credentials masked.
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return 2, f"recolor: error: MLflow: {mask_secrets(first)}"
    if type(error).__module__.startswith("ray."):
        # A remote traceback's text: one line naming the remote error is enough, the work done so far is kept.
        return 1, f"recolor: error: {describe_failure(error)}; {rerun}"
    return None


def masked_log_lines() -> None:
    """Print warnings as Python's last-resort handler does (the message alone, on stderr), every line through
    `mask_secrets`: retries and errors name endpoints, and an endpoint may carry a password. Left as it is when
    logging was set up already (a test's capture, an embedding program)."""
    import logging

    from ingest.cluster import MaskingFilter

    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MaskingFilter())
    root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors a user can act on print one line (see `exit_code_and_message`), without a traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`recolor train cfg.yaml --workers 2 data.batch_size=8`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_help = lambda command: main([command, "--help"])  # for `recolor submit KIND --help`
    masked_log_lines()
    try:
        from ingest.storage import refuse_credentials_in_uri

        for given in argv if argv is not None else sys.argv[1:]:  # --lake, --storage, -o, inputs, key=value
            refuse_credentials_in_uri(given.split("=", 1)[1] if not given.startswith("s3://") and "=" in given
                                      else given)  # fmt: skip
        return args.handler(args)
    except BaseException as error:
        outcome = exit_code_and_message(error, getattr(args, "command", None))
        if outcome is None:
            raise
        code, message = outcome
        print(mask_secrets(message), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
