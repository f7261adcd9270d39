"""One chunk of an ingest, as a Ray task runs it (`process_chunk`): read each image once, hash it (the key and the
split come from the content hash), skip content the dataset already has, decode, convert to Lab, set gray photos
aside, write the chunk's train and val shards, then its small result record (what a rerun finds to skip it).

`ingest.driver` lists the source, cuts it into chunks and commits what they return.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest import faults
from ingest.images import ImageRejected, decode_image, is_grayscale, mean_chroma
from ingest.lab import rgb8_to_lab8
from ingest.lake import (
    SPLITS,
    ManifestRow,
    RejectRow,
    file_sha256,
    sha256_hex,
)
from ingest.shards import ShardWriter
from ingest.sources import SourceItem
from ingest.storage import local_temp_dir, open_storage, read_uri

KEY_LENGTH = 20  # hex digits of the content SHA-256 that name a sample: 80 bits, no collisions in practice


# How items are laid into shards. "shuffled": by a seeded permutation (each shard a sample of the whole set, so a
# batch mixes classes); "sorted": by path, as listed (an ImageNet shard is then one class).
ORDERS = ("shuffled", "sorted")
ORDER_METHOD = "sha256(seed:uri)"  # the permutation: items sorted by this hash (the same on every machine)


def shard_order(items: list[SourceItem], order: str, seed: int) -> list[SourceItem]:
    """The items in the order they are cut into shards: a seeded permutation (`ORDER_METHOD`), or as listed.

    The permutation sorts by a hash of (seed, uri), so it is the same on every machine and every run (a rerun
    resumes), and a grown listing keeps the old items' relative order.
    """
    if order == "sorted":
        return list(items)
    return sorted(items, key=lambda item: sha256_hex(f"{seed}:{item.uri}".encode()))


class KnownKeys:
    """The sample keys a dataset holds, as one sorted byte array: 20 bytes a key (a frozenset of str takes about
    4x that), shipped to every chunk task once (Ray shares the array without copying it), looked up by bisection.
    """

    def __init__(self, keys: Iterable[str] | np.ndarray = ()):
        self.keys = np.unique(np.asarray(keys if isinstance(keys, np.ndarray) else list(keys), dtype=f"S{KEY_LENGTH}"))

    @classmethod
    def from_column(cls, column) -> KnownKeys:
        """From a manifest's `key` column (Arrow), without a Python string per key."""
        import pyarrow as pa

        fixed = column.combine_chunks().cast(pa.binary()).cast(pa.binary(KEY_LENGTH))
        known = cls()
        if len(fixed):
            data = np.frombuffer(fixed.buffers()[1], dtype=f"S{KEY_LENGTH}", count=len(fixed) + fixed.offset)
            known.keys = np.unique(data[fixed.offset :])
        return known

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        needle = np.bytes_(key.encode())
        index = int(np.searchsorted(self.keys, needle))
        return index < len(self.keys) and self.keys[index] == needle


@dataclass
class ChunkSpec:
    """One Ray task's work: these items into the shards numbered `index`."""

    lake_uri: str
    dataset: str
    ingest_id: str
    index: int
    items: list[SourceItem]
    kind: str
    size: int
    resize: str
    val_fraction: float
    max_pixels: int

    @property
    def result_key(self) -> str:
        return f"{self.dataset}/ingests/{self.ingest_id}/chunks/{self.index:06d}.json"

    def shard_path(self, split: str) -> str:
        """Shard path relative to the dataset folder."""
        return f"ingests/{self.ingest_id}/shards/{split}-{self.ingest_id}-{self.index:06d}.tar"


def split_for(sha256: str, val_fraction: float) -> str:
    """The sample's split from its content hash: every run, and every re-ingest, agrees."""
    return "val" if int(sha256[-8:], 16) / 2**32 < val_fraction else "train"


def sample_metadata(item: SourceItem, key: str, sha: str, split: str, width: int, height: int, kind: str) -> dict:
    return {
        "key": key,
        "sha256": sha,
        "split": split,
        "source_dataset": kind,
        "source_name": item.name,
        "width": width,
        "height": height,
        "label": item.label,
        "label_name": item.label_name,
        "coco_id": item.coco_id,
        "categories": list(item.categories),
    }


