"""Real Ray Train DDP with two CPU workers (gloo) on a tiny lake: identical ranks, exact resume, a killed worker.

The runs are `fixtures.training`'s tiny deterministic setup on the session's local Ray (`ray_local`, which
`run_training` reuses): two runs that train on the same samples end with bit-identical weights, so a resumed or
restarted run is checked against the uninterrupted one, `reference_run` (run U), trained once a session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.training import (
    BATCH,
    REPO,
    WORKERS,
    checkpoint_dirs,
    differing,
    load_rank,
    start_recorder,
    starts,
    state_saver,
    tiny_config,
    worker_log,
)
from ray.util import placement_group_table

from pipeline.checkpoint import CHECKPOINT_FILE, load_checkpoint
from pipeline.config import DataConfig
from pipeline.data.plan import DataPlan
from pipeline.models import build_generator
from pipeline.train.driver import run_training

pytestmark = pytest.mark.slow  # on one xdist worker with the other readers of `reference_run` (SHARED)


# --- tests -------------------------------------------------------------------------------------------


def test_both_ranks_hold_identical_networks_after_training(reference_run) -> None:
    result, root, steps = reference_run.result, reference_run.root, reference_run.steps
    rank0, rank1 = load_rank(root, 0), load_rank(root, 1)
    assert rank0["position"] == rank1["position"] == {"stage": 1, "epoch": 0, "step_in_epoch": 0, "global_step": steps}
    for network in ("generator", "discriminator"):
        assert not differing(rank0[network], rank1[network]), f"{network} differs between ranks"
    assert any("running_mean" in name for name in rank0["generator"])  # BatchNorm buffers were compared too
    # Two gloo ranks trained with DDP's buffer broadcast off, and the buffers above still agree (_sync_buffers).
    assert rank0["broadcast_buffers"] == rank1["broadcast_buffers"] == [False, False]

    # What rank 0 holds is what the run's last checkpoint holds; training did move the weights.
    payload = load_checkpoint(result.checkpoint)
    assert payload["position"]["global_step"] == steps == int(result.metrics["global_step"])
    assert not differing(payload["generator"], rank0["generator"])
    torch.manual_seed(0)  # the workers' initial weights (config.seed 0)
    initial = build_generator("unet_256", norm="batch", base_filters=4, num_downs=6).state_dict()
    moved = differing(initial, rank0["generator"])
    assert any(name.endswith("weight") for name in moved) and any("running_var" in name for name in moved)
    assert result.metrics["val/count"] == result.plan.count("val")
    assert starts(root / "starts") == [0]


def test_rerun_resumes_mid_epoch_past_a_corrupt_latest_checkpoint_and_matches_the_uninterrupted_run(
    reference_run, train_lake, tmp_path, quiet_env, ray_local
) -> None:
    """Run K stops mid-epoch with checkpoints at steps 3 and 6; the one of step 6 is torn (a write cut short). The
    rerun of the same name resumes from step 3, says why, replays nothing and ends with run U's weights. Run K
    reads with 2 loader processes in each rank, run U in the rank's own process: the same batches."""
    steps = reference_run.steps
    lake, _ = train_lake
    storage = tmp_path / "runs"
    data = DataConfig(datasets=["photos"], lake=lake, batch_size=BATCH, shuffle_window=8, loader_workers=2)

    run_training(tiny_config(lake, storage, "k", max_steps=6, checkpoint_every=3, data=data))
    before, latest = checkpoint_dirs(storage / "k")[-2:]
    positions = [load_checkpoint(path)["position"] for path in (before, latest)]
    assert positions == [  # mid-epoch (8 steps), off the shuffle windows' edges
        {"stage": 0, "epoch": 0, "step_in_epoch": 3, "global_step": 3},
        {"stage": 0, "epoch": 0, "step_in_epoch": 6, "global_step": 6},
    ]
    corrupt = latest / CHECKPOINT_FILE
    corrupt.write_bytes(corrupt.read_bytes()[:4096])  # a torn write

    second = run_training(
        tiny_config(lake, storage, "k", checkpoint_every=3, data=data),
        on_worker_end=state_saver(tmp_path),
        logger_factory=start_recorder(tmp_path / "starts"),
    )
    assert starts(tmp_path / "starts") == [3], "the rerun did not start from the checkpoint before the corrupt one"
    messages = worker_log(ray_local)
    assert any(m.startswith(f"{latest.name} is unreadable: {latest} is not a readable checkpoint") for m in messages)
    assert f"resuming from {before.name} instead of the unreadable {latest.name}" in messages
    final = load_checkpoint(second.checkpoint)
    assert final["position"]["global_step"] == steps  # not 3 + steps: nothing replayed
    assert final["position"]["epoch"] == 1 and final["position"]["step_in_epoch"] == 0

    expected = load_rank(reference_run.root, 0)
    for rank in range(WORKERS):
        resumed = load_rank(tmp_path, rank)
        for network in ("generator", "discriminator"):
            assert not differing(resumed[network], expected[network]), f"rank {rank} {network} differs from run U"
    reference_opt = load_checkpoint(reference_run.result.checkpoint)["opt_g"]
    assert float(final["opt_g"]["state"][0]["step"]) == float(reference_opt["state"][0]["step"]) == steps


