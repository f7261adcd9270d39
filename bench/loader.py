"""Training-input throughput on one core: lake shards (local and S3) vs the seed recipe's loader.

    python bench/loader.py                        # generated photos (crops of scikit-image's)
    python bench/loader.py --images ../shared/data
    python bench/loader.py --json

seed:  per sample, decode the JPEG, resize to 256x256, scikit-image `rgb2lab`, normalize, into a
       float tensor batch (the report's per-step loader).
lake:  `pipeline.data.batches.train_batches` over the same images ingested into a lake (shards small enough that
       several are read at once, `data.interleave` 4, and once 1 for its cost): read tar shards,
       decode the uint8 Lab arrays, shuffle, flip, batch, then to normalized float L and ab tensors.
       Once from a local folder, once from `rclone serve s3` on 127.0.0.1 (a real S3 server), and once
       from the local folder with the per-sample CRC-32 check switched off: the check's cost. From S3 through the
       node-local shard cache (`pipeline.data.shard_cache`): epoch 1 (fills it), epoch 2 (issue 22's goal: >= 0.9x the
       local folder, 0 bytes from S3), and epoch 2 with a cache of half the lake (bytes from S3).
zstd:  bandwidth per GPU. The same local shards rewritten with each .lab.npy member compressed by zstd
       (levels 1, 3 and 9; `zstandard` package; CRC-32 over the stored bytes), read by the same loader with
       a decompress before decoding: bytes per sample next to the current encoding's, and samples/s per core
       with the batch normalized. The rule (issue 10): offer it as an ingest option only if it reaches at most
       0.6x the bytes at no less than 2,500 samples/s per core.
loader workers: one training worker's input path (uint8 batches, as the step receives them; it normalizes on
       its device) over an epoch of 16,384 samples from the local lake, with `data.loader_workers` 1 (in the
       training process), 2 and 3 (loader processes, each reading its own shards and filling its part of every
       window: issue 22's goal, 2 >= 1.7x 1; and as threads, for the interpreter lock's cost), each timed after
       one untimed epoch; the processes' start apart (once a run: they are kept from epoch to epoch); and the
       cores an H200 needs at 4,300 samples/s.
       Beside them, one loader worker reading as before 2026-12-04 (members copied, zlib's CRC-32).
All in one process on one thread (no prefetch thread), best of --rounds, except the loader-workers rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_small, machine, one_core, sample_photos  # noqa: E402

one_core()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
BATCH = 16
H200_SAMPLES_S = 4300.0  # the recipe's step on one H200 at 40% of its bf16 peak (issue 22)


def seed_loader(paths: list[Path]) -> int:
    from PIL import Image
    from skimage.color import rgb2lab

    count = 0
    for start in range(0, len(paths) - BATCH + 1, BATCH):
        lights, abs_ = [], []
        for path in paths[start : start + BATCH]:
            image = Image.open(path).convert("RGB").resize((256, 256), Image.BICUBIC)
            lab = rgb2lab(np.asarray(image)).astype("float32")
            tensor = torch.from_numpy(lab).permute(2, 0, 1)
            lights.append(tensor[:1] / 50.0 - 1.0)
            abs_.append(tensor[1:] / 110.0)
        batch = (torch.stack(lights), torch.stack(abs_))
        count += batch[0].shape[0]
    return count


def lake_loader(plan, interleave: int = 4, loader_workers: int = 1, cache=None) -> int:
    from ingest.lab import lab8_to_network_torch
    from pipeline.data.batches import LoaderOptions, train_batches

    # A window of 256, as every figure of this benchmark in bench/RESULTS.md was measured (training's default is 512).
    options = LoaderOptions(batch_size=BATCH, shuffle_window=256, interleave=interleave, loader_workers=loader_workers)
    batches, steps, _ = train_batches(plan, 0, 0, 0, 1, options, cache=cache)
    count = 0
    for batch in batches:
        light, _ = lab8_to_network_torch(torch.from_numpy(batch))
        count += light.shape[0]
    return count


INPUT_REPEAT = 64  # the lake's shards 64 times: 16,384 samples, 64 shuffle windows of 256 (an epoch of a rank)


def input_path(plan, loader_workers: int, repeat: int = INPUT_REPEAT, processes: bool = True) -> int:
    """One training worker's input path as the step receives it (uint8 batches; the step normalizes on its
    device), over the lake's shards `repeat` times. With `loader_workers` > 1, loader processes (kept from one call
    to the next, as from epoch to epoch: `loader_start` times their start), or threads."""
    import dataclasses

    from pipeline.data.batches import LoaderOptions, train_batches

    plan = dataclasses.replace(plan, train=plan.train * repeat)
    options = LoaderOptions(batch_size=BATCH, loader_workers=loader_workers, loader_processes=processes)
    batches, _, _ = train_batches(plan, 0, 0, 0, 1, options)
    return sum(batch.shape[0] for batch in batches)


def loader_start(plan, loader_workers: int) -> float:
    """Seconds to the first batch of an epoch whose loader processes start with it (the first epoch of a run),
    less the same with the processes already running (every later epoch)."""
    from pipeline.data import loader_processes
    from pipeline.data.batches import LoaderOptions, train_batches

    def first_batch() -> float:
        start = time.perf_counter()
        batches, _, _ = train_batches(plan, 0, 0, 0, 1, LoaderOptions(batch_size=BATCH, loader_workers=loader_workers))
        next(batches)
        elapsed = time.perf_counter() - start
        for _ in batches:  # to the end: the group is kept
            pass
        return elapsed

    loader_processes.close_idle()
    cold = first_batch()
    return cold - first_batch()


def copied_members(plan) -> int:
    """`input_path` with one loader worker, reading as before 2026-12-04: each shard member copied out of the
    file (a fresh buffer a sample) and checked with zlib's CRC-32 instead of zlib-ng's."""
    import zlib

    import ingest.shards

    crc, iter_samples = ingest.shards.crc32, ingest.shards.iter_samples
    ingest.shards.crc32 = zlib.crc32
    ingest.shards.iter_samples = lambda stream, views=False: iter_samples(stream, False)
    try:
        return input_path(plan, 1)
    finally:
        ingest.shards.crc32, ingest.shards.iter_samples = crc, iter_samples


ZSTD_LEVELS = (1, 3, 9)
ZSTD_GOAL_RATIO, ZSTD_GOAL_RATE = 0.6, 2500.0


def zstd_lake(plan, level: int, folder: Path):
    """The plan's training shards rewritten with zstd-compressed .lab.npy members; (plan, bytes per sample)."""
    import dataclasses
    import zlib

    import zstandard

    from ingest.shards import ShardWriter, iter_samples
    from pipeline.data.plan import ShardInfo

    compressor = zstandard.ZstdCompressor(level=level)
    folder.mkdir(parents=True, exist_ok=True)
    shards, total = [], 0
    for number, shard in enumerate(plan.train):
        path = folder / f"train-{number:06d}.tar"
        with open(shard.uri, "rb") as source, ShardWriter(path) as writer:
            for sample in iter_samples(source):
                packed = compressor.compress(sample["lab.npy"])
                meta = json.loads(sample["json"]) | {"lab_crc32": zlib.crc32(packed), "lab_codec": f"zstd-{level}"}
                writer.write_raw(f"{sample['__key__']}.json", json.dumps(meta).encode())
                writer.write_raw(f"{sample['__key__']}.lab.npy", packed)
        shards.append(ShardInfo(str(path), shard.count))
        total += path.stat().st_size
    return dataclasses.replace(plan, train=shards), total / plan.count("train")


