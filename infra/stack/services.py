"""The local stack: the production roles as processes on 127.0.0.1, without Docker (`recolor stack ...`).

    recolor stack up                 # S3 (rclone), MLflow server, Ray head; prints the exports
    eval "$(recolor stack env)"      # point this shell at it
    recolor submit ingest folder s3://lake/photos --dataset photos
    recolor stack down               # stops exactly what `up` started

The roles match `infra/docker-compose.yml`: `rclone serve s3` with generated keys stands in for
MinIO (buckets `lake`, `mlflow`, `runs`), `mlflow server` keeps runs in SQLite and proxies
artifacts to `s3://mlflow/artifacts`, and a Ray head with its dashboard and job API requires a
generated token. Everything listens on 127.0.0.1 only. The stack folder (default `.stack`)
holds the S3 data, the MLflow database, a log per process, the token file and `stack.json`, the
state file (mode 600): PIDs, ports and keys.

Each service starts in its own session with `RECOLOR_STACK_ID=<id>` in its environment; `down`
signals the recorded PIDs, then ends whatever is left of those sessions, of that id and of their
descendants (Ray workers, job drivers; see `infra.stack.processes`), and touches nothing else.

About 400 lines on purpose: starting, recording, checking and stopping the services share the
state file's contract, and `down` must undo exactly what `up` did.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from infra.stack.processes import process_start_time, stack_members, still_alive
from infra.stack.s3_server import free_port, rclone_binary, wait_for_port
from ingest.cluster import FORWARDED_PREFIXES
from ingest.errors import RecolorError

DEFAULT_DIR = ".stack"
STATE_FILE = "stack.json"
TOKEN_FILE = "ray_auth_token"
TAG = "RECOLOR_STACK_ID"
BUCKETS = ("lake", "mlflow", "runs")
SERVICE_ORDER = ("ray", "mlflow", "s3")  # the order `down` stops them: jobs first, storage last
_SCRUBBED_PREFIXES = ("RAY_", *FORWARDED_PREFIXES)  # the services see none of the caller's settings


class StackError(RecolorError):
    """The stack cannot start, or there is no stack where one was expected; the message says why."""


@dataclass
class Service:
    name: str
    pid: int
    start_time: int  # milliseconds since the epoch (`infra.stack.processes`): tells our process from a reused PID
    port: int  # the port users talk to
    log: str


@dataclass
class StackState:
    """What `up` started, as recorded in `stack.json`; everything `down`, `status` and `env` need."""

    stack_id: str
    dir: str
    created: str
    access_key: str
    secret_key: str
    token_path: str
    s3_port: int
    mlflow_port: int
    dashboard_port: int
    gcs_port: int
    ray_temp_dir: str  # Ray's session folder (sockets must stay under ~100 characters, so not below `dir`)
    agent_port: int = 0  # the head's dashboard agent: jobs are accepted once it listens
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    def exports(self) -> dict[str, str]:
        """The variables that point the CLI, boto3, MLflow and `ray job` at this stack."""
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # rclone's S3 server rejects the streaming (aws-chunked) uploads that newer AWS SDKs send by
            # default to compute checksums. The project's own S3 clients need none of these (they default to
            # checksums only where required); other tools pointed at the stack (aws, mlflow's boto3) do.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}",
            "RECOLOR_LAKE": "s3://lake/lake",
            "RECOLOR_STORAGE": "s3://runs/train",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }

    def save(self) -> None:
        # Created with mode 600 before anything is written: the file holds the S3 keys.
        temp = self.path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover file keeps its old mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(temp, self.path)

    @classmethod
    def load(cls, stack_dir: str | Path) -> StackState:
        path = Path(stack_dir).absolute() / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            hint = f"start one with `recolor stack up --dir {stack_dir}`"
            raise StackError(f"no stack in {path.parent} ({hint})") from None
        data["services"] = {name: Service(**value) for name, value in data["services"].items()}
        return cls(**data)


# --- processes ---------------------------------------------------------------------------------------


def is_running(service: Service) -> bool:
    return process_start_time(service.pid) == service.start_time


def stack_processes(state: StackState) -> dict[int, int]:
    """The live processes of this stack, {pid: start_time} (see `infra.stack.processes`)."""
    leaders = {service.pid: service.start_time for service in state.services.values()}
    return stack_members(f"{TAG}={state.stack_id}".encode(), leaders)


def _spawn(name: str, command: list[str], env: dict[str, str], state: StackState, port: int) -> subprocess.Popen:
    log_path = Path(state.dir) / "logs" / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=state.dir,
            start_new_session=True,  # own process group: the user's Ctrl-C in this shell does not reach it
        )
    start_time = None
    while start_time is None and process.poll() is None:
        start_time = process_start_time(process.pid)
    state.services[name] = Service(name, process.pid, start_time or 0, port, str(log_path))
    state.save()  # after every start, so that `down` can clean up after a failed `up`
    return process


def _base_env(stack_id: str) -> dict[str, str]:
    # The services see none of the caller's endpoints or Ray settings: a job gets what `recolor submit` forwards.
    env = {name: value for name, value in os.environ.items() if not name.startswith(_SCRUBBED_PREFIXES)}
    # Ray job entrypoints say `python`: the head's PATH must find this environment's interpreter first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[TAG] = stack_id
    return env


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _wait_http(name: str, url: str, process: subprocess.Popen, timeout: float, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with code {process.returncode} while starting")
        if _http_ok(url, headers):
            return
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout:.0f} s")


# --- up / down / status -----------------------------------------------------------------------------------


def _port(preferred: int | None, default: int) -> int:
    """`preferred` if given; else `default` when it is free (stable URLs to bookmark), else any free port."""
    if preferred:
        return preferred
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", default))
            return default
        except OSError:
            return free_port()


def start_stack(
    stack_dir: str | Path,
    dashboard_port: int | None = None,
    mlflow_port: int | None = None,
    num_cpus: int = 2,
    timeout: float = 180.0,
) -> StackState:
    """Start S3, MLflow and a Ray head on 127.0.0.1, recording them in `<stack_dir>/stack.json`.

    Args:
        stack_dir: the stack's folder (created; data, logs and state live there).
        dashboard_port: Ray dashboard and job API port (default 8265 when free).
        mlflow_port: MLflow server port (default 5000 when free).
        num_cpus: CPUs the Ray head offers to jobs.
        timeout: seconds to wait for every service to answer.

    Returns:
        The recorded state. On failure everything already started is stopped and StackError is raised.
    """
    stack_dir = Path(stack_dir).absolute()
    stack_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(stack_dir, 0o700)  # S3 data, the MLflow database and logs: the user's alone (mkdir's mode obeys umask)
    if (stack_dir / STATE_FILE).exists():
        previous = StackState.load(stack_dir)
        if stack_processes(previous):
            raise StackError(f"a stack is already running in {stack_dir} (`recolor stack down --dir {stack_dir}`)")
        _keep_ray_logs(previous)  # a stack that died without `down`: keep its logs, start afresh
    (stack_dir / "logs").mkdir(exist_ok=True)
    stack_id = secrets.token_hex(8)
    token_path = stack_dir / TOKEN_FILE
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    state = StackState(
        stack_id=stack_id,
        dir=str(stack_dir),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        access_key="recolor" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
        token_path=str(token_path),
        s3_port=free_port(),
        mlflow_port=_port(mlflow_port, 5000),
        dashboard_port=_port(dashboard_port, 8265),
        gcs_port=free_port(),
        # Inside a private (700) folder of its own: Ray makes its temp folder world-writable (777) as it starts and
        # again after every job, so that folder's mode cannot be the protection; its parent's is.
        ray_temp_dir=str(_private_dir(Path(tempfile.gettempdir()) / f"recolor-stack-{stack_id}") / "ray"),
        agent_port=free_port(),
    )
    state.save()
    try:
        processes = _start_services(state, num_cpus)
        _wait_ready(state, processes, timeout)
        os.chmod(state.ray_temp_dir, 0o700)  # as Ray left it at start; the private parent is what holds
    except BaseException:
        with contextlib.suppress(Exception):  # the reason it failed matters more than a failed cleanup
            stop_stack(stack_dir)
        raise
    return state


def _start_services(state: StackState, num_cpus: int) -> dict[str, subprocess.Popen]:
    s3_root = Path(state.dir) / "s3"
    for bucket in BUCKETS:
        # Made before the server starts: rclone caches its bucket list, so later mkdirs would stay invisible.
        (s3_root / bucket).mkdir(parents=True, exist_ok=True)
    base = _base_env(state.stack_id)
    s3_env = {name: value for name, value in state.exports().items() if name.startswith("AWS_")}
    processes = {}
    # The key pair goes in by environment, not argv, where any local user could read it with `ps`.
    # rclone reads list flags from the environment as CSV, so the "key,secret" pair is quoted.
    rclone_env = base | {"RCLONE_AUTH_KEY": f'"{state.access_key},{state.secret_key}"'}
    rclone = [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{state.s3_port}", "--config", "/dev/null"]
    processes["s3"] = _spawn("s3", [*rclone, str(s3_root)], rclone_env, state, state.s3_port)

    mlflow_env = base | s3_env | {"MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]}
    # MLflow 3's server also starts a job runner and three Huey consumers (GenAI judges, trace rollups) that poll
    # the store all the time: a quarter of a core here, for jobs recolor never runs.
    mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mlflow = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(state.mlflow_port)]
    mlflow += ["--backend-store-uri", f"sqlite:///{state.dir}/mlflow.db"]
    mlflow += ["--artifacts-destination", "s3://mlflow/artifacts", "--workers", "1"]
    processes["mlflow"] = _spawn("mlflow", mlflow, mlflow_env, state, state.mlflow_port)

    ray_env = base | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state.token_path,
        # On Linux Ray turns `--node-ip-address 127.0.0.1` into the machine's address and binds its gRPC
        # servers there; in this single-node mode it keeps the loopback address, so every port stays local.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # `down` should not wait 30 s for a drain
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray = [_executable("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    ray += ["--port", str(state.gcs_port), "--dashboard-host", "127.0.0.1"]
    ray += ["--dashboard-port", str(state.dashboard_port), "--num-cpus", str(num_cpus)]
    ray += ["--temp-dir", state.ray_temp_dir, "--disable-usage-stats"]
    # Explicit free ports: Ray's defaults (52365, 10001, ...) clash with any other Ray on this machine.
    ray += ["--dashboard-agent-listen-port", str(state.agent_port)]
    for flag in (
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
    ):
        ray += [flag, str(free_port())]
    processes["ray"] = _spawn("ray", ray, ray_env, state, state.dashboard_port)
    # Ray's own logs stay in its session folder; a link makes them easy to find (`down` moves them here).
    os.symlink(state.ray_temp_dir, Path(state.dir) / "logs" / "ray-session", target_is_directory=True)
    return processes


def _wait_ready(state: StackState, processes: dict[str, subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        wait_for_port(state.s3_port, timeout, processes["s3"])
    except (RuntimeError, TimeoutError) as e:
        raise StackError(f"S3 server: {e}; see {state.services['s3'].log}") from e
    for name, url, headers in (
        ("mlflow", f"http://127.0.0.1:{state.mlflow_port}/health", None),
        ("ray", f"http://127.0.0.1:{state.dashboard_port}/api/version", _token_header(state)),
    ):
        try:
            _wait_http(name, url, processes[name], max(deadline - time.monotonic(), 1.0), headers)
        except StackError as e:
            raise StackError(f"{e}; see {state.services[name].log}") from e
    # The job API answers before the head's agent registers; a job submitted then is refused.
    try:
        wait_for_port(state.agent_port, max(deadline - time.monotonic(), 1.0), processes["ray"])
    except (RuntimeError, TimeoutError) as e:
        raise StackError(f"Ray's dashboard agent: {e}; see {state.ray_temp_dir}/session_latest/logs") from e


def _token_header(state: StackState) -> dict[str, str]:
    return {"Authorization": "Bearer " + Path(state.token_path).read_text().strip()}


def stop_stack(stack_dir: str | Path, timeout: float = 30.0) -> list[str]:
    """Stop what `start_stack` recorded in `stack_dir`, and nothing else; returns what was stopped.

    The recorded leaders get SIGTERM (a PID whose start time changed belongs to someone else now
    and is left alone), Ray first so that jobs end before their storage does. Whatever of the
    stack still runs after `timeout` seconds (or at once, when no leader was left to stop it) gets
    SIGTERM, then SIGKILL. Data and logs stay; the state and token files are removed.
    """
    state = StackState.load(stack_dir)
    known = stack_processes(state)  # before any signal: the session and parent links still hold
    stopped = []
    for name in SERVICE_ORDER:
        service = state.services.get(name)
        if service is not None and is_running(service):
            os.kill(service.pid, signal.SIGTERM)
            stopped.append(f"{name} (pid {service.pid})")
            if name == "ray":  # Ray stops its workers and job drivers itself when given the time
                _wait_gone({service.pid: service.start_time}, timeout)

    def remaining() -> dict[int, int]:
        known.update(stack_processes(state))
        return still_alive(known)

    left = _wait_gone(remaining, timeout if stopped else 0.0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        stopped.append(f"{len(left)} leftover process(es) sent {sig.name}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        left = _wait_gone(remaining, 5.0)
    if left:
        raise StackError(f"processes {sorted(left)} of stack {state.stack_id} survived SIGKILL")
    _keep_ray_logs(state)
    Path(state.token_path).unlink(missing_ok=True)  # the token of a cluster that no longer exists
    state.path.unlink(missing_ok=True)
    return stopped


def _wait_gone(alive, timeout: float) -> dict[int, int]:
    """Wait until `alive` (a {pid: start_time} dict, or a function returning one) is empty; returns what is left."""
    check = alive if callable(alive) else lambda: still_alive(alive)
    deadline = time.monotonic() + timeout
    left = check()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = check()
    return left


def _keep_ray_logs(state: StackState) -> None:
    # Ray's session logs lived in the short temp folder; move them into the stack folder, drop the rest.
    link = Path(state.dir) / "logs" / "ray-session"
    if link.is_symlink():
        link.unlink()
    temp = Path(state.ray_temp_dir)
    sessions = sorted(temp.glob("session_2*"))
    if sessions and (sessions[-1] / "logs").is_dir():
        target = Path(state.dir) / "logs" / f"ray-{sessions[-1].name}"
        shutil.move(str(sessions[-1] / "logs"), target)
    shutil.rmtree(temp.parent if temp.name == "ray" else temp, ignore_errors=True)  # with its private parent


def _private_dir(path: Path) -> Path:
    """`path` created (or made) readable by its owner alone: 700 whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def stack_status(state: StackState) -> dict[str, dict]:
    """Per service: running (recorded PID alive), answering (its port accepts connections), URL."""

    def answers(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    urls = {
        "s3": f"http://127.0.0.1:{state.s3_port}",
        "mlflow": f"http://127.0.0.1:{state.mlflow_port}",
        "ray": f"http://127.0.0.1:{state.dashboard_port}",
    }
    return {
        name: {
            "pid": service.pid,
            "running": is_running(service),
            "answering": answers(service.port),
            "url": urls[name],
            "log": service.log,
        }
        for name, service in state.services.items()
    }
