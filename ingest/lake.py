"""The lake's catalog: datasets, immutable versions, manifests and rejects.

Layout below the lake root (a local folder or s3://bucket/prefix):

    <dataset>/versions/<NNNNNN>.json                  version record: the commit point
    <dataset>/ingests/<ingest_id>/shards/<split>-<ingest_id>-<NNNNNN>.tar
    <dataset>/ingests/<ingest_id>/chunks/<NNNNNN>.json   per-shard results, for resuming
    <dataset>/ingests/<ingest_id>/manifest-p<parent>.parquet
    <dataset>/ingests/<ingest_id>/rejects.parquet

A version exists once its record exists, and the record is written last, create-exclusive:
readers list `versions/` and never see a version whose shards or manifest are incomplete.
A version's manifest holds every sample of its parent plus the new ones, and its record lists
every shard it uses (shards are shared with earlier versions, never copied or rewritten).

About 520 lines on purpose: the layout, the record's and the manifest's one definitions (`RECORD_FIELDS`,
`ManifestRow`) and the `Lake` that reads them belong together; gc, check and repair are their own modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ingest.errors import RecolorError
from ingest.names import NAME_PATTERN
from ingest.storage import Storage, StorageError, is_s3, open_storage

LAKE_ENV = "RECOLOR_LAKE"
DEFAULT_LAKE = "lake"
SPLITS = ("train", "val")
# How `shard_urls` names shards: as stored (local paths, s3://); `pipe:` commands that stream them with this
# package's storage layer (AWS_* credentials from the environment); `pipe:aws s3 cp ...` for the AWS CLI;
# presigned https URLs (webdataset reads them with curl; no credentials needed until they expire).
URL_FORMS = ("plain", "pipe", "aws", "presigned")


def _column(arrow_type: pa.DataType):
    return field(metadata={"arrow": arrow_type})


@dataclass(frozen=True)
class ManifestRow:
    """One sample of a version's Parquet manifest: the one definition of its columns (`MANIFEST_SCHEMA` is made
    from it), built by the chunk that wrote the sample (`ingest.chunk`) and read as that schema."""

    key: str = _column(pa.string())  # the sample's name in its shard: the first bytes of its content hash
    split: str = _column(pa.string())  # `SPLITS`
    shard: str = _column(pa.string())  # the shard's path below the dataset's folder
    index_in_shard: int = _column(pa.int32())
    source_dataset: str = _column(pa.string())  # the source's kind: imagenet, coco, folder, urls
    source_uri: str = _column(pa.string())
    sha256: str = _column(pa.string())  # of the source file's bytes
    width: int = _column(pa.int32())  # of the source photo
    height: int = _column(pa.int32())
    label: str | None = _column(pa.string())  # ImageNet's wnid
    label_name: str | None = _column(pa.string())
    coco_id: int | None = _column(pa.int64())
    categories: list[str] = _column(pa.list_(pa.string()))  # COCO's
    ingest_id: str = _column(pa.string())
    source_size: int | None = _column(pa.int64())  # the source file as listed: a re-ingest skips it while these match
    source_stamp: str | None = _column(pa.string())

    def to_dict(self) -> dict:
        return asdict(self)


MANIFEST_SCHEMA = pa.schema([(column.name, column.metadata["arrow"]) for column in fields(ManifestRow)])


@dataclass(frozen=True)
class RejectRow:
    """One refused source file of an ingest's rejects table: the one definition of its columns (`REJECTS_SCHEMA` is
    made from it), built by the chunk that refused the file (`ingest.chunk`)."""

    source_uri: str = _column(pa.string())
    reason: str = _column(pa.string())  # a short word: missing, unreadable, grayscale, too_small, ...
    detail: str = _column(pa.string())  # what was wrong, in the reader's words
    ingest_id: str | None = _column(pa.string())
    source_size: int | None = _column(pa.int64())  # the file as listed: a re-ingest skips it while these match
    source_stamp: str | None = _column(pa.string())

    def to_dict(self) -> dict:
        return asdict(self)


REJECTS_SCHEMA = pa.schema([(column.name, column.metadata["arrow"]) for column in fields(RejectRow)])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s columns and order; columns added since it was written are nulls (older lakes)."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema
    ]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


class LakeError(RecolorError):
    """A lake, dataset or version is missing or malformed; the message says what to do."""


def resolve_lake_uri(uri: str | None) -> str:
    """The lake to use: the argument, else $RECOLOR_LAKE, else ./lake (the embedded default).

    Raises:
        LakeError: the argument or the variable is set but empty or blank (`--lake ""`): a slip, not ./lake.
    """
    if uri is not None and not uri.strip():
        raise LakeError("--lake is empty: give a folder or s3://BUCKET/PREFIX (leave it out for ./lake)")
    if uri is None and LAKE_ENV in os.environ and not os.environ[LAKE_ENV].strip():
        raise LakeError(f"${LAKE_ENV} is set but empty: set it to a folder or s3://BUCKET/PREFIX, or unset it")
    return uri or os.environ.get(LAKE_ENV) or DEFAULT_LAKE


def validate_name(name: str, what: str = "dataset name") -> str:
    """Refuse names that could escape the lake as paths or object keys."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise LakeError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, "
            "no '..', at most 128 characters)"
        )
    return name


