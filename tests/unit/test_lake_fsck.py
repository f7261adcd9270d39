"""`recolor lake check` and `recolor lake repair` on a damaged lake: every kind of damage found, mended into a new
version with byte-identical samples where the sources are unchanged, the old version left as it was."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures.lake import shard_samples

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake
from pipeline.cli import main


@pytest.fixture
def damaged(tmp_path, photo_writer):
    """A dataset of 12 photos in several shards, one shard deleted and one with a flipped byte in a sample."""
    photos = photo_writer(tmp_path / "photos", range(40, 52), width=64, height=48)
    lake_dir = tmp_path / "lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=str(lake_dir),
                            size=32, shard_size=8 * 1024, use_ray=False, progress=False))  # fmt: skip
    lake = Lake(str(lake_dir))
    ref = lake.resolve("photos")
    entries = ref.record["shards"]["train"]
    assert len(entries) >= 3
    originals = {}
    for entry in entries + ref.record["shards"].get("val", []):
        originals.update(shard_samples((lake_dir / "photos" / entry["path"]).read_bytes()))
    gone, garbled = lake_dir / "photos" / entries[0]["path"], lake_dir / "photos" / entries[1]["path"]
    gone.unlink()
    data = bytearray(garbled.read_bytes())
    data[512 + 200] ^= 0xFF  # inside the first sample's array: a valid tar, a wrong pixel
    garbled.write_bytes(bytes(data))
    return lake, ref, entries, originals, photos


def test_check_names_each_problem_and_exits_1(damaged, capsys):
    lake, ref, entries, _, _ = damaged
    assert main(["lake", "check", "photos", "--lake", lake.uri, "--no-ray"]) == 1
    out = capsys.readouterr().out
    assert f"missing   {lake.shard_uri('photos', entries[0]['path'])}" in out
    assert entries[1]["path"] not in out  # the flipped byte keeps the size: only --deep sees it
    assert "1 problem(s); `recolor lake repair photos` rebuilds the 1 damaged shard(s)" in out

    assert main(["lake", "check", "photos@1", "--lake", lake.uri, "--deep", "--no-ray", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = {(p["what"], p["shard"]) for p in report["problems"]}
    assert kinds == {("missing", entries[0]["path"]), ("corrupt", entries[1]["path"])}
    assert "fail their checksum" in next(p["detail"] for p in report["problems"] if p["what"] == "corrupt")


def test_check_reports_unparseable_tables_and_disagreeing_counts(tmp_path, photo_writer, capsys):
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake_dir = tmp_path / "lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=str(lake_dir),
                            size=32, use_ray=False, progress=False))  # fmt: skip
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--deep", "--no-ray"]) == 0
    assert "photos@1: 1 shards, 3 samples read and checked: whole" in capsys.readouterr().out
    record = json.loads((lake_dir / "photos/versions/000001.json").read_text())
    (lake_dir / "photos" / record["rejects"]).write_bytes(b"PAR1 not parquet")
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--no-ray"]) == 1
    assert "rejects   " in capsys.readouterr().out
    (lake_dir / "photos" / record["manifest"]).write_bytes(b"garbage")
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--no-ray"]) == 1
    out = capsys.readouterr().out
    assert "does not parse as Parquet" in out and "SHA-256" in out
    # `lake show` and a re-ingest say the same in one line, not an ArrowInvalid traceback.
    assert main(["lake", "show", "photos", "--lake", str(lake_dir)]) == 2
    err = capsys.readouterr().err
    assert "does not parse" in err and "recolor lake check photos" in err and "Traceback" not in err
    photo_writer(tmp_path / "photos", range(3, 5), width=48, height=40)
    assert main(["ingest", "folder", str(tmp_path / "photos"), "--dataset", "photos", "--lake", str(lake_dir),
                 "--size", "32", "--no-ray", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "does not parse" in err and "recolor lake check photos" in err and "Traceback" not in err


def test_repair_rebuilds_damaged_shards_byte_identical_into_a_new_version(damaged, capsys, lake_check):
    lake, ref, entries, originals, _ = damaged
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray"]) == 0
    out = capsys.readouterr().out
    assert "repaired photos@1 into photos@2" in out and "2 shard(s) rebuilt" in out and "0 dropped" in out
    new = lake.resolve("photos@2")
    rows = lake_check(lake, new)  # whole: every shard present, counts and manifest agree
    assert len(rows) == sum(ref.record["counts"].values())
    for entry in new.record["shards"]["train"] + new.record["shards"].get("val", []):
        for key, members in shard_samples(lake.storage.read_bytes(f"photos/{entry['path']}")):
            assert members == originals[key], key  # the same bytes as ingest wrote
    assert new.record["repair"]["of"] == 1 and new.record["parent"] == 1
    assert lake.resolve("photos@1").record == ref.record  # the old version is as it was
    assert main(["lake", "check", "photos", "--lake", lake.uri, "--deep", "--no-ray"]) == 0
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray"]) == 0
    assert "nothing to repair: photos@2 is whole" in capsys.readouterr().out


def test_repair_drops_and_lists_samples_whose_source_is_gone_or_changed(damaged, capsys, lake_check):
    lake, ref, entries, originals, photos = damaged
    manifest = lake.manifest(ref).to_pylist()
    lost = [row for row in manifest if row["shard"] == entries[0]["path"]]
    gone, changed = lost[0], lost[-1] if len(lost) > 1 else None
    shutil.move(gone["source_uri"], gone["source_uri"] + ".moved")
    if changed:
        with open(changed["source_uri"], "ab") as f:
            f.write(b"\0")
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"dropped   {gone['key']}  {gone['source_uri']}  (source gone)" in out
    if changed:
        assert f"({'source changed since ingest'})" in out
    rows = lake_check(lake, lake.resolve("photos@2"))
    dropped = 1 + (changed is not None)
    assert len(rows) == sum(ref.record["counts"].values()) - dropped
    assert gone["key"] not in {row["key"] for row in rows}


def test_repair_refuses_without_a_readable_manifest(damaged, capsys):
    lake, ref, _, _, _ = damaged
    (lake.storage.root / "photos" / ref.record["manifest"]).write_bytes(b"garbage")
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray"]) == 2
    assert "cannot repair photos@1: its manifest" in capsys.readouterr().err


def test_repair_mends_a_damaged_rejects_table_that_check_reports(tmp_path, photo_writer, capsys, lake_check):
    """The hostile pass: with a corrupt rejects.parquet, `lake check` reported it and `lake repair` said "nothing
    to repair"."""
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "photos" / "empty.png").write_bytes(b"")
    lake_dir = tmp_path / "lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=str(lake_dir),
                            size=32, use_ray=False, progress=False))  # fmt: skip
    lake = Lake(str(lake_dir))
    record = json.loads((lake_dir / "photos/versions/000001.json").read_text())
    original = (lake_dir / "photos" / record["rejects"]).read_bytes()
    (lake_dir / "photos" / record["rejects"]).write_bytes(b"PAR1 not parquet")
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--no-ray"]) == 1
    capsys.readouterr()
    assert main(["lake", "repair", "photos", "--lake", str(lake_dir), "--no-ray", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "made again from its ingest's chunk records" in out and "into photos@2" in out
    new = json.loads((lake_dir / "photos/versions/000002.json").read_text())
    assert (lake_dir / "photos" / new["rejects"]).read_bytes() == original  # the same table, byte for byte
    assert new["repair"]["rejects"] == "rebuilt" and new["shards"] == record["shards"]
    lake_check(lake, lake.resolve("photos@2"))
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--no-ray"]) == 0

    # Its chunk records gone as well: an empty table, the refusals still counted by reason, and said so.
    for chunk in (lake_dir / "photos" / "ingests" / record["ingest_id"] / "chunks").iterdir():
        chunk.unlink()
    (lake_dir / "photos" / new["rejects"]).write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["lake", "repair", "photos", "--lake", str(lake_dir), "--no-ray", "--no-progress"]) == 0
    assert "its chunk records are gone: the new version's is empty; the 2 refusal(s)" in capsys.readouterr().out
    third = json.loads((lake_dir / "photos/versions/000003.json").read_text())
    assert third["repair"]["rejects_lost"] == 2 and third["repair"]["rejects_source"] == record["ingest_id"]
    assert main(["lake", "check", "photos", "--lake", str(lake_dir), "--no-ray"]) == 0


def test_one_damaged_version_record_hides_no_other_dataset_from_lake_ls(tmp_path, photo_writer, capsys):
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake_dir = tmp_path / "lake"
    for name in ("alpha", "beta", "gamma"):
        run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset=name, lake=str(lake_dir),
                                size=32, use_ray=False, progress=False))  # fmt: skip
    (lake_dir / "beta/versions/000001.json").write_text('{"version": 1, "torn')
    assert main(["lake", "ls", "--lake", str(lake_dir)]) == 1
    captured = capsys.readouterr()
    assert "alpha" in captured.out and "gamma" in captured.out and "beta" not in captured.out
    assert "recolor: error: dataset beta cannot be listed: " in captured.err and "000001.json" in captured.err
    assert main(["lake", "ls", "--lake", str(lake_dir), "--json"]) == 1
    listing = json.loads(capsys.readouterr().out)
    assert [row["dataset"] for row in listing["datasets"]] == ["alpha", "gamma"]
    assert [bad["dataset"] for bad in listing["unreadable"]] == ["beta"]


