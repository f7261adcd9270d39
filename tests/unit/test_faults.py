"""Failpoints: each action fires exactly at the N-th hit, only where asked."""

from __future__ import annotations

import threading

import pytest

from ingest import faults


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.setattr(faults, "_hits", {})
    for name in (faults.ENV, faults.ONCE_ENV, faults.BARRIER_ENV):
        monkeypatch.delenv(name, raising=False)


def test_raise_fires_at_the_nth_hit_only(monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV, "checkpoint_upload:2:raise")
    faults.maybe_fail("checkpoint_upload")
    faults.maybe_fail("shard_write")  # another point: not counted
    with pytest.raises(faults.InjectedFault, match="checkpoint_upload"):
        faults.maybe_fail("checkpoint_upload")
    faults.maybe_fail("checkpoint_upload")  # the third time passes: one transient failure


def test_rank_filter_and_once_marker(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(faults.ENV, "train_step:1@1:raise")
    faults.maybe_fail("train_step", rank=0)  # other ranks pass
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path / "fired"))
    with pytest.raises(faults.InjectedFault):
        faults.maybe_fail("train_step", rank=1)
    assert (tmp_path / "fired").exists()
    monkeypatch.setattr(faults, "_hits", {})  # a restarted process counts afresh, but the marker holds it back
    faults.maybe_fail("train_step", rank=1)


def test_barrier_holds_each_arrival_until_all_have_come(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(faults.ENV, "commit:1:barrier")
    monkeypatch.setenv(faults.BARRIER_ENV, f"{tmp_path / 'meet'}:2")
    passed = threading.Event()
    thread = threading.Thread(target=lambda: (faults.maybe_fail("commit"), passed.set()), daemon=True)
    thread.start()
    assert not passed.wait(0.5)  # alone at the barrier: waits
    (tmp_path / "meet" / "other").touch()
    thread.join(timeout=10)
    assert passed.is_set()


def test_an_unknown_action_is_named(monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV, "commit:1:explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        faults.maybe_fail("commit")
