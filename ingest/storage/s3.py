"""An S3 bucket and prefix as a store (AWS, MinIO, rclone serve s3, ...), on boto3: retries with a deadline,
resumable streaming reads, multipart uploads, create-exclusive writes by conditional PUT or claims, and one
shared client per process and settings (the S3 settings' only owner: `S3_SETTINGS`, `make_s3_client`).

About 580 lines on purpose: the requests, the translation of their errors and the state they share (the
client cache, the conditional-write probe, the claims) read best together.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ingest import faults
from ingest.errors import one_line
from ingest.storage.base import AlreadyExistsError, ObjectInfo, ObjectUnreadable, StorageError, join_key
from ingest.storage.retry import Retry, http_status, retry_seconds, transient_error

log = logging.getLogger("ingest.storage")


class S3Storage:
    """An S3 bucket and prefix (AWS, MinIO, rclone serve s3, ...).

    `settings` (names of `S3_SETTINGS` and values) take the place of this process's environment:
    an object that travels to another process (Ray's train controller, a worker on another node)
    carries the endpoint and credentials it was made with.
    """

    def __init__(self, bucket: str, prefix: str = "", settings: dict[str, str] | None = None):
        self.bucket = bucket
        self.prefix = prefix
        self.root_uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self.settings = settings
        self._client = None

    @property
    def client(self):
        # Created lazily: a Storage is pickled into Ray tasks, a boto3 client cannot be.
        if self._client is None:
            self._client = make_s3_client(self.settings)
        return self._client

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def _key(self, key: str) -> str:
        # A directory marker (`prefix/`, written by other tools) keeps its slash: it is a key of its own.
        return join_key(self.prefix, key) + ("/" if key.endswith("/") and key.strip("/") else "")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _retry(self, what: str, key: str) -> Retry:
        return Retry(self.client.meta.endpoint_url, what, self.uri(key), retry_seconds(self.settings))

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        """Run one S3 request, retrying while the endpoint is unreachable; translate errors into ours.

        A read or check of one object that keeps failing with a server error (5xx) while the server answers a
        listing of the bucket is not an outage: that object is damaged or gone on the server (a file deleted
        behind `rclone serve s3`'s back, a lost disk under MinIO). After `OBJECT_FAILURES` tries it raises
        `ObjectUnreadable` instead of waiting out the outage deadline.
        """
        retry = self._retry(what, key)
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - sorted below: transient ones are retried, the rest translated
                if not transient_error(e):
                    raise _translate(e, what, self.uri(key)) from None
                failing = what in ("read", "check") and retry.attempts + 1 >= OBJECT_FAILURES and _server_error(e)
                if failing and self._answers():
                    raise ObjectUnreadable(
                        f"{self.uri(key)} cannot be read: the S3 server answers other requests but failed this "
                        f"object {retry.attempts + 1} times ({one_line(e)}): it is damaged or missing there"
                    ) from None
                retry.wait(e)

    def _answers(self) -> bool:
        """Whether the server answers a listing of the bucket now (one request, no retries)."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            return True
        except Exception:  # noqa: BLE001 - any failure: the server is not answering, treat it as an outage
            return False

    def read_bytes(self, key: str) -> bytes:
        with self._body(key) as body:
            return body.read_all()

    def open_read(self, key: str) -> BinaryIO:
        """A stream of the object that survives connection drops: it reopens at the byte it stopped at."""
        # Tar parsing reads in small blocks: buffer the HTTP body in large reads.
        return io.BufferedReader(self._body(key), buffer_size=READ_BUFFER)

    def _body(self, key: str) -> _ResumableBody:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return _ResumableBody(self, key, response)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, local_path: str | Path) -> None:
        # upload_file switches to multipart above 8 MiB; the object appears only when complete.
        self._call(
            "upload",
            key,
            self.client.upload_file,
            str(local_path),
            self.bucket,
            self._key(key),
            Callback=_upload_progress,
        )

    def put_if_absent(self, key: str, data: bytes) -> None:
        """Create `key` only if absent; raises AlreadyExistsError when another writer has it.

        With a store that honours `If-None-Match: *` this is one conditional PUT. Otherwise a
        claim protocol: write a claim object `KEY.claims/ID`, list the claims, and PUT the key only
        if no other live claim is there and the key is still absent; else withdraw and retry after
        a random pause. Two writers A and B cannot both see only their own claim: A's LIST would have
        to precede B's claim PUT and B's LIST precede A's claim PUT, while each PUT precedes its own
        LIST. This needs read-after-write consistent LIST and HEAD (AWS S3, MinIO, rclone on a local
        disk). A claim older than CLAIM_TTL_S (a crashed writer) is ignored; `lake gc` lists it.
        """
        if self.conditional_writes():
            self._conditional_put(key, data)
        else:
            self._claimed_put(key, data)

    def conditional_writes(self) -> bool:
        """Whether the store enforces `If-None-Match: *` (probed once per process, endpoint and bucket).

        `RECOLOR_S3_CONDITIONAL_WRITES=on|off` skips the probe.
        """
        setting = os.environ.get("RECOLOR_S3_CONDITIONAL_WRITES", "auto").lower()
        if setting in ("on", "off"):
            return setting == "on"
        probe_key = (self.client.meta.endpoint_url, self.bucket)
        if probe_key not in _CONDITIONAL:
            probe = join_key(self.prefix, f".recolor-probe/{uuid.uuid4().hex}")
            self._call("write", probe, self.client.put_object, Bucket=self.bucket, Key=probe, Body=b"1")
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                _CONDITIONAL[probe_key] = False
            except Exception as e:  # noqa: BLE001 - a refusal is the answer we hope for
                if not _is_precondition_failure(e):
                    raise
                _CONDITIONAL[probe_key] = True
            finally:
                self._call("delete", probe, self.client.delete_object, Bucket=self.bucket, Key=probe)
            if not _CONDITIONAL[probe_key]:
                log.info("%s ignores conditional PUTs: using claims for create-exclusive writes", self.root_uri)
        return _CONDITIONAL[probe_key]

    def _conditional_put(self, key: str, data: bytes) -> None:
        put = self.client.put_object
        retry = self._retry("write", key)
        retried = False
        while True:
            try:
                put(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return
            except Exception as e:  # noqa: BLE001 - sorted below
                if _is_precondition_failure(e):
                    # After a dropped connection the first PUT may have landed: then the object is ours.
                    if retried and self._holds(key, data):
                        return
                    raise AlreadyExistsError(f"{self.uri(key)} already exists") from None
                if not transient_error(e):
                    raise _translate(e, "write", self.uri(key)) from None
                retried = True
                retry.wait(e)

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.read_bytes(key) == data
        except FileNotFoundError:
            return False

    def _claimed_put(self, key: str, data: bytes) -> None:
        claims = f"{key}.claims"
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            if self.exists(key):
                raise AlreadyExistsError(f"{self.uri(key)} already exists")
            claim = join_key(claims, f"{time.time_ns()}-{uuid.uuid4().hex[:12]}")
            self.write_bytes(claim, b"")
            try:
                now = time.time()
                rivals = [
                    obj
                    for obj in self.list(claims)
                    if obj.key != claim and (obj.modified == 0.0 or now - obj.modified < CLAIM_TTL_S)
                ]
                if not rivals:
                    if self.exists(key):
                        raise AlreadyExistsError(f"{self.uri(key)} already exists")
                    self.write_bytes(key, data)
                    return
            finally:
                self.delete(claim)
            if time.monotonic() > deadline:
                raise StorageError(
                    f"could not create {self.uri(key)}: other writers kept claiming it for {CLAIM_WAIT_S:.0f} s "
                    f"(claims under {self.uri(claims)}); rerun the command"
                )
            time.sleep(random.uniform(0.05, 0.5))

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def size(self, key: str) -> int:
        found = self.info(key)
        if found is None:
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        return found.size

    def list(self, prefix: str = "", include_partial: bool = False, follow_links: bool = True) -> Iterator[ObjectInfo]:
        """Every object below `prefix`; with `include_partial`, also unfinished multipart uploads (size 0)."""
        full = join_key(self.prefix, prefix)
        if full:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self._pages(prefix, full):
            for item in page.get("Contents", []):
                etag = str(item.get("ETag") or "").strip('"') or None
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp(), etag)
        if include_partial:
            for upload in self._multipart_uploads(prefix, full):
                yield ObjectInfo(f"{upload['Key'][strip:]}?uploadId={upload['UploadId']}", 0,
                                 upload["Initiated"].timestamp())  # fmt: skip

    def _pages(self, prefix: str, full_prefix: str) -> Iterator[dict]:
        """ListObjectsV2 pages one at a time, each request retried on its own: a listing of millions of objects
        holds one page (1,000 objects) in memory, not all of them."""
        token, seen = None, set()
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list", prefix, self.client.list_objects_v2, Bucket=self.bucket, Prefix=full_prefix,
                              **extra)  # fmt: skip
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token or token in seen:  # a listing cut short, or going round in circles: never a silent end
                raise StorageError(
                    f"listing {self.uri(prefix)}: the store said there is more but gave "
                    f"{'no' if not token else 'a repeated'} continuation token; the store is misbehaving"
                )
            seen.add(token)

    def _multipart_uploads(self, prefix: str, full_prefix: str) -> list[dict]:
        def uploads() -> list[dict]:
            try:
                return self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full_prefix).get("Uploads", [])
            except Exception as e:
                if getattr(e, "response", {}).get("Error", {}).get("Code") == "NoSuchUpload":
                    return []  # rclone's answer when there are none below a prefix
                raise

        return self._call("list", prefix, uploads)

    def info(self, key: str) -> ObjectInfo | None:
        """The object's size, modification time and ETag (as `list` gives them), or None when there is no such
        object."""
        try:
            head = self._call("check", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None
        etag = str(head.get("ETag") or "").strip('"') or None
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp(), etag)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from byte `start` (fewer at its end)."""
        if length <= 0:
            return b""
        response = self._call(
            "read",
            key,
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Range=f"bytes={start}-{start + length - 1}",
        )
        with _ResumableBody(self, key, response, start=start, end=start + length - 1) as body:
            return body.read_all()

    def list_level(self, prefix: str = "") -> tuple[list[ObjectInfo], list[str]]:
        """The objects directly below `prefix` and the names of its "folders" (common prefixes)."""
        full = join_key(self.prefix, prefix)
        full = full + "/" if full else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"))
        )
        files = [
            ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp())
            for page in pages
            for item in page.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
        folders = sorted({prefix[len(full) :].rstrip("/") for prefix in prefixes})
        return files, folders

    def delete_many(self, keys: list[str]) -> None:
        """Delete `keys` in batches of 1,000 (one request each); absent keys are no error."""
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            objects = {"Objects": [{"Key": self._key(key)} for key in batch], "Quiet": True}
            response = self._call("delete", batch[0], self.client.delete_objects, Bucket=self.bucket, Delete=objects)
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 refused to delete {len(errors)} of {len(batch)} objects, the first s3://{self.bucket}/"
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )

    def copy(self, source_key: str, key: str) -> None:
        """Copy an object within the bucket (server-side)."""
        source = {"Bucket": self.bucket, "Key": self._key(source_key)}
        self._call("copy", key, self.client.copy, source, self.bucket, self._key(key))

    def list_children(self, prefix: str = "", follow_links: bool = True) -> list[str]:
        """Names of the "folders" (common prefixes) directly below `prefix`, sorted."""
        return self.list_level(prefix)[1]

    def delete(self, key: str) -> None:
        name, _, upload_id = key.partition("?uploadId=")
        if upload_id:  # an unfinished multipart upload, as `list(include_partial=True)` names it
            self._call(
                "abort",
                name,
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=self._key(name),
                UploadId=upload_id,
            )
            return
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        """An https URL that reads `key` without credentials for `expires` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )

    def check_writable(self) -> None:
        """A bucket's write permission shows only on a write: this checks what a read can (a refused PUT later
        is one line naming the key)."""
        self.check_access()

    def check_access(self) -> None:
        """Fail early, before anything is written, on a missing bucket or bad credentials."""
        self._call(
            "list",
            "",
            self.client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=self.prefix + "/" if self.prefix else "",
            MaxKeys=1,
        )


