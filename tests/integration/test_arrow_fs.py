"""The project's S3 layer as a pyarrow file system (Ray Train's run storage), against `rclone serve s3`.

What broke long runs: pyarrow's own S3 file system wrote directory markers (on delete too), which
rclone stores as files that block every key below them, and it needed checksum settings from each
process's environment. These tests run Ray Train's own storage operations on the real server.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pyarrow.fs
import pytest

from ingest.storage import make_s3_client
from ingest.storage.arrow import SPOOL_IN_MEMORY, s3_filesystem

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def keys(bucket: str) -> list[str]:
    pages = make_s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def test_rotation_deletes_exactly_the_old_folder_and_writes_no_marker(s3_env, tmp_path) -> None:
    fs = s3_filesystem()
    run = f"{s3_env.bucket}/train/run"
    fs.create_dir(run)  # what Ray asks before every upload: nothing is written
    assert keys(s3_env.bucket) == []
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3"):
        local = tmp_path / name
        local.mkdir()
        (local / "checkpoint.pt").write_bytes(name.encode() * 1000)
        pyarrow.fs.copy_files(str(local), f"{run}/{name}", destination_filesystem=fs)
    write(fs, f"{run}/checkpoint_manager_snapshot.json", b"{}")
    for old in ("checkpoint_1", "checkpoint_2"):
        fs.delete_dir(f"{run}/{old}")
        # The next upload after a rotation is where pyarrow's marker broke runs: it must still work.
        write(fs, f"{run}/checkpoint_manager_snapshot.json", old.encode())
    assert keys(s3_env.bucket) == [
        "train/run/checkpoint_3/checkpoint.pt",
        "train/run/checkpoint_manager_snapshot.json",
    ]
    info = fs.get_file_info([run, f"{run}/checkpoint_3", f"{run}/checkpoint_1", f"{run}/checkpoint_3/checkpoint.pt"])
    assert [i.type for i in info] == [
        pyarrow.fs.FileType.Directory,
        pyarrow.fs.FileType.Directory,
        pyarrow.fs.FileType.NotFound,
        pyarrow.fs.FileType.File,
    ]
    assert info[3].size == len(b"checkpoint_3") * 1000
    listing = fs.get_file_info(pyarrow.fs.FileSelector(run))
    assert [(i.base_name, i.type) for i in listing] == [
        ("checkpoint_3", pyarrow.fs.FileType.Directory),
        ("checkpoint_manager_snapshot.json", pyarrow.fs.FileType.File),
    ]
    recursive = fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_env.bucket}/train", recursive=True))
    assert [i.path for i in recursive] == [
        f"{run}",
        f"{run}/checkpoint_3",
        f"{run}/checkpoint_3/checkpoint.pt",
        f"{run}/checkpoint_manager_snapshot.json",
    ]
    download = tmp_path / "download"
    download.mkdir()  # as Ray does before a download
    pyarrow.fs.copy_files(f"{run}/checkpoint_3", str(download), source_filesystem=fs)
    assert (download / "checkpoint.pt").read_bytes() == b"checkpoint_3" * 1000


def test_deleting_a_folder_deletes_everything_below_it_and_recreates_nothing(s3_env) -> None:
    client = make_s3_client()
    for key in ("runs/old/checkpoint.pt", "runs/old/deeper/extra.bin", "runs/kept.json"):
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=b"x")
    fs = s3_filesystem()
    fs.delete_dir(f"{s3_env.bucket}/runs/old")
    assert keys(s3_env.bucket) == ["runs/kept.json"]
    fs.delete_dir_contents(f"{s3_env.bucket}/runs")
    assert keys(s3_env.bucket) == []
    with pytest.raises(FileNotFoundError):
        fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_env.bucket}/runs"))
    assert fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_env.bucket}/runs", allow_not_found=True)) == []
    with pytest.raises(PermissionError):
        fs.delete_dir(s3_env.bucket)


def test_large_objects_go_multipart_and_read_back_by_ranges(s3_env) -> None:
    fs = s3_filesystem()
    data = bytes(range(256)) * (SPOOL_IN_MEMORY // 256 * 2 + 17)  # past the in-memory spool: a multipart upload
    path = f"{s3_env.bucket}/big/checkpoint.pt"
    write(fs, path, data)
    with fs.open_input_stream(path) as stream:
        assert stream.read() == data
    with fs.open_input_file(path) as handle:
        assert handle.size() == len(data)
        handle.seek(len(data) - 1000)
        assert handle.read(2000) == data[-1000:]
        handle.seek(5)
        assert handle.read(10) == data[5:15]


def test_settings_travel_with_the_file_system_to_a_process_without_them(s3_env, tmp_path) -> None:
    """Ray's controller and workers on other nodes unpickle the file system without the driver's environment.
    It must reach the same server, without the checksum variables the rclone server needs (411 otherwise)."""
    fs = s3_filesystem()
    (tmp_path / "fs.pickle").write_bytes(pickle.dumps(fs))
    script = (
        "import pickle, sys; fs = pickle.load(open(sys.argv[1], 'rb'));\n"
        "s = fs.open_output_stream(sys.argv[2]); s.write(b'from elsewhere'); s.close()"
    )
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no AWS_* at all
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "fs.pickle"), f"{s3_env.bucket}/snapshot.json"],
        env=bare,
        check=True,
        timeout=60,
    )
    assert make_s3_client().get_object(Bucket=s3_env.bucket, Key="snapshot.json")["Body"].read() == b"from elsewhere"


def test_a_failed_upload_raises_and_leaves_nothing(s3_env, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    fs = s3_filesystem()
    with pytest.raises(Exception, match="check AWS_ACCESS_KEY_ID"):
        write(fs, f"{s3_env.bucket}/refused.json", b"{}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    assert keys(s3_env.bucket) == []


def test_on_a_store_that_keeps_markers_as_keys_old_markers_are_folders_and_go_with_them(moto_s3) -> None:
    """moto, like AWS S3, keeps a `prefix/` marker as a key of its own (rclone would store it as a file)."""
    client = make_s3_client()
    for key in ("runs/", "runs/r/", "runs/r/checkpoint_1/checkpoint.pt", "runs/r/checkpoint_2/"):
        client.put_object(Bucket="faults", Key=key, Body=b"x" if key.endswith(".pt") else b"")
    fs = s3_filesystem()
    listing = fs.get_file_info(pyarrow.fs.FileSelector("faults/runs/r"))
    assert [(i.base_name, i.type) for i in listing] == [
        ("checkpoint_1", pyarrow.fs.FileType.Directory),
        ("checkpoint_2", pyarrow.fs.FileType.Directory),
    ]
    assert fs.get_file_info(["faults/runs/r/checkpoint_1"])[0].type == pyarrow.fs.FileType.Directory
    for name in ("checkpoint_1", "checkpoint_2"):
        fs.delete_dir(f"faults/runs/r/{name}")
    write(fs, "faults/runs/r/checkpoint_manager_snapshot.json", b"{}")
    assert keys("faults") == ["runs/", "runs/r/", "runs/r/checkpoint_manager_snapshot.json"]  # none written


def test_deleting_a_folder_of_more_than_a_thousand_objects_deletes_them_all(s3_env) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = make_s3_client()
    with ThreadPoolExecutor(16) as pool:  # S3 deletes in batches of 1,000: three batches here
        list(pool.map(lambda n: client.put_object(Bucket=s3_env.bucket, Key=f"big/{n:05d}", Body=b"x"), range(2005)))
    s3_filesystem().delete_dir(f"{s3_env.bucket}/big")
    assert keys(s3_env.bucket) == []


def test_a_ranged_read_cut_short_resumes_inside_its_range() -> None:
    """A dropped connection during `read_range` reopens at the byte it reached within the range, not from the
    object's start, and stops at the range's end."""
    import io

    from ingest.storage.s3 import S3Storage, _ResumableBody

    data = bytes(range(256)) * 64
    asked: list[str] = []

    class Dropped(io.BytesIO):
        def read(self, size=-1):
            raise ConnectionError("connection reset")

    class Client:
        class meta:
            endpoint_url = "http://127.0.0.1:1"

        def get_object(self, Bucket, Key, Range, **extra):
            asked.append(Range)
            first, last = Range.removeprefix("bytes=").split("-")
            return {"Body": io.BytesIO(data[int(first) : int(last) + 1]), "ETag": '"e"'}

    storage = S3Storage("b")
    storage._client = Client()
    body = _ResumableBody(storage, "k", {"Body": io.BytesIO(data[1000:1100]), "ETag": '"e"'}, start=1000, end=2999)
    first = body._read(100)  # the first connection gave 100 bytes, then dropped
    body._body = Dropped()
    rest = body.read_all()
    assert first + rest == data[1000:3000]
    assert asked == ["bytes=1100-2999"]
