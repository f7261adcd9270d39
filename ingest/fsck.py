"""`recolor lake check` and `recolor lake repair`: is a version whole, and mend it when it is not.

`check` compares a version with its record: the record parses, the manifest and rejects tables parse and the
manifest has its recorded SHA-256, counts agree (record, shards, manifest rows), and every shard the record lists
is in the store with its recorded size (one listing). `deep` also reads every sample of every shard, in Ray tasks
as ingest runs its chunks, and checks its CRC-32, its array and its place in the manifest.

`repair` writes a new version in which every damaged shard of the latest version is replaced by a rebuilt one:
samples still intact in the damaged shard are copied as they are; the others are made again from their recorded
source (the manifest keeps each sample's source URI and SHA-256), byte-identical when the source is unchanged;
a sample whose source is gone, changed or no longer decodes is dropped from the new version and listed. The old
version stays as it was (readable where it is whole), like every version.

About 480 lines on purpose: check and repair walk the same records, manifests and shards and judge them the same
way; gc is its own module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.errors import RecolorError
from ingest.lake import (
    MANIFEST_SCHEMA,
    REJECTS_SCHEMA,
    Lake,
    LakeError,
    VersionRef,
    conform,
    file_sha256,
    sha256_hex,
    table_to_parquet,
)
from ingest.lease import Lease, ingest_lease_key
from ingest.storage import AlreadyExistsError, StorageError, local_temp_dir, open_storage

SHARDS_PER_TASK = 8


@dataclass
class Problem:
    what: str  # "missing", "size", "corrupt", "manifest", "rejects", "counts", "record"
    where: str  # the object's URI
    detail: str
    shard: str | None = None  # the shard's path in the record, for `repair`

    def line(self) -> str:
        return f"{self.what:<9} {self.where}: {self.detail}"


@dataclass
class CheckReport:
    ref: str
    deep: bool
    shards: int = 0
    samples: int = 0  # samples read (deep) or recorded
    problems: list[Problem] = field(default_factory=list)

    @property
    def damaged_shards(self) -> set[str]:
        return {p.shard for p in self.problems if p.shard}


def _read_table(lake: Lake, ref: VersionRef, key: str, schema: pa.Schema, what: str, report: CheckReport):
    uri = lake.storage.uri(f"{ref.dataset}/{key}")
    try:
        data = lake.storage.read_bytes(f"{ref.dataset}/{key}")
    except FileNotFoundError:
        report.problems.append(Problem(what, uri, "missing"))
        return None, None
    try:
        table = pq.ParquetFile(io.BytesIO(data), pre_buffer=False).read(use_threads=False)
        return conform(table, schema), data
    except (pa.ArrowException, OSError, ValueError) as e:
        report.problems.append(Problem(what, uri, f"does not parse as Parquet ({str(e).splitlines()[0]})"))
        return None, data


def check_version(lake: Lake, ref: VersionRef, deep: bool = False, use_ray: bool = True, progress: bool = True,
                  ray_address: str | None = None, workers: int | None = None) -> CheckReport:  # fmt: skip
    """Check one version (see the module's docstring); returns what is wrong, raises only when the lake is
    unreachable."""
    record, dataset = ref.record, ref.dataset
    report = CheckReport(ref.ref, deep)
    manifest, manifest_bytes = _read_table(lake, ref, record["manifest"], MANIFEST_SCHEMA, "manifest", report)
    if manifest_bytes is not None and sha256_hex(manifest_bytes) != record["manifest_sha256"]:
        report.problems.append(Problem("manifest", lake.storage.uri(f"{dataset}/{record['manifest']}"),
                                       "its SHA-256 is not the one the version records"))  # fmt: skip
    if record.get("rejects"):
        _read_table(lake, ref, record["rejects"], REJECTS_SCHEMA, "rejects", report)
    where = lake.storage.uri(f"{dataset}/versions/{ref.version:06d}.json")
    entries = [(split, entry) for split, items in record["shards"].items() for entry in items]
    report.shards = len(entries)
    for split, items in record["shards"].items():
        if record["counts"].get(split, 0) != sum(entry["count"] for entry in items):
            report.problems.append(Problem("counts", where, f"{split}: the record counts {record['counts'].get(split)} "
                                           f"samples, its shards {sum(e['count'] for e in items)}"))  # fmt: skip
    rows_by_shard: dict[str, list[str]] = {}
    if manifest is not None:
        order = pc.sort_indices(manifest, [("shard", "ascending"), ("index_in_shard", "ascending")])
        ordered = manifest.take(order)
        for shard, key in zip(ordered.column("shard").to_pylist(), ordered.column("key").to_pylist(), strict=True):
            rows_by_shard.setdefault(shard, []).append(key)
        for _, entry in entries:
            rows = len(rows_by_shard.get(entry["path"], []))
            if rows != entry["count"]:
                report.problems.append(Problem("counts", lake.shard_uri(dataset, entry["path"]),
                                               f"the record counts {entry['count']} samples, the manifest {rows}",
                                               shard=entry["path"]))  # fmt: skip
        unlisted = set(rows_by_shard) - {entry["path"] for _, entry in entries}
        for shard in sorted(unlisted):
            report.problems.append(Problem("manifest", lake.shard_uri(dataset, shard),
                                           f"{len(rows_by_shard[shard])} manifest rows name a shard the record "
                                           "does not list"))  # fmt: skip
    present = []
    absent = {entry["path"]: problem for _, entry, problem in lake.shard_problems(dataset, record)}
    for _, entry in entries:
        problem = absent.get(entry["path"])
        if problem is None:
            present.append(entry)
        elif problem == "missing":
            report.problems.append(Problem("missing", lake.shard_uri(dataset, entry["path"]),
                                           f"recorded {entry['bytes']} bytes, {entry['count']} samples",
                                           shard=entry["path"]))  # fmt: skip
        else:
            report.problems.append(Problem("size", lake.shard_uri(dataset, entry["path"]), problem,
                                           shard=entry["path"]))  # fmt: skip
    report.samples = sum(entry["count"] for _, entry in entries)
    if deep:
        report.samples = 0
        jobs = [(entry, rows_by_shard.get(entry["path"]) if manifest is not None else None) for entry in present]
        for result in _scan_all(lake, dataset, record["size"], jobs, use_ray, progress, ray_address, workers):
            report.samples += result["samples"]
            for detail in result["problems"]:
                report.problems.append(Problem("corrupt", lake.shard_uri(dataset, result["path"]), detail,
                                               shard=result["path"]))  # fmt: skip
    return report


def scan_shard(lake_uri: str, dataset: str, size: int, entry: dict, keys: list[str] | None) -> dict:
    """Read every sample of one shard: CRC-32, the array's shape, and the keys in the manifest's order."""
    from ingest.shards import LAB_MEMBER, META_MEMBER, TarFormatError, checksum_matches, decode_lab_npy, iter_samples

    storage = open_storage(lake_uri)
    problems: list[str] = []
    seen: list[str] = []
    bad: list[str] = []
    try:
        with storage.open_read(f"{dataset}/{entry['path']}") as stream:
            for sample in iter_samples(stream):
                key, lab, meta = sample["__key__"], sample.get(LAB_MEMBER), sample.get(META_MEMBER)
                seen.append(key)
                try:
                    if lab is None or meta is None or not checksum_matches(lab, meta):
                        raise ValueError
                    decode_lab_npy(lab, size)
                except ValueError:
                    bad.append(key)
    except (TarFormatError, OSError, ValueError) as e:  # a garbled header's size field is not octal: ValueError
        problems.append(f"unreadable after {len(seen)} samples ({e})")
    if bad:
        problems.append(f"{len(bad)} sample(s) fail their checksum or array check (first {bad[0]})")
    if keys is not None and seen != keys and not problems:
        problems.append(f"holds {len(seen)} samples that are not the manifest's {len(keys)} in its order")
    return {"path": entry["path"], "samples": len(seen), "problems": problems, "bad": bad}


def _scan_task(environment, lake_uri, dataset, size, jobs) -> list[dict]:
    from ingest.cluster import open_environment

    open_environment(environment)
    return [scan_shard(lake_uri, dataset, size, entry, keys) for entry, keys in jobs]


def _scan_all(lake: Lake, dataset: str, size: int, jobs: list, use_ray: bool, progress: bool, ray_address, workers):
    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), unit="shard", desc=f"check {dataset}", disable=not progress) as bar:
        if not use_ray or not jobs:
            for entry, keys in jobs:
                yield scan_shard(lake.storage.root_uri, dataset, size, entry, keys)
                bar.update(1)
            return
        import ray

        from ingest.cluster import ensure_ray, ship_environment

        with ensure_ray(ray_address, workers):
            remote = ray.remote(num_cpus=1, max_retries=3)(_scan_task)
            environment = ship_environment()
            batches = [jobs[i : i + SHARDS_PER_TASK] for i in range(0, len(jobs), SHARDS_PER_TASK)]
            pending = [remote.remote(environment, lake.storage.root_uri, dataset, size, batch) for batch in batches]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for result in ray.get(ready[0]):
                    bar.update(1)
                    yield result


# --- repair -------------------------------------------------------------------------------------------------------


class RepairError(RecolorError):
    """A version that `repair` cannot mend (its manifest, the source of truth, is unreadable)."""


@dataclass
class RepairSummary:
    dataset: str
    parent: int
    version: int | None  # None: nothing to repair
    rebuilt: list[str] = field(default_factory=list)  # shard paths replaced
    salvaged: int = 0  # samples copied from the damaged shards as they were
    remade: int = 0  # samples made again from their sources
    dropped: list[dict] = field(default_factory=list)  # {"key", "source_uri", "reason"}
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rejects: str | None = None  # how a damaged rejects table was mended: "rebuilt" or "lost" (names unknown)
    rejects_lost: int = 0  # refusals the mended table could not name (the record still counts them)
    rejects_source: str | None = None  # the ingest whose refusals the table lists
    rejects_count: int = 0  # how many it refused


def _source_names(lake: Lake, record: dict) -> dict[str, list[str]]:
    """Each ingest's source roots as URIs (what a source item's name is relative to), by ingest id."""
    roots: dict[str, list[str]] = {}
    for source in record.get("sources", []):
        try:
            root = open_storage(source["root"]).root_uri.rstrip("/")
        except StorageError:
            continue
        roots.setdefault(source.get("ingest_id"), []).append(root)
    return roots


def _source_name(row: dict, roots: dict[str, list[str]]) -> str:
    uri = row["source_uri"]
    for root in roots.get(row["ingest_id"], []) + [r for rs in roots.values() for r in rs]:
        if uri.startswith(root + "/"):
            return uri[len(root) + 1 :]
    return uri.rsplit("/", 1)[-1]


def _salvage(lake: Lake, dataset: str, path: str) -> dict[str, list[tuple[str, bytes]]]:
    """The intact samples of a damaged shard, as their raw members: {key: [(member name, bytes)]}."""
    from ingest.shards import LAB_MEMBER, META_MEMBER, checksum_matches, iter_members

    members: dict[str, list[tuple[str, bytes]]] = {}
    try:
        with lake.storage.open_read(f"{dataset}/{path}") as stream:
            for name, data in iter_members(stream):
                members.setdefault(name.partition(".")[0], []).append((name, data))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        pass  # a truncated or garbled shard: what came before the damage may still be whole
    intact = {}
    for key, parts in members.items():
        by_suffix = {name.partition(".")[2]: data for name, data in parts}
        if set(by_suffix) == {LAB_MEMBER, META_MEMBER} and checksum_matches(
            by_suffix[LAB_MEMBER], by_suffix[META_MEMBER]
        ):
            try:
                if json.loads(by_suffix[META_MEMBER]).get("key") == key:
                    intact[key] = [(f"{key}.{LAB_MEMBER}", by_suffix[LAB_MEMBER]),
                                   (f"{key}.{META_MEMBER}", by_suffix[META_MEMBER])]  # fmt: skip
            except ValueError:
                pass
    return intact


def _remake(row: dict, record: dict, name: str) -> tuple[object, dict] | str:
    """The sample of a manifest row made again from its source: (lab8, metadata), or why it cannot be."""
    from ingest.chunk import sample_metadata
    from ingest.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
    from ingest.lab import rgb8_to_lab8
    from ingest.sources import SourceItem
    from ingest.storage import read_uri

    try:
        data = read_uri(row["source_uri"])
    except FileNotFoundError:
        return "source gone"
    except (OSError, RuntimeError) as e:
        return f"source unreadable ({type(e).__name__})"
    sha = hashlib.sha256(data).hexdigest()
    if sha != row["sha256"]:
        return "source changed since ingest"
    max_pixels = int(record.get("params", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
    try:
        decoded = decode_image(data, record["size"], record["resize"], max_pixels)
    except ImageRejected as e:
        return f"source no longer decodes ({e.reason})"
    item = SourceItem(uri=row["source_uri"], name=name, label=row["label"], label_name=row["label_name"],
                      coco_id=row["coco_id"], categories=tuple(row["categories"] or ()))  # fmt: skip
    meta = sample_metadata(item, row["key"], sha, row["split"], decoded.width, decoded.height, row["source_dataset"])
    return rgb8_to_lab8(decoded.rgb), meta


def _rebuild_shard(lake: Lake, dataset: str, path: str, new_path: str, rows: list[dict], record: dict, roots,
                   local: Path, summary: RepairSummary, new_rows: list[dict]) -> dict | None:  # fmt: skip
    """One damaged shard written again as `new_path`: its intact samples copied byte for byte, the others remade
    from their sources (or dropped, counted in `summary`); its manifest rows appended to `new_rows`. Returns its
    entry for the version record, or None when nothing of it is left."""
    from ingest.shards import ShardWriter

    intact = _salvage(lake, dataset, path)
    try:
        with ShardWriter(local) as writer:
            for row in rows:
                if row["key"] in intact:
                    writer.copy_sample(intact[row["key"]])
                    summary.salvaged += 1
                else:
                    made = _remake(row, record, _source_name(row, roots))
                    if isinstance(made, str):
                        summary.dropped.append({"key": row["key"], "source_uri": row["source_uri"], "reason": made})
                        continue
                    writer.write(row["key"], *made)
                    summary.remade += 1
                new_rows.append(dict(row, shard=new_path, index_in_shard=writer.count - 1))
        if not writer.count:
            return None
        lake.storage.upload_file(f"{dataset}/{new_path}", local)
        return {"path": new_path, "count": writer.count, "bytes": local.stat().st_size, "sha256": file_sha256(local)}
    finally:
        local.unlink(missing_ok=True)


def _repaired_record(record: dict, parent: int, repair_id: str, replaced: dict, manifest_path: str,
                     manifest_bytes: bytes, summary: RepairSummary) -> dict:  # fmt: skip
    """The repair's version record: the parent's, its damaged shards replaced (or gone), counted again."""
    shards = {
        split: [replaced.get(e["path"], e) for e in entries if replaced.get(e["path"], e) is not None]
        for split, entries in record["shards"].items()
    }
    return {
        **record,
        "version": parent + 1,
        "parent": parent,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ingest_id": repair_id,
        "shards": shards,
        "counts": {split: sum(e["count"] for e in entries) for split, entries in shards.items()},
        "bytes": {split: sum(e["bytes"] for e in entries) for split, entries in shards.items()},
        "manifest": manifest_path,
        "manifest_sha256": sha256_hex(manifest_bytes),
        "stats": {"listed": 0, "ingested": 0, "duplicates": 0, "unchanged": 0, "grayscale": 0, "rejected": {}},
        "repair": {
            "of": parent,
            "shards": summary.rebuilt,
            "salvaged": summary.salvaged,
            "remade": summary.remade,
            "dropped": summary.dropped,
            "reasons": dict(Counter(d["reason"] for d in summary.dropped)),
        },
        "host": os.uname().nodename,
    }


def _rejects_source(lake: Lake, dataset: str, record: dict) -> tuple[str, int]:
    """(the ingest whose chunks refused the files of `record`'s rejects table, how many it refused). A mended table
    says where it came from (`repair.rejects_source`); otherwise its path names the ingest, whose own version's
    stats count its refusals."""
    repaired = record.get("repair") or {}
    if repaired.get("rejects_source"):
        return str(repaired["rejects_source"]), int(repaired.get("rejects_count", 0))
    parts = str(record.get("rejects") or "").split("/")
    source = parts[1] if len(parts) == 3 and parts[0] == "ingests" else str(record["ingest_id"])
    for version in lake.versions(dataset):
        try:
            other = lake.resolve(f"{dataset}@{version}").record
        except LakeError:
            continue
        if other.get("ingest_id") == source and not other.get("repair"):
            return source, sum((other.get("stats") or {}).get("rejected", {}).values())
    return source, sum((record.get("stats") or {}).get("rejected", {}).values())


def _mended_rejects(lake: Lake, dataset: str, record: dict, summary: RepairSummary) -> bytes:
    """A rejects table in place of the version's damaged one: made again from its ingest's chunk records (each
    holds the refusals of its files) when they are all there and add up to the refusals the record counts; else
    empty, the lost refusals counted in `summary.rejects_lost` (their reasons stay in the record's stats)."""
    source, expected = _rejects_source(lake, dataset, record)
    summary.rejects_source, summary.rejects_count = source, expected
    rows: list[dict] = []
    prefix = f"{dataset}/ingests/{source}/chunks/"
    try:
        for info in sorted(lake.storage.list(prefix), key=lambda info: info.key):
            rows += json.loads(lake.storage.read_bytes(info.key)).get("rejects", [])
        table = pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
    except (StorageError, OSError, ValueError, TypeError, KeyError, pa.ArrowException):
        rows, table = [], None
    if table is not None and len(rows) == expected:
        summary.rejects = "rebuilt"
        return table_to_parquet(table)
    summary.rejects, summary.rejects_lost = "lost", expected
    return table_to_parquet(pa.Table.from_pylist([], schema=REJECTS_SCHEMA))


def repair(lake: Lake, dataset: str, report: CheckReport, progress: bool = True) -> RepairSummary:
    """Write a new version of `dataset` with the damaged shards `report` found (in its latest version) rebuilt.

    Raises:
        RepairError: the manifest cannot be read (nothing to rebuild from).
        LakeError: another version was committed meanwhile (rerun), or a rebuilt shard vanished.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    parent = lake.resolve(report.ref)
    record = parent.record
    if any(p.what == "manifest" for p in report.problems):
        detail = next(p.line() for p in report.problems if p.what == "manifest")
        raise RepairError(
            f"cannot repair {parent.ref}: its manifest, which says what each shard held, is damaged ({detail}). "
            f"Restore it from a backup, or train on an earlier version (`recolor lake show {dataset}` lists them)"
        )
    damaged = sorted(report.damaged_shards)
    rejects_damaged = any(p.what == "rejects" for p in report.problems)
    summary = RepairSummary(dataset, parent.version, None)
    if not damaged and not rejects_damaged:
        return summary
    repair_id = sha256_hex(json.dumps(["repair", dataset, parent.version, damaged, rejects_damaged]).encode())[:12]
    manifest = lake.manifest(parent)
    roots = _source_names(lake, record)
    damaged_rows = manifest.filter(pc.is_in(manifest["shard"], pa.array(damaged, type=pa.string())))
    kept = manifest.filter(pc.invert(pc.is_in(manifest["shard"], pa.array(damaged, type=pa.string()))))
    rows_by_shard: dict[str, list[dict]] = {}
    for row in sorted(damaged_rows.to_pylist(), key=lambda r: r["index_in_shard"]):
        rows_by_shard.setdefault(row["shard"], []).append(row)
    replaced: dict[str, dict | None] = {}
    new_rows: list[dict] = []
    temp_dir = Path(local_temp_dir())
    with Lease(lake.storage, ingest_lease_key(dataset, repair_id), f"repair {parent.ref}"):
        try:
            for number, path in enumerate(tqdm(damaged, unit="shard", desc=f"repair {dataset}", disable=not progress)):
                split = path.rsplit("/", 1)[-1].split("-", 1)[0]
                new_path = f"ingests/{repair_id}/shards/{split}-{repair_id}-{number:06d}.tar"
                replaced[path] = _rebuild_shard(lake, dataset, path, new_path, rows_by_shard.get(path, []), record,
                                                roots, temp_dir / "shard.tar", summary, new_rows)  # fmt: skip
                summary.rebuilt.append(path)
        finally:
            for leftover in temp_dir.iterdir():
                leftover.unlink()
            temp_dir.rmdir()
        table = pa.concat_tables([kept, pa.Table.from_pylist(new_rows, schema=MANIFEST_SCHEMA)])
        manifest_bytes = table_to_parquet(table)
        manifest_path = f"ingests/{repair_id}/manifest-p{parent.version}.parquet"
        lake.storage.write_bytes(f"{dataset}/{manifest_path}", manifest_bytes)
        new = _repaired_record(record, parent.version, repair_id, replaced, manifest_path, manifest_bytes, summary)
        if rejects_damaged:
            new["rejects"] = f"ingests/{repair_id}/rejects.parquet"
            lake.storage.write_bytes(f"{dataset}/{new['rejects']}", _mended_rejects(lake, dataset, record, summary))
            new["repair"].update(
                rejects=summary.rejects,
                rejects_lost=summary.rejects_lost,
                rejects_source=summary.rejects_source,
                rejects_count=summary.rejects_count,
            )
        if lake.shard_problems(dataset, new):
            raise LakeError(f"not committing the repair of {parent.ref}: a shard vanished meanwhile; rerun the repair")
        try:
            lake.commit_version(dataset, new["version"], new)
        except AlreadyExistsError:
            raise LakeError(
                f"{dataset}@{new['version']} was committed by another ingest while this repair ran: rerun "
                f"`recolor lake repair {dataset}` (it checks the new version)"
            ) from None
    summary.version = new["version"]
    summary.counts = new["counts"]
    summary.seconds = time.perf_counter() - started
    return summary
