"""`recolor submit KIND ...` and `recolor jobs ...`: run the job entrypoints (`jobs/`) on a Ray cluster.

    recolor submit ingest folder s3://photos/summer --dataset summer --address http://HEAD:8265
    recolor submit train configs/pix2pix_unet.yaml --dataset summer --workers 4 --gpu
    recolor jobs list | recolor jobs logs JOB_ID | recolor jobs stop JOB_ID

A submission ships this project as the job's working directory (without virtual environments,
lakes, MLflow stores, caches or git metadata) and runs `python -m jobs.<kind> ARGS...` on the
cluster, whose Python must already have the project's dependencies (the cluster image installs
the project; the local stack's head uses this environment). The endpoint variables (`AWS_*`,
`MLFLOW_*`, `RECOLOR_*`) travel from the submitter's environment into the job; their values are
never printed, and credentials among them travel sealed with the cluster token (Ray logs runtime
environments in plain text; see `pipeline.remote.sealed_env`). Requests carry the cluster's token:
`$RAY_AUTH_TOKEN`, else the file `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

from ingest.cluster import forwarded_environment, is_secret
from ingest.errors import RecolorError
from pipeline.remote import sealed_env

JOB_KINDS = ("ingest", "train", "sweep", "evaluate", "colorize")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# gitwildmatch patterns, relative to the working directory; a leading slash anchors at its top.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "*.pyc",
    "/lake",
    "/mlruns",
    "/mlartifacts",
    "/mlflow.db",
    "/ray_results",
    "/outputs",
    "/.stack",
    "/.whl",
    "/.gl",
    "/build",
    "/dist",
]


class SubmitError(RecolorError):
    """The cluster refused or could not be reached; the message says what to do."""


def resolve_address(address: str | None = None, environ=os.environ) -> str:
    """The job server: the argument, else $RAY_API_SERVER_ADDRESS, $RAY_DASHBOARD_ADDRESS, an http(s)
    $RAY_ADDRESS, else http://127.0.0.1:8265."""
    for candidate in (address, environ.get("RAY_API_SERVER_ADDRESS"), environ.get("RAY_DASHBOARD_ADDRESS")):
        if candidate:
            return candidate
    ray_address = environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def resolve_token(environ=os.environ) -> str | None:
    """The cluster token, looked up the way Ray looks it up; None when there is none."""
    try:
        return sealed_env.resolve_token(environ)
    except sealed_env.SealError as e:
        raise SubmitError(str(e)) from None


def forwarded_env(environ=os.environ, extra: list[str] = ()) -> dict[str, str]:
    """The submitter's variables (and `extra` names) that a job should see: `ingest.cluster`'s one table."""
    # No checksum settings are added: every S3 client of the project asks for checksums only where
    # required unless told otherwise (`ingest.storage`), in the job's processes as in this one.
    return forwarded_environment(environ, extra)


def build_entrypoint(kind: str, job_args: list[str]) -> str:
    if kind not in JOB_KINDS:
        raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")
    return shlex.join(["python", "-m", f"jobs.{kind}", *job_args])


def seal_credentials(env_vars: dict[str, str], token: str | None) -> tuple[dict[str, str], list[str], list[str]]:
    """Split the forwarded variables: endpoints stay readable, credentials are sealed with the cluster
    token (see `pipeline.remote.sealed_env`), or left out when there is no token to seal them with.

    Returns:
        (the job's env_vars, the names sealed, the names left out)
    """
    plain = {name: value for name, value in env_vars.items() if not is_secret(name, value)}
    secret = {name: value for name, value in env_vars.items() if is_secret(name, value)}
    if not secret:
        return plain, [], []
    if token is None:
        return plain, [], sorted(secret)
    return plain | {sealed_env.SEALED_ENV: sealed_env.seal(secret, token)}, sorted(secret), []


def build_runtime_env(working_dir: Path, env_vars: dict[str, str]) -> dict:
    """The job's runtime environment: the project as working directory, the forwarded variables, and
    the hook that opens sealed credentials in every worker."""
    working_dir = Path(working_dir).resolve()
    if not (working_dir / "jobs").is_dir() or not (working_dir / "pyproject.toml").is_file():
        raise SubmitError(f"{working_dir} is not the project root (no jobs/ or pyproject.toml): pass --working-dir")
    runtime_env = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": dict(env_vars)}
    if sealed_env.SEALED_ENV in env_vars:
        runtime_env["worker_process_setup_hook"] = sealed_env.SETUP_HOOK
    return runtime_env


