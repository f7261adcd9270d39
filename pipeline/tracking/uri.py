"""Where MLflow is: the tracking URI (`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the embedded default, a
SQLite file `./mlflow.db` with artifacts in `./mlartifacts`), reaching it, and MLflow's fluent API pointed at it.

Its own module so that the registry (`pipeline.tracking.registry`) and the runs (`pipeline.tracking.runs`) both
use it without importing each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ingest.cluster import has_credentials, mask_secrets
from ingest.errors import RecolorError

DEFAULT_EXPERIMENT = "recolor"  # training runs' MLflow experiment
DEFAULT_MODEL_NAME = "colorizer"  # the registered model of training runs and sweeps

log = logging.getLogger(__name__)
_ANSWERED: set[str] = set()  # servers that answered in this process: probed once


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's fluent API (`start_run`, `log_input`, `log_model`, `load_model`) on `uri` for the block.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; setting back `mlflow.get_tracking_uri()`
    afterwards would pin the default of that moment (./mlflow.db of the then current folder) for the rest
    of the process, its Ray workers and its subprocesses. The previous setting, or its absence, comes back.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri keeps it equal to MLflow's own setting
    mlflow.set_tracking_uri(uri)
    try:
        with quiet_run_links(uri):
            yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both


@contextlib.contextmanager
def quiet_run_links(uri: str):
    """For the block, no "View run ... at: <tracking URI>/#/..." lines from MLflow when `uri` holds a password:
    MLflow prints them whenever a run ends, the password included."""
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    if not has_credentials(uri):
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (absolute, so Ray workers agree)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').absolute()}"


def connect_tracking(uri: str | None = None) -> str:
    """`resolve_tracking_uri`, and the server probed (`check_tracking_server`): what every command that talks to
    MLflow calls first, so an unreachable server is one line in seconds, not minutes of retries and a traceback."""
    resolved = resolve_tracking_uri(uri)
    check_tracking_server(resolved)
    return resolved


class TrackingUnreachable(RecolorError):
    """The MLflow tracking server does not answer."""


def check_tracking_server(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before a cluster starts, when an http(s) tracking server does not answer (MLflow's own
    client would retry for minutes, then print a traceback).

    Raises:
        TrackingUnreachable: one line naming the URI (credentials masked) and what to do.
    """
    if not tracking_uri.startswith(("http://", "https://")) or tracking_uri in _ANSWERED:
        return
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        _ANSWERED.add(tracking_uri)
    except requests.RequestException as e:
        response = getattr(e, "response", None)
        reason = f"HTTP {response.status_code}" if response is not None else type(e).__name__
        raise TrackingUnreachable(
            f"the MLflow tracking server {mask_secrets(tracking_uri)} does not answer ({reason}): start it, fix "
            "--tracking-uri / $MLFLOW_TRACKING_URI, or unset it to track in ./mlflow.db"
        ) from None


def _local_artifact_root(tracking_uri: str) -> str | None:
    # The embedded default keeps artifacts beside the database; a server decides for itself.
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").absolute().as_uri()
    return None


def get_experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_local_artifact_root(tracking_uri))