def test_a_killed_worker_is_restarted_and_the_run_finishes_from_its_checkpoint(
    reference_run, train_lake, tmp_path, quiet_env, monkeypatch
) -> None:
    steps = reference_run.steps
    lake, _ = train_lake
    killed = tmp_path / "killed"
    # Rank 1 dies (SIGKILL) as it is about to run its 6th step; checkpoints were reported at steps 2 and 4.
    monkeypatch.setenv("RECOLOR_FAILPOINT", "train_step:6@1")
    monkeypatch.setenv("RECOLOR_FAILPOINT_ONCE", str(killed))
    # Synchronous uploads pin which checkpoint the restart begins from: in the background an upload may still be
    # in flight when the worker dies (the soak tests kill workers under asynchronous uploads).
    groups_before = set(placement_group_table())
    result = run_training(
        tiny_config(lake, tmp_path / "runs", "c", checkpoint_every=2, checkpoint_upload="sync"),
        on_worker_end=state_saver(tmp_path),
        logger_factory=start_recorder(tmp_path / "starts"),
    )
    assert killed.exists(), "the failpoint never fired"
    first_start, restart = starts(tmp_path / "starts")
    # Step 4's checkpoint unless the controller had not taken it in yet when the worker died.
    assert first_start == 0 and restart in (2, 4), f"the restarted group began at step {restart}, not a checkpoint"
    assert load_checkpoint(result.checkpoint)["position"]["global_step"] == steps
    # Deterministic mode: the crash and the restart changed nothing in the weights.
    for network in ("generator", "discriminator"):
        assert not differing(load_rank(tmp_path, 1)[network], load_rank(reference_run.root, 0)[network]), network
    # Both worker groups' placement groups are gone, without Ray Train's cleaner actor (a driver's run: see
    # `pipeline.train.trainer.called_by_a_driver`).
    groups = {key: group for key, group in placement_group_table().items() if key not in groups_before}
    assert len(groups) == 2 and {group["state"] for group in groups.values()} == {"REMOVED"}, groups


def test_ray_trains_placement_group_cleaner_stays_for_runs_inside_an_actor(ray_local) -> None:
    """A sweep's trial runs in a Tune actor, which ASHA may end while the sweep's Ray job goes on: its run keeps
    the cleaner that removes a placement group its controller leaves behind. A driver's run leaves it out."""
    from pipeline.train.trainer import called_by_a_driver

    assert called_by_a_driver()

    @ray_local.remote(num_cpus=0)
    class Trial:
        def driven(self) -> bool:
            from pipeline.train.trainer import called_by_a_driver

            return called_by_a_driver()

    trial = Trial.remote()
    assert ray_local.get(trial.driven.remote()) is False
    ray_local.kill(trial)


