"""The storage layer against a real S3 server that goes away: retries, deadlines, resumed reads, races.

Each test runs its own `rclone serve s3` (the `own_s3` fixture), so it can stop and restart it
(same port, same keys, same files) without disturbing the session's server.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from ingest.storage import AlreadyExistsError, StorageError, open_storage
from ingest.storage import s3 as storage_module

pytestmark = pytest.mark.slow


def test_an_outage_is_retried_and_the_operation_carries_on(own_s3, restart_later, caplog) -> None:
    store = open_storage("s3://faults/lake")
    store.write_bytes("a.bin", b"before")
    own_s3.stop()
    thread = restart_later(own_s3, 2.0)
    with caplog.at_level(logging.WARNING, logger="ingest.storage"):
        store.write_bytes("b.bin", b"during")  # sent while the server is down: retried until it is back
        assert store.read_bytes("a.bin") == b"before"
    thread.join()
    assert store.read_bytes("b.bin") == b"during"
    assert "retrying for up to 120 s" in caplog.text


def test_an_outage_past_the_deadline_is_a_clear_error(own_s3, monkeypatch) -> None:
    monkeypatch.setenv("RECOLOR_S3_RETRY_SECONDS", "2")
    store = open_storage("s3://faults/lake")
    own_s3.stop()
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        store.write_bytes("shard.tar", b"x")
    message = str(error.value)
    assert f"S3 endpoint {own_s3.endpoint} unreachable for 2 s" in message
    assert "s3://faults/lake/shard.tar" in message and "rerunning the same command resumes" in message
    assert time.monotonic() - started < 30  # gave up, did not hang
    assert own_s3.secret_key not in message and own_s3.access_key not in message


def test_refused_credentials_are_a_clear_error_that_shows_no_secret(own_s3, monkeypatch) -> None:
    wrong = "wrong-secret-" + "x" * 24
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StorageError) as error:
        open_storage("s3://faults/lake").write_bytes("a.bin", b"x")
    message = str(error.value)
    assert "S3 refused to write s3://faults/lake/a.bin" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and own_s3.secret_key not in message


def test_a_stream_cut_mid_object_resumes_at_the_byte_it_stopped(own_s3, restart_later) -> None:
    store = open_storage("s3://faults/lake")
    data = os.urandom(48 * 2**20)
    store.write_bytes("big.tar", data)
    with store.open_read("big.tar") as stream:
        head = stream.read(2**20)
        own_s3.stop()  # drops the open connection
        thread = restart_later(own_s3, 1.5)
        rest = stream.read()
    thread.join()
    assert head + rest == data


def test_rclone_ignores_conditional_puts_and_the_probe_says_so(own_s3) -> None:
    # If a later rclone enforces If-None-Match, this fails and the README's table needs updating.
    assert open_storage("s3://faults/lake").conditional_writes() is False


@pytest.mark.parametrize("where", ["local", "s3-claims", "s3-conditional"])
def test_racing_create_exclusive_writes_have_exactly_one_winner(where, request, tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "lake") if where == "local" else "s3://faults/lake"
    if where == "s3-claims":
        request.getfixturevalue("own_s3")
    elif where == "s3-conditional":  # moto honours If-None-Match: *, as AWS S3 and MinIO do
        request.getfixturevalue("moto_s3")
        assert open_storage(uri).conditional_writes()
        monkeypatch.setattr(storage_module.S3Storage, "_claimed_put", None)  # a claim would now fail loudly
    racers = 6
    barrier = threading.Barrier(racers)
    outcomes: dict[int, str] = {}

    def race(number: int) -> None:
        store = open_storage(uri)  # one store per writer, as separate processes would have
        barrier.wait()
        try:
            store.put_if_absent("photos/versions/000001.json", f"writer {number}".encode())
            outcomes[number] = "won"
        except AlreadyExistsError:
            outcomes[number] = "lost"

    threads = [threading.Thread(target=race, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == racers and len(winners) == 1, outcomes
    store = open_storage(uri)
    assert store.read_bytes("photos/versions/000001.json") == f"writer {winners[0]}".encode()
    assert [obj.key for obj in store.list("photos")] == ["photos/versions/000001.json"]  # claims withdrawn


def test_a_crashed_writers_stale_claim_is_ignored_and_a_live_one_waited_for(own_s3, monkeypatch) -> None:
    store = open_storage("s3://faults/lake")
    store.write_bytes("v/000001.json.claims/1-crashed", b"")
    monkeypatch.setattr(storage_module, "CLAIM_WAIT_S", 1.0)
    with pytest.raises(StorageError, match=r"other writers kept claiming it for 1 s"):
        store.put_if_absent("v/000001.json", b"mine")  # the claim is fresh: someone may be writing
    assert not store.exists("v/000001.json")
    monkeypatch.setattr(storage_module, "CLAIM_TTL_S", 0.5)
    time.sleep(1.0)
    store.put_if_absent("v/000001.json", b"mine")  # now it is a crashed writer's: ignored
    assert store.read_bytes("v/000001.json") == b"mine"


def test_unfinished_multipart_uploads_are_listed_on_request_and_aborted_by_delete(own_s3) -> None:
    store = open_storage("s3://faults/lake")
    store.client.create_multipart_upload(Bucket="faults", Key="lake/photos/ingests/x/shards/train.tar")
    assert list(store.list("photos")) == []  # invisible to readers
    partial = list(store.list("photos", include_partial=True))
    assert [obj.key.split("?")[0] for obj in partial] == ["photos/ingests/x/shards/train.tar"]
    store.delete(partial[0].key)
    assert list(store.list("photos", include_partial=True)) == []
