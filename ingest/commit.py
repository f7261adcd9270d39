"""Commit an ingest: merge its chunk results with the parent version and publish the new version.

Chunks deduplicate within themselves; content that two chunks, or a concurrent ingest, both
brought is dropped here (rewriting the few affected shards, so shards and manifest agree). The
manifest (parent rows + new rows) and rejects are written first, the version record last and
create-exclusive: when another ingest took the number, merge with its version and try the next.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from ingest import faults
from ingest.chunk import ORDER_METHOD, KnownKeys
from ingest.lab import ENCODING
from ingest.lake import (
    MANIFEST_SCHEMA,
    RECORD_FORMAT,
    REJECTS_SCHEMA,
    SPLITS,
    Lake,
    LakeError,
    file_sha256,
    sha256_hex,
    table_to_parquet,
)
from ingest.shards import filter_shard
from ingest.storage import AlreadyExistsError, local_temp_dir

COMMIT_ATTEMPTS = 5


@dataclass
class IngestSummary:
    dataset: str
    version: int | None  # None when nothing new was found
    parent: int | None
    ingest_id: str
    listed: int
    ingested: int
    duplicates: int
    unchanged: int = 0  # listed files the dataset already held as they are: not read (--rehash reads them)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count, "grayscale" included
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_chunks: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dedup_and_rewrite(lake: Lake, dataset: str, results: list[dict], base_keys: KnownKeys) -> tuple[list, int]:
    """Drop samples whose content is already in `base_keys` or in an earlier chunk; rewrite their shards.

    Chunks deduplicate within themselves; two chunks (or a concurrent ingest) holding the same
    photo is rare, and rewriting the few affected shards keeps shards and manifest in agreement.
    Returns the kept rows (with shard positions updated) and the number of dropped duplicates.
    """
    seen: set[str] = set()
    kept_rows: list[dict] = []
    dropped = 0
    for result in results:
        by_shard: dict[str, list[dict]] = {}
        shard_dropped: set[str] = set()
        for row in result["rows"]:
            if row["key"] in seen or row["key"] in base_keys:
                dropped += 1
                shard_dropped.add(row["shard"])
                continue
            seen.add(row["key"])
            by_shard.setdefault(row["shard"], []).append(row)
        for split, shard in list(result["shards"].items()):
            rows = by_shard.get(shard["path"], [])
            if shard["path"] in shard_dropped:
                shard.update(_rewrite_shard(lake, dataset, shard["path"], {r["key"] for r in rows}))
                if not rows:
                    del result["shards"][split]
            for index, row in enumerate(rows):
                kept_rows.append(dict(row, index_in_shard=index))
    return kept_rows, dropped


def _rewrite_shard(lake: Lake, dataset: str, path: str, keep: set[str]) -> dict:
    key = f"{dataset}/{path}"
    temp_dir = Path(local_temp_dir())
    temp = temp_dir / "shard.tar"
    try:
        with lake.storage.open_read(key) as source:
            count = filter_shard(source, temp, keep)
        if count:
            lake.storage.upload_file(key, temp)
        return {"count": count, "bytes": temp.stat().st_size, "sha256": file_sha256(temp)}
    finally:
        temp.unlink(missing_ok=True)
        temp_dir.rmdir()


def commit(lake, config, ingest_id, listed: int, items, results, started, resumed) -> IngestSummary:
    """Merge the chunks' results with the latest version and commit the next one (see the module's docstring).

    `listed` is how many files the source listed, `items` the part of them that was read (new or changed files).
    """
    rejects = [reject for result in results for reject in result["rejects"]]
    reasons = Counter(reject["reason"] for reject in rejects)
    chunk_duplicates = sum(result["duplicates"] for result in results)
    dataset_prefix = f"{config.dataset}/ingests/{ingest_id}"
    rejects_path = f"ingests/{ingest_id}/rejects.parquet"
    lake.storage.write_bytes(
        f"{config.dataset}/{rejects_path}", table_to_parquet(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
    )
    for _ in range(COMMIT_ATTEMPTS):
        parent = lake.latest_version(config.dataset)
        parent_ref = lake.resolve(f"{config.dataset}@{parent}") if parent else None
        parent_table = lake.manifest(parent_ref) if parent_ref else MANIFEST_SCHEMA.empty_table()
        base_keys = KnownKeys.from_column(parent_table.column("key"))
        rows, dropped = _dedup_and_rewrite(lake, config.dataset, results, base_keys)
        summary = IngestSummary(
            dataset=config.dataset,
            version=None,
            parent=parent,
            ingest_id=ingest_id,
            listed=listed,
            ingested=len(rows),
            duplicates=chunk_duplicates + dropped,
            unchanged=listed - len(items),
            rejected=dict(sorted(reasons.items())),
            resumed_chunks=resumed,
        )
        if not rows:
            summary.counts = dict(parent_ref.record["counts"]) if parent_ref else {}
            summary.seconds = time.perf_counter() - started
            return summary
        faults.maybe_fail("manifest")
        manifest = pa.concat_tables([parent_table, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)])
        manifest_bytes = table_to_parquet(manifest)
        manifest_path = f"ingests/{ingest_id}/manifest-p{parent or 0}.parquet"
        lake.storage.write_bytes(f"{config.dataset}/{manifest_path}", manifest_bytes)
        version = (parent or 0) + 1
        record = _version_record(config, version, parent_ref, ingest_id, listed, results, summary)
        record.update(manifest=manifest_path, manifest_sha256=sha256_hex(manifest_bytes), rejects=rejects_path)
        _check_shards_present(lake, config.dataset, ingest_id, record, parent_ref)
        faults.maybe_fail("commit")
        try:
            lake.commit_version(config.dataset, version, record)
        except AlreadyExistsError:
            continue  # another ingest took this number: merge with its version and try the next
        summary.version = version
        summary.counts = record["counts"]
        summary.seconds = time.perf_counter() - started
        return summary
    raise LakeError(
        f"could not commit a version of {config.dataset} after {COMMIT_ATTEMPTS} attempts: other ingests keep "
        f"committing; rerun this command (finished shards under {lake.storage.uri(dataset_prefix)} are kept)"
    )


def _check_shards_present(lake: Lake, dataset: str, ingest_id: str, record: dict, parent_ref) -> None:
    """Refuse to publish a version that lists a shard the store does not hold as recorded.

    This ingest's own shards can vanish while it runs (deleted by hand, or by a gc that did not see its lease):
    their chunk records are removed so that the rerun this error asks for writes them again. A missing shard of
    the parent version is damage to the dataset that `recolor lake repair` mends.

    Raises:
        LakeError: names the first missing shards and what to run.
    """
    problems = lake.shard_problems(dataset, record)
    if not problems:
        return
    own = [entry for _, entry, _ in problems if entry["path"].startswith(f"ingests/{ingest_id}/")]
    for entry in own:
        index = entry["path"].rsplit("-", 1)[-1].removesuffix(".tar")
        lake.storage.delete(f"{dataset}/ingests/{ingest_id}/chunks/{index}.json")
    named = "; ".join(f"{lake.shard_uri(dataset, entry['path'])} ({problem})" for _, entry, problem in problems[:3])
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    if len(own) == len(problems):
        raise LakeError(
            f"not committing {dataset}: {len(problems)} shard(s) of this ingest vanished before the commit: "
            f"{named}{more}. Their resume records were removed: rerun the same command to write them again"
        )
    raise LakeError(
        f"not committing {dataset}: {len(problems)} shard(s) the version would list are not in the lake as "
        f"recorded: {named}{more}. The parent {dataset}@{parent_ref.version if parent_ref else '?'} is damaged: run "
        f"`recolor lake check {dataset}` and `recolor lake repair {dataset}`, then rerun this command"
    )


def _version_record(config, version, parent_ref, ingest_id, listed: int, results, summary) -> dict:
    shards = {split: list(parent_ref.record["shards"].get(split, [])) if parent_ref else [] for split in SPLITS}
    for result in results:
        for split, shard in sorted(result["shards"].items()):
            shards[split].append(shard)
    counts = {split: sum(s["count"] for s in entries) for split, entries in shards.items()}
    sizes = {split: sum(s["bytes"] for s in entries) for split, entries in shards.items()}
    rejected = Counter(summary.rejected)
    source = {
        "kind": config.kind,
        "root": config.source,
        "annotations": config.annotations,
        "listed": listed,
        "ingested": summary.ingested,
        "ingest_id": ingest_id,
    }
    return {
        "format": RECORD_FORMAT,
        "dataset": config.dataset,
        "version": version,
        "parent": parent_ref.version if parent_ref else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ingest_id": ingest_id,
        "encoding": ENCODING,
        "size": config.size,
        "resize": config.resize,
        "counts": counts,
        "bytes": sizes,
        "shards": shards,
        "stats": {
            "listed": listed,
            "ingested": summary.ingested,
            "duplicates": summary.duplicates,
            "unchanged": summary.unchanged,
            "grayscale": rejected.get("grayscale", 0),
            "rejected": dict(sorted(rejected.items())),
        },
        "params": {
            "val_fraction": config.val_fraction,
            "shard_size": config.shard_size,
            "max_pixels": config.max_pixels,
            "limit": config.limit,
            "seed": config.seed,
            "categories": list(config.categories),
            "imagenet_splits": list(config.imagenet_splits),
            "coco_split": config.coco_split,
        },
        # How this ingest's items were laid into shards (`ingest.driver.shard_order`), so anyone can redo it.
        "order": {
            "name": config.order,
            "method": ORDER_METHOD if config.order == "shuffled" else "sorted by path",
            "seed": config.seed,
        },
        "sources": (parent_ref.record.get("sources", []) if parent_ref else []) + [source],
        "host": os.uname().nodename,
    }