def parse_dataset_ref(ref: str) -> tuple[str, int | None]:
    """`NAME` or `NAME@VERSION` (VERSION a number or `latest`) to (name, version or None)."""
    name, at, version = ref.partition("@")
    validate_name(name)
    if not at or version == "latest":
        return name, None
    if not re.fullmatch(r"v?[0-9]+", version):  # `good@`, `good@ 1`, `good@+1`: slips, not the latest version
        raise LakeError(f"invalid version {version!r} in {ref!r}: use NAME@N (a number) or NAME@latest")
    try:
        number = int(version.lstrip("v"))
    except ValueError:
        raise LakeError(f"invalid version {version!r} in {ref!r}: use NAME@N (a number) or NAME@latest") from None
    if number < 1:
        raise LakeError(f"invalid version {version!r} in {ref!r}: versions start at 1")
    return name, number


def version_key(dataset: str, version: int) -> str:
    return f"{dataset}/versions/{version:06d}.json"


RECORD_FORMAT = "recolor-lake-v1"
# The version record's required fields and their JSON types: what `check_record` holds every record to, on read
# and before a commit writes one (`Lake.commit_version`). Also written, not required: dataset, parent, rejects,
# params, order, sources, host, repair.
RECORD_FIELDS = {
    "version": int,
    "size": int,
    "resize": str,
    "counts": dict,
    "bytes": dict,
    "shards": dict,
    "manifest": str,
    "manifest_sha256": str,
    "created": str,
    "encoding": dict,
    "stats": dict,
}


def check_record(record, where: str) -> None:
    """Refuse a version record that is not one: a missing or mistyped field, or a path that leaves the dataset.

    Every path in a record (the manifest, the rejects table, each shard) names an object below its dataset's
    folder: a relative POSIX key without `..`, absolute parts or a scheme. Anything else would make `lake show`,
    training and evaluation read files outside the lake.

    Raises:
        LakeError: names the record and the field.
    """

    def corrupt(field: str, why: str) -> LakeError:
        return LakeError(
            f"{where}: field {field!r} {why}: the version record is corrupt; restore it, or use an earlier version "
            "(`recolor lake check NAME@N` says whether one is whole)"
        )

    if not isinstance(record, dict):
        raise corrupt("(the record)", "is not a JSON object")
    if record.get("format") != RECORD_FORMAT:
        raise corrupt("format", f"is {record.get('format')!r}, not {RECORD_FORMAT!r}")
    for name, kind in RECORD_FIELDS.items():
        if name not in record:
            raise corrupt(name, "is missing")
        if not isinstance(record[name], kind) or (kind is int and isinstance(record[name], bool)):
            raise corrupt(name, f"is a {type(record[name]).__name__}, not a {kind.__name__}")
    check_key(record["manifest"], lambda why: corrupt("manifest", why))
    if record.get("rejects") is not None and not isinstance(record["rejects"], str):
        raise corrupt("rejects", f"is a {type(record['rejects']).__name__}, not a str")
    if record.get("rejects"):
        check_key(record["rejects"], lambda why: corrupt("rejects", why))
    if not isinstance(record["encoding"].get("name"), str):
        raise corrupt("encoding.name", "is missing")
    for split, entries in record["shards"].items():
        if not isinstance(entries, list):
            raise corrupt(f"shards.{split}", "is not a list")
        for index, entry in enumerate(entries):
            name = f"shards.{split}[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise corrupt(f"{name}.path", "is missing")
            for number in ("count", "bytes"):
                if not isinstance(entry.get(number), int) or entry[number] < 0:
                    raise corrupt(f"{name}.{number}", "is not a count")
            check_key(entry["path"], lambda why, name=name: corrupt(f"{name}.path", why))
            digest = entry.get("sha256")
            if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise corrupt(f"{name}.sha256", "is not a SHA-256 in hex")


