"""The node-local shard cache: one download per shard per node, nothing partial trusted, a bounded size, a
fallback to streaming when the disk cannot take it."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.data.shard_cache import CacheDiskError, ShardCache, _download


class CountingStore:
    """Shards as local files, downloads counted (and slowed, so that concurrent fills overlap)."""

    def __init__(self, folder: Path, sizes: dict[str, int], delay: float = 0.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.uris = {}
        for name, size in sizes.items():
            path = folder / name
            path.write_bytes(os.urandom(size))
            self.uris[name] = str(path)
        self.calls: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def download(self, uri: str, target: Path) -> int:
        with self.lock:
            self.calls.append(uri)
        time.sleep(self.delay)
        return _download(uri, target)


def read(cache: ShardCache, uri: str) -> bytes:
    with cache.open(uri, os.path.getsize(uri)) as handle:
        return handle.read()


def test_concurrent_ranks_download_a_shard_once(tmp_path):
    store = CountingStore(tmp_path / "store", {"a.tar": 300_000}, delay=0.3)
    caches = [ShardCache(tmp_path / "cache", 10**7, download=store.download) for _ in range(4)]  # four ranks
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda c=c: results.append(read(c, store.uris["a.tar"]))) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.calls == [store.uris["a.tar"]]  # one download; the others waited for it
    assert results == [Path(store.uris["a.tar"]).read_bytes()] * 4
    taken = [c.stats.take() for c in caches]
    assert sum(store for store, _ in taken) == 300_000  # downloaded once
    assert sum(hits for _, hits in taken) == 900_000  # the three that waited read the filled shard


def test_a_fill_cut_short_leaves_nothing_that_is_trusted(tmp_path):
    store = CountingStore(tmp_path / "store", {"a.tar": 200_000})
    uri = store.uris["a.tar"]

    def killed(uri: str, target: Path) -> int:
        target.write_bytes(b"half")
        raise KeyboardInterrupt  # as a kill: no cleanup of ours runs beyond `finally`

    with pytest.raises(KeyboardInterrupt):
        ShardCache(tmp_path / "cache", 10**7, download=killed).open(uri, 200_000)
    assert [p.name for p in (tmp_path / "cache").glob("*.tar")] == []  # nothing under a final name
    stale = tmp_path / "cache" / ".x.tar.123.abcd.tmp"  # what a SIGKILLed fill leaves
    stale.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    cache = ShardCache(tmp_path / "cache", 10**7, download=store.download)
    assert not stale.exists()
    assert read(cache, uri) == Path(uri).read_bytes() and len(store.calls) == 1


def test_a_cached_shard_of_the_wrong_size_is_dropped_and_fetched_again(tmp_path, caplog):
    store = CountingStore(tmp_path / "store", {"a.tar": 100_000})
    uri = store.uris["a.tar"]
    cache = ShardCache(tmp_path / "cache", 10**7, download=store.download)
    assert read(cache, uri) == Path(uri).read_bytes()
    (cached,) = (tmp_path / "cache").glob("*.tar")
    cached.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert read(cache, uri) == Path(uri).read_bytes()
    assert "not the 100000 recorded: dropped, fetching it again" in caplog.text
    assert len(store.calls) == 2


def test_the_cache_keeps_its_budget_and_never_evicts_a_shard_being_read(tmp_path):
    store = CountingStore(tmp_path / "store", {f"{n}.tar": 100_000 for n in "abcd"})
    cache = ShardCache(tmp_path / "cache", 250_000, download=store.download)  # room for two
    held = cache.open(store.uris["a.tar"], 100_000)  # a reader holds a
    read(cache, store.uris["b.tar"])
    read(cache, store.uris["c.tar"])  # b is the least recent one nobody holds: it goes
    sizes = [p.stat().st_size for p in (tmp_path / "cache").glob("*.tar")]
    assert sum(sizes) <= 250_000 and len(sizes) == 2
    assert cache._path(store.uris["a.tar"]).exists() and not cache._path(store.uris["b.tar"]).exists()
    held.close()
    read(cache, store.uris["d.tar"])
    assert not cache._path(store.uris["a.tar"]).exists()  # no longer held, least recent: evicted now
    big = CountingStore(tmp_path / "big", {"huge.tar": 300_000})
    with cache.open(big.uris["huge.tar"], 300_000) as handle:  # larger than the budget: streamed
        assert handle.read() == Path(big.uris["huge.tar"]).read_bytes()
    assert not cache._path(big.uris["huge.tar"]).exists()


def test_a_cache_that_cannot_be_written_streams_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = CountingStore(tmp_path / "store", {"a.tar": 50_000})
    with caplog.at_level(logging.WARNING):
        cache = ShardCache(blocker / "cache", 10**7, download=store.download)
        assert read(cache, store.uris["a.tar"]) == Path(store.uris["a.tar"]).read_bytes()
        assert read(cache, store.uris["a.tar"]) == Path(store.uris["a.tar"]).read_bytes()
    assert not cache.enabled and caplog.text.count("streaming shards from the store instead") == 1
    assert store.calls == []  # streamed, never filled
    assert cache.stats.take() == (100_000, 0)


def test_a_full_disk_mid_fill_falls_back_to_streaming(tmp_path, caplog):
    import errno

    store = CountingStore(tmp_path / "store", {"a.tar": 50_000})

    def full(uri: str, target: Path) -> int:
        raise CacheDiskError(errno.ENOSPC, f"{target}: No space left on device")  # as `_download` says it

    cache = ShardCache(tmp_path / "cache", 10**7, download=full)
    with caplog.at_level(logging.WARNING):
        assert read(cache, store.uris["a.tar"]) == Path(store.uris["a.tar"]).read_bytes()
    assert not cache.enabled and "No space left on device" in caplog.text
    assert list((tmp_path / "cache").glob("*.tar")) == [] and list((tmp_path / "cache").glob(".*.tmp")) == []


def test_a_missing_object_in_the_store_is_the_readers_error_not_a_broken_cache(tmp_path):
    cache = ShardCache(tmp_path / "cache", 10**7)
    with pytest.raises(FileNotFoundError):
        cache.open(str(tmp_path / "store" / "gone.tar"), 1000)
    assert cache.enabled  # one object the store lacks says nothing about the node's disk


def test_fills_running_at_once_keep_the_budget(tmp_path):
    """Four ranks fill four different shards at once into room for two: no more than two are ever cached."""
    store = CountingStore(tmp_path / "store", {f"{n}.tar": 100_000 for n in "abcd"}, delay=0.2)
    caches = [ShardCache(tmp_path / "cache", 250_000, download=store.download) for _ in range(4)]
    threads = [threading.Thread(target=lambda c=c, n=n: read(c, store.uris[f"{n}.tar"]))
               for c, n in zip(caches, "abcd", strict=True)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.tar")) <= 250_000
    assert list((tmp_path / "cache").glob(".*.reserve")) == []


# --- trust: a private folder, shards as the lake recorded them -----------------------------------------------


def test_a_planted_shard_of_the_right_size_is_never_read(tmp_path, caplog):
    """The hostile pass: a file of a shard's size planted in the cache was trained on (only its size was checked)."""
    import hashlib

    store = CountingStore(tmp_path / "store", {"a.tar": 100_000, "b.tar": 100_000})
    uri, old_uri = store.uris["a.tar"], store.uris["b.tar"]
    digest = hashlib.sha256(Path(uri).read_bytes()).hexdigest()
    cache = ShardCache(tmp_path / "cache", 10**7, download=store.download)
    planted = os.urandom(100_000)  # e.g. validation samples re-labelled as training ones
    for target in (uri, old_uri):
        cache._path(target).write_bytes(planted)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
        with cache.open(uri, 100_000, digest) as handle:
            assert handle.read() == Path(uri).read_bytes()  # the recorded shard, fetched again
        with cache.open(old_uri, 100_000) as handle:  # a lake from before digests: no download of this cache's
            assert handle.read() == Path(old_uri).read_bytes()
    assert store.calls == [uri, old_uri]
    assert any("not the" in message and "recorded: dropped" in message for message in caplog.messages)
    assert any("has no digest to check it by" in message for message in caplog.messages)
    # Once fetched, both are read from the cache, by this process and by another one (its own check).
    for reader in (cache, ShardCache(tmp_path / "cache", 10**7, download=store.download)):
        assert read_with(reader, uri, digest) == Path(uri).read_bytes()
        assert read_with(reader, old_uri, None) == Path(old_uri).read_bytes()
    assert store.calls == [uri, old_uri]
    # A copy changed after it was checked (same size): the next process refuses it.
    cache._path(uri).write_bytes(planted)
    fresh = ShardCache(tmp_path / "cache", 10**7, download=store.download)
    assert read_with(fresh, uri, digest) == Path(uri).read_bytes() and store.calls[-1] == uri