def zstd_loader(plan) -> int:
    """`lake_loader` with each member decompressed before it is decoded (the loader's own decode, patched)."""
    import zstandard

    import pipeline.data.reading

    decompress = zstandard.ZstdDecompressor().decompress
    decode = pipeline.data.reading.decode_sample  # what `Window.fill` calls
    pipeline.data.reading.decode_sample = lambda data, size: decode(
        decompress(data) if data is not None else None, size
    )
    try:
        return lake_loader(plan)
    finally:
        pipeline.data.reading.decode_sample = decode


def warm_rate(rounds: int, fn) -> float:
    """`best_rate` after one untimed call: loader processes start once a run (`loader_start` times that)."""
    fn()
    return best_rate(rounds, fn)


def best_rate(rounds: int, fn) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        count = fn()
        best = max(best, count / (time.perf_counter() - start))
    return best


def two_node_epoch2(plan, folder: Path, owned: bool) -> list[int]:
    """4 ranks on 2 nodes (a cache each, room for the whole lake), 2 epochs: each node's bytes from S3 in epoch 2,
    with shard ownership (`data.shard_ownership`) or each epoch drawn over all ranks."""
    from pipeline.data.batches import LoaderOptions, train_batches
    from pipeline.data.shard_cache import ShardCache

    lake_bytes = sum(shard.size for shard in plan.train)
    caches = [ShardCache(folder / f"node{n}", 2 * lake_bytes) for n in range(2)]
    for epoch in range(2):
        for cache in caches:
            cache.stats.take()
        for rank in range(4):
            options = LoaderOptions(global_batch=BATCH, shuffle_window=256, owned_shards=owned)
            for _ in train_batches(plan, epoch, 0, rank, 4, options, cache=caches[rank // 2])[0]:
                pass
    return [cache.stats.take()[0] for cache in caches]


def s3_rows(rounds: int, lake: Path, work: Path) -> dict:
    """The lake served by `rclone serve s3` on loopback: plain reads, and reads through the node cache."""
    from infra.stack.s3_server import LocalS3Server, apply_env, restore_env
    from pipeline.data.plan import resolve_data
    from pipeline.data.shard_cache import ShardCache

    server = LocalS3Server(work / "s3").start()
    previous = apply_env(server.env())
    try:
        shutil.copytree(lake, work / "s3" / "lake")  # a bucket is a folder of the served root
        s3_plan = resolve_data(["bench"], "s3://lake")
        s3_rate = best_rate(rounds, lambda: lake_loader(s3_plan))
        lake_train_bytes = sum(shard.size for shard in s3_plan.train)
        cache = ShardCache(work / "cache", 2 * lake_train_bytes)
        start = time.perf_counter()
        count = lake_loader(s3_plan, cache=cache)  # epoch 1: fills the cache
        cache_fill_rate = count / (time.perf_counter() - start)
        fill_store, _ = cache.stats.take()
        cache_rate = best_rate(rounds, lambda: lake_loader(s3_plan, cache=cache))  # epoch 2 and on
        cached_store, _ = cache.stats.take()
        small = ShardCache(work / "small-cache", lake_train_bytes // 2)  # half the lake fits
        lake_loader(s3_plan, cache=small)
        small.stats.take()
        lake_loader(s3_plan, cache=small)
        small_store, _ = small.stats.take()
        nodes = {owned: two_node_epoch2(s3_plan, work / f"nodes-{owned}", owned) for owned in (True, False)}
    finally:
        restore_env(previous)
        server.stop()
    return {
        "two_nodes_epoch2_store_bytes_owned": nodes[True],
        "two_nodes_epoch2_store_bytes_drawn_over_all": nodes[False],
        "s3_samples_s": s3_rate,
        "s3_cached_fill_samples_s": cache_fill_rate,
        "s3_cached_samples_s": cache_rate,
        "s3_cached_epoch2_store_bytes": cached_store // rounds,
        "s3_fill_store_bytes": fill_store,
        "s3_half_cache_epoch2_store_bytes": small_store,
        "lake_train_bytes": lake_train_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of photos (default: 256 generated crops of scikit-image photos)")
    parser.add_argument("--count", type=int, default=256, help="number of photos (default: 256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-zstd", action="store_true", help="leave out the zstd rows (they take longest)")
    parser.add_argument(
        "--skip-s3",
        action="store_true",
        help="leave out the S3 and node-cache rows (a machine without rclone, e.g. a lent GPU host)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        metavar="N",
        help="data.loader_workers values to time (default: 1 2 3; the first is the base)",
    )
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # as the defaults: flags given beside --small still win
        parser.set_defaults(images=None, count=16, rounds=1, loader_workers=[1, 2])
        args = parser.parse_args()

    from ingest.driver import IngestConfig, run_ingest
    from pipeline.data.plan import resolve_data

    work = Path(tempfile.mkdtemp(prefix="recolor-bench-loader-"))
    try:
        photos = sample_photos(work / "photos", args.count, args.images)
        lake = work / "lake"
        run_ingest(
            IngestConfig(
                kind="folder",
                source=str(work / "photos"),
                dataset="bench",
                lake=str(lake),
                val_fraction=0.0,
                shard_size=64 * (3 * 256 * 256 + 1536),  # 64 samples a shard: four or more to read at once
                use_ray=False,
                progress=False,
            )
        )
        local_plan = resolve_data(["bench"], str(lake))
        seed_rate = best_rate(args.rounds, lambda: seed_loader(photos))
        local_rate = best_rate(args.rounds, lambda: lake_loader(local_plan))
        sequential_rate = best_rate(args.rounds, lambda: lake_loader(local_plan, interleave=1))
        workers = {n: warm_rate(args.rounds, lambda n=n: input_path(local_plan, n)) for n in args.loader_workers}
        threads = {n: best_rate(args.rounds, lambda n=n: input_path(local_plan, n, processes=False))
                   for n in args.loader_workers if n > 1}  # fmt: skip
        start_cost = {n: loader_start(local_plan, n) for n in args.loader_workers if n > 1}
        import ingest.shards

        copies_rate = best_rate(args.rounds, lambda: copied_members(local_plan))
        checked = ingest.shards.checksum_matches
        ingest.shards.checksum_matches = lambda lab, meta: True  # read_segments looks it up at each call
        try:
            unchecked_rate = best_rate(args.rounds, lambda: lake_loader(local_plan))
        finally:
            ingest.shards.checksum_matches = checked
        lake_bytes = sum(Path(shard.uri).stat().st_size for shard in local_plan.train) / local_plan.count("train")
        zstd = {}
        for level in () if args.skip_zstd else ZSTD_LEVELS:
            plan, per_sample = zstd_lake(local_plan, level, work / f"zstd-{level}")
            rate = best_rate(args.rounds, lambda plan=plan: zstd_loader(plan))
            zstd[level] = {"bytes_per_sample": per_sample, "ratio": per_sample / lake_bytes, "samples_s": rate}
        s3 = None if args.skip_s3 else s3_rows(args.rounds, lake, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = args.loader_workers[0]
    result = {
        "samples": local_plan.count("train"),
        "seed_samples_s": seed_rate,
        "local_samples_s": local_rate,
        "local_unchecked_samples_s": unchecked_rate,
        "local_one_shard_at_a_time_samples_s": sequential_rate,
        "checksum_cost": 1 - local_rate / unchecked_rate,
        **(s3 or {}),
        "loader_workers_samples_s": workers,
        "loader_threads_samples_s": threads,
        "loader_processes_start_s": start_cost,
        "input_path_samples": local_plan.count("train") * INPUT_REPEAT,
        "input_path_copies_zlib_samples_s": copies_rate,
        "loader_workers_scaling": {n: rate / workers[base] for n, rate in workers.items()},
        "cores_per_h200_at_one_core_rate": H200_SAMPLES_S / workers[base] * base,
        "one_process_best_samples_s": max(workers.values()),
        "local_vs_seed": local_rate / seed_rate,
        "bytes_per_sample": lake_bytes,
        "zstd": zstd,
        "zstd_offered": [
            level for level, z in zstd.items() if z["ratio"] <= ZSTD_GOAL_RATIO and z["samples_s"] >= ZSTD_GOAL_RATE
        ],
        "machine": machine(),
    }
    if s3:
        result["s3_cached_vs_local"] = s3["s3_cached_samples_s"] / local_rate
        result["s3_vs_local"] = s3["s3_samples_s"] / local_rate
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['samples']} samples, batch {BATCH}, one thread")
    print(f"seed recipe loader  {seed_rate:9.1f} samples/s")
    print(f"lake, local folder  {local_rate:9.1f} samples/s   {result['local_vs_seed']:.1f}x seed (goal >= 20)")
    if s3:
        s3_rate = s3["s3_samples_s"]
        print(f"lake, S3 (loopback) {s3_rate:9.1f} samples/s   {result['s3_vs_local']:.2f}x local (goal >= 0.7)")
        print(
            f"lake, S3 via the node cache, epoch 1 {s3['s3_cached_fill_samples_s']:9.1f} samples/s (downloads "
            f"{s3['s3_fill_store_bytes'] / 2**20:.1f} MiB)"
        )
        print(
            f"lake, S3 via the node cache, epoch 2 {s3['s3_cached_samples_s']:9.1f} samples/s   "
            f"{result['s3_cached_vs_local']:.2f}x local (goal >= 0.9); "
            f"from S3: {result['s3_cached_epoch2_store_bytes']} bytes (goal 0)"
        )
        owned, drawn = s3["two_nodes_epoch2_store_bytes_owned"], s3["two_nodes_epoch2_store_bytes_drawn_over_all"]
        print(f"2 nodes x 2 ranks, epoch 2 from S3 a node: {[b // 2**10 for b in owned]} KiB with shard ownership, "
              f"{[b // 2**10 for b in drawn]} KiB drawn over all ranks (goal 0)")  # fmt: skip
        lake_train_bytes = s3["lake_train_bytes"]
        print(
            f"lake, S3, cache of half the lake: epoch 2 downloads {s3['s3_half_cache_epoch2_store_bytes'] / 2**20:.1f}"
            f" MiB of the lake's {lake_train_bytes / 2**20:.1f} MiB (ideal: {lake_train_bytes / 2 / 2**20:.1f})"
        )
    print(f"lake, local, 1 shard at a time {sequential_rate:9.1f} samples/s (data.interleave=1; default 4 above)")
    print(f"lake, local, no CRC {unchecked_rate:9.1f} samples/s   the per-sample check costs "
          f"{100 * result['checksum_cost']:.1f}%")  # fmt: skip
    print(f"input path, members copied, zlib's CRC-32 (the read path before 2026-12-04) {copies_rate:9.1f} samples/s")
    print(f"input path: an epoch of {result['input_path_samples']} samples, best of {args.rounds}")
    for n, rate in workers.items():
        kind = "in the training process" if n == 1 else "processes"
        print(f"input path, {n} loader worker(s), {kind} {rate:9.1f} samples/s   {rate / workers[base]:.2f}x {base}"
              + (f"   {rate / copies_rate:.2f}x copies + zlib" if n == 1 else ""))  # fmt: skip
        if n in threads:
            print(f"input path, {n} loader worker(s), threads {threads[n]:9.1f} samples/s   "
                  f"{threads[n] / workers[base]:.2f}x {base}")  # fmt: skip
    for n, seconds in start_cost.items():
        print(f"starting {n} loader processes (an epoch's first batch, run's first epoch only): {seconds:.2f} s")
    scaling = result["loader_workers_scaling"].get(2)
    measured = f"{scaling:.2f}x" if scaling else "not run"
    print(
        f"  goal: 2 workers >= 1.7x one (measured {measured}); the best here is "
        f"{max(workers.values()):.0f} samples/s; at one core's rate an H200 ({H200_SAMPLES_S:.0f} samples/s) "
        f"needs {result['cores_per_h200_at_one_core_rate']:.1f} cores"
    )
    print(f"bytes per sample: {lake_bytes / 1024:.1f} KiB as stored (uint8 npy in tar, with metadata)")
    for level, z in zstd.items():
        met = "meets" if level in result["zstd_offered"] else "misses"
        print(f"lake, local, zstd-{level} {z['samples_s']:7.1f} samples/s   {z['bytes_per_sample'] / 1024:.1f} "
              f"KiB/sample = {z['ratio']:.2f}x   {met} <= {ZSTD_GOAL_RATIO}x at >= {ZSTD_GOAL_RATE:.0f}/s")  # fmt: skip


if __name__ == "__main__":
    main()