def test_a_run_pinned_to_a_damaged_version_goes_on_with_its_repair(damaged, tmp_path, capsys, caplog):
    """The hostile pass: a run stopped by a corrupt shard could not go on after the advised `lake repair`, pinned
    to the damaged version, the repaired one refused."""
    from pathlib import Path

    from ingest.errors import ConfigError
    from pipeline.config import load_config
    from pipeline.data.plan import resolve_data
    from pipeline.train.rerun import RUN_DATA, pin_run_data

    lake, ref, entries, _, photos = damaged
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / RUN_DATA).write_text(json.dumps({"refs": ["photos@1"]}))
    config = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml",
                         ["data.datasets=[photos]", f"data.lake={lake.uri}"])  # fmt: skip
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray", "--no-progress"]) == 0
    for asked in (["photos"], ["photos@2"]):  # the latest, or named
        plan = pin_run_data(config, resolve_data(asked, lake.uri), str(run), resuming=True)
        assert plan.refs == ["photos@2"] and json.loads((run / RUN_DATA).read_text()) == {"refs": ["photos@2"]}
        (run / RUN_DATA).write_text(json.dumps({"refs": ["photos@1"]}))
    rebuilt = {e["path"] for e in lake.resolve("photos@2").record["shards"]["train"]}
    assert len(rebuilt - {e["path"] for e in entries}) == 2  # the rebuilt shards are the ones the run now reads

    # A repair that dropped samples cannot continue the run exactly: refused, saying what to do.
    manifest = lake.manifest(lake.resolve("photos@2")).to_pylist()
    victim = next(e for e in lake.resolve("photos@2").record["shards"]["train"] if e["path"] not in
                  {x["path"] for x in entries})  # fmt: skip
    row = next(r for r in manifest if r["shard"] == victim["path"])
    Path(row["source_uri"]).rename(row["source_uri"] + ".gone")
    (lake.storage.root / "photos" / victim["path"]).unlink()
    assert main(["lake", "repair", "photos", "--lake", lake.uri, "--no-ray", "--no-progress"]) == 0
    with pytest.raises(ConfigError, match=r"photos@3 repairs it but dropped samples .*--dataset photos@3 --name"):
        pin_run_data(config, resolve_data(["photos"], lake.uri), str(run), resuming=True)
