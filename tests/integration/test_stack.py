"""The local stack as real processes: `recolor stack up`, its services, a Ray job submitted through it, `down`.

One stack serves the module (starting it costs about 25 s): `rclone serve s3`, `mlflow server` and a
Ray head with token auth, on 127.0.0.1. The tests check what a user relies on: the printed keys open
S3, MLflow answers and stores artifacts in S3, the job API refuses requests without the token, no port
listens beyond loopback, `recolor submit ingest` commits a lake version in S3, and `down` ends every
process of the stack and nothing else. The stack is torn down after the module even when a test fails.

Jobs go through the stack as a user submits them: the main job end to end (ingest, train, evaluate --promote,
colorize) on a long training run soaked on the way (`soak.py`) with the stack's S3 restarted; its ingest is checked
as any `submit ingest` is (`check_ingest_job`), and a job that fails fails its `submit`.

Long on purpose: one module-scoped stack (25 s to start) serves every test here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest
import requests
from botocore.exceptions import ClientError

from infra.stack.processes import still_alive
from infra.stack.s3_server import free_port
from infra.stack.services import StackError, StackState, stack_processes, stop_stack
from ingest.lake import Lake

pytestmark = [pytest.mark.slow, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
SMALL_SHARDS = ["--size", "64", "--shard-size", "40k"]


@dataclass
class Stack:
    dir: Path
    exports: dict[str, str]  # as `recolor stack up` printed them
    state: StackState

    def s3(self, secret: str | None = None):
        return boto3.client(
            "s3",
            endpoint_url=self.exports["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=secret or self.exports["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def secrets(self) -> list[str]:
        return [self.state.secret_key, Path(self.state.token_path).read_text().strip()]


def parse_exports(text: str) -> dict[str, str]:
    exports = {}
    for line in text.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        name, _, value = words[1].partition("=")
        exports[name] = value
    return exports


def teardown(stack_dir: Path, cli_runner) -> None:
    """`recolor stack down`; should it fail, stop the stack in this process, and say so."""
    if not (stack_dir / "stack.json").exists():
        return
    result = cli_runner("stack", "down", "--dir", stack_dir, cwd=stack_dir.parent, timeout=120)
    if result.returncode != 0 or (stack_dir / "stack.json").exists():
        with contextlib.suppress(StackError):
            stop_stack(stack_dir)
        raise AssertionError(f"`recolor stack down` failed: {result.stdout}{result.stderr}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, cli_runner):
    base = tmp_path_factory.mktemp("stack")
    stack_dir = base / "stack"
    try:
        # Free ports rather than 8265/5000: another Ray or MLflow on this machine must not matter.
        ports = ["--dashboard-port", str(free_port()), "--mlflow-port", str(free_port())]
        up = cli_runner("stack", "up", "--dir", stack_dir, *ports, cwd=base, timeout=240)
        assert up.returncode == 0, up.stderr + "".join(
            f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted((stack_dir / "logs").glob("*.log"))
        )
        assert "up in" in up.stderr
        yield Stack(stack_dir, parse_exports(up.stdout), StackState.load(stack_dir))
    finally:
        teardown(stack_dir, cli_runner)


def submit(stack: Stack, cli_runner, kind: str, *args, timeout: float = 300, env: dict | None = None):
    """`recolor submit KIND ARGS...` against the stack from a shell with its exports; follows the logs,
    so the job's own output is in `stdout` (after the job id on the first line)."""
    return cli_runner("submit", kind, *args, cwd=stack.dir.parent, env=stack.exports | (env or {}), timeout=timeout)


def ray_logs(stack: Stack, limit: int = 4000) -> str:
    """The tails of the head's job and runtime-env logs: what a failed job's own log may not say."""
    logs = Path(stack.state.ray_temp_dir) / "session_latest" / "logs"
    patterns = ("job-driver-*.log", "runtime_env_setup-*.log", "dashboard_JobHead.log", "runtime_env_agent.log")
    return "".join(
        f"\n--- {path.name}\n{path.read_text(errors='replace')[-limit:]}"
        for pattern in patterns
        for path in sorted(logs.glob(pattern))
    )


def mlflow_client(stack: Stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])


def registered_model_uri(train) -> str:
    """`models:/NAME/VERSION` from the train job's summary line "registered NAME version N"."""
    match = re.search(r"registered (\S+) version (\d+)", train.stdout)
    assert match, train.stdout[-3000:]
    return f"models:/{match.group(1)}/{match.group(2)}"


# --- the services -------------------------------------------------------------------------------------


