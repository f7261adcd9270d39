"""The training data reader on synthetic shards whose every sample carries its own id.

Each sample is a uint8 (3, 8, 8) array: channel 0 holds id // 256, channel 1 id % 256 (the same in
every pixel, so a flip keeps the id) and channel 2 the column index, so a flipped sample reads
7..0 along a row. Shards are written with `ShardWriter` in uneven sizes; plans are built by hand.

Long on purpose: the epoch plan, the stages and the loader are one contract, tested together.
"""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.shards import ShardWriter, TarFormatError, encode_npy, iter_members
from pipeline.data.batches import LoaderOptions, _window_block, prefetch, train_batches, validation_batches
from pipeline.data.epochs import plan_train_epoch, plan_validation, steps_per_epoch, window_draws
from pipeline.data.plan import DataError, DataPlan, ShardInfo
from pipeline.data.reading import Shuffle, decode_sample, open_shard, read_segments, rotate_lab8, verified

SIZE = 8
UNEVEN = [7, 1, 13, 4]  # 25 training samples


def sample_array(sample_id: int) -> np.ndarray:
    array = np.empty((3, SIZE, SIZE), dtype=np.uint8)
    array[0] = sample_id // 256
    array[1] = sample_id % 256
    array[2] = np.arange(SIZE, dtype=np.uint8)[None, :]
    return array


def sample_id(array: np.ndarray) -> int:
    return int(array[0, 0, 0]) * 256 + int(array[1, 0, 0])


def is_flipped(array: np.ndarray) -> bool:
    return int(array[2, 0, 0]) == SIZE - 1


