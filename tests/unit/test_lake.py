"""The lake on a local folder, ingesting in this process (no Ray): manifest, rejects, versions, shards, dedup.

Long on purpose: one lake's behaviours (records, manifests, dedup, re-ingest, names) share fixtures.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ingest.chunk import KEY_LENGTH, split_for
from ingest.driver import IngestConfig, run_ingest
from ingest.images import decode_image
from ingest.lab import ENCODING, rgb8_to_lab8
from ingest.lake import MANIFEST_SCHEMA, REJECTS_SCHEMA, Lake, LakeError, parse_dataset_ref, resolve_lake_uri

SIZE = 32


def ingest(source: Path, lake: Path, dataset: str = "photos", **options):
    options = {"size": SIZE, "use_ray": False, "progress": False} | options
    return run_ingest(IngestConfig(kind="folder", source=str(source), dataset=dataset, lake=str(lake), **options))


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def mixed_folder(photo_folder, make_photo) -> Path:
    """Eight colour photos, one gray, one duplicate under another name, and four broken files."""
    folder = photo_folder(range(8), name="mixed", width=90, height=60)
    (folder / "gray.jpg").write_bytes(make_photo(100, 90, 60, gray=True))
    (folder / "copy-of-img0003.jpg").write_bytes((folder / "img0003.jpg").read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<html><body>Not Found</body></html>")
    (folder / "half.jpg").write_bytes(make_photo(101, 90, 60)[:1500])
    (folder / "bomb.png").write_bytes(make_photo(102, 100, 100, fmt="PNG"))
    return folder


@pytest.fixture
def mixed_lake(mixed_folder, tmp_path):
    """The mixed folder ingested once; `max_pixels` makes the 100x100 PNG a decompression bomb."""
    summary = ingest(mixed_folder, tmp_path / "lake", max_pixels=90 * 60)
    lake = Lake(str(tmp_path / "lake"))
    return summary, lake, lake.resolve("photos")


def test_summary_counts_every_outcome(mixed_lake) -> None:
    summary, _, _ = mixed_lake
    assert summary.version == 1 and summary.parent is None
    assert summary.listed == 14 and summary.ingested == 8 and summary.duplicates == 1
    assert summary.rejected == {"corrupt": 1, "empty": 1, "grayscale": 1, "not_an_image": 1, "too_large": 1}
    assert sum(summary.counts.values()) == 8


def test_manifest_has_one_row_per_sample_with_every_column(mixed_lake, mixed_folder, lake_check) -> None:
    _, lake, ref = mixed_lake
    table = lake.manifest(ref)
    assert table.schema.names == MANIFEST_SCHEMA.names
    rows = lake_check(lake, ref)
    assert len(rows) == 8
    colour_photos = {hashlib.sha256((mixed_folder / f"img{n:04d}.jpg").read_bytes()).hexdigest() for n in range(8)}
    assert {row["sha256"] for row in rows} == colour_photos
    for row in rows:
        source = Path(row["source_uri"])
        data = source.read_bytes()
        assert source.parent == mixed_folder
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["key"] == row["sha256"][:KEY_LENGTH] and re.fullmatch(r"[0-9a-f]{20}", row["key"])
        assert row["split"] == split_for(row["sha256"], 0.2)
        assert (row["width"], row["height"]) == (90, 60)
        assert row["source_dataset"] == "folder" and row["ingest_id"] == ref.record["ingest_id"]
        assert row["label"] is None and row["coco_id"] is None and row["categories"] == []
        assert re.fullmatch(
            rf"ingests/{row['ingest_id']}/shards/{row['split']}-{row['ingest_id']}-\d{{6}}\.tar", row["shard"]
        )


def test_rejects_table_lists_each_file_with_its_reason(mixed_lake, mixed_folder) -> None:
    _, lake, ref = mixed_lake
    table = lake.rejects(ref)
    assert table.schema.names == REJECTS_SCHEMA.names
    reasons = {Path(row["source_uri"]).name: row["reason"] for row in table.to_pylist()}
    assert reasons == {
        "bomb.png": "too_large",
        "empty.jpg": "empty",
        "gray.jpg": "grayscale",
        "half.jpg": "corrupt",
        "page.jpg": "not_an_image",
    }
    assert all(row["detail"] and row["ingest_id"] == ref.record["ingest_id"] for row in table.to_pylist())


def test_version_record_fields(mixed_lake, tmp_path, mixed_folder) -> None:
    _, lake, ref = mixed_lake
    path = tmp_path / "lake" / "photos" / "versions" / "000001.json"
    record = json.loads(path.read_text())
    assert record == ref.record
    assert record["format"] == "recolor-lake-v1" and record["dataset"] == "photos"
    assert record["version"] == 1 and record["parent"] is None
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    assert record["encoding"] == ENCODING and record["size"] == SIZE and record["resize"] == "cover"
    manifest_split = Counter(row["split"] for row in lake.manifest(ref).to_pylist())
    assert record["counts"] == {"train": manifest_split["train"], "val": manifest_split["val"]}
    for split, entries in record["shards"].items():
        on_disk = sum((tmp_path / "lake" / "photos" / entry["path"]).stat().st_size for entry in entries)
        assert record["bytes"][split] == on_disk
    assert record["stats"] == {
        "listed": 14,
        "ingested": 8,
        "duplicates": 1,
        "unchanged": 0,
        "grayscale": 1,
        "rejected": {"corrupt": 1, "empty": 1, "grayscale": 1, "not_an_image": 1, "too_large": 1},
    }
    assert record["params"]["val_fraction"] == 0.2 and record["params"]["max_pixels"] == 90 * 60
    assert record["sources"] == [
        {
            "kind": "folder",
            "root": str(mixed_folder),
            "annotations": None,
            "listed": 14,
            "ingested": 8,
            "ingest_id": record["ingest_id"],
        }
    ]
    summary = lake.summary(ref)
    assert summary["counts"] == record["counts"] and summary["versions"] == [1]
    assert lake.datasets() == ["photos"]


def test_shards_are_plain_tar_with_npy_and_json_members(mixed_lake, tmp_path) -> None:
    _, lake, ref = mixed_lake
    rows = {row["key"]: row for row in lake.manifest(ref).to_pylist()}
    for entry in lake.shards(ref, "train") + lake.shards(ref, "val"):
        with tarfile.open(entry["uri"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * entry["count"]
            for name in names:
                key, _, suffix = name.partition(".")
                assert suffix in ("lab.npy", "json") and key in rows
                data = tar.extractfile(name).read()
                if suffix == "json":
                    meta = json.loads(data)
                    assert meta["key"] == key and meta["sha256"] == rows[key]["sha256"]
                    assert meta["split"] == rows[key]["split"] and meta["source_name"].endswith(".jpg")
                    continue
                lab8 = np.load(io.BytesIO(data), allow_pickle=False)
                assert lab8.dtype == np.uint8 and lab8.shape == (3, SIZE, SIZE)
                source = Path(rows[key]["source_uri"]).read_bytes()
                expected = rgb8_to_lab8(decode_image(source, SIZE).rgb)
                np.testing.assert_array_equal(lab8, expected)


def test_shards_are_readable_by_webdataset(mixed_lake) -> None:
    _, lake, ref = mixed_lake
    manifest = lake.manifest(ref).to_pylist()
    for split in ("train", "val"):
        urls = [entry["uri"] for entry in lake.shards(ref, split)]
        if not urls:
            continue
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert sorted(sample["__key__"] for sample in samples) == sorted(
            row["key"] for row in manifest if row["split"] == split
        )
        for sample in samples:
            assert np.load(io.BytesIO(sample["lab.npy"]), allow_pickle=False).shape == (3, SIZE, SIZE)
            assert json.loads(sample["json"])["key"] == sample["__key__"]


def test_val_fraction_decides_splits_by_content(photo_folder, tmp_path) -> None:
    source = photo_folder(range(40), width=40, height=40)
    ingest(source, tmp_path / "lake", val_fraction=0.5)
    lake = Lake(str(tmp_path / "lake"))
    rows = lake.manifest(lake.resolve("photos")).to_pylist()
    assert all(row["split"] == split_for(row["sha256"], 0.5) for row in rows)
    assert 8 <= sum(row["split"] == "val" for row in rows) <= 32
    ingest(source, tmp_path / "lake0", val_fraction=0.0)
    lake0 = Lake(str(tmp_path / "lake0"))
    assert lake0.resolve("photos").record["counts"] == {"train": 40, "val": 0}


def test_keys_splits_and_shards_are_stable_across_runs(mixed_folder, tmp_path) -> None:
    for name in ("lake-a", "lake-b"):
        ingest(mixed_folder, tmp_path / name, shard_size=2 * 3 * SIZE * SIZE, max_pixels=90 * 60)
    a, b = Lake(str(tmp_path / "lake-a")), Lake(str(tmp_path / "lake-b"))
    ref_a, ref_b = a.resolve("photos"), b.resolve("photos")
    rows_a = {row["key"]: row["split"] for row in a.manifest(ref_a).to_pylist()}
    rows_b = {row["key"]: row["split"] for row in b.manifest(ref_b).to_pylist()}
    assert rows_a == rows_b and len(rows_a) == 8
    assert ref_a.record["shards"] == ref_b.record["shards"]
    assert len(ref_a.record["shards"]["train"]) > 1  # several chunks
    # Deterministic tar headers: the same images give byte-identical shards.
    shards_a = {k: v for k, v in file_hashes(tmp_path / "lake-a").items() if "/shards/" in k}
    shards_b = {k: v for k, v in file_hashes(tmp_path / "lake-b").items() if "/shards/" in k}
    assert shards_a == shards_b and shards_a


def test_same_image_twice_in_a_run_is_stored_once(photo_folder, tmp_path, lake_check) -> None:
    source = photo_folder(range(3))
    shutil.copy(source / "img0001.jpg", source / "renamed.jpg")
    summary = ingest(source, tmp_path / "lake")
    assert summary.ingested == 3 and summary.duplicates == 1
    lake = Lake(str(tmp_path / "lake"))
    rows = lake_check(lake, lake.resolve("photos"))
    assert len(rows) == 3


def test_duplicate_in_another_chunk_is_dropped_and_its_shard_rewritten(photo_folder, tmp_path, lake_check) -> None:
    source = photo_folder(range(7))
    # Sorted names put the copy last, in another chunk than its original (chunks hold two images).
    shutil.copy(source / "img0000.jpg", source / "zz-copy.jpg")
    sample_bytes = 3 * SIZE * SIZE + 1536  # what IngestConfig.images_per_chunk assumes
    summary = ingest(source, tmp_path / "lake", shard_size=2 * sample_bytes, val_fraction=0.0, order="sorted")
    assert summary.ingested == 7 and summary.duplicates == 1
    lake = Lake(str(tmp_path / "lake"))
    ref = lake.resolve("photos")
    assert len(ref.record["shards"]["train"]) == 4
    rows = lake_check(lake, ref)  # shard members, positions, counts and bytes agree with the manifest
    assert sorted(Path(row["source_uri"]).name for row in rows) == [f"img{n:04d}.jpg" for n in range(7)]


def test_reingest_of_a_grown_folder_keeps_v1_and_adds_only_new_images(photo_folder, tmp_path, lake_check) -> None:
    lake_dir = tmp_path / "lake"
    source = photo_folder(range(6))
    first = ingest(source, lake_dir)
    assert first.version == 1 and first.ingested == 6
    lake = Lake(str(lake_dir))
    v1 = lake.resolve("photos@1")
    v1_rows = lake.manifest(v1).to_pylist()
    v1_files = file_hashes(lake_dir)

    photo_folder(range(6, 10))  # four new photos in the same folder
    second = ingest(source, lake_dir)
    assert (second.version, second.parent) == (2, 1)
    # The six known files are not read again (same size and mtime): only the four new ones are.
    assert second.listed == 10 and second.unchanged == 6 and second.ingested == 4 and second.duplicates == 0
    v2 = lake.resolve("photos")
    assert v2.version == 2 and v2.record["parent"] == 1
    v2_rows = lake_check(lake, v2)
    assert v2_rows[:6] == v1_rows  # every v1 sample, unchanged, still pointing at v1's shards
    new = v2_rows[6:]
    assert len(new) == 4 and {Path(row["source_uri"]).name for row in new} == {f"img{n:04d}.jpg" for n in range(6, 10)}
    assert all(row["ingest_id"] == v2.record["ingest_id"] != v1.record["ingest_id"] for row in new)
    for split in ("train", "val"):
        assert v2.record["shards"][split][: len(v1.record["shards"][split])] == v1.record["shards"][split]
    assert [s["ingest_id"] for s in v2.record["sources"]] == [v1.record["ingest_id"], v2.record["ingest_id"]]
    # v1 is immutable: nothing it holds was touched.
    after = file_hashes(lake_dir)
    assert all(after[path] == digest for path, digest in v1_files.items())
    assert lake.resolve("photos@1").record == v1.record


@pytest.mark.parametrize("grown", [False, True])
@pytest.mark.parametrize("rehash", [False, True])
def test_reingest_with_nothing_new_writes_no_version(photo_folder, tmp_path, grown: bool, rehash: bool) -> None:
    lake_dir = tmp_path / "lake"
    source = photo_folder(range(5))
    ingest(source, lake_dir)
    if grown:
        ingest(photo_folder(range(5, 7), name="more"), lake_dir)  # v2: the rerun below has another parent
    versions = Lake(str(lake_dir)).versions("photos")
    shards_before = {k: v for k, v in file_hashes(lake_dir).items() if "/shards/" in k}
    # The same command again: every file is known unchanged and read no more; with --rehash each is read, hashed
    # and found known by content.
    again = ingest(source, lake_dir, rehash=rehash)
    assert again.version is None and again.ingested == 0
    assert (again.unchanged, again.duplicates) == ((0, 5) if rehash else (5, 0))
    assert again.parent == versions[-1]
    assert Lake(str(lake_dir)).versions("photos") == versions
    assert {k: v for k, v in file_hashes(lake_dir).items() if "/shards/" in k} == shards_before


def test_size_or_resize_mismatch_with_the_parent_is_refused(photo_folder, tmp_path) -> None:
    lake_dir = tmp_path / "lake"
    ingest(photo_folder(range(3)), lake_dir)
    more = photo_folder(range(3, 5), name="more")
    before = file_hashes(lake_dir)
    with pytest.raises(LakeError, match=r"photos@1 holds 32px 'cover' samples; this ingest asks for 48px 'cover'"):
        ingest(more, lake_dir, size=48)
    with pytest.raises(LakeError, match="use the same --size/--resize or a new --dataset"):
        ingest(more, lake_dir, resize="squash")
    assert file_hashes(lake_dir) == before
    assert ingest(more, lake_dir, dataset="photos-48", size=48).version == 1


@pytest.mark.parametrize("name", ["../x", "/abs", "a b", "", "a..b", ".hidden", "x/y", "-dash", "n" * 129])
def test_unsafe_dataset_names_are_refused(tmp_path, name: str) -> None:
    with pytest.raises(LakeError, match="invalid dataset name"):
        IngestConfig(kind="folder", source=str(tmp_path), dataset=name, lake=str(tmp_path / "lake"))
    with pytest.raises(LakeError, match="invalid dataset name"):
        Lake(str(tmp_path / "lake")).versions(name)


@pytest.mark.parametrize("name", ["imagenet-5k", "coco.val2017", "A_1", "n" * 128])
def test_ordinary_dataset_names_are_accepted(tmp_path, name: str) -> None:
    assert IngestConfig(kind="folder", source=str(tmp_path), dataset=name).dataset == name


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("photos", ("photos", None)),
        ("photos@3", ("photos", 3)),
        ("photos@v12", ("photos", 12)),
        ("a.b@latest", ("a.b", None)),
    ],
)
def test_parse_dataset_ref(ref: str, expected) -> None:
    assert parse_dataset_ref(ref) == expected


@pytest.mark.parametrize(
    "ref, message",
    [
        ("photos@0", "versions start at 1"),
        ("photos@two", "use NAME@N"),
        ("../photos@1", "invalid dataset name"),
        ("photos@", "invalid version '' in 'photos@'"),  # a slip, not the latest version
        ("photos@ 1", "invalid version ' 1'"),
        ("photos@+1", "invalid version '\\+1'"),
    ],
)
def test_parse_dataset_ref_errors(ref: str, message: str) -> None:
    with pytest.raises(LakeError, match=message):
        parse_dataset_ref(ref)


def test_resolve_errors_say_what_exists(photo_folder, tmp_path) -> None:
    ingest(photo_folder(range(2)), tmp_path / "lake")
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(LakeError, match=r"photos@7 does not exist in lake .* \(versions: 1\)"):
        lake.resolve("photos@7")
    with pytest.raises(LakeError, match=r"dataset 'other' has no versions .*datasets there: photos.*recolor ingest"):
        lake.resolve("other")


def test_lake_uri_from_argument_environment_or_default(monkeypatch) -> None:
    monkeypatch.delenv("RECOLOR_LAKE", raising=False)
    assert resolve_lake_uri(None) == "lake"
    monkeypatch.setenv("RECOLOR_LAKE", "s3://bucket/lake")
    assert resolve_lake_uri(None) == "s3://bucket/lake"
    assert resolve_lake_uri("/data/lake") == "/data/lake"


@pytest.mark.parametrize("uri", ["ftp://host/lake", "http://host/lake", "s3://"])
def test_bad_lake_uri_is_a_lake_error(uri: str) -> None:
    with pytest.raises(LakeError, match="bad lake URI"):
        Lake(uri)


def test_foreign_folders_in_the_lake_root_are_not_datasets(photo_folder, tmp_path) -> None:
    lake_dir = tmp_path / "lake"
    ingest(photo_folder(range(2)), lake_dir)
    (lake_dir / "notes about data").mkdir()
    (lake_dir / "scratch").mkdir()
    assert Lake(str(lake_dir)).datasets() == ["photos"]


def test_concurrent_ingest_that_commits_first_is_merged_not_duplicated(
    photo_folder, tmp_path, monkeypatch, lake_check
) -> None:
    """Ingest B loses the race for version 1 to ingest A (which holds some of B's photos): B commits v2
    without those photos, and the shard it rewrote agrees with the manifest."""
    lake_dir = tmp_path / "lake"
    source_a = photo_folder([0, 1, 2], name="a")
    source_b = photo_folder([1, 2, 3, 4], name="b")
    original = Lake.commit_version
    raced = []

    def commit_after_a(self, dataset, version, record):
        if not raced:
            raced.append(version)
            assert ingest(source_a, lake_dir, val_fraction=0.0).version == 1
        return original(self, dataset, version, record)

    monkeypatch.setattr(Lake, "commit_version", commit_after_a)
    summary = ingest(source_b, lake_dir, val_fraction=0.0)
    assert raced == [1]
    assert (summary.version, summary.parent) == (2, 1)
    assert summary.ingested == 2 and summary.duplicates == 2
    lake = Lake(str(lake_dir))
    rows = lake_check(lake, lake.resolve("photos"))
    assert [Path(row["source_uri"]).parent.name for row in rows] == ["a", "a", "a", "b", "b"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_reading_tables_starts_no_arrow_threads(mixed_lake, tmp_path) -> None:
    """Arrow IO threads that outlive a table read can abort the process at exit (exit code -6 after
    `recolor lake show` printed everything); a read on the calling thread leaves none behind."""
    code = (
        "import os, sys\n"
        "from ingest.lake import Lake\n"
        "lake = Lake(sys.argv[1]); ref = lake.resolve('photos')\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "rows = lake.manifest(ref).num_rows + lake.rejects(ref).num_rows\n"
        "print(rows, before, len(os.listdir('/proc/self/task')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lake")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows, before, after = map(int, result.stdout.split())
    assert rows == 8 + 5 and after == before


# --- records that are not what they claim ---------------------------------------------------------------


@pytest.fixture
def one_version(photo_folder, tmp_path) -> tuple[Lake, Path]:
    ingest(photo_folder(range(4), name="four", width=60, height=40), tmp_path / "lake")
    return Lake(str(tmp_path / "lake")), tmp_path / "lake" / "photos" / "versions" / "000001.json"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rejects", "../../../../../../etc/passwd", r"field 'rejects' is '\.\./.*': it leaves the dataset's folder"),
        ("rejects", "/etc/passwd", r"field 'rejects' is '/etc/passwd': not a relative path"),
        ("manifest", "s3://elsewhere/m.parquet", r"field 'manifest' is 's3://elsewhere/m.parquet': not a relative"),
        ("shard", "shards/../../../../etc/passwd", r"field 'shards.train\[0\].path' is .*: it leaves the dataset"),
        ("counts", None, r"field 'counts' is missing"),
        ("size", "64", r"field 'size' is a str, not a int"),
    ],
)
def test_a_record_whose_paths_leave_the_lake_or_fields_are_wrong_is_refused(one_version, field, value, message):
    lake, path = one_version
    record = json.loads(path.read_text())
    if field == "shard":
        record["shards"]["train"][0]["path"] = value
    elif value is None:
        del record[field]
    else:
        record[field] = value
    path.write_text(json.dumps(record))
    with pytest.raises(LakeError, match=rf"000001.json: {message}.*the version record is corrupt"):
        lake.resolve("photos")


def test_invalid_json_and_a_deleted_manifest_name_the_file(one_version) -> None:
    lake, path = one_version
    record = json.loads(path.read_text())
    manifest = path.parent.parent / record["manifest"]
    manifest.unlink()
    with pytest.raises(LakeError, match=r"000001.json: its manifest .*manifest.*parquet is missing.*lake check"):
        lake.resolve("photos@1")
    path.write_text('{"format": "recolor-lake-v1", "vers')
    with pytest.raises(LakeError, match=r"000001.json is not valid JSON \(.*\): the version record is corrupt"):
        lake.resolve("photos@1")


def test_an_empty_lake_is_an_error_not_the_default(monkeypatch) -> None:
    monkeypatch.delenv("RECOLOR_LAKE", raising=False)
    with pytest.raises(LakeError, match=r"--lake is empty"):
        resolve_lake_uri("")
    with pytest.raises(LakeError, match=r"--lake is empty"):
        resolve_lake_uri("  ")
    monkeypatch.setenv("RECOLOR_LAKE", "")
    with pytest.raises(LakeError, match=r"\$RECOLOR_LAKE is set but empty"):
        resolve_lake_uri(None)


# --- re-ingest reads only what is new --------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The source URIs ingest reads (chunks run in this process: use_ray=False)."""
    import ingest.chunk

    seen: list[str] = []
    real = ingest.chunk.read_uri

    def read_uri(uri):
        seen.append(uri)
        return real(uri)

    monkeypatch.setattr(ingest.chunk, "read_uri", read_uri)
    return seen


def test_reingest_reads_only_new_and_changed_files(photo_folder, make_photo, tmp_path, reads) -> None:
    import os

    source = photo_folder(range(6))
    (source / "gray.jpg").write_bytes(make_photo(50, gray=True))
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    lake_dir = tmp_path / "lake"
    first = ingest(source, lake_dir)
    assert first.ingested == 6 and first.rejected == {"grayscale": 1, "not_an_image": 1} and len(reads) == 8

    photo_folder(range(6, 8))  # two new photos
    (source / "img0001.jpg").write_bytes(make_photo(77))  # replaced under a known name: new content
    touched = source / "img0002.jpg"
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 60))  # same bytes, a new mtime
    reads.clear()
    second = ingest(source, lake_dir)
    # The rejected files (grayscale, not an image) and the untouched photos are not read again.
    assert sorted(Path(uri).name for uri in reads) == ["img0001.jpg", "img0002.jpg", "img0006.jpg", "img0007.jpg"]
    assert (second.listed, second.unchanged, second.ingested, second.duplicates) == (10, 6, 3, 1)
    assert second.version == 2 and Lake(str(lake_dir)).resolve("photos").record["stats"]["unchanged"] == 6
    assert sum(second.counts.values()) == 9  # the old content of img0001 stays (versions are immutable)

    reads.clear()
    third = ingest(source, lake_dir)
    assert third.version is None and third.unchanged == 9  # v2's samples and v1's rejects
    assert sorted(Path(uri).name for uri in reads) == ["img0002.jpg"]  # its stamp in the lake is still v1's
    reads.clear()
    forced = ingest(source, lake_dir, rehash=True)
    assert len(reads) == 10 and forced.version is None and forced.unchanged == 0


