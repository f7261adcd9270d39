"""`ingest.retrying`: the one schedule of waits every retry loop uses, and the loop for calls that may fail."""

from __future__ import annotations

import itertools

import pytest

from ingest.retrying import Backoff, retried
from ingest.storage.retry import BACKOFF


def test_waits_double_up_to_their_cap_and_jitter_stays_within_half_and_all() -> None:
    assert list(itertools.islice(Backoff(1.0).waits(), 4)) == [1.0, 2.0, 4.0, 8.0]
    assert list(itertools.islice(Backoff(0.2, cap_s=0.5).waits(), 4)) == [0.2, 0.4, 0.5, 0.5]
    plain = list(itertools.islice(Backoff(0.2, cap_s=5.0).waits(), 8))
    for _ in range(20):
        jittered = list(itertools.islice(BACKOFF.waits(), 8))  # the S3 layer's
        assert all(wait / 2 <= got <= wait for got, wait in zip(jittered, plain, strict=True))


def test_a_call_is_retried_until_it_returns_with_a_wait_and_a_word_before_each_retry() -> None:
    outcomes = iter([OSError("reset"), OSError("reset"), "done"])

    def call():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    slept, said = [], []
    result = retried(call, 4, Backoff(0.5), lambda e: isinstance(e, OSError),
                     lambda error, attempt, wait: said.append((str(error), attempt, wait)), slept.append)  # fmt: skip
    assert result == "done" and slept == [0.5, 1.0] and said == [("reset", 1, 0.5), ("reset", 2, 1.0)]


def test_an_error_not_worth_retrying_and_the_last_attempts_are_raised_as_they_are() -> None:
    calls = []

    def refused():
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError, match="denied"):
        retried(refused, 5, Backoff(1.0), lambda e: not isinstance(e, PermissionError), sleep=lambda s: None)
    assert len(calls) == 1

    def broken():
        calls.append(1)
        raise OSError("down")

    calls.clear()
    with pytest.raises(OSError, match="down"):
        retried(broken, 3, Backoff(1.0), lambda e: True, sleep=lambda s: None)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        retried(broken, 0, Backoff(1.0), lambda e: True)