def check_key(key: str, error) -> None:
    """Raise `error(why)` unless `key` is a relative POSIX key that stays below the folder it is read from."""
    if not key or key.startswith("/") or "\\" in key or "://" in key or (len(key) > 1 and key[1] == ":"):
        raise error(f"is {key!r}: not a relative path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise error(f"is {key!r}: it leaves the dataset's folder")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes: a shard's digest, recorded beside its size."""
    with open(path, "rb") as file:
        return stream_sha256(file)


def stream_sha256(handle) -> str:
    """The SHA-256 (hex) of what an open binary file holds from where it stands, read in 4 MB pieces."""
    digest = hashlib.sha256()
    while piece := handle.read(4 * 2**20):
        digest.update(piece)
    return digest.hexdigest()


def table_to_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass(frozen=True)
class VersionRef:
    dataset: str
    version: int
    record: dict

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version}"


class Lake:
    """Read access to a lake, plus the commit of new versions (used by ingest)."""

    def __init__(self, uri: str | None = None, storage: Storage | None = None):
        self.uri = resolve_lake_uri(uri)
        try:
            self.storage = storage or open_storage(self.uri)
        except StorageError as e:
            raise LakeError(f"bad lake URI {self.uri!r}: {e}") from None

    def check(self, write: bool = False) -> None:
        """Fail early on an unreachable lake or bad credentials (and, with `write`, a lake that cannot be written)."""
        if write:
            self.storage.check_writable()
        else:
            self.storage.check_access()

    def datasets(self) -> list[str]:
        # Other folders may share the lake's root ("lost+found", "my notes"): they are not datasets, not errors.
        names = self.storage.list_children("")
        return [name for name in names if NAME_PATTERN.match(name) and ".." not in name and self.versions(name)]

    def dataset_folders(self) -> list[str]:
        """Datasets with versions, and those whose first ingest never committed (what `lake gc` looks at)."""
        names = [name for name in self.storage.list_children("", follow_links=False) if NAME_PATTERN.match(name)]
        return [
            name
            for name in names
            if ".." not in name and {"ingests", "versions"} & set(self.storage.list_children(name, follow_links=False))
        ]

    def versions(self, dataset: str) -> list[int]:
        validate_name(dataset)
        numbers = []
        for obj in self.storage.list(f"{dataset}/versions"):
            name = obj.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                numbers.append(int(name[:-5]))
        return sorted(numbers)

    def latest_version(self, dataset: str) -> int | None:
        versions = self.versions(dataset)
        return versions[-1] if versions else None

    def resolve(self, ref: str) -> VersionRef:
        """Find `NAME[@VERSION]` (latest when no version is given) and load its record."""
        dataset, version = parse_dataset_ref(ref)
        if version is None:
            version = self.latest_version(dataset)
            if version is None:
                known = ", ".join(self.datasets()) or "none"
                raise LakeError(
                    f"dataset {dataset!r} has no versions in lake {self.uri} (datasets there: {known}); "
                    "run `recolor ingest` first"
                )
        key = version_key(dataset, version)
        try:
            data = self.storage.read_bytes(key)
        except FileNotFoundError:
            have = ", ".join(map(str, self.versions(dataset))) or "none"
            raise LakeError(f"{dataset}@{version} does not exist in lake {self.uri} (versions: {have})") from None
        where = self.storage.uri(key)
        try:
            record = json.loads(data)
        except ValueError as e:
            raise LakeError(f"{where} is not valid JSON ({e}): the version record is corrupt") from None
        check_record(record, where)
        manifest = f"{dataset}/{record['manifest']}"
        if not self.storage.exists(manifest):
            raise LakeError(
                f"{where}: its manifest {self.storage.uri(manifest)} is missing, so the version cannot be read: "
                f"run `recolor lake check {dataset}` and restore the file, or use an earlier version"
            )
        return VersionRef(dataset, version, record)

    def manifest(self, ref: VersionRef) -> pa.Table:
        return self._read_table(ref, ref.record["manifest"], MANIFEST_SCHEMA)

    def manifest_batches(self, ref: VersionRef, columns: list[str], rows: int = 131_072) -> Iterator[pa.Table]:
        """The manifest's `columns`, `rows` rows at a time (conformed like `manifest`): bounded memory at any size."""
        if not ref.record["manifest"]:
            return
        schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        key = f"{ref.dataset}/{ref.record['manifest']}"
        with self._parquet_errors(ref, key):
            file = pq.ParquetFile(io.BytesIO(self.storage.read_bytes(key)), pre_buffer=False)
            present = [name for name in columns if name in file.schema_arrow.names]  # older manifests lack some
            batches = list(file.iter_batches(batch_size=rows, columns=present, use_threads=False))
        for batch in batches:
            yield conform(pa.Table.from_batches([batch]), schema)

    def rejects(self, ref: VersionRef) -> pa.Table:
        return self._read_table(ref, ref.record["rejects"], REJECTS_SCHEMA)

    def _read_table(self, ref: VersionRef, key: str, schema: pa.Schema) -> pa.Table:
        if not key:
            return schema.empty_table()
        with self._parquet_errors(ref, f"{ref.dataset}/{key}"):
            data = self.storage.read_bytes(f"{ref.dataset}/{key}")
            # Synchronous, on this thread: with pre-buffering Arrow's IO threads can drop the last reference to
            # the Python bytes while the interpreter exits, which aborts the process after the work is done
            # ("terminate called without an active exception", exit code -6).
            return conform(pq.ParquetFile(io.BytesIO(data), pre_buffer=False).read(use_threads=False), schema)

    @contextlib.contextmanager
    def _parquet_errors(self, ref: VersionRef, key: str):
        """A table of a version that is missing or does not parse: one line naming it and `lake check`."""
        try:
            yield
        except FileNotFoundError:
            raise LakeError(
                f"{self.storage.uri(key)}, a table of {ref.ref}, is missing: `recolor lake check {ref.dataset}` "
                f"lists what else is damaged; `recolor lake show {ref.dataset}` lists earlier versions"
            ) from None
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, StorageError) or type(e).__module__.startswith(("botocore", "urllib3")):
                raise
            raise LakeError(
                f"{self.storage.uri(key)}, a table of {ref.ref}, does not parse ({str(e).splitlines()[0]}): "
                f"run `recolor lake check {ref.dataset}` to see what else is damaged, and restore the file or use "
                f"an earlier version (`recolor lake show {ref.dataset}@N`)"
            ) from None

    def shard_uri(self, dataset: str, shard: str) -> str:
        return self.storage.uri(f"{dataset}/{shard}")

    def shards(self, ref: VersionRef, split: str) -> list[dict]:
        """The version's shards of one split: [{"path", "uri", "count", "bytes"}], in order."""
        return [
            dict(entry, uri=self.shard_uri(ref.dataset, entry["path"])) for entry in ref.record["shards"].get(split, [])
        ]

    def shard_urls(self, ref: VersionRef, split: str, form: str = "plain", expires: int = 3600) -> list[str]:
        """The version's shard URLs of one split, for webdataset or any tar reader (see `URL_FORMS`).

        Raises:
            LakeError: an unknown split or form.
        """
        if split not in SPLITS:
            raise LakeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if form not in URL_FORMS:
            raise LakeError(f"unknown URL form {form!r}: use one of {', '.join(URL_FORMS)}")
        entries = self.shards(ref, split)
        uris = [entry["uri"] for entry in entries]
        if form == "pipe":
            return [f"pipe:{shlex.join([sys.executable, '-m', 'ingest.storage.cat', uri])}" for uri in uris]
        if form == "aws":
            from ingest.storage.s3 import s3_endpoint

            endpoint = s3_endpoint()
            options = ["--endpoint-url", endpoint] if endpoint else []
            return [
                f"pipe:{shlex.join(['aws', 's3', 'cp', *options, uri, '-'])}" if is_s3(uri) else uri for uri in uris
            ]
        if form == "presigned" and hasattr(self.storage, "presigned_url"):
            return [self.storage.presigned_url(f"{ref.dataset}/{entry['path']}", expires) for entry in entries]
        return uris

    def shard_problems(self, dataset: str, record: dict) -> list[tuple[str, dict, str]]:
        """The shards a version record lists that are not in the store as recorded: [(split, entry, problem)],
        problem "missing" or "size N, recorded M". One listing of the dataset's `ingests/`, not a request a shard."""
        sizes = {obj.key: obj.size for obj in self.storage.list(f"{dataset}/ingests")}  # links followed: reads do
        problems = []
        for split, entries in record["shards"].items():
            for entry in entries:
                size = sizes.get(f"{dataset}/{entry['path']}")
                if size is None:
                    problems.append((split, entry, "missing"))
                elif size != entry["bytes"]:
                    problems.append((split, entry, f"size {size}, recorded {entry['bytes']}"))
        return problems

    def commit_version(self, dataset: str, version: int, record: dict) -> None:
        """Publish a version: create-exclusive write of its record (raises AlreadyExistsError on a race), checked
        first as every reader checks it (`check_record`: a writer's bug cannot publish a record readers refuse)."""
        check_record(record, f"the new record of {dataset}@{version}")
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        self.storage.put_if_absent(version_key(dataset, version), data)

    def summary(self, ref: VersionRef) -> dict:
        """What `lake show` prints: counts and bytes per split, stats, reject reasons, versions."""
        record = ref.record
        return {
            "dataset": ref.dataset,
            "version": ref.version,
            "uri": self.storage.uri(version_key(ref.dataset, ref.version)),
            "created": record["created"],
            "parent": record.get("parent"),
            "counts": record["counts"],
            "bytes": record["bytes"],
            "shards": {split: len(entries) for split, entries in record["shards"].items()},
            "size": record["size"],
            "resize": record["resize"],
            "encoding": record["encoding"]["name"],
            "stats": record["stats"],
            "manifest_sha256": record["manifest_sha256"],
            "sources": record.get("sources", []),
            "versions": self.versions(ref.dataset),
        }