# --- the CLI ----------------------------------------------------------------------------------------


def test_recolor_train_with_a_missing_dataset_is_a_one_line_error(train_lake, tmp_path, cli_runner) -> None:
    lake, _ = train_lake
    result = cli_runner(
        "train", REPO / "configs" / "tiny.yaml", "--dataset", "nope", "--lake", lake, "--storage", tmp_path / "runs",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith("recolor: error: ") and "nope" in result.error_lines[0]
    assert not (tmp_path / "runs").exists()


# --- resuming on another number of workers -----------------------------------------------------------


def trained_log(folder: Path) -> list[tuple[int, int, int, list[int]]]:
    """(epoch, step in epoch, workers, sample CRCs) of every step every rank trained (`RECOLOR_TRAINED_LOG`)."""
    steps = []
    for path in sorted(folder.glob("trained-rank*.txt")):
        for line in path.read_text().splitlines():
            _, epoch, step, workers, _, crcs = line.split()
            steps.append((int(epoch), int(step), int(workers), [int(c) for c in crcs.split(",")]))
    return steps


def epoch_sample_crcs(plan: DataPlan, seed: int, global_batch: int) -> list[int]:
    """The CRC-32 of each sample of the first epoch's global order (what one epoch must train, each once)."""
    import zlib

    from pipeline.data.epochs import epoch_segments
    from pipeline.data.reading import decode_sample, read_segments

    segments, _ = epoch_segments(plan.train, 0, seed, global_batch)
    return [zlib.crc32(decode_sample(data, plan.size).tobytes()) for _, _, data in read_segments(segments)]


def test_an_epoch_resumed_on_fewer_then_more_workers_trains_each_sample_once(
    ray_local, train_lake, tmp_path, quiet_env
) -> None:
    """One epoch in three runs of the same name: two workers stop mid-epoch, one worker goes on and stops again,
    three finish it. The global batch (6, which 2, 1 and 3 divide) stays, so each step trains the same samples
    whichever group trains it. (Until 2026-12, 2 -> 1 at a global batch of 4 and 1 -> 3 at 6 were two tests of
    two runs each: one chain is a Ray Train run fewer, and shrinks and grows as they did.)"""
    lake, plan = train_lake
    global_batch, groups = 6, [(2, 2), (1, 4), (3, None)]  # (workers, the global step it stops at)
    steps = plan.count("train") // global_batch
    assert steps >= 5  # each stop mid-epoch, inside a shuffle window
    log_dir = tmp_path / "trained"
    log_dir.mkdir()
    quiet_env.setenv("RECOLOR_TRAINED_LOG", str(log_dir))
    storage = tmp_path / "runs"
    options = dict(data=DataConfig(datasets=["photos"], lake=lake, global_batch_size=global_batch, shuffle_window=8,
                                   flip=False), checkpoint_every=2)  # fmt: skip

    for workers, stop_at in groups:
        last = run_training(tiny_config(lake, storage, "elastic", workers=workers, max_steps=stop_at, **options))

    final = load_checkpoint(last.checkpoint)
    assert final["position"]["global_step"] == steps  # as many steps as an uninterrupted epoch
    assert final["data"]["read"]["global_batch"] == global_batch
    trained = trained_log(log_dir)
    group_of = {step: next(w for w, stop in groups if stop is None or step <= stop) for step in range(1, steps + 1)}
    assert {(workers, group_of[step]) for _, step, workers, _ in trained} == {(w, w) for w, _ in groups}
    per_step: dict[int, int] = {}
    for _, step, _, crcs in trained:
        per_step[step] = per_step.get(step, 0) + len(crcs)
    assert per_step == {step: global_batch for step in range(1, steps + 1)}  # the global batch, every step
    got = sorted(crc for *_, crcs in trained for crc in crcs)
    expected = sorted(epoch_sample_crcs(plan, 0, global_batch))
    assert len(set(expected)) == len(expected) == steps * global_batch  # the photos are all different
    assert got == expected, "a sample of the epoch was trained twice, or not at all"