@contextlib.contextmanager
def job_client(address: str | None = None):
    """A `JobSubmissionClient` for `address`, with the token header when a token is configured.

    Ray lets $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS override the client's address; the address
    resolved here wins instead. The token goes in as an explicit header: Ray adds it on its own only
    when this process has RAY_AUTH_MODE=token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logging()
    url = resolve_address(address)
    token = resolve_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        client = JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        raise SubmitError(_auth_hint(url, token, e)) from None
    except ConnectionError as e:
        raise SubmitError(f"no Ray job server at {url} ({e}); pass --address or set RAY_API_SERVER_ADDRESS") from None
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
    try:
        yield client
    except AuthenticationError as e:
        raise SubmitError(_auth_hint(url, token, e)) from None


def _quiet_ray_logging() -> None:
    # Ray's client logs every packaging step at INFO, and warns that it skips .git and .venv, which the
    # excludes skip anyway; keep its real warnings (a large package, a failed upload).
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def _auth_hint(url: str, token: str | None, error: Exception) -> str:
    first_line = str(error).splitlines()[0]
    if token is None:
        return (
            f"{url} requires a token ({first_line}); set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "(`recolor stack env` prints them for the local stack)"
        )
    return f"{url} refused the token ({first_line}); check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"


def follow_logs(client, job_id: str, out=None) -> str:
    """Print the job's logs (to `out`, default stdout) as they come until it ends; returns its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    if str(info.status) != "SUCCEEDED" and info.message:
        print(f"job {job_id}: {info.message}", file=sys.stderr)
    return str(info.status)


# --- the commands ------------------------------------------------------------------------------------


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    options.add_argument(
        "--address", help=f"Ray job server (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else {DEFAULT_ADDRESS})"
    )
    return options


def _submit_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False, parents=[_client_options()])
    options.add_argument("--no-follow", dest="follow", action="store_false", help="print the job id and return")
    options.add_argument(
        "--forward-env", action="append", default=[], metavar="NAME", help="forward another variable (repeatable)"
    )
    options.add_argument(
        "--no-forward-env",
        dest="forward",
        action="store_false",
        help="forward no variables: the cluster's own environment applies (e.g. the compose stack's head)",
    )
    options.add_argument("--working-dir", default=str(PROJECT_ROOT), help="project to ship (default: this one)")
    options.add_argument("--submission-id", help="job id to use (default: generated)")
    options.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default: 0)")
    return options


def add_submit_parser(subparsers) -> None:
    """Register `recolor submit` and `recolor jobs`."""
    submit_options = _submit_options()
    submit = subparsers.add_parser(
        "submit",
        parents=[submit_options],
        help="run ingest, train, sweep, evaluate or colorize as a Ray job on a cluster",
        description="Submit `python -m jobs.KIND ARGS...` to a Ray cluster with this project as working directory "
        "and the AWS_*, MLFLOW_* and RECOLOR_* variables of this shell; follow its logs and exit with its status "
        "(0 when it succeeded). ARGS are those of `recolor KIND`; the options below may come before KIND or "
        "after ARGS.",
        epilog="examples:\n"
        "  recolor submit ingest folder s3://lake/sources/photos --dataset photos --address http://head:8265\n"
        "  recolor submit train configs/demo.yaml --dataset photos --workers 2\n"
        "  recolor submit evaluate --model models:/recolor@candidate --dataset photos --promote --no-follow\n"
        "  recolor submit colorize s3://archive/scans -o s3://archive/colorized --model models:/colorizer@champion "
        "--actors 4 --gpu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("kind", choices=JOB_KINDS, help="the job: jobs/KIND.py, with the arguments of `recolor KIND`")
    submit.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments of `recolor KIND`")
    submit.set_defaults(handler=run_submit_command, submit_options=submit_options)

    jobs = subparsers.add_parser("jobs", help="list Ray jobs, print their logs, stop one")
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="{list,status,logs,stop}")
    client_options = _client_options()
    listing = commands.add_parser("list", parents=[client_options], help="every job of the cluster, newest last")
    status = commands.add_parser("status", parents=[client_options], help="one job's status")
    logs = commands.add_parser("logs", parents=[client_options], help="one job's logs")
    stop = commands.add_parser("stop", parents=[client_options], help="stop a running job")
    for sub in (status, logs, stop):
        sub.add_argument("job_id", metavar="JOB_ID", help="submission id, as `recolor submit` printed it")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    listing.set_defaults(handler=run_jobs_list)
    status.set_defaults(handler=run_jobs_status)
    logs.set_defaults(handler=run_jobs_logs)
    stop.set_defaults(handler=run_jobs_stop)


