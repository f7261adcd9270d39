"""`recolor lake gc`: find, and on request delete, the objects of a dataset that no version references.

What gc may delete is narrow, by construction:

- only objects of the lake's own layout (`LAYOUT`): shards, chunk records, manifests, rejects tables and leases
  below `ingests/<id>/`, and the temporary files, unfinished multipart uploads and commit claims of those and of
  version records. Anything else below a dataset (a `.py` file, a photo, a folder of notes) is listed as
  unknown and left alone, so gc pointed at a folder that is not a lake deletes nothing of it;
- only in datasets whose version records all parse: with one unreadable, what is referenced cannot be known,
  and the dataset is skipped with one line (run `recolor lake check`);
- never through a symbolic link, at any level: a dataset folder that is a link is not looked into, a link inside
  one is unknown, and the store refuses to delete below a link;
- never below an ingest (or `lake repair`) whose lease is live (`ingest.lease`), whatever the age of its files:
  an ingest resumed after a day has old chunks it is about to commit. The lease is read again just before
  that ingest's objects are deleted; an ingest that starts after that and resumes from records gc deleted is
  caught by its commit, which refuses a version whose shards are not all present;
- only objects at least `min_age` old (temporary files of a write in progress have no lease of their own).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from ingest.lake import Lake, LakeError, validate_name, version_key
from ingest.lease import LEASE_FILE, LeaseState, read_lease
from ingest.storage import ObjectInfo

# Keys below a dataset folder that the lake writes (after `_canonical` strips temp and claim decorations).
LAYOUT = re.compile(
    r"^(?:versions/\d{6}\.json"
    r"|ingests/(?P<id>[0-9a-f]{12})/(?:shards/(?:train|val)-(?P=id)-\d{6}\.tar|chunks/\d{6}\.json"
    rf"|manifest-p\d+\.parquet|rejects\.parquet|{re.escape(LEASE_FILE)}))$"
)
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")  # `LocalStorage._publish`'s temporary files
_CLAIM = re.compile(r"^(?P<key>.+)\.claims/\d+-[0-9a-f]{12}$")  # `S3Storage._claimed_put`'s claims


def _canonical(rest: str) -> str:
    """The layout key an object stands for: itself, or the key whose temp file, upload or claim it is."""
    rest = rest.partition("?uploadId=")[0]
    claim = _CLAIM.match(rest)
    if claim:
        rest = claim["key"]
    folder, slash, name = rest.rpartition("/")
    temp = _TEMP.match(name)
    return f"{folder}{slash}{temp['name']}" if temp else rest


@dataclass
class GcReport:
    """What gc found in one dataset."""

    dataset: str
    garbage: list[ObjectInfo] = field(default_factory=list)  # the lake's own objects that nothing references
    unknown: list[ObjectInfo] = field(default_factory=list)  # not of the lake's layout: never deleted
    in_use: dict[str, LeaseState] = field(default_factory=dict)  # ingest id -> the live lease protecting it
    skipped: str | None = None  # why the dataset was not collected at all
    deleted: int = 0


def collect(lake: Lake, dataset: str, min_age: float = 0.0) -> GcReport:
    """Find what gc may delete in `dataset` (see the module's docstring); deletes nothing."""
    validate_name(dataset)
    report = GcReport(dataset)
    keep = set()
    try:
        for version in lake.versions(dataset):
            record = lake.resolve(f"{dataset}@{version}").record
            keep.add(version_key(dataset, version))
            keep.update(f"{dataset}/{record[name]}" for name in ("manifest", "rejects") if record.get(name))
            keep.update(f"{dataset}/{shard['path']}" for entries in record["shards"].values() for shard in entries)
    except LakeError as e:
        report.skipped = f"{e} (nothing collected in {dataset}; see `recolor lake check {dataset}`)"
        return report
    cutoff = time.time() - min_age
    candidates: list[tuple[ObjectInfo, str | None]] = []
    for obj in lake.storage.list(dataset, include_partial=True, follow_links=False):
        if obj.key in keep:
            continue
        match = None if obj.symlink else LAYOUT.match(_canonical(obj.key[len(dataset) + 1 :]))
        if match is None:
            report.unknown.append(obj)
        elif obj.modified <= cutoff or match.group(0).endswith(f"/{LEASE_FILE}"):  # an expired lease: any age
            candidates.append((obj, match["id"]))
    for ingest_id in sorted({ingest_id for _, ingest_id in candidates if ingest_id}):
        lease = read_lease(lake.storage, f"{dataset}/ingests/{ingest_id}/{LEASE_FILE}")
        if lease is not None and lease.live:
            report.in_use[ingest_id] = lease
    report.garbage = [obj for obj, ingest_id in candidates if ingest_id not in report.in_use]
    return report


def delete(lake: Lake, report: GcReport) -> None:
    """Delete what `collect` found, one ingest at a time, reading each ingest's lease again just before: an ingest
    that resumed since `collect` keeps its objects. Chunk records go first, so an ingest starting meanwhile
    redoes those chunks rather than trusting shards about to vanish."""
    groups: dict[str | None, list[ObjectInfo]] = {}
    for obj in report.garbage:
        match = LAYOUT.match(_canonical(obj.key[len(report.dataset) + 1 :]))
        groups.setdefault(match["id"] if match else None, []).append(obj)
    kept: list[ObjectInfo] = []
    for ingest_id, objects in groups.items():
        if ingest_id is not None:
            lease = read_lease(lake.storage, f"{report.dataset}/ingests/{ingest_id}/{LEASE_FILE}")
            if lease is not None and lease.live:
                report.in_use[ingest_id] = lease
                continue
        objects.sort(key=lambda obj: ("/chunks/" not in obj.key, obj.key))
        for obj in objects:
            lake.storage.delete(obj.key)
            report.deleted += 1
            kept.append(obj)
    report.garbage = kept
