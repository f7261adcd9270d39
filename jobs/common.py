"""What every job entrypoint does around the CLI call: open its credentials, say where it reads and writes,
and clean up."""

from __future__ import annotations

import os
import sys

from ingest.cluster import mask_secrets

# Where a job reads and writes: printed (URLs and paths, never keys) so a job's log says which stack it used.
ENDPOINT_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "RECOLOR_LAKE",
    "RECOLOR_STORAGE",
    "RAY_ADDRESS",
)


def start_job(name: str, environ=os.environ) -> None:
    """Open the credentials `recolor submit` sealed (see `pipeline.remote.sealed_env`; the workers open them
    through the runtime env's setup hook), then print one line naming the endpoints in effect.
    Credential values are never printed, only whether they are set."""
    from pipeline.remote.sealed_env import unseal_environ

    opened = unseal_environ(environ)
    parts = [
        f"{variable}={mask_secrets(environ[variable])}" for variable in ENDPOINT_VARIABLES if environ.get(variable)
    ]
    credentials = "set" if environ.get("AWS_ACCESS_KEY_ID") else "not set (instance role or anonymous)"
    if opened:
        credentials += f" (opened from the submission: {', '.join(opened)})"
    print(f"jobs.{name}: endpoints: {', '.join(parts) or 'none set (embedded defaults)'}; S3 credentials {credentials}")
    sys.stdout.flush()


def shutdown_ray() -> None:
    """Leave the cluster if this process is still connected (the CLI normally has already)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
