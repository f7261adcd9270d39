"""Ingest: list a source, turn its images into Lab shards with Ray tasks, commit a lake version.

The work is split into chunks, one chunk per pair of shards (train and val), each run as a Ray
task (`ingest.chunk.process_chunk`), which writes a small result record when its shards are up;
a rerun with the same arguments finds those records and skips the finished chunks, so an
interrupted ingest resumes where it stopped.

When every chunk is done the driver merges the results with the parent version (dropping
content that two chunks or a concurrent ingest both brought), writes the manifest and
rejects tables, and commits the version record last (`ingest.commit`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.chunk import ORDERS, ChunkSpec, KnownKeys, chunk_task, process_chunk, shard_order
from ingest.commit import IngestSummary, commit
from ingest.errors import ConfigError
from ingest.images import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE, DEFAULT_SIDE, RESIZE_MODES
from ingest.lake import (
    Lake,
    LakeError,
    sha256_hex,
    validate_name,
)
from ingest.lease import Lease, ingest_lease_key
from ingest.sources import SourceItem, list_coco, list_folder, list_imagenet, select_subset

SOURCE_KINDS = ("imagenet", "coco", "folder")
DIGEST_BYTES = 16  # BLAKE2b of (uri, size, stamp): 128 bits, no collisions among billions of files
RETRIED_REASONS = frozenset({"missing", "unreadable"})  # rejects a re-ingest reads again: they may work next time


@dataclass
class IngestConfig:
    """Everything that decides what an ingest writes (and so its ingest id), plus how it runs."""

    kind: str  # "imagenet", "coco" or "folder"
    source: str  # the source root: a local path or s3://bucket/prefix
    dataset: str  # the lake dataset to create or extend
    lake: str | None = None  # lake URI; None: $RECOLOR_LAKE, else ./lake
    size: int = DEFAULT_SIDE  # output side in pixels
    resize: str = DEFAULT_RESIZE  # "cover": shorter side to size, center crop; "squash": plain resize (the recipe's)
    limit: int | None = None  # take at most this many images (spread evenly across ImageNet classes)
    seed: int = 0  # seed of the --limit subset and of the shard order
    order: str = "shuffled"  # how items are laid into shards (ORDERS)
    rehash: bool = False  # read and hash every listed file, also those the dataset already holds unchanged
    val_fraction: float = 0.2  # share of samples in the validation split, decided by content hash
    shard_size: int = 64 * 2**20  # target bytes of a training shard
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images (decompression bombs)
    annotations: str | None = None  # COCO: the annotation JSON
    coco_split: str | None = None  # COCO: image folder, e.g. val2017 (default: from the JSON's name)
    categories: tuple[str, ...] = ()  # COCO: keep images with one of these categories
    imagenet_splits: tuple[str, ...] = ("train",)  # ImageNet: source folders to read
    workers: int | None = None  # CPUs of the local Ray instance (default: all)
    ray_address: str | None = None  # a Ray cluster to run on; None: $RAY_ADDRESS, else a local instance
    use_ray: bool = True  # False runs every chunk in this process (debugging, benchmarks)
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        validate_name(self.dataset)
        if not 16 <= self.size <= 4096:
            raise ConfigError(f"size must be between 16 and 4096 pixels, got {self.size}")
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ConfigError(
                f"val_fraction must be in [0, 1], got {self.val_fraction} (1: every sample is validation, "
                "a dataset for scoring only)"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be positive, got {self.shard_size}")
        if self.kind == "coco" and not self.annotations:
            raise ConfigError("a COCO source needs --annotations FILE (a COCO-format JSON)")

    @property
    def images_per_chunk(self) -> int:
        sample_bytes = 3 * self.size * self.size + 1536  # npy array + header + JSON + tar headers
        train_samples = max(1, self.shard_size // sample_bytes)
        # A chunk's larger split fills one shard: the train split, or the val split of a scoring-only dataset.
        return max(1, round(train_samples / max(1.0 - self.val_fraction, self.val_fraction)))


def list_source(config: IngestConfig) -> list[SourceItem]:
    """List the configured source and apply --limit; raises SourceError on a bad source."""
    if config.kind == "imagenet":
        items = list_imagenet(config.source, config.imagenet_splits)
    elif config.kind == "coco":
        items = list_coco(config.source, config.annotations, config.coco_split, config.categories)
    else:
        items = list_folder(config.source)
    return select_subset(items, config.limit, config.seed, by_label=config.kind == "imagenet")


def ingest_id_for(config: IngestConfig, items: list[SourceItem]) -> str:
    """Deterministic id of an ingest: same arguments and same listing give the same id (so it resumes)."""
    fields = {
        "dataset": config.dataset,
        "kind": config.kind,
        "size": config.size,
        "resize": config.resize,
        "val_fraction": config.val_fraction,
        "shard_size": config.shard_size,
        "max_pixels": config.max_pixels,
        "order": [config.order, config.seed],
        "items": [item.uri for item in items],
    }
    return sha256_hex(json.dumps(fields, sort_keys=True).encode())[:12]


def run_ingest(config: IngestConfig) -> IngestSummary:
    """Ingest a source into a new version of `config.dataset`.

    Checks the lake and the source before writing anything; then runs one task per chunk
    (on Ray unless `use_ray` is False), merges and commits.

    Raises:
        SourceError, LakeError, StorageError: bad source, lake or credentials (nothing written).
    """
    started = time.perf_counter()
    lake = Lake(config.lake)
    lake.check(write=True)
    listed = list_source(config)
    parent = lake.latest_version(config.dataset)
    parent_ref = lake.resolve(f"{config.dataset}@{parent}") if parent else None
    if parent_ref is not None:
        _check_compatible(parent_ref.record, config)
    known, items = what_to_read(lake, parent_ref, listed, config)
    listed_count = len(listed)
    del listed  # ImageNet's listing is hundreds of MB: only the files to read go on

    ingest_id = ingest_id_for(config, items)
    per_chunk = config.images_per_chunk
    specs = [
        ChunkSpec(
            lake_uri=lake.storage.root_uri,
            dataset=config.dataset,
            ingest_id=ingest_id,
            index=start // per_chunk,
            items=items[start : start + per_chunk],
            kind=config.kind,
            size=config.size,
            resize=config.resize,
            val_fraction=config.val_fraction,
            max_pixels=config.max_pixels,
        )
        for start in range(0, len(items), per_chunk)
    ]
    # The lease tells `lake gc` that this ingest's folder is in use, however old its files (a resumed ingest
    # commits chunks written days ago); it is renewed while the chunks run and the commit is made.
    with Lease(lake.storage, ingest_lease_key(config.dataset, ingest_id), f"ingest {config.dataset} {ingest_id}"):
        results = _run_chunks(specs, known, config)
        resumed = sum(1 for r in results if r.get("resumed"))
        return commit(lake, config, ingest_id, listed_count, items, results, started, resumed)


def what_to_read(lake: Lake, parent_ref, listed: list[SourceItem], config: IngestConfig):
    """The keys the dataset holds, and the listed items to read, in shard order. The parent's manifest is read a
    batch of rows at a time and kept only as fixed-size digests: at ImageNet scale it is hundreds of MB."""
    if parent_ref is None:
        return KnownKeys(), shard_order(listed, config.order, config.seed)
    keys, sources = [], []
    columns = ["key"] if config.rehash else ["key", "source_uri", "source_size", "source_stamp"]
    for batch in lake.manifest_batches(parent_ref, columns):
        keys.append(KnownKeys.from_column(batch.column("key")).keys)
        if not config.rehash:  # --rehash reads every file: no digests to compare with
            sources.append(_source_digests(batch))
    known = KnownKeys(np.concatenate(keys)) if keys else KnownKeys()
    if config.rehash:
        return known, shard_order(listed, config.order, config.seed)
    known_sources = np.concatenate(sources) if sources else np.array([], dtype=f"S{DIGEST_BYTES}")
    items = unchanged_filter(lake, parent_ref, known_sources, listed, config.max_pixels)
    return known, shard_order(items, config.order, config.seed)


def source_digest(uri: str, size: int | None, stamp: str | None) -> bytes | None:
    """16 bytes naming a source file as listed, (uri, size, stamp); None when size or stamp is unknown."""
    if size is None or stamp is None:
        return None
    return hashlib.blake2b(f"{uri}\0{size}\0{stamp}".encode(), digest_size=DIGEST_BYTES).digest()


def _source_digests(table) -> np.ndarray:
    """The known digests of a table with source_uri/source_size/source_stamp (rows without stamps left out)."""
    digests = map(source_digest, *(table.column(c).to_pylist() for c in ("source_uri", "source_size", "source_stamp")))
    return np.array([d for d in digests if d is not None], dtype=f"S{DIGEST_BYTES}")


def unchanged_filter(lake: Lake, parent_ref, known: np.ndarray, items: list[SourceItem],
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> list[SourceItem]:  # fmt: skip
    """The listed items the dataset does not already account for, unchanged: new files, and files whose size or
    stamp (ETag; mtime, ctime and inode) differ from when they were ingested (read again, deduplicated by
    content).

    Accounted for: `known`, the digests of the parent version's samples (`source_digest`), and the files its
    ingests (all its ancestors') rejected for their content; files that were missing or unreadable are tried
    again, and files too large for an ingest whose --max-pixels was lower than `max_pixels`.
    """
    known_parts = [known]
    ref = parent_ref
    while ref is not None:
        rejects = lake.rejects(ref)
        retried = set(RETRIED_REASONS)
        if max_pixels > int(ref.record.get("params", {}).get("max_pixels") or 0):
            retried.add("too_large")  # a higher --max-pixels than that ingest had: those may fit now
        known_parts.append(_source_digests(rejects.filter(pc.invert(pc.is_in(rejects["reason"],
                                                                             pa.array(sorted(retried)))))))  # fmt: skip
        parent = ref.record.get("parent")
        ref = lake.resolve(f"{ref.dataset}@{parent}") if parent else None
    known_all = np.unique(np.concatenate(known_parts))
    listed = [source_digest(item.uri, item.size, item.stamp) for item in items]
    has = np.array([d is not None for d in listed], dtype=bool)  # unknown stamps match nothing
    digests = np.array([d or b"" for d in listed], dtype=f"S{DIGEST_BYTES}")
    unchanged = has & np.isin(digests, known_all)
    return [item for item, skip in zip(items, unchanged, strict=True) if not skip]


def _check_compatible(record: dict, config: IngestConfig) -> None:
    if record["size"] != config.size or record["resize"] != config.resize:
        raise LakeError(
            f"{record['dataset']}@{record['version']} holds {record['size']}px '{record['resize']}' samples; "
            f"this ingest asks for {config.size}px '{config.resize}': use the same --size/--resize or a new --dataset"
        )


def _progress_bar(config: IngestConfig, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=f"ingest {config.dataset}", disable=not config.progress, smoothing=0.1)


def _run_chunks(specs: list[ChunkSpec], known: KnownKeys, config: IngestConfig) -> list[dict]:
    results: list[dict] = []
    stats: Counter = Counter()
    with _progress_bar(config, sum(len(s.items) for s in specs)) as bar:

        def done(spec: ChunkSpec, result: dict) -> None:
            results.append(result)
            stats["ok"] += len(result["rows"])
            stats["dup"] += result["duplicates"]
            stats["rejected"] += len(result["rejects"])
            bar.set_postfix(stats, refresh=False)
            bar.update(len(spec.items))

        if not config.use_ray:
            for spec in specs:
                done(spec, process_chunk(spec, known))
        else:
            import ray

            from ingest.cluster import ensure_ray, ship_environment

            with ensure_ray(config.ray_address, config.workers):
                remote = ray.remote(num_cpus=1, max_retries=3)(chunk_task)
                known_ref, environment_ref = ray.put(known), ship_environment()
                pending = {remote.remote(environment_ref, spec, known_ref): spec for spec in specs}
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        done(pending.pop(ref), ray.get(ref))
    return sorted(results, key=lambda r: r["index"])
