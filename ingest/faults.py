"""Named failpoints for fault-injection tests (as etcd's gofail or TiKV's fail-rs).

`RECOLOR_FAILPOINT=NAME:N[@R][:ACTION]` acts the N-th time the process reaches `maybe_fail(NAME)`;
with `@R` only in the process that passes rank R. Actions:

- `kill` (the default): SIGKILL, no cleanup, like a crash or an OOM kill.
- `raise`: raise `InjectedFault` (an OSError) that one time, like a dropped connection.
- `flag`: return True that one time (the caller acts: `loss_nan` makes a step's losses NaN).
- `barrier`: wait until `RECOLOR_FAILPOINT_BARRIER=DIR:COUNT` holds COUNT arrivals (each process
  adds a file to DIR), so that racing processes meet at the same point; then go on.

With `RECOLOR_FAILPOINT_ONCE=PATH` it fires once across processes: it creates PATH when it fires
and stays quiet while PATH exists (a restarted worker must not die again). Unset, a failpoint
costs one lookup.

Points (ingest): `shard_write` (a shard half written), `shard_upload` (a shard written locally,
not uploaded), `upload_partial` (an object's bytes partly sent or written, not published),
`chunk_result` (shards uploaded, result record not written), `manifest` (all chunks done, manifest
not written), `commit` (manifest written, version record not written).
Points (training): `train_step` (a training step about to run), `checkpoint_upload` (a checkpoint
about to be uploaded), `loss_nan` (with `flag`: a step's losses turn NaN).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from ingest.errors import ConfigError

ENV = "RECOLOR_FAILPOINT"
ONCE_ENV = "RECOLOR_FAILPOINT_ONCE"
BARRIER_ENV = "RECOLOR_FAILPOINT_BARRIER"
BARRIER_TIMEOUT_S = 120.0
_hits: dict[str, int] = {}
_quiet = threading.local()


@contextlib.contextmanager
def suppressed():
    """No failpoint fires in this thread inside the block (bookkeeping writes, such as a lease's, that a drill's
    count of writes must not include)."""
    previous = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = previous


class InjectedFault(OSError):
    """The error a `raise` failpoint throws."""


def maybe_fail(name: str, rank: int | None = None) -> bool:
    """Act if `$RECOLOR_FAILPOINT` names this point and this is its N-th hit; True when a `flag` fired."""
    spec = os.environ.get(ENV)
    if not spec or getattr(_quiet, "on", False):
        return False
    target, _, rest = spec.partition(":")
    if target != name:
        return False
    count, _, action = rest.partition(":")
    count, _, only_rank = count.partition("@")
    if only_rank and rank != int(only_rank):
        return False
    once = os.environ.get(ONCE_ENV)
    if once and os.path.exists(once):
        return False
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(count or 1):
        return False
    if once:
        open(once, "w").close()
    action = action or "kill"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected fault at failpoint {name!r}")
    elif action == "barrier":
        _barrier(name)
    elif action == "flag":
        return True
    else:
        raise ConfigError(f"{ENV}={spec!r}: unknown action {action!r} (kill, raise, barrier or flag)")
    return False


def _barrier(name: str) -> None:
    setting = os.environ.get(BARRIER_ENV, "")
    directory, _, count = setting.rpartition(":")
    if not directory or not count.isdigit():
        raise ConfigError(f"failpoint {name!r} is a barrier: set {BARRIER_ENV}=DIR:COUNT")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while sum(1 for _ in folder.iterdir()) < int(count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"failpoint barrier {name!r}: fewer than {count} arrivals in {BARRIER_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
