"""Named failpoints for fault-injection tests (as etcd's gofail or TiKV's fail-rs).

`RECOLOR_FAILPOINT=NAME:N` kills the process (SIGKILL, no cleanup, like a crash or an OOM kill)
the N-th time it reaches `maybe_fail(NAME)`; `NAME:N@R` only in the process that passes rank R.
With `RECOLOR_FAILPOINT_ONCE=PATH` it fires once: it creates PATH before killing and stays quiet
while PATH exists (a restarted worker must not die again). Unset, a failpoint costs one lookup.
Points: `shard_upload` (a shard written locally, not uploaded), `chunk_result` (shards uploaded,
result record not written), `manifest` (all chunks done, manifest not written), `commit`
(manifest written, version record not written), `train_step` (a training step about to run).
"""

from __future__ import annotations

import os
import signal

ENV = "RECOLOR_FAILPOINT"
ONCE_ENV = "RECOLOR_FAILPOINT_ONCE"
_hits: dict[str, int] = {}


def maybe_fail(name: str, rank: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, only_rank = rest.partition("@")
    if only_rank and rank != int(only_rank):
        return
    once = os.environ.get(ONCE_ENV)
    if once and os.path.exists(once):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        if once:
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
