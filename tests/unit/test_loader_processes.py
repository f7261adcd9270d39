"""Loader processes (`pipeline.data.loader_processes`): the same windows as one thread, from shards each process reads
alone, into blocks it is lent; kept from epoch to epoch, stopped with an epoch closed early, and a dead or failing
one named. On the id-carrying synthetic shards of test_data."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import loader_processes
from pipeline.data.batches import LoaderOptions, train_batches, windows
from pipeline.data.plan import DataError
from pipeline.data.reading import BlockPool, read_segments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import epoch_batches, ids_of, make_plan, write_shards  # noqa: E402

pytestmark = pytest.mark.skipif(not loader_processes.available(), reason="loader processes need Linux's memfd")


def idle_pids(count: int) -> list[int]:
    return [process.pid for group in loader_processes._IDLE if group.count == count for process in group.processes]


@pytest.fixture()
def plan(tmp_path):
    return make_plan(write_shards(tmp_path / "lake", [20, 13, 20, 7, 20, 9]))


def test_the_processes_own_shards_and_together_read_the_stream_one_reader_does(plan) -> None:
    """Each window's items, taken from the processes' parts, are the items `read_segments` gives, at the same
    places; each process opened only its own shards (every 3rd opened, from its index)."""
    from pipeline.data.epochs import plan_train_epoch
    from pipeline.data.reading import EpochStream, Shuffle

    segments, _ = plan_train_epoch(plan.train, 1, 5, 0, 1, 4)
    for skip in (0, 12):  # 12: a resume two windows of 6 in
        stream = EpochStream(segments, 2, 6, skip // 6, 0, Shuffle(plan.size, 5, 1, 0, True))
        job = {"stream": stream, "count": 3}
        one = list(enumerate(windows(read_segments(segments, skip=skip, interleave=2, verify=False), 6), skip // 6))
        parts = [list(loader_processes.owned_items({**job, "index": index}, None)) for index in range(3)]
        assert all(len(part) == len(one) for part in parts)
        for number, items in one:
            merged = {}
            for part in parts:
                made, length, owned = part[number - skip // 6]
                assert (made, length) == (number, len(items))
                assert not merged.keys() & {index for index, _ in owned}  # no item in two processes
                merged.update({index: item[:2] for index, item in owned})
            assert merged == {index: item[:2] for index, item in enumerate(items)}
        shards = [{item[0] for _, _, owned in part for _, item in owned} for part in parts]
        assert all(shards) and not (shards[0] & shards[1] or shards[1] & shards[2] or shards[0] & shards[2])


def test_a_group_is_kept_for_the_next_epoch_and_gives_what_threads_give(plan) -> None:
    loader_processes.close_idle()
    options = {"interleave": 2, "loader_workers": 2, "shuffle_window": 6}
    first, _, _ = epoch_batches(plan, 0, 1, 4, epoch=0, **options)
    pids = idle_pids(2)
    assert len(pids) == 2 and os.getpid() not in pids
    second, _, _ = epoch_batches(plan, 0, 1, 4, epoch=1, **options)
    assert idle_pids(2) == pids  # the same processes read epoch 2
    for number, got in ((0, first), (1, second)):
        threads, _, _ = epoch_batches(plan, 0, 1, 4, epoch=number, loader_processes=False, **options)
        assert len(got) == len(threads) > 0
        assert all(np.array_equal(a, b) for a, b in zip(got, threads, strict=True))
    assert ids_of(first) != ids_of(second)


def test_an_epoch_closed_early_stops_its_processes_and_the_next_one_starts_afresh(plan) -> None:
    loader_processes.close_idle()
    options = LoaderOptions(batch_size=4, shuffle_window=6, interleave=2, loader_workers=2)
    batches, _, _ = train_batches(plan, 0, 7, 0, 1, options)
    next(batches)
    batches.close()
    assert idle_pids(2) == []  # stopped, not kept: they were mid-stream
    again, _, _ = train_batches(plan, 0, 7, 0, 1, options)
    threads, _, _ = train_batches(plan, 0, 7, 0, 1, LoaderOptions(batch_size=4, shuffle_window=6, interleave=2))
    assert all(np.array_equal(a, b) for a, b in zip(again, threads, strict=True))


def test_a_killed_loader_process_stops_the_epoch_with_an_error_that_names_it(tmp_path) -> None:
    plan = make_plan(write_shards(tmp_path / "lake", [40] * 12))
    loader_processes.close_idle()
    options = LoaderOptions(batch_size=2, shuffle_window=4, interleave=2, loader_workers=2)
    list(train_batches(plan, 0, 7, 0, 1, options)[0])
    pids = idle_pids(2)
    batches, _, _ = train_batches(plan, 1, 7, 0, 1, options)  # takes the idle group
    next(batches)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(DataError, match=rf"loader process 1 \(pid {pids[1]}\) was killed by signal 9"):
        list(batches)
    assert idle_pids(2) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # its partner was stopped too


def test_an_error_in_a_loader_process_is_raised_here_with_its_traceback() -> None:
    from pipeline.data.reading import EpochStream, Shuffle

    stream = EpochStream("not segments", 2, 4, 0, 0, Shuffle(8, 0, 0, 0, False))  # type: ignore[arg-type]
    job = {"stream": stream, "cache": None}
    with pytest.raises(AttributeError) as caught:
        list(loader_processes.process_windows(job, 2))
    assert any("in loader process" in note and "Traceback" in note for note in caught.value.__notes__)


def test_a_missing_shard_counts_as_corrupt_samples_as_one_thread_counts_them(tmp_path) -> None:
    shards = write_shards(tmp_path / "lake", [6, 6, 6, 6])
    Path(shards[2].uri).unlink()
    plan = make_plan(shards)
    one, _, counter_one = epoch_batches(plan, 0, 1, 3, max_bad_fraction=0.5, interleave=2)
    two, _, counter_two = epoch_batches(plan, 0, 1, 3, max_bad_fraction=0.5, interleave=2, loader_workers=2)
    assert counter_one.bad == counter_two.bad == 6
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))


def test_a_block_is_lent_again_only_when_no_batch_refers_to_it() -> None:
    pool = BlockPool(64)
    _, storage = pool.take()
    batch = storage[:32].reshape(2, 16)[1:]  # a view of a view, as block_batches cuts them
    del storage
    index, other = pool.take()
    assert index == 1 and len(pool) == 2  # the first is still referred to by `batch`
    del other
    assert pool.take()[0] == 1  # let go: lent again
    tensor = __import__("torch").from_numpy(batch)
    del batch
    assert pool.take()[0] == 1 and len(pool) == 2  # the tensor keeps the first one's storage
    del tensor
    assert pool.take()[0] == 0


def test_an_idle_group_whose_process_died_between_epochs_is_replaced(plan) -> None:
    loader_processes.close_idle()
    options = {"interleave": 2, "loader_workers": 2, "shuffle_window": 6}
    epoch_batches(plan, 0, 1, 4, epoch=0, **options)
    pids = idle_pids(2)
    (group,) = [group for group in loader_processes._IDLE if group.count == 2]
    os.kill(pids[1], signal.SIGKILL)
    group.processes[1].wait(timeout=10)  # dead before the next epoch asks
    again, _, _ = epoch_batches(plan, 0, 1, 4, epoch=1, **options)
    threads, _, _ = epoch_batches(plan, 0, 1, 4, epoch=1, loader_processes=False, **options)
    assert all(np.array_equal(a, b) for a, b in zip(again, threads, strict=True))
    assert not set(idle_pids(2)) & set(pids)  # a new group