def read_with(cache: ShardCache, uri: str, digest: str | None) -> bytes:
    with cache.open(uri, os.path.getsize(uri), digest) as handle:
        return handle.read()


def test_a_store_copy_that_is_not_the_recorded_one_is_streamed_not_cached(tmp_path, caplog):
    store = CountingStore(tmp_path / "store", {"a.tar": 50_000})
    uri = store.uris["a.tar"]
    cache = ShardCache(tmp_path / "cache", 10**7, download=store.download)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
        assert read_with(cache, uri, "0" * 64) == Path(uri).read_bytes()  # the reader's checks judge its samples
    assert not cache._path(uri).exists() and "not the " + "0" * 64 in caplog.text


def test_a_cache_folder_open_to_others_is_emptied_and_made_private(tmp_path, caplog):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "0123.tar").write_bytes(b"planted")
    os.chmod(root, 0o777)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
        cache = ShardCache(root, 10**7)
    assert cache.enabled and (os.stat(root).st_mode & 0o777) == 0o700 and list(root.iterdir()) == []
    assert "was open to other users (mode 777)" in caplog.text


def test_a_cache_folder_of_another_user_or_a_link_is_refused(tmp_path, caplog):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
        assert not ShardCache(tmp_path / "link", 10**7).enabled
    assert "is not a folder (a link, or a file): refused" in caplog.text
    if os.geteuid() == 0:  # root can give a folder away: another user's
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 12345, 12345)
        with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
            assert not ShardCache(theirs, 10**7).enabled
        assert "belongs to user id 12345, not to you" in caplog.text and "data.cache_dir" in caplog.text