def test_reingest_reads_again_files_that_were_missing(coco_tree, tmp_path, reads) -> None:
    from fixtures.images import photo_bytes

    def coco():
        config = IngestConfig(
            kind="coco", source=str(coco_tree.root), annotations=str(coco_tree.instances), dataset="coco",
            lake=str(tmp_path / "lake"), size=SIZE, use_ray=False, progress=False,
        )  # fmt: skip
        return run_ingest(config)

    first = coco()
    assert first.rejected == {"missing": 1}
    missing = coco_tree.root / "val2017" / coco_tree.file_name(coco_tree.missing_id)
    missing.write_bytes(photo_bytes(4321, 96, 64))  # it arrived
    reads.clear()
    second = coco()
    assert [Path(uri).name for uri in reads] == [missing.name] and second.ingested == 1 and second.unchanged == 6


def test_older_manifests_without_source_stamps_read_as_nulls(photo_folder, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest.lake import conform

    old = pa.table({"key": ["a" * 20], "split": ["train"]})
    table = conform(old, MANIFEST_SCHEMA)
    assert table.schema == MANIFEST_SCHEMA and table.column("source_stamp").to_pylist() == [None]
    # A lake written before stamps: a re-ingest reads every file again, and deduplicates them by content.
    source = photo_folder(range(3))
    lake_dir = tmp_path / "lake"
    ingest(source, lake_dir)
    lake = Lake(str(lake_dir))
    ref = lake.resolve("photos")
    path = lake_dir / "photos" / ref.record["manifest"]
    pq.write_table(pq.read_table(path).drop_columns(["source_size", "source_stamp"]), path)
    again = ingest(source, lake_dir)
    assert (again.unchanged, again.duplicates, again.version) == (0, 3, None)


def test_a_scoring_only_dataset_puts_every_sample_in_validation(photo_folder, tmp_path) -> None:
    summary = ingest(photo_folder(range(5)), tmp_path / "lake", val_fraction=1.0)
    assert summary.counts == {"train": 0, "val": 5}
    ref = Lake(str(tmp_path / "lake")).resolve("photos")
    assert ref.record["shards"]["train"] == [] and ref.record["params"]["val_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\], got 1.5"):
        ingest(photo_folder(range(1), name="more"), tmp_path / "lake", val_fraction=1.5)


def test_reingest_with_a_higher_pixel_limit_reads_the_too_large_files_again(photo_folder, make_photo, tmp_path,
                                                                           reads) -> None:  # fmt: skip
    source = photo_folder(range(3))  # 96x72 photos
    (source / "small.jpg").write_bytes(make_photo(40, 80, 60))
    lake_dir = tmp_path / "lake"
    first = ingest(source, lake_dir, max_pixels=90 * 60)
    assert first.rejected == {"too_large": 3} and first.ingested == 1
    reads.clear()
    assert ingest(source, lake_dir, max_pixels=90 * 60).unchanged == 4  # the same limit: nothing is read again
    assert reads == []
    assert ingest(source, lake_dir).ingested == 3  # the default limit: the three fit now
    assert sorted(Path(uri).name for uri in reads) == [f"img{n:04d}.jpg" for n in range(3)]


def test_a_commit_refuses_a_record_its_readers_would_refuse_and_the_manifest_schema_is_the_rows(tmp_path) -> None:
    import dataclasses

    from ingest.lake import RECORD_FIELDS, RECORD_FORMAT, ManifestRow

    lake = Lake(str(tmp_path / "lake"))
    record = {"format": RECORD_FORMAT, "version": 1, "size": 64, "resize": "cover", "counts": {}, "bytes": {},
              "shards": {}, "manifest": "m.parquet", "manifest_sha256": "0" * 64, "created": "now",
              "encoding": {"name": ENCODING["name"]}, "stats": {}}  # fmt: skip
    assert set(RECORD_FIELDS) <= set(record)
    for name in RECORD_FIELDS:
        broken = {k: v for k, v in record.items() if k != name}
        with pytest.raises(LakeError, match=rf"the new record of photos@1: field '{name}' is missing"):
            lake.commit_version("photos", 1, broken)
    with pytest.raises(LakeError, match=r"field 'manifest' is '../x': it leaves the dataset's folder"):
        lake.commit_version("photos", 1, {**record, "manifest": "../x"})
    assert lake.versions("photos") == []  # nothing was written
    lake.commit_version("photos", 1, record)
    assert lake.versions("photos") == [1]
    assert [f.name for f in dataclasses.fields(ManifestRow)] == MANIFEST_SCHEMA.names
