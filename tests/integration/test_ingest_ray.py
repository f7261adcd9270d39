"""Ingest on Ray in this process (the session's local Ray, which `ensure_ray` reuses)."""

from __future__ import annotations

import pytest

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake

pytestmark = pytest.mark.slow

SIZE = 32


def test_ray_and_in_process_ingests_write_identical_lakes(ray_local, photo_folder, tmp_path, lake_check) -> None:
    source = photo_folder(range(10), width=80, height=64)
    (source / "broken.jpg").write_bytes(b"")
    (source / "zz-copy.jpg").write_bytes((source / "img0002.jpg").read_bytes())  # a duplicate in another chunk
    common = {
        "kind": "folder",
        "source": str(source),
        "dataset": "photos",
        "size": SIZE,
        "shard_size": 2 * (3 * SIZE * SIZE + 1536),  # chunks of two or three images: several Ray tasks
        "progress": False,
    }
    on_ray = run_ingest(IngestConfig(lake=str(tmp_path / "ray"), use_ray=True, **common))
    assert ray_local.is_initialized()  # reused, and left running for the rest of the session
    in_process = run_ingest(IngestConfig(lake=str(tmp_path / "local"), use_ray=False, **common))

    ignore = {"seconds"}
    assert {k: v for k, v in on_ray.to_dict().items() if k not in ignore} == {
        k: v for k, v in in_process.to_dict().items() if k not in ignore
    }
    assert on_ray.ingested == 10 and on_ray.duplicates == 1 and on_ray.rejected == {"empty": 1}
    ray_lake, local_lake = Lake(str(tmp_path / "ray")), Lake(str(tmp_path / "local"))
    ray_ref, local_ref = ray_lake.resolve("photos"), local_lake.resolve("photos")
    assert len(ray_ref.record["shards"]["train"]) > 2
    assert lake_check(ray_lake, ray_ref) == lake_check(local_lake, local_ref)
    for field in ("shards", "counts", "bytes", "stats", "manifest_sha256", "ingest_id"):
        assert ray_ref.record[field] == local_ref.record[field], field
    ray_shards = {p.relative_to(tmp_path / "ray"): p.read_bytes() for p in (tmp_path / "ray").rglob("*.tar")}
    local_shards = {p.relative_to(tmp_path / "local"): p.read_bytes() for p in (tmp_path / "local").rglob("*.tar")}
    assert ray_shards == local_shards


def test_cli_runs_on_a_given_ray_cluster_and_leaves_it_running(ray_local, photo_folder, tmp_path, recolor) -> None:
    """`--ray-address` connects to an existing cluster (here the session's) instead of starting one."""
    address = ray_local.get_runtime_context().gcs_address
    source = photo_folder(range(4), width=64, height=48)
    args = ["ingest", "folder", source, "--dataset", "photos", "--lake", tmp_path / "lake", "--size", "32"]
    result = recolor(*args, "--ray-address", address, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "committed photos@1" in result.stdout
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 3  # the session's, unchanged
    assert sum(Lake(str(tmp_path / "lake")).resolve("photos").record["counts"].values()) == 4
