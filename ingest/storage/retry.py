"""Which S3 failures are worth retrying, and the backoff with a deadline (`RECOLOR_S3_RETRY_SECONDS`) that waits
them out before a `StorageError` says what to do."""

from __future__ import annotations

import logging
import os
import time

from ingest.errors import one_line
from ingest.retrying import Backoff
from ingest.storage.base import StorageError

log = logging.getLogger("ingest.storage")


def retry_seconds(settings: dict[str, str] | None = None) -> float:
    return float((os.environ if settings is None else settings).get("RECOLOR_S3_RETRY_SECONDS", "120"))


BACKOFF = Backoff(0.2, cap_s=5.0, jitter=True)  # 0.2 s doubling to 5 s, each drawn in [half, all]


class Retry:
    """Backoff for one operation against an unreachable endpoint: 0.2 s doubling to 5 s, with jitter,
    until `RECOLOR_S3_RETRY_SECONDS` after the first failure; then a StorageError that says what to do."""

    def __init__(self, endpoint: str, what: str, uri: str, limit_s: float):
        from ingest.cluster import mask_secrets

        # Every line below names the endpoint: a password in AWS_ENDPOINT_URL is masked once, here.
        self.endpoint, self.what, self.uri, self.limit_s = mask_secrets(str(endpoint)), what, uri, limit_s
        self.deadline: float | None = None
        self.waits = BACKOFF.waits()
        self.attempts = 0

    def wait(self, error: Exception) -> None:
        now = time.monotonic()
        limit = self.limit_s
        if self.deadline is None:
            self.deadline = now + limit
            log.warning(
                "S3 endpoint %s failed to %s %s (%s); retrying for up to %.0f s",
                self.endpoint,
                self.what,
                self.uri,
                one_line(error),
                limit,
            )
        self.attempts += 1
        if now >= self.deadline:
            raise StorageError(
                f"S3 endpoint {self.endpoint} unreachable for {limit:.0f} s ({self.attempts} attempts) while trying "
                f"to {self.what} {self.uri}: {one_line(error)}. Check that the server is up and AWS_ENDPOINT_URL; "
                "rerunning the same command resumes where this one stopped"
            ) from None
        time.sleep(min(next(self.waits), self.deadline - now))


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}


def transient_error(error: Exception) -> bool:
    """Connection trouble or a server-side hiccup, worth retrying (not a 4xx that will answer the same)."""
    import boto3.exceptions
    import botocore.exceptions
    import urllib3.exceptions

    if isinstance(
        error,
        (
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.IncompleteReadError,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    if isinstance(error, botocore.exceptions.ClientError):
        return http_status(error) >= 500 or error.response.get("Error", {}).get("Code", "") in _TRANSIENT_CODES
    if isinstance(error, boto3.exceptions.S3UploadFailedError):
        text = str(error)
        return any(f"({code})" in text for code in _TRANSIENT_CODES) or any(
            f"({status})" in text for status in ("500", "502", "503", "504")
        )
    return False


def http_status(error) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
