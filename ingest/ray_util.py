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
