"""Shared fixtures, one family a module in `tests/fixtures/`: generated photos (`images`), source trees in
ImageNet and COCO layouts (`sources`), S3 servers on loopback (`s3`), a local Ray (`ray`), lake version checks
(`lake`), the CLI as a real process (`cli`), the tiny Ray Train setup and the runs its tests share (`training`),
empty MLflow stores (`tracking`), what each test costs the machine (`cpu`), and how `make test`'s workers share the
files (`schedule`).

Every asset is generated, deterministically from a seed, and each test writes only below its own `tmp_path`. One
binary is committed, on purpose: `tests/data/checkpoint-format1.pt`, a checkpoint written by recolor before the
checkpoint format changed, which must still resume (`test_checkpoint.py`).
"""

import os

import pytest

# Ray Train's controller polls its workers every 2 s by default, and a worker's report (every checkpoint) waits for
# that poll: in runs of a few dozen tiny steps the polls, not the steps, would set the pace. Set before the session's
# Ray starts, so its processes and every `recolor` process the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train starts a preemption watcher actor with every run, for spot nodes a cloud takes back; no test preempts a
# node (the elastic test kills one), and the suite starts dozens of runs: a tiny two-worker run costs the machine 24
# CPU seconds without it, 29 with it (measured 3 runs each, 2026-12-07).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# One intra-op thread a process: `make test` runs two workers on two cores, and each test's `recolor` processes and
# Ray workers beside them; a second torch thread a process only contends for a core that is already busy (OpenMP's
# threads spin while they wait). Measured 2026-12-07 with one core kept busy, the torch-heavy unit files
# (test_inception_unet, test_fid, test_fusion): 111 CPU-s and 103 s with two threads, 88 CPU-s and 89 s with one.
# Ray already gives its workers one thread a CPU they hold. Set before torch is first imported here or in a child.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fixtures.cli import CliResult, cli_runner, recolor, run_cli  # noqa: E402, F401
from fixtures.cpu import pytest_runtest_protocol  # noqa: E402, F401
from fixtures.images import (  # noqa: E402, F401
    color_photo,
    encode,
    make_image,
    make_photo,
    photo_bytes,
    photo_folder,
    photo_writer,
    write_photos,
)
from fixtures.lake import check_version, lake_check, shard_samples  # noqa: E402, F401
from fixtures.ray import ray_address, ray_local  # noqa: E402, F401
from fixtures.s3 import MotoS3Server, S3Env, moto_s3, own_s3, restart_later, s3_env, s3_server  # noqa: E402, F401
from fixtures.sources import (  # noqa: E402, F401
    COCO_CATEGORIES,
    IMAGENET_NAMES,
    CocoTree,
    ImageNetTree,
    build_coco,
    build_imagenet,
    coco_tree,
    imagenet_tree,
    make_imagenet,
)
from fixtures.tracking import mlflow_store  # noqa: E402, F401
from fixtures.training import quiet_env, reference_run, train_lake  # noqa: E402, F401


@pytest.hookimpl(optionalhook=True)  # xdist's hook: absent with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s two xdist workers: a test file at a time, files sharing session fixtures together, the longest
    first (`fixtures.schedule`)."""
    from fixtures.schedule import make_scheduler
    from fixtures.training import SHARED

    return make_scheduler(config, log, SHARED)


def pytest_collection_modifyitems(items) -> None:
    """The longest work units first (`fixtures.schedule`): the order `make test`'s two workers take them in."""
    from fixtures.schedule import longest_first
    from fixtures.training import SHARED

    longest_first(items, SHARED)