READ_BUFFER = 4 * 2**20


CLAIM_TTL_S = 300.0  # a claim older than this is a crashed writer's


CLAIM_WAIT_S = 120.0


_CONDITIONAL: dict[tuple[str, str], bool] = {}


def _upload_progress(_bytes: int) -> None:
    faults.maybe_fail("upload_partial")


def _is_precondition_failure(error: Exception) -> bool:
    import botocore.exceptions

    if not isinstance(error, botocore.exceptions.ClientError):
        return False
    code = error.response.get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or http_status(error) in (409, 412)


class _ResumableBody(io.RawIOBase):
    """An S3 object body as a raw stream; a dropped connection reopens it with a Range from the current
    byte (and If-Match on the ETag, so a replaced object fails instead of mixing two versions)."""

    def __init__(self, storage: S3Storage, key: str, response: dict, start: int = 0, end: int | None = None):
        self._storage, self._key = storage, key
        self._body = response["Body"]
        self._etag = response.get("ETag")
        self._start, self._end = start, end  # the byte range asked for (end inclusive; None: to the object's end)
        self._position = 0  # bytes read so far, from `start`

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read_all(self) -> bytes:
        """The rest of the object, read in large pieces (each resumable), without a buffer in front."""
        pieces = []
        while piece := self._read(READ_BUFFER):
            pieces.append(piece)
        return b"".join(pieces)

    def _read(self, size: int) -> bytes:
        retry = None
        while True:
            try:
                data = self._body.read(size)
                break
            except Exception as e:  # noqa: BLE001 - only transient errors are retried
                if not transient_error(e):
                    raise
                retry = retry or self._storage._retry("read", self._key)
                retry.wait(e)
                self._reopen()
        self._position += len(data)
        return data

    def _reopen(self) -> None:
        storage = self._storage
        extra = {"IfMatch": self._etag} if self._etag else {}
        response = storage._call(
            "read",
            self._key,
            storage.client.get_object,
            Bucket=storage.bucket,
            Key=storage._key(self._key),
            Range=f"bytes={self._start + self._position}-{'' if self._end is None else self._end}",
            **extra,
        )
        self._body.close()
        self._body = response["Body"]

    def close(self) -> None:
        self._body.close()
        super().close()


