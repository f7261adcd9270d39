"""How a failed training run is described: one line naming the error a worker raised, never a secret."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.train import ControllerError, WorkerGroupError

from ingest.faults import InjectedFault
from pipeline.trainer import describe_failure


def test_a_worker_group_error_is_described_by_the_workers_own_error_not_rays_wrapper() -> None:
    # Rank 0 only died because rank 1 failed; rank 1's error is the one that says why.
    error = WorkerGroupError(
        "rank 0: actor died\nrank 1: Traceback ...", {0: ActorDiedError(), 1: InjectedFault("injected fault at 'x'")}
    )
    assert str(error).splitlines()[0] == "Training failed due to worker errors:"
    assert describe_failure(error) == "InjectedFault: injected fault at 'x'"


def test_workers_that_only_died_are_described_by_the_first_death() -> None:
    error = WorkerGroupError("...", {1: ActorDiedError(), 0: RayActorError(error_msg="node lost\nmore")})
    assert describe_failure(error) == "RayActorError: node lost"


def test_a_task_error_and_a_controller_error_are_described_by_their_cause() -> None:
    task_error = RayTaskError("read_shard", "Traceback (most recent call last): ...", ValueError("bad shard\ndetails"))
    assert describe_failure(task_error) == "ValueError: bad shard"
    assert describe_failure(task_error.as_instanceof_cause()) == "ValueError: bad shard"
    assert describe_failure(ControllerError(RuntimeError("no placement group"))) == "RuntimeError: no placement group"


def test_a_description_masks_credentials_and_url_passwords_and_stays_short(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    error = WorkerGroupError("...", {0: OSError("denied with wJalrXUtnFEMI at https://ann:hunter2@minio:9000/b")})
    assert describe_failure(error) == "OSError: denied with *** at https://ann:***@minio:9000/b"
    long = describe_failure(RuntimeError("x" * 1000))
    assert len(long) == 500 and long.endswith("...")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), "interrupted"),
        (RuntimeError(), "RuntimeError"),
        (ValueError("  \nsecond"), "ValueError: second"),
    ],
)
def test_plain_errors_are_described_by_type_and_first_line(error, expected) -> None:
    assert describe_failure(error) == expected