def _reject(spec: ChunkSpec, item: SourceItem, reason: str, detail: str) -> dict:
    return RejectRow(source_uri=item.uri, reason=reason, detail=detail, ingest_id=spec.ingest_id,
                     source_size=item.size, source_stamp=item.stamp).to_dict()  # fmt: skip


def process_chunk(spec: ChunkSpec, known_keys: KnownKeys | frozenset[str] | set[str]) -> dict:
    """Turn one chunk of source images into shards; returns (and stores) the chunk's result record.

    Args:
        spec: the chunk's items and the ingest's parameters.
        known_keys: sample keys the dataset already holds (skipped as duplicates).

    Returns:
        {"index", "rows": manifest rows, "rejects": reject rows, "duplicates", "shards": {split: {...}}}
    """
    storage = open_storage(spec.lake_uri)
    try:
        return json.loads(storage.read_bytes(spec.result_key)) | {"resumed": True}
    except FileNotFoundError:
        pass
    temp_dir = Path(local_temp_dir())
    writers = {split: ShardWriter(temp_dir / f"{split}.tar") for split in SPLITS}
    rows: list[dict] = []
    rejects: list[dict] = []
    duplicates = 0
    seen: set[str] = set()
    try:
        for item in spec.items:
            try:
                data = read_uri(item.uri)
            except FileNotFoundError:
                rejects.append(_reject(spec, item, "missing", "listed but not found"))
                continue
            except (OSError, RuntimeError) as e:
                rejects.append(_reject(spec, item, "unreadable", f"{type(e).__name__}: {e}"))
                continue
            sha = sha256_hex(data)
            key = sha[:KEY_LENGTH]
            if key in known_keys or key in seen:
                duplicates += 1
                continue
            seen.add(key)
            try:
                decoded = decode_image(data, spec.size, spec.resize, spec.max_pixels)
            except ImageRejected as e:
                rejects.append(_reject(spec, item, e.reason, e.detail))
                continue
            lab8 = rgb8_to_lab8(decoded.rgb)
            if is_grayscale(decoded.source_mode, lab8):
                detail = f"mode {decoded.source_mode}, mean chroma {mean_chroma(lab8):.2f}"
                rejects.append(_reject(spec, item, "grayscale", detail))
                continue
            split = split_for(sha, spec.val_fraction)
            writer = writers[split]
            meta = sample_metadata(item, key, sha, split, decoded.width, decoded.height, spec.kind)
            row = ManifestRow(key=key, split=split, shard=spec.shard_path(split), index_in_shard=writer.count,
                              source_dataset=spec.kind, source_uri=item.uri, sha256=sha, width=decoded.width,
                              height=decoded.height, label=item.label, label_name=item.label_name,
                              coco_id=item.coco_id, categories=list(item.categories), ingest_id=spec.ingest_id,
                              source_size=item.size, source_stamp=item.stamp)  # fmt: skip
            rows.append(row.to_dict())
            writer.write(key, lab8, meta)
            faults.maybe_fail("shard_write")
        shards = {}
        for split, writer in writers.items():
            count = writer.close()
            if count:
                faults.maybe_fail("shard_upload")
                storage.upload_file(f"{spec.dataset}/{spec.shard_path(split)}", writer.path)
                shards[split] = {
                    "path": spec.shard_path(split),
                    "count": count,
                    "bytes": writer.path.stat().st_size,
                    "sha256": file_sha256(writer.path),
                }  # what a node's cached copy must match
    finally:
        for writer in writers.values():
            writer.close()
            writer.path.unlink(missing_ok=True)
        temp_dir.rmdir()
    result = {"index": spec.index, "rows": rows, "rejects": rejects, "duplicates": duplicates, "shards": shards}
    faults.maybe_fail("chunk_result")
    storage.write_bytes(spec.result_key, json.dumps(result).encode())
    return result


def chunk_task(environment, spec: ChunkSpec, known: KnownKeys) -> dict:
    """`process_chunk` in a Ray task, with the driver's settings and credentials (`ingest.cluster.ship_environment`)."""
    from ingest.cluster import open_environment

    open_environment(environment)
    return process_chunk(spec, known)
