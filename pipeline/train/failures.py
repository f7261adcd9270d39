"""How a training run fails or stops, told to a user in one line: Ray's wrappers unwrapped to the worker's own
error, credentials masked, and whether rerunning the same command can succeed.

`pipeline.train.driver` raises these; `pipeline.cli` turns them into exit codes.
"""

from __future__ import annotations

from ingest.cluster import mask_secrets
from ingest.errors import RecolorError


class Stopped(KeyboardInterrupt):
    """The driver got SIGINT or SIGTERM (Ctrl-C, a scheduler, `ray job stop`, `timeout`): the run is ended as KILLED,
    its checkpoints kept; rerunning the same command resumes it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


class NonFiniteLoss(RecolorError):
    """The losses became NaN or infinite: the run stops (no checkpoint of a diverged model is taken)."""

    @classmethod
    def at(cls, global_step: int, bad: dict[str, float], config, stage_index: int) -> NonFiniteLoss:
        """The error of a run whose losses `bad` (this rank's; empty: another rank's) diverged at `global_step`:
        names them and what to change."""
        stage = config.stages[stage_index]
        shown = ", ".join(f"{name.removeprefix('train/')}={value}" for name, value in bad.items()) or "on another rank"
        return cls(
            f"the losses are not finite at step {global_step} ({shown}): the run stopped, and its latest checkpoint "
            f"(taken while they were finite) is kept. Lower stages.{stage_index}.lr (now {stage.lr:g}) or l1_lambda "
            f"(now {config.l1_lambda:g}) and train under a new --name"
        )


class TrainingError(RecolorError):
    """Training failed in the workers after `max_failures` restarts; the message is one line naming the root cause."""

    def __init__(self, reason: str, run_id: str | None = None, rerunnable: bool = True):
        super().__init__(reason)
        self.run_id = run_id  # the MLflow run, now FAILED; None without tracking
        self.rerunnable = rerunnable  # whether rerunning the same command can succeed (see `is_transient`)


def is_transient(cause: BaseException) -> bool:
    """Whether a failure can pass by itself, so rerunning the same command may succeed: a lost worker or node,
    a store or network that failed, memory that ran out. A mistake in the config, the data or the code (a
    ValueError, TypeError, an unsupported option) fails the same way every time."""
    from ingest.storage import StorageError
    from pipeline.checkpoint import CheckpointError

    return _is_ray_error(cause) or isinstance(
        cause, (OSError, StorageError, CheckpointError, MemoryError, ConnectionError, TimeoutError)
    )


def is_training_failure(error: BaseException) -> bool:
    from ray.train import TrainingFailedError

    return isinstance(error, TrainingFailedError)


def worker_failures_of(error: BaseException) -> list[BaseException]:
    # Ray Train's WorkerGroupError holds each failed rank's own exception (unwrapped from Ray's traceback wrapper).
    failures = getattr(error, "worker_failures", None) or {}
    return [failures[rank] for rank in sorted(failures)]


def root_cause(error: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: what a worker, task or actor raised itself.

    Ray Train raises a `WorkerGroupError` (holding each failed rank's exception) or a `ControllerError`; a Ray
    task or actor that raised surfaces as a `RayTaskError` (the remote exception as `.cause`); a worker that
    stopped answering as a health-check error wrapping the actor's death. Of several ranks' errors the first
    that is not Ray's own (a dead actor, a lost node) wins: when one rank fails, the others often fail only
    because it did.
    """
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError

    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = worker_failures_of(error)
        if failures:
            causes = [root_cause(failure) for failure in failures]
            error = next((cause for cause in causes if not _is_ray_error(cause)), causes[0])
        elif isinstance(error, ControllerError):
            error = error.controller_failure
        elif isinstance(error, RayTaskError) and isinstance(getattr(error, "cause", None), BaseException):
            error = error.cause
        elif isinstance(getattr(error, "health_check_failure", None), BaseException):
            error = error.health_check_failure
        else:
            break
    return error


def _is_ray_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] == "ray"


def describe_failure(error: BaseException, limit: int = 500) -> str:
    """One line for a user and for MLflow: the root cause's type and the first line of its message.

    Credentials found in the environment and passwords in URLs are masked: the line goes to logs and tags.
    """
    if isinstance(error, KeyboardInterrupt):
        return f"stopped by {getattr(error, 'signal_name', 'SIGINT')}"
    cause = root_cause(error) if _is_ray_error(error) else error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    name = type(cause).__name__
    text = f"{name}: {lines[0]}" if lines else name
    text = mask_secrets(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