# What the job server's answers raise: SubmitError (ours), RuntimeError (Ray's client, e.g. an unknown job
# id or an HTTP 500), OSError (requests' connection errors, mid-way).
JOB_SERVER_ERRORS = (SubmitError, RuntimeError, OSError)


def _error(message: str) -> int:
    """One line, secrets masked (as `pipeline.cli.main` masks every other error), exit 2."""
    from ingest.cluster import mask_secrets

    print(f"recolor: error: {mask_secrets(message)}", file=sys.stderr)
    return 2


def run_submit_command(args) -> int:
    # Options after ARGS arrive inside the remainder: take submit's own out, leave the job's.
    options, job_args = args.submit_options.parse_known_args(args.job_args, namespace=args)
    if any(arg in ("-h", "--help") for arg in job_args):
        return args.command_help(options.kind)  # set by pipeline.cli, which imports this module
    forwarded = forwarded_env(extra=options.forward_env) if options.forward else {}
    try:
        env_vars, sealed, left_out = seal_credentials(forwarded, resolve_token())
        runtime_env = build_runtime_env(Path(options.working_dir), env_vars)
        entrypoint = build_entrypoint(options.kind, job_args)
        with job_client(options.address) as client:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=options.submission_id,
                entrypoint_num_gpus=options.entrypoint_num_gpus,
            )
            print(f"submitted {job_id} to {resolve_address(options.address)}: {entrypoint}", file=sys.stderr)
            print(f"  working dir {runtime_env['working_dir']}", file=sys.stderr)
            plain = [name for name in env_vars if name != sealed_env.SEALED_ENV]
            print(f"  forwarded variables: {', '.join(plain) or 'none'}", file=sys.stderr)
            if sealed:
                print(f"  sealed with the cluster token: {', '.join(sealed)}", file=sys.stderr)
            if left_out:
                print(f"  not forwarded (no cluster token to seal them with): {', '.join(left_out)}", file=sys.stderr)
            print(job_id)
            sys.stdout.flush()
            if not options.follow:
                return 0
            try:
                final = follow_logs(client, job_id)
            except KeyboardInterrupt:
                print(
                    f"\nstopped following; the job keeps running (`recolor jobs logs {job_id} --follow`, "
                    f"`recolor jobs stop {job_id}`)",
                    file=sys.stderr,
                )
                return 130
    except JOB_SERVER_ERRORS as e:
        return _error(str(e))
    print(f"job {job_id} {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


def run_jobs_list(args) -> int:
    try:
        with job_client(args.address) as client:
            jobs = client.list_jobs()
    except JOB_SERVER_ERRORS as e:
        return _error(str(e))
    jobs.sort(key=lambda job: job.start_time or 0)
    print(f"{'submission id':<30} {'status':<10} {'started':<19}  entrypoint")
    for job in jobs:
        started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else ""
        print(f"{job.submission_id or job.job_id or '-':<30} {job.status!s:<10} {started:<19}  {job.entrypoint}")
    return 0


def run_jobs_status(args) -> int:
    try:
        with job_client(args.address) as client:
            info = client.get_job_info(args.job_id)
    except JOB_SERVER_ERRORS as e:
        return _error(str(e))
    print(f"{args.job_id} {info.status}" + (f": {info.message}" if info.message else ""))
    return 0


def run_jobs_logs(args) -> int:
    try:
        with job_client(args.address) as client:
            if args.follow:
                final = follow_logs(client, args.job_id)
                print(f"job {args.job_id} {final}", file=sys.stderr)
            else:
                sys.stdout.write(client.get_job_logs(args.job_id))
    except JOB_SERVER_ERRORS as e:
        return _error(str(e))
    return 0


def run_jobs_stop(args) -> int:
    try:
        with job_client(args.address) as client:
            stopped = client.stop_job(args.job_id)
    except JOB_SERVER_ERRORS as e:
        return _error(str(e))
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0