OBJECT_FAILURES = 3  # server errors on one object, while the server answers others, before it counts as unreadable


def _server_error(error: Exception) -> bool:
    import botocore.exceptions

    return isinstance(error, botocore.exceptions.ClientError) and (
        http_status(error) >= 500 or error.response.get("Error", {}).get("Code", "") in ("InternalError", "500")
    )


_CLIENTS: dict[tuple, object] = {}


# The variables that say how to reach S3: endpoint, region, credentials and this project's knobs.
S3_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "RECOLOR_S3_RETRY_SECONDS",
    "RECOLOR_S3_MAX_ATTEMPTS",
    "RECOLOR_S3_ADDRESSING",
    "RECOLOR_S3_CONDITIONAL_WRITES",
)


def s3_settings() -> dict[str, str]:
    """This process's S3 settings (see `S3_SETTINGS`), to hand to an object that runs elsewhere."""
    return {name: os.environ[name] for name in S3_SETTINGS if name in os.environ}


def s3_endpoint(settings: dict[str, str] | None = None) -> str | None:
    """The S3 endpoint these settings (default: this process's) reach: `AWS_ENDPOINT_URL_S3` before
    `AWS_ENDPOINT_URL`, as the AWS SDKs read them; None for AWS itself. What names a server (a shard cache's keys,
    a printed `aws s3 cp` command) comes from here, as the client's endpoint does."""
    values = s3_settings() if settings is None else settings
    return values.get("AWS_ENDPOINT_URL_S3") or values.get("AWS_ENDPOINT_URL") or None