def test_the_default_cache_folder_is_each_users_own():
    from pipeline.data.shard_cache import default_cache_dir

    assert default_cache_dir().endswith(f"recolor-shard-cache-{os.geteuid()}")


def test_one_bucket_on_two_s3_servers_is_two_cache_entries_whichever_variable_names_them(tmp_path, monkeypatch):
    """The cache key holds the endpoint the S3 client uses: `AWS_ENDPOINT_URL_S3` before `AWS_ENDPOINT_URL`."""
    from ingest.storage.s3 import s3_endpoint

    cache = ShardCache(tmp_path / "cache", 10**7)
    uri = "s3://lake/photos/shards/train-000000.tar"
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    keys = {}
    for general, s3_only in (("http://a:9000", None), ("http://a:9000", "http://b:9000"), ("http://b:9000", None)):
        monkeypatch.setenv("AWS_ENDPOINT_URL", general)
        if s3_only:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_only)
        else:
            monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        keys[(general, s3_only)] = (s3_endpoint(), cache._path(uri))
    assert keys[("http://a:9000", None)][0] == "http://a:9000"
    assert keys[("http://a:9000", "http://b:9000")][0] == "http://b:9000"  # the S3-only variable wins, as in boto3
    assert keys[("http://a:9000", None)][1] != keys[("http://a:9000", "http://b:9000")][1]
    assert keys[("http://a:9000", "http://b:9000")][1] == keys[("http://b:9000", None)][1]  # the same server
    assert cache._path(str(tmp_path / "a.tar")) == ShardCache(tmp_path / "cache", 10**7)._path(str(tmp_path / "a.tar"))
