"""Connect to Ray the same way everywhere: a cluster when an address is given, else a local instance."""

from __future__ import annotations

import contextlib
import logging
import os


@contextlib.contextmanager
def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Use the running Ray connection, or connect for the duration of the block.

    Args:
        address: a cluster (`ray://head:10001`, `auto`, `head:6379`); None uses $RAY_ADDRESS,
            else starts a local instance on this machine.
        num_cpus: CPUs of a local instance (ignored for a cluster).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # A local instance gets the dashboard too: Ray Train's state API (and the user) need it.
    kwargs = {} if address else {"num_cpus": num_cpus}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


# Secrets travel to tasks as a Ray object, never in a runtime env: Ray's runtime env agent logs
# every runtime env, values included, in plain text.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Settings tasks need to reach the same stores as the driver.
STORE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "RECOLOR_S3_RETRY_SECONDS",
    "RECOLOR_S3_MAX_ATTEMPTS",
    "RECOLOR_S3_ADDRESSING",
    "RECOLOR_S3_CONDITIONAL_WRITES",
)


def task_environment() -> dict[str, str]:
    """The driver's store endpoints, settings and credentials, for `os.environ.update` in a task.

    A task on a cluster (or on a local Ray started before these were set) does not inherit the
    driver's environment; pass this through `ray.put` so the values stay out of Ray's logs.
    """
    return {name: os.environ[name] for name in (*STORE_ENV, *CREDENTIAL_ENV) if name in os.environ}
