"""`recolor lake gc`: lists what no version references, deletes only when asked, never touches a version."""

from __future__ import annotations

import json

import pytest

from ingest.driver import IngestConfig, run_ingest
from ingest.gc import collect
from ingest.lake import Lake
from pipeline.cli import main


def ingest(source, lake, **kwargs):
    return run_ingest(
        IngestConfig(kind="folder", source=str(source), dataset="photos", lake=str(lake), size=32,
                     use_ray=False, progress=False, **kwargs)
    )  # fmt: skip


def test_gc_lists_orphans_and_deletes_only_when_asked(tmp_path, photo_writer, capsys, lake_check):
    photo_writer(tmp_path / "photos", range(6), width=48, height=40)
    lake_dir = tmp_path / "lake"
    ingest(tmp_path / "photos", lake_dir)
    lake = Lake(str(lake_dir))
    orphan = lake_dir / "photos" / "ingests" / "deadbeef0000" / "shards" / "train-deadbeef0000-000000.tar"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 1000)

    # By default only objects older than an hour are listed: fresh ones may be a running ingest's.
    assert main(["lake", "gc", "--lake", str(lake_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unreferenced"] == []
    temp = orphan.parent / ".train-deadbeef0000-000001.tar.0123456789ab.tmp"  # a killed writer's
    temp.write_bytes(b"y" * 10)
    young = orphan.parent / ".train-deadbeef0000-000002.tar.0123456789ab.tmp"  # a write that may be in progress
    young.write_bytes(b"z" * 10)
    _old(temp, 600)  # temporary files and claims are left alone for 6 minutes whatever --min-age says

    assert main(["lake", "gc", "--lake", str(lake_dir), "--json", "--min-age", "0"]) == 0
    listed = json.loads(capsys.readouterr().out)["unreferenced"]
    keys = {item["key"] for item in listed}
    assert "photos/ingests/deadbeef0000/shards/train-deadbeef0000-000000.tar" in keys
    assert "photos/ingests/deadbeef0000/shards/.train-deadbeef0000-000001.tar.0123456789ab.tmp" in keys
    # Resume records of the committed ingest are listed too; nothing a version names is.
    ref = lake.resolve("photos")
    named = {f"photos/{s['path']}" for entries in ref.record["shards"].values() for s in entries}
    named |= {f"photos/{ref.record['manifest']}", f"photos/{ref.record['rejects']}", "photos/versions/000001.json"}
    assert not keys & named
    assert orphan.exists()  # listing deletes nothing

    assert "photos/ingests/deadbeef0000/shards/.train-deadbeef0000-000002.tar.0123456789ab.tmp" not in keys
    assert main(["lake", "gc", "photos", "--lake", str(lake_dir), "--delete", "--min-age", "0s"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert not orphan.exists() and not temp.exists() and young.exists()
    young.unlink()
    assert collect(lake, "photos").garbage == []
    assert len(lake_check(lake, lake.resolve("photos@1"))) == 6  # the version is whole


def test_gc_refuses_bad_dataset_names(tmp_path, capsys):
    assert main(["lake", "gc", "../etc", "--lake", str(tmp_path)]) == 2
    assert "invalid dataset name" in capsys.readouterr().err


def test_gc_refuses_a_bad_min_age(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lake", "gc", "--lake", str(tmp_path), "--min-age", "soon"])
    assert exit_.value.code == 2
    assert "'soon' is not a duration" in capsys.readouterr().err


def _old(path, seconds: float = 7200) -> None:
    then = __import__("time").time() - seconds
    __import__("os").utime(path, (then, then), follow_symlinks=False)


def test_gc_never_follows_a_symbolic_link_out_of_the_lake(tmp_path, photo_writer, capsys, lake_check):
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake_dir = tmp_path / "lake"
    ingest(tmp_path / "photos", lake_dir)
    elsewhere = tmp_path / "elsewhere"
    victim = elsewhere / "ingests" / "deadbeef0000" / "shards" / "train-deadbeef0000-000000.tar"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"precious")
    (elsewhere / "versions").mkdir()
    _old(victim)
    (lake_dir / "evil").symlink_to(elsewhere)  # a dataset folder that is a link
    (lake_dir / "photos" / "ingests" / "deadbeef0000").symlink_to(victim.parent.parent)  # a link inside one
    outside_file = tmp_path / "precious.json"
    outside_file.write_text("{}")
    (lake_dir / "photos" / "ingests" / "abcdefabcdef").mkdir()
    (lake_dir / "photos" / "ingests" / "abcdefabcdef" / "rejects.parquet").symlink_to(outside_file)

    for args in (["--delete"], ["evil", "--delete"], ["photos", "--delete"]):
        main(["lake", "gc", *args, "--lake", str(lake_dir), "--min-age", "0", "--json"])
        report = json.loads(capsys.readouterr().out)
        assert all("deadbeef0000" not in item["key"] for item in report["unreferenced"]), report
    assert victim.read_bytes() == b"precious" and outside_file.read_text() == "{}"
    assert "photos/ingests/abcdefabcdef/rejects.parquet" in report["unknown"]  # a link: unknown, left alone
    assert len(lake_check(Lake(str(lake_dir)), Lake(str(lake_dir)).resolve("photos"))) == 3


def test_a_local_delete_refuses_to_pass_through_a_link(tmp_path):
    from ingest.storage import LocalStorage, StorageError

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "file").write_text("x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    store = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError, match="symbolic link"):
        store.delete("link/file")
    assert (tmp_path / "outside" / "file").exists()
    assert list(store.list("link", follow_links=False)) == [] and store.list_children("", follow_links=False) == []


def _not_a_lake(root):
    """A project folder with `versions/` and `ingests/` children, as gc used to treat as datasets."""
    files = {
        "project/versions/notes.md": "# notes",
        "project/ingests/setup.py": "print()",
        "project/ingests/deadbeef0000/photo.jpg": "jpeg",
        "project/ingests/deadbeef0000/shards/readme.txt": "x",
        "site/versions/000001.json.bak": "{}",
        "site/ingests/deadbeef0000/shards/train-deadbeef0000-000000.tar.orig": "tar",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        _old(path)
    return files


def test_gc_on_a_folder_that_is_not_a_lake_deletes_nothing(tmp_path, capsys):
    files = _not_a_lake(tmp_path)
    assert main(["lake", "gc", "--lake", str(tmp_path), "--delete", "--min-age", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unreferenced"] == []
    assert set(report["unknown"]) == set(files)
    assert all((tmp_path / name).read_text() == text for name, text in files.items())
    assert main(["lake", "gc", "--lake", str(tmp_path)]) == 0
    assert "6 unknown, left alone" in capsys.readouterr().out


def test_gc_skips_a_dataset_whose_version_records_do_not_parse(tmp_path, photo_writer, capsys):
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake_dir = tmp_path / "lake"
    ingest(tmp_path / "photos", lake_dir)
    (lake_dir / "photos" / "versions" / "000002.json").write_text("{not json")
    chunks = sorted((lake_dir / "photos" / "ingests").rglob("chunks/*.json"))
    assert chunks
    assert main(["lake", "gc", "--lake", str(lake_dir), "--delete", "--min-age", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unreferenced"] == [] and "not valid JSON" in report["skipped"]["photos"]
    assert all(chunk.exists() for chunk in chunks)


def test_a_live_lease_protects_an_ingest_and_an_expired_one_does_not(tmp_path, photo_writer, capsys, monkeypatch):
    from ingest.lease import Lease, ingest_lease_key, read_lease

    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake_dir = tmp_path / "lake"
    ingest(tmp_path / "photos", lake_dir)
    lake = Lake(str(lake_dir))
    orphan = lake_dir / "photos" / "ingests" / "0123456789ab" / "shards" / "val-0123456789ab-000003.tar"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"t" * 512)
    _old(orphan)
    with Lease(lake.storage, ingest_lease_key("photos", "0123456789ab"), "test", ttl=60):
        assert main(["lake", "gc", "photos", "--lake", str(lake_dir), "--delete", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert list(report["in_use"]) == ["photos/ingests/0123456789ab"] and orphan.exists()
    assert read_lease(lake.storage, ingest_lease_key("photos", "0123456789ab")) is None  # released on exit

    # A holder that died: its lease (pid of a process that is gone) protects nothing.
    lease_file = lake_dir / "photos" / "ingests" / "0123456789ab" / "lease.json"
    from ingest.lease import _machine

    lease_file.write_text(json.dumps({"holder": "x", "host": "here", "machine": _machine(), "pid": 2**22 + 7,
                                      "renewed": __import__("time").time(), "ttl": 600}))  # fmt: skip
    assert not read_lease(lake.storage, ingest_lease_key("photos", "0123456789ab")).live
    assert main(["lake", "gc", "photos", "--lake", str(lake_dir), "--delete", "--json"]) == 0
    assert not orphan.exists() and not lease_file.exists()
