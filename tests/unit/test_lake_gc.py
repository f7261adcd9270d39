"""`recolor lake gc`: lists what no version references, deletes only when asked, never touches a version."""

from __future__ import annotations

import json

import pytest

from ingest.driver import IngestConfig, run_ingest
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

    assert main(["lake", "gc", "photos", "--lake", str(lake_dir), "--delete", "--min-age", "0s"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert not orphan.exists() and not temp.exists()
    assert lake.unreferenced("photos") == []
    assert len(lake_check(lake, lake.resolve("photos@1"))) == 6  # the version is whole


def test_gc_refuses_bad_dataset_names(tmp_path, capsys):
    assert main(["lake", "gc", "../etc", "--lake", str(tmp_path)]) == 2
    assert "invalid dataset name" in capsys.readouterr().err


def test_gc_refuses_a_bad_min_age(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lake", "gc", "--lake", str(tmp_path), "--min-age", "soon"])
    assert exit_.value.code == 2
    assert "'soon' is not a duration" in capsys.readouterr().err
