"""The local stack's bookkeeping: the state file, and which processes count as the stack's (with `sleep`s)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time

import pytest

from infra.stack.processes import process_start_time, stack_members, still_alive
from infra.stack.services import StackError, StackState

TAG = b"RECOLOR_STACK_ID=unit-test-" + str(os.getpid()).encode()


def make_state(tmp_path) -> StackState:
    return StackState(
        stack_id="abc",
        dir=str(tmp_path),
        created="2026-01-01T00:00:00+00:00",
        access_key="recolorkey",
        secret_key="very-secret",
        token_path=str(tmp_path / "ray_auth_token"),
        s3_port=9000,
        mlflow_port=5000,
        dashboard_port=8265,
        gcs_port=6379,
        ray_temp_dir="/tmp/recolor-stack-abc",
    )


def test_state_file_is_private_and_round_trips(tmp_path) -> None:
    state = make_state(tmp_path)
    state.save()
    assert stat.S_IMODE(os.stat(tmp_path / "stack.json").st_mode) == 0o600
    loaded = StackState.load(tmp_path)
    assert loaded == state
    exports = loaded.exports()
    assert exports["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert exports["AWS_SECRET_ACCESS_KEY"] == "very-secret"
    assert exports["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert exports["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"
    assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")
    assert exports["RECOLOR_LAKE"].startswith("s3://lake/")


def test_no_stack_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(StackError, match=r"no stack in .*recolor stack up --dir"):
        StackState.load(tmp_path / "nothing")


@pytest.fixture
def spawned():
    """`spawn(command, tagged=False) -> Popen` in a new session; every group is SIGKILLed afterwards."""
    processes: list[subprocess.Popen] = []

    def spawn(command: str, tagged: bool = False) -> subprocess.Popen:
        env = dict(os.environ)
        if tagged:
            name, _, value = TAG.decode().partition("=")
            env[name] = value
        process = subprocess.Popen(["sh", "-c", command], env=env, start_new_session=True)
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.add(int(entry))
    return found


def wait_children(pid: int, count: int) -> set[int]:
    deadline = time.monotonic() + 5
    while len(children := children_of(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return children


def test_members_by_session_tag_and_parentage(spawned) -> None:
    # The leader's children: one keeps the tag, one runs with an empty environment (as if setproctitle had
    # overwritten it), one leaves the session with an empty environment (as a Ray job driver leaves it).
    leader = spawned("sleep 30 & env -i sleep 31 & setsid env -i sleep 32 & wait", tagged=True)
    children = wait_children(leader.pid, 3)
    bystander = spawned("sleep 33")  # untagged, its own session: someone else's
    time.sleep(0.2)
    members = stack_members(TAG, {})
    assert {leader.pid, *children} <= set(members)
    assert bystander.pid not in members
    assert members[leader.pid] == process_start_time(leader.pid)


def test_recorded_leader_counts_only_with_its_start_time(spawned) -> None:
    leader = spawned("env -i sleep 30 & wait")  # no tag anywhere: only the recorded leader makes it ours
    (child,) = wait_children(leader.pid, 1)
    start = process_start_time(leader.pid)
    assert set(stack_members(TAG, {leader.pid: start})) == {leader.pid, child}
    # The same PID with another start time is a reused PID: a stranger's session, left alone.
    assert stack_members(TAG, {leader.pid: start + 1}) == {}


def test_still_alive_checks_start_times(spawned) -> None:
    process = spawned("sleep 30")
    start = process_start_time(process.pid)
    assert still_alive({process.pid: start, process.pid + 10_000_000: 1}) == {process.pid: start}
    assert still_alive({process.pid: start + 1}) == {}
