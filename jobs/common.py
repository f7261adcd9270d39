"""What every job entrypoint does around the CLI call: say where it reads and writes, then clean up."""

from __future__ import annotations

import os
import sys

# Where a job reads and writes: printed (URLs and paths, never keys) so a job's log says which stack it used.
ENDPOINT_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "RECOLOR_LAKE",
    "RECOLOR_STORAGE",
    "RAY_ADDRESS",
)


def describe_endpoints(environ=os.environ) -> str:
    """One line naming the endpoints in effect; credentials are only said to be set or not."""
    parts = [f"{name}={environ[name]}" for name in ENDPOINT_VARIABLES if environ.get(name)]
    credentials = "set" if environ.get("AWS_ACCESS_KEY_ID") else "not set (instance role or anonymous)"
    return f"endpoints: {', '.join(parts) or 'none set (embedded defaults)'}; S3 credentials {credentials}"


def shutdown_ray() -> None:
    """Leave the cluster if this process is still connected (the CLI normally has already)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