def make_s3_client(settings: dict[str, str] | None = None):
    """A boto3 S3 client from `settings` (default: the standard environment), with retries for flaky networks.

    One client per process and settings, shared (boto3 clients are thread-safe): creating one
    costs about 0.1 s, and ingest opens a store per source image.
    """
    values = s3_settings() if settings is None else dict(settings)
    key = (os.getpid(), tuple(sorted(values.items())))
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = _new_s3_client(values)
    return client


def _new_s3_client(settings: dict[str, str]):
    import boto3
    from botocore.config import Config

    config = Config(
        # A few quick attempts in botocore; longer outages are retried (with a deadline) by S3Storage._call.
        retries={"max_attempts": int(settings.get("RECOLOR_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # Path-style addressing works for MinIO and rclone as well as AWS.
        s3={"addressing_style": settings.get("RECOLOR_S3_ADDRESSING", "path")},
        max_pool_connections=32,
        # SigV4 for presigned URLs too (botocore presigns with V2 without a region; MinIO and rclone refuse V2).
        signature_version="s3v4",
        # Checksums only where S3 requires them: S3-compatible servers (rclone, older MinIO) reject the
        # streaming (aws-chunked) uploads that the SDK's default sends, and AWS accepts either.
        request_checksum_calculation=settings.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required").lower(),
        response_checksum_validation=settings.get("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required").lower(),
    )
    region = settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session(profile_name=settings.get("AWS_PROFILE"))
    return session.client(
        "s3",
        region_name=region,
        config=config,
        endpoint_url=s3_endpoint(settings),
        aws_access_key_id=settings.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=settings.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=settings.get("AWS_SESSION_TOKEN"),
    )


def _translate(error: Exception, what: str, uri: str) -> Exception:
    """Our exception for a failed S3 request: FileNotFoundError or a StorageError saying what to do."""
    import boto3.exceptions
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        return _translate_client_error(error, what, uri)
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return StorageError(
            f"no S3 credentials to {what} {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)"
        )
    if isinstance(error, boto3.exceptions.S3UploadFailedError):
        return StorageError(f"S3 upload failed while trying to {what} {uri}: {one_line(error)}")
    return error


def _translate_client_error(error, what: str, uri: str) -> Exception:
    code = error.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{uri} does not exist")
    if code == "NoSuchBucket":
        bucket = uri.split("/")[2]
        return StorageError(f"S3 bucket {bucket!r} does not exist (while trying to {what} {uri}): create it first")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or http_status(error) == 403:
        return StorageError(
            f"S3 refused to {what} {uri} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the "
            "bucket's permissions"
        )
    return StorageError(f"S3 error {code or http_status(error)} while trying to {what} {uri}: {error}")