def test_s3_answers_to_the_printed_keys_only(stack) -> None:
    assert {b["Name"] for b in stack.s3().list_buckets()["Buckets"]} >= {"lake", "mlflow", "runs"}
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        stack.s3(secret="not-the-secret").list_buckets()


def test_mlflow_answers_and_keeps_artifacts_in_s3(stack) -> None:
    client = mlflow_client(stack)
    assert "Default" in [e.name for e in client.search_experiments()]
    experiment = client.create_experiment("stack-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "val/l1_ab", 7.5)
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")
    assert client.get_run(run.info.run_id).data.metrics == {"val/l1_ab": 7.5}
    keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(
        key.startswith("artifacts/") and key.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for key in keys
    ), keys
    # Without MLflow 3's job runner and its Huey consumers (jobs recolor never runs), which poll the store all along.
    commands = []
    for pid in stack_processes(stack.state):
        with contextlib.suppress(psutil.Error):
            commands.append(" ".join(psutil.Process(pid).cmdline()))
    assert any("mlflow" in command for command in commands), commands
    assert not [command for command in commands if "huey" in command or "jobs._job_runner" in command], commands


def test_state_is_private_and_logs_hold_no_secrets(stack) -> None:
    for path in (stack.dir / "stack.json", Path(stack.state.token_path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Ray's logs and sockets are below its temp folder, which Ray makes 777 after every job: the private folder
    # around it (700) is what keeps them the user's (this runs after the jobs of the tests above).
    for folder in (stack.dir, Path(stack.state.ray_temp_dir).parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    logs = [p for p in (stack.dir / "logs").iterdir() if p.is_file()]
    logs += [p for p in Path(stack.state.ray_temp_dir).rglob("*") if p.is_file() and not p.is_socket()]
    assert {p.name for p in logs} >= {"s3.log", "mlflow.log", "ray.log"}
    for path in logs:
        with contextlib.suppress(OSError):
            text = path.read_bytes()
            for secret in stack.secrets():
                assert secret.encode() not in text, f"a secret is in {path}"


def test_job_api_requires_the_token(stack, cli_runner, monkeypatch, tmp_path) -> None:
    url = stack.exports["RAY_API_SERVER_ADDRESS"]
    token = Path(stack.state.token_path).read_text().strip()
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/jobs/", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
    assert requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).ok

    listed = cli_runner("jobs", "list", cwd=tmp_path, env=stack.exports)
    assert listed.returncode == 0, listed.stderr
    # Without RAY_AUTH_TOKEN(_PATH) and with an empty home (no ~/.ray/auth_token): refused, nothing submitted.
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    bare = {k: v for k, v in stack.exports.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    refused = cli_runner("jobs", "list", cwd=tmp_path, env=bare)
    assert refused.returncode == 2 and "requires a token" in refused.stderr, refused.stderr
    refused = cli_runner(
        "submit", "--no-follow", "ingest", "folder", "s3://lake/none", "--dataset", "x", cwd=tmp_path, env=bare
    )
    assert refused.returncode == 2 and "requires a token" in refused.stderr, refused.stderr
    wrong = cli_runner("jobs", "list", cwd=tmp_path, env=bare | {"RAY_AUTH_TOKEN": "wrong"})
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr, wrong.stderr
    jobs = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert not any("s3://lake/none" in job["entrypoint"] for job in jobs)


def listening_sockets(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state owned by `pids`, read from /proc/net."""
    inodes = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(
                (
                    socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw),
                    int(port_hex, 16),
                    inodes[fields[9]],
                )
            )
    return found


def other_addresses() -> set[str]:
    """This machine's IPv4 addresses other than loopback."""
    addresses = set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        addresses |= set(subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split())
    with contextlib.suppress(OSError):
        addresses |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    return {a for a in addresses if ":" not in a and not a.startswith("127.")}


def test_every_port_listens_on_loopback_only(stack) -> None:
    pids = stack_processes(stack.state)
    sockets = listening_sockets(pids)
    ports = {port for _, port, _ in sockets}
    state = stack.state
    assert {state.s3_port, state.mlflow_port, state.dashboard_port, state.gcs_port} <= ports
    exposed = [(a, p, pid) for a, p, pid in sockets if a not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    for address in other_addresses():
        for port in sorted(ports):
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"{address}:{port} accepts connections"


# --- a job through the stack ------------------------------------------------------------------------------


def check_ingest_job(stack: Stack, result, dataset: str, photos: int, cli_runner, tmp_path: Path, lake_check) -> None:
    """What `recolor submit ingest` into the stack's S3 leaves: the job's own output followed live, the S3 keys sealed
    (in no log of Ray's), a version of every photo in s3://lake/lake, and the job in `recolor jobs`."""
    assert result.returncode == 0, result.stdout + result.stderr + ray_logs(stack)
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert f"committed {dataset}@1 (train" in result.stdout  # the job's own output, followed live
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert "forwarded variables: AWS_DEFAULT_REGION, AWS_ENDPOINT_URL" in result.stderr
    assert "sealed with the cluster token: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in result.stderr
    # The head has no S3 keys of its own: the job's tasks wrote to S3 with the sealed ones. Ray logs every
    # runtime environment in plain text; the secret must be in none of its logs.
    for secret in stack.secrets():
        assert secret not in result.stdout + result.stderr
    for path in Path(stack.state.ray_temp_dir).rglob("*"):
        if path.is_file() and not path.is_socket() and path.suffix in (".log", ".out", ".err", ".txt"):
            assert stack.state.secret_key.encode() not in path.read_bytes(), f"the S3 secret is in {path}"

    client = stack.s3()
    record = json.loads(client.get_object(Bucket="lake", Key=f"lake/{dataset}/versions/000001.json")["Body"].read())
    assert sum(record["counts"].values()) == photos and record["counts"]["train"] >= 4, record["counts"]
    lake = Lake("s3://lake/lake")
    assert len(lake_check(lake, lake.resolve(f"{dataset}@1"))) == photos

    logs = cli_runner("jobs", "logs", job_id, cwd=tmp_path, env=stack.exports)
    assert logs.returncode == 0 and f"committed {dataset}@1" in logs.stdout
    listed = cli_runner("jobs", "list", cwd=tmp_path, env=stack.exports)
    assert any(line.startswith(job_id) and "SUCCEEDED" in line for line in listed.stdout.splitlines()), listed.stdout


def test_a_failing_job_fails_the_submit(stack, cli_runner) -> None:
    result = submit(stack, cli_runner, "ingest", "folder", "s3://lake/no-such-folder", "--dataset", "nothing")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr


def stack_s3_outage(stack: Stack) -> tuple:
    """(stop, start) of the stack's S3 server: the same command, environment and port again (a real outage:
    connections refused), recorded in `stack.json` so that `down` stops the new process."""
    from infra.stack.s3_server import wait_for_port
    from infra.stack.services import _spawn

    service = stack.state.services["s3"]
    command = [part.decode() for part in Path(f"/proc/{service.pid}/cmdline").read_bytes().split(b"\0") if part]
    environ = Path(f"/proc/{service.pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    current = {"pid": service.pid}

    def stop() -> None:
        os.kill(current["pid"], signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(current["pid"], 0)
        while still_alive({current["pid"]: service.start_time}):
            time.sleep(0.05)

    def start() -> None:
        state = StackState.load(stack.dir)
        process = _spawn("s3", command, env, state, service.port)
        current["pid"] = process.pid
        wait_for_port(service.port, 30, process)
        stack.state = StackState.load(stack.dir)  # the later tests (down) see the new process

    return stop, start


def test_main_job_end_to_end_through_a_long_soaked_run_on_the_stack(
    stack, cli_runner, photo_writer, tmp_path, monkeypatch, lake_check
) -> None:
    """Issue 5's end to end and issue 15's soak, as a user runs them through the stack, on one training run:
    `submit ingest` into s3:// (`check_ingest_job`: the keys sealed, every photo in the version, `recolor jobs`);
    `submit train` (two DDP workers) while rotations happen, rank 1 is killed mid-epoch
    and the stack's S3 (lake, checkpoints and Ray Train's run state) is down for a few seconds (`soak.py`); the same
    `submit train` again trains nothing; then `submit evaluate --promote` of the version the run registered and a
    Ray Data `submit colorize` from s3:// to s3:// with the champion. One run serves both: each is a minute of
    training through the job server, and everything the main job checks after training holds for a soaked run.
    (A submission without the token is refused: `test_job_api_requires_the_token`.) This is the suite's one soak:
    a second one, with the run's storage in a local folder, ran the same checks with an outage that reached the
    lake's reads only, for 80 s of the suite; local run storage is rotated, killed and resumed in `test_train_ray`."""
    import soak

    client = stack.s3()
    for path in photo_writer(tmp_path / "photos", range(4000, 4000 + soak.PHOTOS), width=80, height=64):
        client.upload_file(str(path), "lake", f"sources/soak/{path.name}")
    ingest = submit(stack, cli_runner, "ingest", "folder", "s3://lake/sources/soak", "--dataset", "soak", *SMALL_SHARDS)
    for name, value in stack.exports.items():
        monkeypatch.setenv(name, value)
    check_ingest_job(stack, ingest, "soak", soak.PHOTOS, cli_runner, tmp_path, lake_check)
    train_samples = Lake("s3://lake/lake").resolve("soak").record["counts"]["train"]
    run_uri = "s3://runs/train/soak"  # $RECOLOR_STORAGE of the stack, and the run's name
    args = ["configs/tiny.yaml", "--dataset", "soak", "--workers", str(soak.WORKERS), "--name", "soak",
            *soak.OVERRIDES]  # fmt: skip
    env = soak.failpoint_env(tmp_path)
    outage = soak.Outage(run_uri, *stack_s3_outage(stack))
    try:
        train = submit(stack, cli_runner, "train", *args, env=env, timeout=600)
        finished_at = time.monotonic()
    finally:
        outage.join()
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:] + ray_logs(stack)
    mlflow = mlflow_client(stack)
    marker = tmp_path / "killed-once"
    folders = soak.check_soaked_run(run_uri, train_samples, outage, finished_at, marker, mlflow, "soak")
    soak.check_rerun(submit(stack, cli_runner, "train", *args, env=env), run_uri, folders, mlflow, "soak")

    # The main job's checks of the finished run: its metrics, lineage and artifacts (in S3), then evaluate --promote.
    experiment = mlflow.get_experiment_by_name("recolor")
    (run,) = mlflow.search_runs([experiment.experiment_id], filter_string="tags.`recolor.run_name` = 'soak'")
    assert {"train/loss_D", "train/loss_G", "train/loss_G_L1", "val/l1_ab", "val/gray_l1_ab"} <= set(run.data.metrics)
    assert run.data.tags["recolor.datasets"] == "soak@1"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    mine = [key for key in keys if f"/{run.info.run_id}/artifacts/" in key]
    assert any("/samples/" in key and key.endswith(".png") for key in mine), keys
    assert any(key.endswith("plots/loss_curves.png") for key in mine), keys
    model = registered_model_uri(train)
    evaluate = submit(stack, cli_runner, "evaluate", "--model", model, "--dataset", "soak", "--promote")
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr + ray_logs(stack)
    assert "promotion: promoted" in evaluate.stdout
    champion = mlflow.get_model_version_by_alias("colorizer", "champion")
    assert champion.run_id == run.info.run_id
    assert f"models:/colorizer/{champion.version}" == model

    # The archive colorized on the cluster: a Ray Data job from s3:// to s3:// with the champion.
    colorize = submit(stack, cli_runner, "colorize", "s3://lake/sources/soak", "-o", "s3://lake/colorized/soak",
                      "--model", "models:/colorizer@champion", "--no-progress")  # fmt: skip
    assert colorize.returncode == 0, colorize.stdout[-3000:] + colorize.stderr[-3000:] + ray_logs(stack)
    assert f"colorized {soak.PHOTOS} image(s) into s3://lake/colorized/soak" in colorize.stdout
    listed = client.list_objects_v2(Bucket="lake", Prefix="colorized/soak/").get("Contents", [])
    assert len([o for o in listed if o["Key"].endswith(".png")]) == soak.PHOTOS, listed


# --- down (last: it ends the module's stack) -------------------------------------------------------------


def test_down_stops_the_stack_and_nothing_else(stack, cli_runner) -> None:
    # After every job of the tests above (Ray resets its temp folder to 777 after each), its logs and sockets
    # are still the user's alone: the folder around it is 700.
    assert stat.S_IMODE(Path(stack.state.ray_temp_dir).parent.stat().st_mode) == 0o700
    members = stack_processes(stack.state)
    leaders = {service.pid for service in stack.state.services.values()}
    assert leaders <= set(members) and len(members) > len(leaders)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        down = cli_runner("stack", "down", "--dir", stack.dir, cwd=stack.dir.parent, timeout=120)
        assert down.returncode == 0, down.stderr
        assert "ray (pid" in down.stdout and "mlflow (pid" in down.stdout and "s3 (pid" in down.stdout
        assert still_alive(members) == {}
        assert bystander.poll() is None, "down killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
    for port in (stack.state.s3_port, stack.state.mlflow_port, stack.state.dashboard_port, stack.state.gcs_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, port
    assert not (stack.dir / "stack.json").exists() and not Path(stack.state.token_path).exists()
    assert (stack.dir / "logs" / "ray.log").exists() and list((stack.dir / "logs").glob("ray-session_*"))
    assert not Path(stack.state.ray_temp_dir).exists() and not Path(stack.state.ray_temp_dir).parent.exists()
    again = cli_runner("stack", "down", "--dir", stack.dir, cwd=stack.dir.parent)
    assert again.returncode == 1 and "no stack in" in again.stderr
