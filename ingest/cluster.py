"""Ray for the whole project: connect the same way everywhere (a cluster when an address is given, else a local
instance), and the one table of variables that travel from a driver to its tasks, workers and jobs."""

from __future__ import annotations

import contextlib
import logging
import os
import re


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
    before = {process.pid for process in _descendants()}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    try:
        yield
    finally:
        # The local instance's processes (the children that came with ray.init), gathered before shutdown: its
        # workers are reparented when the raylet goes, and a worker blocked in a collective (a run stopped
        # mid-step) outlives it. This process's other children are not Ray's to end.
        local = [p for p in _descendants() if p.pid not in before] if not address else []
        ray.shutdown()
        _end_processes(local)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _end_processes(processes: list, grace_s: float = 5.0) -> None:
    """SIGTERM what is still alive of `processes`, then SIGKILL what outlives `grace_s`."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


# --- the one table of variables that travel from a driver to its tasks, workers and jobs ------------------

# Every variable with one of these prefixes is a setting of the project or of a store it talks to (endpoints,
# regions, credentials, MLflow, this project's knobs): a job gets them from its submitter, a task or worker
# from its driver.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "RECOLOR_")
# Files and profiles of the submitter's machine, or the local stack's bookkeeping: meaningless elsewhere.
NOT_FORWARDED = frozenset(
    {
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CA_BUNDLE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "RECOLOR_STACK_ID",
    }
)
# A credential, by its name (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, ...): never printed, never in a
# runtime env (Ray logs those in plain text), masked in error lines.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a variable holds a credential, judged by its name."""
    return bool(_SECRET_NAME.search(name))


# Credentials inside a value: `scheme://user:password@host` and token-like query parameters.
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/\s:@]+):[^/\s@]+@")
# An s3:// address carries no user at all: whatever stands before its `@` is a key (`s3://AKID:Secret@bucket`).
_S3_USERINFO = re.compile(r"(s3://)[^/\s@]+@", re.IGNORECASE)
# A query parameter whose name ends in a secret's word (`token`, `api_key`, `X-Amz-Signature`, `X-Amz-Credential`):
# `max-keys=1` or `keys=` name no secret and stay as they are.
_QUERY_SECRET = re.compile(r"([?&](?:[\w.-]*?(?:token|key|secret|password|passwd|signature|sig|credential))=)[^&\s#]+",
                           re.IGNORECASE)  # fmt: skip


def has_credentials(value: str) -> bool:
    """Whether a value carries a credential inside it: a URL with a password, or a token in its query string."""
    return bool(_URL_PASSWORD.search(value) or _QUERY_SECRET.search(value))


def is_secret(name: str, value: str) -> bool:
    """Whether a variable is a credential: by its name, or because its value holds one (a tracking URI with a
    password). Such variables travel sealed and are never printed."""
    return is_secret_name(name) or has_credentials(value)


def mask_secrets(text: str, environ=os.environ) -> str:
    """`text` with every credential masked: the values of secret variables, URL passwords, query tokens."""
    for secret in secret_values(environ):
        text = text.replace(secret, "***")
    text = _S3_USERINFO.sub(r"\1***@", text)
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


class MaskingFilter(logging.Filter):
    """A handler's filter that passes every record through `mask_secrets`: a log line that names an endpoint, a URI
    or an error of boto3's never shows a password."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def forwarded_environment(environ=os.environ, extra=()) -> dict[str, str]:
    """The variables of `environ` that a task, worker or job should see (and the `extra` names), sorted."""
    names = {n for n in environ if n.startswith(FORWARDED_PREFIXES) and n not in NOT_FORWARDED}
    names |= {n for n in extra if n in environ}
    return {name: environ[name] for name in sorted(names)}


def secret_values(environ=os.environ, min_length: int = 4) -> list[str]:
    """The values of the credentials set in `environ` (not paths to them), for masking in printed lines."""
    return [
        value
        for name, value in environ.items()
        if is_secret_name(name) and not name.endswith(("_PATH", "_FILE")) and len(value) >= min_length
    ]


def ship_environment(overrides: dict[str, str] | None = None):
    """The driver's forwarded variables (credentials included), and `overrides`, as a Ray object for its tasks and
    workers.

    The one way the project ships settings within a Ray job: tasks and workers call `open_environment` first.
    A Ray object, not a runtime env: Ray's runtime env agent logs every runtime env, values included. (A job's
    own driver cannot get an object before it exists: `recolor submit` seals the credentials instead, see
    `pipeline.remote.sealed_env`.)
    """
    import ray

    return ray.put(forwarded_environment() | (overrides or {}))


def open_environment(shipped) -> None:
    """In a task or worker: take up the variables `ship_environment` sent (an object reference or the dict)."""
    import ray

    os.environ.update(ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped)