def write_shards(folder: Path, counts: list[int], first_id: int = 0, prefix: str = "train") -> list[ShardInfo]:
    """Shards of `counts` samples with consecutive ids from `first_id`; returns their ShardInfo."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    next_id = first_id
    for number, count in enumerate(counts):
        path = folder / f"{prefix}-{number:06d}.tar"
        with ShardWriter(path) as writer:
            for _ in range(count):
                writer.write(f"s{next_id:06d}", sample_array(next_id), {"key": f"s{next_id:06d}", "id": next_id})
                next_id += 1
        shards.append(ShardInfo(str(path), count))
    return shards


def make_plan(train: list[ShardInfo], val: list[ShardInfo] | None = None) -> DataPlan:
    return DataPlan(refs=["synthetic@1"], digests={}, uris={}, size=SIZE, train=train, val=val or [])


def epoch_batches(plan: DataPlan, rank: int, world_size: int, batch_size: int, **kwargs) -> tuple[list, int, object]:
    options = {"epoch": 0, "seed": 7, "shuffle_window": 5, "flip": True}
    options.update(kwargs)
    epoch, seed = options.pop("epoch"), options.pop("seed")
    reading = {name: options.pop(name) for name in list(options) if name in LoaderOptions.__dataclass_fields__}
    iterator, steps, counter = train_batches(
        plan, epoch, seed, rank, world_size, LoaderOptions(batch_size=batch_size, **reading), **options
    )
    return list(iterator), steps, counter


def ids_of(batches: list[np.ndarray]) -> list[int]:
    return [sample_id(array) for batch in batches for array in batch]


@pytest.fixture(scope="module")
def uneven_plan(tmp_path_factory) -> DataPlan:
    folder = tmp_path_factory.mktemp("uneven")
    return make_plan(write_shards(folder, UNEVEN), write_shards(folder, [3, 5, 2], first_id=1000, prefix="val"))


# --- exact epochs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts, world_size, batch_size",
    [
        (UNEVEN, 1, 4),
        (UNEVEN, 2, 3),
        (UNEVEN, 3, 2),
        (UNEVEN, 4, 1),
        ([9, 8], 6, 2),  # more ranks than shards: several ranks read one shard
        ([5, 4], 6, 1),
    ],
)
def test_every_rank_runs_the_same_steps_and_no_sample_repeats(tmp_path, counts, world_size, batch_size) -> None:
    plan = make_plan(write_shards(tmp_path, counts))
    total = sum(counts)
    expected_steps = total // (world_size * batch_size)
    assert steps_per_epoch(total, world_size, batch_size) == expected_steps
    for epoch in range(2):
        used: list[int] = []
        for rank in range(world_size):
            batches, steps, counter = epoch_batches(plan, rank, world_size, batch_size, epoch=epoch)
            assert steps == expected_steps
            assert len(batches) == steps, f"rank {rank} ran {len(batches)} steps, not {steps}"
            assert all(batch.shape == (batch_size, 3, SIZE, SIZE) and batch.dtype == np.uint8 for batch in batches)
            assert counter.bad == 0
            used += ids_of(batches)
        assert len(used) == len(set(used)), "a sample was used twice in one epoch"
        assert set(used) <= set(range(total))
        left_out = total - len(used)
        assert 0 <= left_out < world_size * batch_size


def test_the_left_out_remainder_changes_between_epochs(uneven_plan) -> None:
    left_out = []
    for epoch in range(4):
        used = set()
        for rank in range(2):
            used |= set(ids_of(epoch_batches(uneven_plan, rank, 2, 4, epoch=epoch)[0]))
        left_out.append(frozenset(range(25)) - used)
    assert all(len(ids) == 25 - 2 * 4 * 3 for ids in left_out)
    assert len(set(left_out)) > 1


def test_fewer_samples_than_one_global_batch_is_a_data_error(tmp_path) -> None:
    plan = make_plan(write_shards(tmp_path, [3, 2]))
    with pytest.raises(DataError, match=r"5 samples, fewer than one global batch \(6\)"):
        train_batches(plan, 0, 0, 0, 2, LoaderOptions(batch_size=3, shuffle_window=4))


# --- shuffling ---------------------------------------------------------------------------------------


def test_epochs_shuffle_differently_and_the_same_seed_and_epoch_repeat(uneven_plan) -> None:
    def order(epoch: int, seed: int = 7) -> list[int]:
        return ids_of(epoch_batches(uneven_plan, 0, 1, 4, epoch=epoch, seed=seed)[0])

    first = order(0)
    assert order(0) == first
    assert order(1) != first and order(2) != order(1)
    assert order(0, seed=8) != first
    assert first != sorted(first), "samples come out in storage order"


def test_shuffle_mixes_across_shards_within_a_window(uneven_plan) -> None:
    # A window bigger than the epoch: one permutation of everything this rank reads.
    ids = ids_of(epoch_batches(uneven_plan, 0, 1, 5, shuffle_window=64)[0])
    assert sorted(ids) == list(range(25))
    assert ids != sorted(ids)


# --- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_resuming_at_any_step_yields_the_tail_of_the_uninterrupted_epoch(uneven_plan, world_size, rank) -> None:
    # Batch 2, window 5: resume points fall inside windows, on their edges and across shards.
    full, steps, _ = epoch_batches(uneven_plan, rank, world_size, 2, epoch=3)
    assert len(full) == steps
    for start_step in range(steps + 1):
        tail, tail_steps, _ = epoch_batches(uneven_plan, rank, world_size, 2, epoch=3, start_step=start_step)
        assert tail_steps == steps
        assert len(tail) == steps - start_step, start_step
        for got, expected in zip(tail, full[start_step:], strict=True):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("interleave", [1, 3])
def test_resuming_does_not_open_shards_already_trained_on(uneven_plan, interleave) -> None:
    opened: list[str] = []

    def opener(uri: str):
        opened.append(uri)
        return open_shard(uri)

    options = {"shuffle_window": 1, "opener": opener, "interleave": interleave}
    full, steps, _ = epoch_batches(uneven_plan, 0, 1, 1, **options)
    everything = list(opened)
    assert sorted(everything) == sorted(s.uri for s in uneven_plan.train)
    opened.clear()
    tail, _, _ = epoch_batches(uneven_plan, 0, 1, 1, start_step=steps - 1, **options)
    assert len(opened) == 1 and opened[0] in everything  # only the shard holding the last sample
    np.testing.assert_array_equal(tail[0], full[-1])


def test_interleaving_reads_shards_in_turn_and_skips_exactly(tmp_path) -> None:
    shards = write_shards(tmp_path, [7, 1, 13, 4, 6, 9, 2])
    cut = Path(shards[2].uri)
    cut.write_bytes(cut.read_bytes()[:9000])  # a broken shard keeps its place in the turn: gaps, not a shift
    segments, _ = plan_train_epoch(shards, epoch=1, seed=3, rank=0, world_size=1, batch_size=3)
    one_by_one = list(read_segments(segments, interleave=1))
    mixed = list(read_segments(segments, interleave=3))
    assert sorted(map(repr, mixed)) == sorted(map(repr, one_by_one))  # the same samples, once each
    first = segments[:3]
    turn = min(segment.length for segment in first)
    heads = [uri for uri, _, _ in mixed[: 3 * turn]]
    assert heads == [segment.shard.uri for segment in first] * turn  # one from each of three shards in turn
    for skip in range(len(mixed) + 1):  # resuming anywhere continues exactly where the full read was
        assert list(read_segments(segments, skip=skip, interleave=3)) == mixed[skip:], skip


# --- flips -------------------------------------------------------------------------------------------


def test_flips_are_random_per_sample_and_deterministic(uneven_plan) -> None:
    batches = epoch_batches(uneven_plan, 0, 1, 5, epoch=1)[0]
    flipped = [is_flipped(array) for batch in batches for array in batch]
    assert 0 < sum(flipped) < len(flipped)
    for batch in batches:  # a flip mirrors columns and nothing else
        for array in batch:
            expected = sample_array(sample_id(array))
            np.testing.assert_array_equal(array, expected[:, :, ::-1] if is_flipped(array) else expected)
    again = epoch_batches(uneven_plan, 0, 1, 5, epoch=1)[0]
    assert [is_flipped(a) for b in again for a in b] == flipped
    other_epoch = epoch_batches(uneven_plan, 0, 1, 5, epoch=2)[0]
    assert {sample_id(a): is_flipped(a) for b in other_epoch for a in b} != {
        sample_id(a): is_flipped(a) for b in batches for a in b
    }


def test_no_flips_when_turned_off(uneven_plan) -> None:
    batches = epoch_batches(uneven_plan, 0, 1, 5, flip=False)[0]
    assert not any(is_flipped(array) for batch in batches for array in batch)


def test_reading_shards_ahead_yields_what_streaming_yields(tmp_path) -> None:
    # Read-ahead (the default on s3://) downloads whole shards in threads: same samples, same gaps.
    shards = write_shards(tmp_path, [7, 1, 13, 4, 6])
    cut = Path(shards[2].uri)
    cut.write_bytes(cut.read_bytes()[:9000])
    Path(shards[4].uri).unlink()  # gone: all its samples are unreadable
    segments, _ = plan_train_epoch(shards, epoch=1, seed=3, rank=0, world_size=1, batch_size=3)
    for skip in (0, 5, 12):
        streamed = list(read_segments(segments, skip=skip, readahead=0))
        assert len(streamed) == 30 - skip
        assert list(read_segments(segments, skip=skip, readahead=2)) == streamed
    streamed = list(read_segments(segments, readahead=0))
    by_shard = {uri: [data for u, _, data in streamed if u == uri] for uri in (shards[2].uri, shards[4].uri)}
    assert all(data is None for data in by_shard[shards[4].uri])
    gaps = [data is None for data in by_shard[shards[2].uri]]
    assert gaps.index(True) > 0 and all(gaps[gaps.index(True) :])  # the cut shard: a readable head, then gaps
    assert all(data is not None for uri, _, data in streamed if uri not in by_shard)
    partial = read_segments(segments, readahead=2)
    next(partial)
    partial.close()  # stopping early leaves no download thread behind
    assert not [t for t in threading.enumerate() if t.name.startswith("recolor-shard")]


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 12])
def test_validation_covers_every_sample_once_in_order(uneven_plan, world_size) -> None:
    ids: list[int] = []
    for rank in range(world_size):
        batches = list(validation_batches(uneven_plan, rank, world_size, batch_size=3))
        assert all(len(batch) <= 3 for batch in batches)
        assert not any(is_flipped(array) for batch in batches for array in batch)
        ids += ids_of(batches)
    assert ids == list(range(1000, 1010))


def test_validation_stops_after_max_batches(uneven_plan) -> None:
    batches = list(validation_batches(uneven_plan, 0, 1, batch_size=3, max_batches=2))
    assert ids_of(batches) == list(range(1000, 1006))


# --- corrupt samples and shards ----------------------------------------------------------------------


class Touch:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def corrupt_members(marker: Path) -> dict[str, bytes]:
    """.lab.npy payloads that are not a usable sample, by kind."""
    pickled = io.BytesIO()
    np.save(pickled, np.array([Touch(str(marker))], dtype=object), allow_pickle=True)
    return {
        "garbage": b"\x00not an npy file at all" * 3,
        "pickled": pickled.getvalue(),
        "wrong_shape": encode_npy(np.zeros((3, SIZE // 2, SIZE // 2), dtype=np.uint8)),
        "wrong_dtype": encode_npy(np.zeros((3, SIZE, SIZE), dtype=np.float32)),
        "truncated": encode_npy(sample_array(0))[:40],
    }


def test_decode_sample_refuses_bad_members_and_never_unpickles(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    members = corrupt_members(marker)
    for kind, data in members.items():
        assert decode_sample(data, SIZE) is None, kind
    assert decode_sample(None, SIZE) is None
    assert not marker.exists()
    np.load(io.BytesIO(members["pickled"]), allow_pickle=True)  # the payload is live...
    assert marker.exists()  # ...so decode_sample really did refuse to unpickle it
    np.testing.assert_array_equal(decode_sample(encode_npy(sample_array(300)), SIZE), sample_array(300))


def write_corrupt_shard(path: Path, marker: Path, first_id: int, count: int) -> list[str]:
    """A shard of `count` samples whose first few have a bad .lab.npy member (or none); returns the bad kinds."""
    bad = corrupt_members(marker)
    kinds = [*bad, "missing"]
    with ShardWriter(path) as writer:
        for offset in range(count):
            key = f"s{first_id + offset:06d}"
            if offset < len(kinds):
                kind = kinds[offset]
                if kind != "missing":
                    writer.write_raw(f"{key}.lab.npy", bad[kind])
                writer.write_raw(f"{key}.json", b"{}")
            else:
                writer.write(key, sample_array(first_id + offset), {"key": key})
    return kinds


def test_corrupt_samples_are_replaced_and_counted_without_changing_the_steps(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    good = write_shards(tmp_path, [10, 10])
    corrupt_path = tmp_path / "corrupt.tar"
    kinds = write_corrupt_shard(corrupt_path, marker, first_id=100, count=12)
    plan = make_plan([good[0], ShardInfo(str(corrupt_path), 12), good[1]])
    total_bad = 0
    for rank in range(2):
        batches, steps, counter = epoch_batches(plan, rank, 2, 4, shuffle_window=8, max_bad_fraction=0.5)
        assert len(batches) == steps == 32 // 8
        assert all(batch.shape == (4, 3, SIZE, SIZE) for batch in batches)
        # Replacements are good samples of the same window: every yielded array is a real sample.
        for batch in batches:
            for array in batch:
                expected = sample_array(sample_id(array))
                np.testing.assert_array_equal(array, expected[:, :, ::-1] if is_flipped(array) else expected)
        total_bad += counter.bad
    # The epoch uses 32 of 32 samples: all the corrupt ones were read by some rank.
    assert total_bad == len(kinds)
    assert not marker.exists()


def test_each_corrupt_sample_is_a_warning_naming_its_key_and_shard(tmp_path, caplog) -> None:
    corrupt_path = tmp_path / "corrupt-000003.tar"
    kinds = write_corrupt_shard(corrupt_path, tmp_path / "unpickled", first_id=100, count=12)
    assert {"garbage", "wrong_shape", "wrong_dtype", "truncated", "missing"} <= set(kinds)
    cut = write_shards(tmp_path, [8], prefix="cut")[0]  # a truncated tar: its lost samples count too
    Path(cut.uri).write_bytes(Path(cut.uri).read_bytes()[:5000])
    plan = make_plan([ShardInfo(str(corrupt_path), 12), cut])
    with caplog.at_level("WARNING", logger="pipeline.data.batches"):
        _, _, counter = epoch_batches(plan, 0, 1, 4, shuffle_window=20, max_bad_fraction=1.0)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping corrupt sample ")]
    assert len(skipped) == counter.bad
    for offset, kind in enumerate(kinds):
        assert f"skipping corrupt sample s{100 + offset:06d} in shard {corrupt_path}" in skipped, kind
    lost = [message for message in skipped if message.endswith(f"in shard {cut.uri}")]
    assert lost and counter.bad == len(kinds) + len(lost)


def test_too_many_corrupt_samples_stop_the_run_naming_the_shard(tmp_path) -> None:
    good = write_shards(tmp_path, [10])
    corrupt_path = tmp_path / "corrupt-000007.tar"
    write_corrupt_shard(corrupt_path, tmp_path / "unpickled", first_id=100, count=12)
    plan = make_plan([good[0], ShardInfo(str(corrupt_path), 12)])
    with pytest.raises(DataError, match=r"exceed data\.max_bad_fraction=0\.1.*corrupt-000007\.tar"):
        epoch_batches(plan, 0, 1, 2, shuffle_window=4, max_bad_fraction=0.1)


def test_a_truncated_shard_costs_its_missing_samples_only(tmp_path) -> None:
    shards = write_shards(tmp_path, [10, 20, 10])
    cut = Path(shards[1].uri)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    plan = make_plan(shards)
    batches, steps, counter = epoch_batches(plan, 0, 1, 4, shuffle_window=64, max_bad_fraction=0.5)
    assert len(batches) == steps == 10
    readable = set(ids_of(batches))
    assert set(range(10)) | set(range(30, 40)) <= readable  # the intact shards are all there
    assert 0 < counter.bad <= 20 and counter.bad == 40 - len(readable)
    assert readable & set(range(10, 30)), "the readable first half of the cut shard was lost too"


def test_a_truncated_shard_above_the_limit_is_a_data_error_naming_it(tmp_path) -> None:
    shards = write_shards(tmp_path, [10, 20, 10])
    cut = Path(shards[1].uri)
    cut.write_bytes(cut.read_bytes()[:3000])
    plan = make_plan(shards)
    with pytest.raises(DataError, match=re.escape(f"in {cut}")):
        epoch_batches(plan, 0, 1, 4, shuffle_window=64, max_bad_fraction=0.05)


def test_a_window_with_nothing_readable_is_a_data_error(tmp_path) -> None:
    shards = write_shards(tmp_path, [8, 8])
    Path(shards[0].uri).write_bytes(b"")
    plan = make_plan(shards)
    with pytest.raises(DataError, match="whole window"):  # read one shard after the other: a window of one shard
        epoch_batches(plan, 0, 1, 4, shuffle_window=4, max_bad_fraction=1.0, interleave=1)


def test_validation_skips_corrupt_samples(tmp_path) -> None:
    corrupt_path = tmp_path / "val.tar"
    kinds = write_corrupt_shard(corrupt_path, tmp_path / "unpickled", first_id=100, count=9)
    plan = make_plan(write_shards(tmp_path, [4]), [ShardInfo(str(corrupt_path), 9)])
    ids = ids_of(list(validation_batches(plan, 0, 1, batch_size=2)))
    assert ids == list(range(100 + len(kinds), 109))


def test_garbage_inside_an_arrays_data_is_a_corrupt_sample_by_its_checksum(tmp_path) -> None:
    """Bytes changed inside a member's data keep a valid .npy (same header, same shape): only the CRC-32 recorded
    at ingest tells. An old shard without checksums is read as before."""
    import json
    import tarfile

    path = tmp_path / "checked.tar"
    with ShardWriter(path) as writer:
        for sample_id in (1, 2, 3):
            writer.write(f"s{sample_id:06d}", sample_array(sample_id), {"key": f"s{sample_id:06d}"})
    with tarfile.open(path) as archive:
        member = archive.getmember("s000002.lab.npy")
        meta = json.loads(archive.extractfile("s000002.json").read())
    assert isinstance(meta["lab_crc32"], int)
    with open(path, "r+b") as shard:  # 16 bytes of the array's data, past the .npy header
        shard.seek(member.offset_data + member.size - 100)
        shard.write(b"\xff" * 16)
    read = list(read_segments(plan_validation([ShardInfo(str(path), 3)], 0, 1)))
    assert [key for _, key, _ in read] == ["s000001", "s000002", "s000003"]
    assert [data is not None for _, _, data in read] == [True, False, True]
    assert decode_sample(read[0][2], SIZE) is not None

    old = tmp_path / "old.tar"  # written before checksums: metadata without lab_crc32
    with ShardWriter(old) as writer:
        writer.write_raw("s000009.lab.npy", encode_npy(sample_array(9)))
        writer.write_raw("s000009.json", b'{"key":"s000009"}')
    [(_, _, data)] = list(read_segments(plan_validation([ShardInfo(str(old), 1)], 0, 1)))
    np.testing.assert_array_equal(decode_sample(data, SIZE), sample_array(9))


def reference_window(items, size, seed, epoch, rank, number, start, flip, rotate):
    """A window as the loader defines it, written the plain way: decode all, replace each corrupt sample i by the
    (i mod good)-th good one, then shuffle, flip and rotate."""
    arrays = [decode_sample(verified(item), size) for item in items]
    good = [array for array in arrays if array is not None]
    arrays = [array if array is not None else good[i % len(good)] for i, array in enumerate(arrays)]
    order, flips, angles = window_draws(seed, epoch, rank, number, len(arrays), rotate)
    out = []
    for position in range(start, len(arrays)):
        array = arrays[order[position]]
        if flip and flips[position]:
            array = array[:, :, ::-1]
        if angles is not None:
            array = rotate_lab8(array, float(angles[position]))
        out.append(array)
    return np.stack(out)


@pytest.mark.parametrize("size", [48, 44])  # rows of whole 8-byte words (mirrored word by word), and not
@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("rotate", [0.0, 12.0])
def test_a_window_is_checked_shuffled_and_augmented_as_the_plain_way_does(tmp_path, size, start, rotate) -> None:
    rng = np.random.default_rng(size)
    path = tmp_path / "window.tar"
    with ShardWriter(path) as writer:
        for number in range(20):
            writer.write(f"s{number:06d}", rng.integers(0, 256, (3, size, size), dtype=np.uint8), {})
    items = list(read_segments(plan_validation([ShardInfo(str(path), 20)], 0, 1), verify=False))
    assert isinstance(items[0][2], memoryview)  # the mapped file's bytes, not a copy
    items[3] = (*items[3][:2], bytes(items[3][2][:-8]) + b"garbage!", items[3][3])  # fails its checksum
    items[11] = (items[11][0], "<missing #11>", None, None)
    window = Shuffle(size, seed=7, epoch=2, rank=1, flip=True, rotate=rotate).window(4, len(items), start)
    records, block, first = _window_block(items, window)
    assert records == [(item[0], item[1], index not in (3, 11)) for index, item in enumerate(items)]
    assert first == str(path)
    np.testing.assert_array_equal(block, reference_window(items, size, 7, 2, 1, 4, start, True, rotate))
    assert block.shape == (20 - start, 3, size, size)


class Unseekable:
    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(min(size, 1000))  # short reads, as a socket gives


@pytest.mark.parametrize("source", ["file", "bytes", "stream"])
@pytest.mark.parametrize("cut", [None, 5000, 10_000, 20_000])
def test_members_read_as_views_are_the_members_read_as_copies(tmp_path, source, cut) -> None:
    """`iter_members(views=True)` maps files and shares in-memory buffers: the same members, the same errors."""
    path = tmp_path / "shard.tar"
    with ShardWriter(path) as writer:
        for number in range(4):
            writer.write(f"s{number:06d}", sample_array(number).repeat(6, axis=1).repeat(6, axis=2), {"n": number})
    if cut:
        path.write_bytes(path.read_bytes()[:cut])

    def members(views: bool) -> tuple[list, str | None]:
        data = path.read_bytes()
        opened = {"file": lambda: open(path, "rb"), "bytes": lambda: io.BytesIO(data),
                  "stream": lambda: Unseekable(data)}[source]()  # fmt: skip
        read = []
        try:
            for name, member in iter_members(opened, views):
                assert not views or source == "stream" or len(member) <= 4096 or isinstance(member, memoryview)
                read.append((name, bytes(member)))
        except TarFormatError as e:
            return read, str(e)
        return read, None

    copies, views = members(False), members(True)
    assert views == copies
    assert len(copies[0]) == {None: 8, 5000: 0, 10_000: 2, 20_000: 4}[cut] and (copies[1] is None) == (cut is None)


def test_the_tar_header_checksum_is_the_sum_of_its_bytes() -> None:
    """`header_checksum` sums by Adler-32 halves: exactly tar's sum (checksum field as 8 spaces), at the extremes
    too, and what tarfile writes."""
    import tarfile

    from ingest.shards import header_checksum

    rng = np.random.default_rng(0)
    headers = [bytes(rng.integers(0, 256, 512, dtype=np.uint8)) for _ in range(300)] + [b"\xff" * 512, b"\0" * 512]
    for header in headers:
        assert header_checksum(header) == sum(header[:148]) + 256 + sum(header[156:])
    written = tarfile.TarInfo("s000001.lab.npy").tobuf(tarfile.USTAR_FORMAT)
    assert header_checksum(written) == int(written[148:154], 8)


@pytest.mark.parametrize("size_field", [b"-0000001000\0", b"\x80" + b"\0" * 10 + b"\x01", b"00000000x12\0"])
def test_a_size_that_is_not_octal_is_a_format_error_not_a_hang(tmp_path, size_field) -> None:
    """A negative size (which walked a mapped shard backwards for ever), base-256 or garbage, with a valid header
    checksum: a `TarFormatError`, read as views or copies."""
    header = bytearray(512)
    header[:9], header[100:108], header[124:136], header[156:157] = b"a.lab.npy", b"0000644\0", size_field, b"0"
    header[257:265], header[148:156] = b"ustar\x0000", b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(header) + b"A" * 1024 + b"\0" * 1024)
    for views in (False, True):
        with open(path, "rb") as stream, pytest.raises(TarFormatError, match="not an octal number"):
            list(iter_members(stream, views))


def test_the_recorded_checksum_is_zlibs_crc32(tmp_path) -> None:
    import json
    import tarfile
    import zlib

    path = tmp_path / "crc.tar"
    with ShardWriter(path) as writer:
        writer.write("s000001", sample_array(1), {})
    with tarfile.open(path) as archive:
        lab = archive.extractfile("s000001.lab.npy").read()
        meta = json.loads(archive.extractfile("s000001.json").read())
    assert meta["lab_crc32"] == zlib.crc32(lab)


# --- prefetch ----------------------------------------------------------------------------------------


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "recolor-prefetch"]


def wait_for_no_prefetch_thread(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not prefetch_threads(), "the prefetch thread outlived its consumer"


def test_prefetch_yields_everything_in_order() -> None:
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))
    wait_for_no_prefetch_thread()


def test_prefetch_reraises_the_producers_exception_after_its_items() -> None:
    def failing():
        yield 1
        yield 2
        raise DataError("shard s3://lake/x.tar is broken")

    seen = []
    with pytest.raises(DataError, match="x.tar is broken"):
        for item in prefetch(failing(), depth=4):
            seen.append(item)
    assert seen == [1, 2]
    wait_for_no_prefetch_thread()


@pytest.mark.parametrize("length", [3, 4, 10_000, None])
def test_prefetch_stops_its_thread_when_the_consumer_stops_early(length) -> None:
    # None: an endless producer. 3 and 4: the producer finishes while the queue is full.
    source = iter(range(length)) if length is not None else iter(int, 1)
    iterator = prefetch(source, depth=2)
    assert next(iterator) == 0
    time.sleep(0.3)  # let the producer fill the queue
    iterator.close()
    wait_for_no_prefetch_thread()


def test_prefetch_stops_its_thread_when_the_consumer_stops_after_an_error_is_queued() -> None:
    def failing():
        yield 1
        yield 2
        raise RuntimeError("late")

    iterator = prefetch(failing(), depth=1)
    assert next(iterator) == 1
    time.sleep(0.3)
    iterator.close()
    wait_for_no_prefetch_thread()


def test_a_plan_round_trips_through_a_plain_dict() -> None:
    # Ray ships the plan to workers as a plain dict inside train_loop_config.
    plan = make_plan([ShardInfo("s3://lake/a.tar", 3)], [ShardInfo("/lake/b.tar", 2)])
    assert DataPlan.from_dict(plan.to_dict()) == plan
    assert plan.count("train") == 3 and plan.count("val") == 2


# --- rotation (off by default) ----------------------------------------------------------------------------


def test_rotation_turns_the_sample_and_leaves_no_empty_corner() -> None:

    side = 64
    y, x = np.mgrid[0:side, 0:side]
    array = np.stack([np.full((side, side), 200), 128 + (x - side // 2), 128 + (y - side // 2)]).astype(np.uint8)
    assert rotate_lab8(array, 0.0) is array
    turned = rotate_lab8(array, 20.0)
    assert turned.shape == array.shape and turned.dtype == np.uint8
    assert (turned[0] >= 199).all()  # a constant L stays constant everywhere: no black (L 0) corner came in
    assert not np.array_equal(turned, array)
    # The a gradient, horizontal before, now also varies down a column.
    assert np.ptp(turned[1, :, side // 2].astype(int)) > 5


def test_rotation_is_drawn_per_sample_and_repeats_on_resume(tmp_path) -> None:
    plan = make_plan(write_shards(tmp_path, [12]))
    rotated = LoaderOptions(batch_size=4, shuffle_window=8, flip=False, rotate=15.0)
    first, _, _ = train_batches(plan, 0, 0, 0, 1, rotated)
    again, _, _ = train_batches(plan, 0, 0, 0, 1, rotated)
    plain, _, _ = train_batches(plan, 0, 0, 0, 1, LoaderOptions(batch_size=4, shuffle_window=8, flip=False))
    first, again, plain = list(first), list(again), list(plain)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))  # seeded: the same draws
    assert not all(np.array_equal(a, b) for a, b in zip(first, plain, strict=True))
    resumed, _, _ = train_batches(plan, 0, 0, 0, 1, rotated, start_step=1)
    assert all(np.array_equal(a, b) for a, b in zip(list(resumed), first[1:], strict=True))


# --- loader workers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
@pytest.mark.parametrize("rotate", [0.0, 10.0])
def test_loader_workers_change_nothing_of_the_order_or_the_arrays(uneven_plan, rotate, processes) -> None:
    """1 and 3 loader workers (processes or threads) give the same samples, flips and rotations in the same order,
    on every rank, from the start and from a mid-epoch resume (a step that is not on a window's edge)."""
    for rank, world_size in ((0, 1), (1, 2)):
        one, steps, _ = epoch_batches(uneven_plan, rank, world_size, 3, interleave=2, rotate=rotate)
        three, _, _ = epoch_batches(uneven_plan, rank, world_size, 3, interleave=2, rotate=rotate, loader_workers=3,
                                    loader_processes=processes)  # fmt: skip
        assert len(one) == len(three) == steps
        assert all(np.array_equal(a, b) for a, b in zip(one, three, strict=True))
        resumed, _, _ = epoch_batches(uneven_plan, rank, world_size, 3, interleave=2, rotate=rotate,
                                      loader_workers=3, loader_processes=processes, start_step=3)  # fmt: skip
        assert all(np.array_equal(a, b) for a, b in zip(resumed, one[3:], strict=True))


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_loader_workers_count_and_replace_corrupt_samples_as_one_does(tmp_path, processes) -> None:
    shards = write_shards(tmp_path, [6, 6, 6])
    data = bytearray(Path(shards[1].uri).read_bytes())
    data[512 + 300] ^= 0xFF  # a changed byte in the first sample's array: its checksum fails
    Path(shards[1].uri).write_bytes(bytes(data))
    plan = make_plan(shards)
    one, _, counter_one = epoch_batches(plan, 0, 1, 3, max_bad_fraction=0.5)
    four, _, counter_four = epoch_batches(plan, 0, 1, 3, max_bad_fraction=0.5, loader_workers=4,
                                          loader_processes=processes)  # fmt: skip
    assert counter_one.bad == counter_four.bad == 1
    assert all(np.array_equal(a, b) for a, b in zip(one, four, strict=True))
    with pytest.raises(DataError, match="corrupt samples"):
        epoch_batches(plan, 0, 1, 3, max_bad_fraction=0.0, loader_workers=4, loader_processes=processes)


def test_ordered_map_keeps_order_and_stops_early() -> None:
    from pipeline.data.batches import ordered_map

    def slow(number: int) -> tuple[int, str]:
        time.sleep(0.01 * (5 - number % 5))  # later jobs finish first
        return number, threading.current_thread().name

    results = list(ordered_map(slow, ((n,) for n in range(20)), 4))
    assert [n for n, _ in results] == list(range(20))
    assert len({name for _, name in results}) > 1  # really ran in several threads
    drawn = []

    def jobs():
        for n in range(100):
            drawn.append(n)
            yield (n,)

    iterator = ordered_map(slow, jobs(), 3)
    assert [next(iterator)[0] for _ in range(2)] == [0, 1]
    iterator.close()
    assert len(drawn) <= 5  # never more than the workers ahead of what was taken


def test_block_batches_cut_views_inside_blocks_and_join_across_them() -> None:
    from pipeline.data.batches import block_batches

    blocks = [np.arange(n0, n0 + n).reshape(n, 1) for n0, n in ((0, 5), (5, 2), (7, 9), (16, 3))]
    cut = list(block_batches(blocks, 4))
    assert [b[:, 0].tolist() for b in cut] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert np.shares_memory(cut[2], blocks[2])  # inside one block: a view, no copy
    assert list(block_batches([], 4)) == [] and list(block_batches([np.zeros((3, 1))], 4)) == []


def test_files_are_mapped_only_on_local_file_systems(tmp_path, monkeypatch) -> None:
    """A network or FUSE mount's file is read, not mapped: a read error there must stay an error the reader
    handles, not a SIGBUS."""
    import os
    import sys

    import ingest.shards as shards

    assert not shards._maps_safely(os.makedev(4095, 4095))  # no such mount
    path = tmp_path / "shard.tar"
    with ShardWriter(path) as writer:
        writer.write("s000001", sample_array(1).repeat(6, axis=1).repeat(6, axis=2), {})
    if sys.platform == "linux" and shards._maps_safely(os.stat(path).st_dev):
        with open(path, "rb") as stream:
            assert isinstance(dict(iter_members(stream, views=True))["s000001.lab.npy"], memoryview)
    monkeypatch.setattr(shards, "_maps_safely", lambda device: False)
    with open(path, "rb") as stream:
        members = dict(iter_members(stream, views=True))
    assert isinstance(members["s000001.lab.npy"], bytes)


def test_metadata_read_as_a_view_is_still_checked(tmp_path) -> None:
    """Metadata over 4 KiB arrives as a memoryview: its recorded checksum must still be compared."""
    import tarfile

    path = tmp_path / "big-meta.tar"
    with ShardWriter(path) as writer:
        writer.write("s000001", sample_array(1).repeat(6, axis=1).repeat(6, axis=2), {"notes": "x" * 6000})
    with tarfile.open(path) as archive:
        member = archive.getmember("s000001.lab.npy")
    with open(path, "r+b") as shard:
        shard.seek(member.offset_data + member.size - 50)
        shard.write(b"\xff" * 8)
    [(_, _, data)] = list(read_segments(plan_validation([ShardInfo(str(path), 1)], 0, 1)))
    assert data is None


def test_a_start_step_outside_the_epoch_is_refused(uneven_plan) -> None:
    _, steps, _ = train_batches(uneven_plan, 0, 7, 0, 1, LoaderOptions(batch_size=3, shuffle_window=5))
    assert list(train_batches(uneven_plan, 0, 7, 0, 1, LoaderOptions(batch_size=3), start_step=steps)[0]) == []
    for start_step in (steps + 1, -1):
        with pytest.raises(ValueError, match="outside this worker group's steps"):
            train_batches(uneven_plan, 0, 7, 0, 1, LoaderOptions(batch_size=3, loader_workers=2), start_step=start_step)
