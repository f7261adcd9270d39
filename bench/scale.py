"""How the lake's costs grow: catalog steps at 10k, 100k and 1.28M samples, and what a re-ingest of a grown set reads.

    python bench/scale.py                              # everything (about 10 minutes here)
    python bench/scale.py --sizes 10000,100000 --reingest 0 --json

Part 1, the catalog at ImageNet scale. For each size a synthetic source (ImageNet layout, 1,000 class folders of
empty files: only the listing is measured) and a synthetic lake dataset (the version record, a manifest of that
many rows, ~320 samples a shard so 1.28M is ~4,000 shards, empty shard files) are written, then each step runs
in a fresh process that reports its time and peak memory (RSS, interpreter and imports included):

    list      list the source (`ingest.driver.list_source`)
    dedup     a +1% re-ingest's filter: the parent's manifest, the known keys, skipping unchanged files, the order
    commit    that re-ingest's commit: the 1% new rows merged with the parent, manifest and record written
    plan      the training `DataPlan` (`pipeline.data.plan.resolve_data`)
    ship      the plan as the workers get it (pickled `to_dict` in the loop config) and rebuilt
    show      `recolor lake show`
    gc        `recolor lake gc` listing (what no version references)
    epoch     every rank's shard schedule of one epoch (64 ranks x batch 16)

The growth exponent between consecutive sizes is log(t2/t1) / log(n2/n1): 1 is linear. Goals at 1.28M: under 30 s
and 2 GB each, growth no worse than linear.

Part 2, a re-ingest of a set grown by 1% (`--reingest N` photos of about 500x375, local folder and
`rclone serve s3` on loopback, at 128 px, chunks in-process on one core): the first ingest's time, the
re-ingest's, and the files each read. Goal: the re-ingest costs at most 5% of the first. The re-ingest of an
unchanged set is timed too (the fixed cost), and `--rehash` (the old behaviour: every file read and hashed again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_small, machine  # noqa: E402

STEPS = ("list", "dedup", "commit", "plan", "ship", "show", "gc", "epoch")
CLASSES = 1000
PER_SHARD = 320
DATASET = "scale"
GOAL_SECONDS, GOAL_MB = 30.0, 2048.0


# --- synthetic source and lake --------------------------------------------------------------------


def class_name(index: int) -> str:
    return f"n{index:08d}"


def write_source(root: Path, start: int, stop: int) -> None:
    """Empty files train/<wnid>/<wnid>_<i>.JPEG for items [start, stop), spread over CLASSES folders."""
    for index in range(start, stop):
        wnid = class_name(index % CLASSES)
        folder = root / "train" / wnid
        if index < CLASSES:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{wnid}_{index // CLASSES}.JPEG").touch()


def write_lake(source: Path, lake: Path) -> None:
    """Version 1 of DATASET: a manifest row per listed file (random keys), shards of PER_SHARD samples."""
    import numpy as np
    import pyarrow as pa

    from ingest.driver import IngestConfig, list_source
    from ingest.lab import ENCODING
    from ingest.lake import MANIFEST_SCHEMA, REJECTS_SCHEMA, Lake, sha256_hex, table_to_parquet

    items = list_source(IngestConfig(kind="imagenet", source=str(source), dataset=DATASET, lake=str(lake)))
    n = len(items)
    rng = np.random.default_rng(0)
    keys = [bytes(row).hex() for row in rng.integers(0, 256, (n, 10), dtype=np.uint8)]
    splits = np.where(rng.random(n) < 0.2, "val", "train")
    shards: dict[str, list] = {"train": [], "val": []}
    shard_col, index_col = [], []
    counters = {"train": 0, "val": 0}
    for split in splits:
        position = counters[split]
        counters[split] += 1
        number = position // PER_SHARD
        path = f"ingests/first/shards/{split}-first-{number:06d}.tar"
        if position % PER_SHARD == 0:
            shards[split].append({"path": path, "count": 0, "bytes": 0})
        shards[split][-1]["count"] += 1
        shards[split][-1]["bytes"] += 198_144
        shard_col.append(path)
        index_col.append(position % PER_SHARD)
    folder = lake / DATASET / "ingests" / "first" / "shards"
    folder.mkdir(parents=True)
    for entries in shards.values():
        for entry in entries:
            # A sparse file of the recorded size (no disk used): a commit checks that the parent's shards are there
            # as recorded before it lists them again.
            with open(lake / DATASET / entry["path"], "wb") as shard:
                shard.truncate(entry["bytes"])
    table = pa.table(
        {
            "key": keys,
            "split": splits.tolist(),
            "shard": shard_col,
            "index_in_shard": pa.array(index_col, pa.int32()),
            "source_dataset": ["imagenet"] * n,
            "source_uri": [item.uri for item in items],
            "sha256": [key + "0" * 44 for key in keys],
            "width": pa.array([500] * n, pa.int32()),
            "height": pa.array([375] * n, pa.int32()),
            "label": [item.label for item in items],
            "label_name": [None] * n,
            "coco_id": pa.nulls(n, pa.int64()),
            "categories": pa.array([[]] * n, pa.list_(pa.string())),
            "ingest_id": ["first"] * n,
            "source_size": pa.array([item.size for item in items], pa.int64()),
            "source_stamp": [item.stamp for item in items],
        },
        schema=MANIFEST_SCHEMA,
    )
    manifest = table_to_parquet(table)
    lake_ = Lake(str(lake))
    lake_.storage.write_bytes(f"{DATASET}/ingests/first/manifest-p0.parquet", manifest)
    rejects = table_to_parquet(REJECTS_SCHEMA.empty_table())
    lake_.storage.write_bytes(f"{DATASET}/ingests/first/rejects.parquet", rejects)
    counts = {split: sum(e["count"] for e in entries) for split, entries in shards.items()}
    record = {
        "format": "recolor-lake-v1", "dataset": DATASET, "version": 1, "parent": None,
        "created": "2026-12-02T00:00:00+00:00", "ingest_id": "first",
        "encoding": ENCODING, "size": 256, "resize": "cover", "counts": counts,
        "bytes": {split: sum(e["bytes"] for e in entries) for split, entries in shards.items()}, "shards": shards,
        "stats": {"listed": n, "ingested": n, "duplicates": 0, "unchanged": 0, "grayscale": 0, "rejected": {}},
        "params": {"val_fraction": 0.2, "shard_size": 64 * 2**20, "max_pixels": 0, "limit": None, "seed": 0,
                   "categories": [], "imagenet_splits": ["train"], "coco_split": None},
        "order": {"name": "shuffled", "method": "sha256(seed:uri)", "seed": 0},
        "sources": [{"kind": "imagenet", "root": str(source), "annotations": None, "listed": n, "ingested": n,
                     "ingest_id": "first"}],
        "manifest": "ingests/first/manifest-p0.parquet", "manifest_sha256": sha256_hex(manifest),
        "rejects": "ingests/first/rejects.parquet", "host": "bench",
    }  # fmt: skip
    lake_.commit_version(DATASET, 1, record)


# --- the steps, each in its own process -----------------------------------------------------------


def _config(source: Path, lake: Path):
    from ingest.driver import IngestConfig

    return IngestConfig(kind="imagenet", source=str(source), dataset=DATASET, lake=str(lake), use_ray=False)


def run_step(step: str, source: Path, lake: Path) -> dict:
    """Run one step; returns what it found (counts, bytes) for the report."""
    from ingest.lake import Lake

    if step == "list":
        from ingest.driver import list_source

        return {"items": len(list_source(_config(source, lake)))}
    if step in ("dedup", "commit"):
        from ingest.driver import list_source, what_to_read

        config = _config(source, lake)
        catalog = Lake(str(lake))
        listed = list_source(config)  # timed as the list step; not part of this one
        started = time.perf_counter()
        parent = catalog.resolve(DATASET)
        known, items = what_to_read(catalog, parent, listed, config)  # what run_ingest does before its chunks
        found = {"listed": len(listed), "new": len(items), "known_keys_mb": known.keys.nbytes / 2**20,
                 "seconds": time.perf_counter() - started}  # fmt: skip
        if step == "dedup":
            return found
        listed_count = len(listed)
        del listed  # as run_ingest does before its chunks run
        from ingest.commit import commit

        rows = [
            {"key": f"{i:020x}", "split": "train", "shard": "ingests/grown/shards/train-grown-000000.tar",
             "index_in_shard": i, "source_dataset": "imagenet", "source_uri": item.uri, "sha256": f"{i:064x}",
             "width": 500, "height": 375, "label": item.label, "label_name": None, "coco_id": None,
             "categories": [], "ingest_id": "grown", "source_size": item.size, "source_stamp": item.stamp}
            for i, item in enumerate(items)
        ]  # fmt: skip
        shard = {"path": "ingests/grown/shards/train-grown-000000.tar", "count": len(rows), "bytes": 1}
        written = lake / DATASET / shard["path"]  # what the ingest's chunks would have written: the commit checks
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_bytes(b"\0")
        results = [{"index": 0, "rows": rows, "rejects": [], "duplicates": 0, "shards": {"train": shard}}]
        started = time.perf_counter()
        summary = commit(catalog, config, "grown", listed_count, items, results, started, 0)
        seconds = time.perf_counter() - started
        return found | {"version": summary.version, "samples": sum(summary.counts.values()), "seconds": seconds}
    if step in ("plan", "ship", "epoch"):
        from pipeline.data.epochs import plan_train_epoch
        from pipeline.data.plan import DataPlan, resolve_data

        plan = resolve_data([DATASET], str(lake))
        if step == "plan":
            return {"train_shards": len(plan.train), "val_shards": len(plan.val)}
        if step == "ship":
            import pickle

            payload = pickle.dumps({"data_plan": plan.to_dict()})
            again = DataPlan.from_dict(pickle.loads(payload)["data_plan"])
            assert again.count("train") == plan.count("train")
            return {"payload_kb": len(payload) / 1024}
        world, batch = 64, 16
        steps = 0
        for rank in range(world):
            _, steps = plan_train_epoch(plan.train, 3, 0, rank, world, batch)
        return {"ranks": world, "steps": steps}
    if step == "show":
        import contextlib
        import io

        from ingest.cli import run_lake_show

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_lake_show(argparse.Namespace(lake=str(lake), ref=DATASET, rejects=5, json=False))
        return {"lines": len(out.getvalue().splitlines())}
    if step == "gc":
        from ingest.gc import collect

        return {"unreferenced": len(collect(Lake(str(lake)), DATASET).garbage)}
    raise ValueError(step)


def child(step: str, source: Path, lake: Path) -> None:
    import ingest.cli  # noqa: F401 - imports are not the step's cost (they are in its peak memory)
    import ingest.commit  # noqa: F401
    import ingest.driver  # noqa: F401
    import pipeline.data.batches  # noqa: F401

    started = time.perf_counter()
    found = run_step(step, source, lake)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb} | found))  # a step's own "seconds" wins


def in_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def catalog_at(size: int, root: Path) -> dict[str, dict]:
    source, lake = root / f"source-{size}", root / f"lake-{size}"
    started = time.perf_counter()
    write_source(source, 0, size)
    in_child("--setup-lake", str(source), str(lake))
    setup = time.perf_counter() - started
    measured = {"list": in_child("--step", "list", str(source), str(lake))}
    write_source(source, size, size + size // 100)  # the set grows by 1%
    for step in STEPS[1:]:
        measured[step] = in_child("--step", step, str(source), str(lake))
    print(f"  {size:>9,} samples: setup {setup:.0f} s", file=sys.stderr)
    return measured


# --- part 2: a real re-ingest of a grown set ----------------------------------------------------


def reingest_cost(count: int, root: Path) -> dict:
    """First ingest of `count` photos, then +1%, on a local folder and on S3; seconds and files read.

    Every ingest runs its chunks in this process (one core, `use_ray=False`), so the files read can be counted and
    no Ray start-up is in any number.
    """
    import ingest.chunk
    from bench.common import sample_photos
    from infra.stack.s3_server import LocalS3Server, apply_env
    from ingest.driver import IngestConfig, run_ingest

    photos = root / "photos"
    sample_photos(photos, count + max(1, count // 100))  # +1%, at least one photo
    grown = sorted(photos.iterdir())[count:]
    hold = root / "later"
    hold.mkdir()
    for path in grown:
        path.rename(hold / path.name)
    reads = {"n": 0}
    real_read = ingest.chunk.read_uri

    def counting_read(uri):
        reads["n"] += 1
        return real_read(uri)

    ingest.chunk.read_uri = counting_read  # in-process chunks (use_ray=False) read through this
    server = LocalS3Server(root / "s3", log_path=root / "rclone.log").start()
    results = {}
    try:
        apply_env(server.env())
        server.create_bucket("bench")
        from ingest.storage import open_storage

        warm = root / "warm"  # the first in-process ingest pays for imports: not what is measured
        sample_photos(warm, 2)
        run_ingest(IngestConfig(kind="folder", source=str(warm), dataset="warm", lake=str(root / "lake-warm"),
                                size=128, progress=False, use_ray=False))  # fmt: skip
        for where in ("local", "s3"):
            source = str(photos) if where == "local" else "s3://bench/photos"
            lake = str(root / f"lake-{where}") if where == "local" else "s3://bench/lake"
            if where == "s3":
                store = open_storage(source)
                for path in sorted(photos.iterdir()):
                    store.upload_file(path.name, path)

            def once(rehash: bool = False, source=source, lake=lake):
                reads["n"] = 0
                config = IngestConfig(kind="folder", source=source, dataset="grow", lake=lake, size=128,
                                      progress=False, use_ray=False, rehash=rehash)  # fmt: skip
                started = time.perf_counter()
                summary = run_ingest(config)
                return time.perf_counter() - started, summary

            first_s, first = once()
            fixed_s, _ = once()  # nothing new: the fixed cost of any re-ingest (listing, manifest, lake checks)
            for path in sorted(hold.iterdir()):
                (photos / path.name).write_bytes(path.read_bytes())
                if where == "s3":
                    open_storage(source).upload_file(path.name, photos / path.name)
            again_s, again = once()
            again_reads = reads["n"]
            rehash_s, _ = once(rehash=True)
            results[where] = {
                "first_s": first_s, "first_ingested": first.ingested, "unchanged_s": fixed_s,
                "reingest_s": again_s, "reingest_read": again_reads, "reingest_ingested": again.ingested,
                "unchanged": again.unchanged, "rehash_s": rehash_s, "rehash_read": reads["n"],
                "ratio": again_s / first_s, "rehash_ratio": rehash_s / first_s,
            }  # fmt: skip
            for path in hold.iterdir():
                (photos / path.name).unlink()
    finally:
        ingest.chunk.read_uri = real_read
        server.stop()
    return results


# --- report ---------------------------------------------------------------------------------------


def exponents(sizes: list[int], catalog: dict[int, dict]) -> dict[str, list[float]]:
    growth = {}
    for step in STEPS:
        values = []
        for small, large in zip(sizes, sizes[1:], strict=False):
            a, b = catalog[small][step]["seconds"], catalog[large][step]["seconds"]
            values.append(math.log(max(b, 1e-4) / max(a, 1e-4)) / math.log(large / small))
        growth[step] = values
    return growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1280000", help="catalog sizes (default: 10k, 100k, 1.28M)")
    parser.add_argument("--reingest", type=int, default=2000, help="photos of the re-ingest test (0: skip it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--step", nargs=3, metavar=("STEP", "SOURCE", "LAKE"), help=argparse.SUPPRESS)
    parser.add_argument("--setup-lake", nargs=2, metavar=("SOURCE", "LAKE"), help=argparse.SUPPRESS)
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # every step at 1,500 samples (an epoch needs a global batch, 1,024); re-ingest 20 photos, then 1
        args.sizes, args.reingest = "1500", 20
    if args.step:
        child(args.step[0], Path(args.step[1]), Path(args.step[2]))
        return 0
    if args.setup_lake:
        write_lake(Path(args.setup_lake[0]), Path(args.setup_lake[1]))
        print("{}")
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("RECOLOR_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temp:
        root = Path(temp)
        catalog = {size: catalog_at(size, root) for size in sizes}
        reingest = reingest_cost(args.reingest, root / "reingest") if args.reingest else {}
    growth = exponents(sizes, catalog)
    report = {"machine": machine(), "catalog": catalog, "growth_exponents": growth, "reingest": reingest}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"machine: {report['machine']}")
    print(f"{'step':8}" + "".join(f"{f'{n:,}':>22}" for n in sizes) + "   growth exponents   goal at largest")
    for step in STEPS:
        cells = "".join(f"{catalog[n][step]['seconds']:>9.2f} s {catalog[n][step]['peak_mb']:>7.0f} MB" for n in sizes)
        last = catalog[sizes[-1]][step]
        met = "met" if last["seconds"] < GOAL_SECONDS and last["peak_mb"] < GOAL_MB else "MISSED"
        print(f"{step:8}{cells}   {', '.join(f'{g:.2f}' for g in growth[step]):18} {met}")
    largest = catalog[sizes[-1]]
    dedup = largest["dedup"]
    print(f"at {sizes[-1]:,}: dedup found {dedup['new']:,} new of {dedup['listed']:,} listed; known keys "
          f"{dedup['known_keys_mb']:.1f} MB; plan payload {largest['ship']['payload_kb']:.0f} KB; "
          f"{largest['plan']['train_shards']:,} train shards")  # fmt: skip
    for where, r in reingest.items():
        print(
            f"re-ingest +1% ({where}): first {r['first_s']:.1f} s ({r['first_ingested']} photos); re-ingest "
            f"{r['reingest_s']:.2f} s reading {r['reingest_read']} files = {r['ratio']:.1%} of the first "
            f"(goal <= 5%; {r['unchanged_s']:.2f} s of it is any re-ingest's fixed cost); --rehash "
            f"{r['rehash_s']:.1f} s reading {r['rehash_read']} = {r['rehash_ratio']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
