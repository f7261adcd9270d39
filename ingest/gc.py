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


CLAIM_MARGIN_S = 360.0  # a commit claim or temporary file younger than this may be a write in progress (claims
# count as a crashed writer's after 300 s: `ingest.storage.s3`), whatever --min-age says


def _referenced(lake: Lake, dataset: str) -> tuple[set[str], list[int]]:
    """The keys the dataset's versions reference, and the version numbers read.

    Raises:
        LakeError: a version record does not parse.
    """
    keep = set()
    versions = lake.versions(dataset)
    for version in versions:
        record = lake.resolve(f"{dataset}@{version}").record
        keep.add(version_key(dataset, version))
        keep.update(f"{dataset}/{record[name]}" for name in ("manifest", "rejects") if record.get(name))
        keep.update(f"{dataset}/{shard['path']}" for entries in record["shards"].values() for shard in entries)
    return keep, versions


def collect(lake: Lake, dataset: str, min_age: float = 0.0) -> GcReport:
    """Find what gc may delete in `dataset` (see the module's docstring); deletes nothing."""
    validate_name(dataset)
    report = GcReport(dataset)
    try:
        keep, _ = _referenced(lake, dataset)
    except LakeError as e:
        report.skipped = f"{e} (nothing collected in {dataset}; see `recolor lake check {dataset}`)"
        return report
    now = time.time()
    cutoff = now - min_age
    candidates: list[tuple[ObjectInfo, str | None]] = []
    for obj in lake.storage.list(dataset, include_partial=True, follow_links=False):
        if obj.key in keep:
            continue
        rest = obj.key[len(dataset) + 1 :]
        canonical = _canonical(rest)
        match = None if obj.symlink else LAYOUT.match(canonical)
        if match is None:
            report.unknown.append(obj)
            continue
        if canonical == rest and canonical.startswith("versions/"):
            continue  # a version record itself is never garbage (one committed after `keep` was read)
        decorated = canonical != rest  # a temporary file, an unfinished upload or a commit claim
        if decorated and obj.modified > min(cutoff, now - CLAIM_MARGIN_S):
            continue
        if obj.modified <= cutoff or (not decorated and canonical.endswith(f"/{LEASE_FILE}")):  # expired lease
            candidates.append((obj, match["id"]))
    for ingest_id in sorted({ingest_id for _, ingest_id in candidates if ingest_id}):
        lease = read_lease(lake.storage, f"{dataset}/ingests/{ingest_id}/{LEASE_FILE}")
        if lease is not None and lease.live:
            report.in_use[ingest_id] = lease
    report.garbage = [obj for obj, ingest_id in candidates if ingest_id not in report.in_use]
    return report


RECHECK_EVERY = 100  # objects deleted between two readings of an ingest's lease


def delete(lake: Lake, report: GcReport) -> None:
    """Delete what `collect` found, one ingest at a time.

    For each ingest its lease is read again first (one that resumed since `collect` keeps its objects), then the
    dataset's versions (an ingest commits before it gives its lease up, so a version committed since `collect` is
    seen here, and what it references is kept), and the lease again every `RECHECK_EVERY` objects. Chunk records
    go first, so an ingest starting meanwhile redoes those chunks rather than trusting shards about to vanish."""
    groups: dict[str | None, list[ObjectInfo]] = {}
    for obj in report.garbage:
        match = LAYOUT.match(_canonical(obj.key[len(report.dataset) + 1 :]))
        groups.setdefault(match["id"] if match else None, []).append(obj)
    deleted: list[ObjectInfo] = []
    if report.skipped or not groups:
        report.garbage = deleted
        return
    keep, versions = _referenced(lake, report.dataset)
    for ingest_id, objects in groups.items():
        lease_key = f"{report.dataset}/ingests/{ingest_id}/{LEASE_FILE}" if ingest_id else None
        if not _free(lake, report, ingest_id, lease_key):
            continue
        if lake.versions(report.dataset) != versions:  # one listing; the records only when one was committed
            keep, versions = _referenced(lake, report.dataset)
        objects.sort(key=lambda obj: ("/chunks/" not in obj.key, obj.key))
        for number, obj in enumerate(objects):
            if number and number % RECHECK_EVERY == 0 and not _free(lake, report, ingest_id, lease_key):
                break
            if obj.key in keep:
                continue
            lake.storage.delete(obj.key)
            report.deleted += 1
            deleted.append(obj)
    report.garbage = deleted


def _free(lake: Lake, report: GcReport, ingest_id: str | None, lease_key: str | None) -> bool:
    """Whether no live lease holds this ingest now (recorded in the report when one does)."""
    if lease_key is None:
        return True
    lease = read_lease(lake.storage, lease_key)
    if lease is not None and lease.live:
        report.in_use[ingest_id] = lease
        return False
    return True
