"""The storage layer without a server: URIs, the local store's atomic writes, S3 client reuse."""

from __future__ import annotations

import pytest

from ingest.storage import (
    AlreadyExistsError,
    LocalStorage,
    StorageError,
    make_s3_client,
    open_storage,
    read_uri,
    split_uri,
)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.jpg", ("s3://bucket/a", "b.jpg")),
        ("s3://bucket/b.jpg", ("s3://bucket", "b.jpg")),
        ("/data/x.json", ("/data", "x.json")),
        ("/x.json", ("/", "x.json")),
        ("annotations/x.json", ("annotations", "x.json")),
        ("x.json", (".", "x.json")),  # a bare name lies in the working directory
    ],
)
def test_split_uri(uri: str, expected) -> None:
    assert split_uri(uri) == expected


def test_read_uri_of_a_bare_relative_name_reads_the_working_directory(tmp_path, monkeypatch) -> None:
    (tmp_path / "instances_val2017.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert read_uri("instances_val2017.json") == b"{}"
    assert read_uri(str(tmp_path / "instances_val2017.json")) == b"{}"


@pytest.mark.parametrize(
    "uri, message", [("ftp://host/lake", "unsupported URI scheme 'ftp'"), ("s3://", "expected s3://BUCKET")]
)
def test_open_storage_refuses_unusable_uris(uri: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        open_storage(uri)


def test_local_put_if_absent_is_create_exclusive(tmp_path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    assert isinstance(storage, LocalStorage)
    storage.put_if_absent("d/versions/000001.json", b"first")
    with pytest.raises(AlreadyExistsError, match="000001.json already exists"):
        storage.put_if_absent("d/versions/000001.json", b"second")
    assert storage.read_bytes("d/versions/000001.json") == b"first"
    assert [p.name for p in (tmp_path / "d" / "versions").iterdir()] == ["000001.json"]  # no temporary left


def test_local_list_is_sorted_recursive_and_skips_temporary_files(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    for key in ["b/2.tar", "a.json", "b/1.tar", "b/c/3.tar"]:
        storage.write_bytes(key, b"x")
    (tmp_path / "b" / ".1.tar.0123456789ab.tmp").write_bytes(b"partial upload")
    assert [obj.key for obj in storage.list("b")] == ["b/1.tar", "b/2.tar", "b/c/3.tar"]
    assert storage.list_children("") == ["b"]
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        storage.read_bytes("missing.json")


def test_s3_client_is_reused_per_environment(monkeypatch) -> None:
    """Ingest opens a store per source image; a new boto3 client each time costs ~0.1 s of CPU."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    first = make_s3_client()
    assert make_s3_client() is first
    assert open_storage("s3://bucket/a").client is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    other = make_s3_client()
    assert other is not first and other.meta.endpoint_url == "http://127.0.0.1:10"
