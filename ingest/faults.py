"""Named failpoints for fault-injection tests (as etcd's gofail or TiKV's fail-rs).

`RECOLOR_FAILPOINT=NAME:N` kills the process (SIGKILL, no cleanup, like a crash or an OOM kill)
the N-th time it reaches `maybe_fail(NAME)`. Unset, a failpoint costs one dict lookup.
Points: `shard_upload` (a shard written locally, not uploaded), `chunk_result` (shards uploaded,
result record not written), `manifest` (all chunks done, manifest not written), `commit`
(manifest written, version record not written).
"""

from __future__ import annotations

import os
import signal

ENV = "RECOLOR_FAILPOINT"
_hits: dict[str, int] = {}


def maybe_fail(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
