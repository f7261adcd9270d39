"""Waiting before trying again, in one place: `Backoff` is every retry loop's schedule of waits, `retried` the loop
for calls that either succeed or fail with an error worth another try.

Where recolor retries: S3 requests against an unreachable endpoint (`ingest.storage.retry.Retry`: a deadline, not
a count, and jittered waits, so that many clients do not come back at once), checkpoint uploads
(`pipeline.train.checkpoint_store.upload_with_retries`: a count, and a cleanup between tries), and MLflow dataset
inputs that a concurrent run created first (`pipeline.tracking.runs`). Two loops retry without waiting on a schedule
and stay as they are: a lease taken over from a dead holder (`ingest.lease`: a race lost is retried at once, five
times at most) and the S3 claims of a create-exclusive write (`S3Storage._claimed_put`: random waits to break ties).

Kept rather than `tenacity`: these three loops need their own messages (what failed, the attempt, the wait, what to
do next) and a cleanup between tries, which would be as many callbacks as lines here, and one dependency more in
every Ray worker image.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Waits of `first_s`, then `factor` times the one before, at most `cap_s`; with `jitter`, each drawn between
    half and all of that."""

    first_s: float
    factor: float = 2.0
    cap_s: float = float("inf")
    jitter: bool = False

    def waits(self) -> Iterator[float]:
        wait = self.first_s
        while True:
            yield wait * random.uniform(0.5, 1.0) if self.jitter else wait
            wait = min(wait * self.factor, self.cap_s)


def retried(
    call: Callable[[], T],
    attempts: int,
    backoff: Backoff,
    retry_on: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException, int, float], None] = lambda error, attempt, wait: None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`call()` until it returns, at most `attempts` times, waiting `backoff`'s waits between tries.

    An error `retry_on` rejects, or the last attempt's, is raised as it is; before each retry `on_retry(error,
    attempt, wait)` runs (a cleanup, a message).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    waits = backoff.waits()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - `retry_on` decides; the rest is raised below
            if attempt == attempts or not retry_on(error):
                raise
            wait = next(waits)
            on_retry(error, attempt, wait)
            sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")