def open_webdataset(ref: str, split: str = "train", lake: str | None = None, handler=None, nodesplitter=None,
                    shardshuffle: int | bool = False):  # fmt: skip
    """A `webdataset.WebDataset` over one split of a lake version, yielding `(key, L, ab)`.

    L is float32 (1, H, W) in [-1, 1] and ab float32 (2, H, W) in [-1, 1], the recipe's normalization
    (`ingest.lab.lab8_to_network`): the arrays this project's loader trains on. A sample whose bytes fail
    its recorded CRC-32 raises `ValueError` naming its key (pass `handler=webdataset.warn_and_continue` to
    skip such samples instead). s3:// shards stream through this package's storage layer.

    Args:
        ref: NAME or NAME@VERSION (the latest version when none is given).
        lake: the lake URI (default: $RECOLOR_LAKE, else ./lake).
        nodesplitter: webdataset's node splitter; under DDP pass one (e.g. `webdataset.split_by_node`)
            and shards whose count the world size divides, or ranks see unequal sample counts.

    Raises:
        LakeError: an unknown dataset, version or split, or a split without shards.
    """
    import webdataset as wds

    from ingest.lab import lab8_to_network
    from ingest.shards import checksum_matches, decode_lab_npy

    catalog = Lake(lake)
    version = catalog.resolve(ref)
    urls = catalog.shard_urls(version, split, form="pipe" if is_s3(catalog.storage.root_uri) else "plain")
    if not urls:
        raise LakeError(f"{version.ref} has no {split} samples")
    size = version.record["size"]

    def to_sample(sample: dict):
        key, data = sample["__key__"], sample.get("lab.npy")
        if data is None or not checksum_matches(data, sample.get("json")):
            raise ValueError(f"sample {key} of {version.ref}: missing or changed since ingest (checksum)")
        light, ab = lab8_to_network(decode_lab_npy(data, size))
        return key, light, ab

    handler = handler or wds.reraise_exception
    dataset = wds.WebDataset(
        urls,
        handler=handler,
        shardshuffle=shardshuffle,
        nodesplitter=nodesplitter or wds.single_node_only,
        empty_check=False,
    )
    return dataset.map(to_sample, handler=handler)
