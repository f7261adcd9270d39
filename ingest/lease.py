"""Leases: how a running writer tells `recolor lake gc` (and a second copy of itself) "this is mine, I am alive".

A lease is a small JSON object (`holder`, `host`, `pid`, `renewed`, `ttl`) that its holder rewrites every
`ttl / 5` seconds from a background thread while the work runs, and deletes when it ends. It is live while
it was renewed less than `ttl` seconds ago, by the holder's clock as written in the lease and by the store's
modification time, whichever is later, so a reader with a slow clock errs on the side of "live". A holder that
dies (SIGKILL, OOM, a lost node) stops renewing: its lease expires after `ttl` at most, at once when the reader
runs on the same host and sees that the holder's process is gone.

Ingest and `lake repair` hold `<dataset>/ingests/<id>/lease.json` while they write below that folder (gc leaves
the whole folder alone); a training run holds `<run storage>/<name>/.recolor-run.lease` (a second run of the same
name is refused while it is live).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from ingest import faults
from ingest.errors import RecolorError
from ingest.storage import AlreadyExistsError, Storage

log = logging.getLogger(__name__)

TTL_ENV = "RECOLOR_LEASE_TTL_S"
DEFAULT_TTL_S = 600.0
LEASE_FILE = "lease.json"


def lease_ttl() -> float:
    """The lease lifetime: `$RECOLOR_LEASE_TTL_S` (tests set a few seconds), else 10 minutes."""
    try:
        return max(1.0, float(os.environ.get(TTL_ENV, DEFAULT_TTL_S)))
    except ValueError:
        return DEFAULT_TTL_S


@dataclass(frozen=True)
class LeaseState:
    """A lease as read back: who holds it and whether it is still live."""

    key: str
    holder: str
    host: str
    pid: int
    renewed: float  # seconds since the epoch, the later of the holder's clock and the store's
    ttl: float
    live: bool
    token: str = ""  # the holder's, to tell its lease from a successor's

    def describe(self) -> str:
        age = max(0.0, time.time() - self.renewed)
        return f"pid {self.pid} on {self.host}, renewed {age:.0f} s ago"


def _machine() -> str:
    """Who can judge a pid: the host name, its boot, and the pid namespace (containers sharing a host name but
    not their processes must not take each other's live holders for dead)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(open(path).read().strip())
        except OSError:
            parts.append("?")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")
    return "/".join(parts)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def read_lease(storage: Storage, key: str, modified: float | None = None) -> LeaseState | None:
    """The lease stored at `key`, or None when there is none. An unreadable lease counts as live until it is
    `ttl` old by the store's clock: a half-understood claim is never taken for an abandoned one."""
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    if modified is None:
        info = getattr(storage, "info", None)
        found = info(key) if info else None
        modified = found.modified if found else time.time()
    try:
        lease = json.loads(data)
        holder, host, pid = str(lease["holder"]), str(lease["host"]), int(lease["pid"])
        renewed, ttl = max(float(lease["renewed"]), modified), float(lease["ttl"])
        token, machine = str(lease.get("token", "")), str(lease.get("machine", ""))
    except (ValueError, KeyError, TypeError):
        ttl = lease_ttl()
        return LeaseState(key, "?", "?", 0, modified, ttl, time.time() - modified < ttl)
    live = time.time() - renewed < ttl
    if live and machine == _machine() and "?" not in machine and not _process_alive(pid):
        live = False  # its process is gone (same host, boot and pid namespace): nobody will renew it
    return LeaseState(key, holder, host, pid, renewed, ttl, live, token)


class LeaseHeld(RecolorError):
    """An exclusive lease is live in another process: the work it guards is running elsewhere."""

    def __init__(self, message: str, state: LeaseState):
        super().__init__(message)
        self.state = state


class Lease:
    """Hold a lease at `key` while a `with` block runs: written on entry, renewed in the background, deleted on
    exit. `holder` names the work (shown to whoever finds the lease).

    With `exclusive`, entering takes the lease only if nobody else holds it live (a create-exclusive write; a dead
    holder's lease is removed first), else raises `LeaseHeld` naming the holder.
    """

    def __init__(self, storage: Storage, key: str, holder: str, ttl: float | None = None, exclusive: bool = False):
        self.storage, self.key, self.holder = storage, key, holder
        self.exclusive = exclusive
        self.ttl = ttl or lease_ttl()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "machine": _machine(), "renewed": time.time(), "ttl": self.ttl,
                           "token": self.token}).encode()  # fmt: skip

    def _write(self) -> None:
        with faults.suppressed():  # a drill counts the work's writes, not the lease's
            self.storage.write_bytes(self.key, self._payload())

    def _take(self) -> None:
        """The create-exclusive write of an exclusive lease (see the class)."""
        for _ in range(5):
            try:
                with faults.suppressed():
                    self.storage.put_if_absent(self.key, self._payload())
                return
            except AlreadyExistsError:
                state = read_lease(self.storage, self.key)
                if state is not None and state.live:
                    raise LeaseHeld(f"{self.storage.uri(self.key)} is held by {state.holder} ({state.describe()})",
                                    state) from None  # fmt: skip
                if state is not None:
                    again = read_lease(self.storage, self.key)
                    if again is not None and again.token != state.token:
                        continue  # another taker replaced it meanwhile: judge the new one
                    log.warning("taking over %s: its holder (%s) is gone", self.storage.uri(self.key),
                                state.describe())  # fmt: skip
                    self.storage.delete(self.key)
        raise LeaseHeld(f"{self.storage.uri(self.key)}: could not take the lease (others keep taking it)",
                        LeaseState(self.key, "?", "?", 0, time.time(), self.ttl, True))  # fmt: skip

    def _ours(self) -> bool:
        """Whether the stored lease is still this holder's (or gone), read just before each renewal and before the
        removal on exit, so that a holder which stalled past its lifetime does not renew or remove a successor's.

        The remaining risk, stated: the read and the write after it are two requests, not one conditional write
        (the stores here offer create-exclusive writes, not compare-and-swap: rclone has no `If-Match` on PUT, a
        local folder no atomic replace-if-unchanged). A successor can only take the lease once it expired, that is
        after this holder missed five renewals in a row (`ttl`, renewed every `ttl / 5`). For this holder to then
        overwrite or remove the successor's lease, the takeover must land inside the milliseconds between this read
        and the write that follows it, after such a stall. Should it happen, both believe they hold the lease until
        the successor's next renewal reads a foreign token and stops: one of them writes on without a lease, which
        is what the lease exists to prevent, so the window is kept to one read and one write."""
        state = read_lease(self.storage, self.key)
        return state is None or state.token in (self.token, "")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            try:
                if self.exclusive and not self._ours():
                    log.warning("the lease %s was taken over while this process held it (it stalled past its "
                                "lifetime): no longer renewing it", self.storage.uri(self.key))  # fmt: skip
                    return
                self._write()
            except Exception as e:  # an outage: the next renewal tries again, well within the lifetime
                log.warning("could not renew the lease %s: %s", self.storage.uri(self.key), e)

    def __enter__(self) -> Lease:
        if self.exclusive:
            self._take()
        else:
            self._write()
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self._ours():
                self.storage.delete(self.key)
        except Exception as e:
            log.warning("could not remove the lease %s (it expires by itself): %s", self.storage.uri(self.key), e)


def ingest_lease_key(dataset: str, ingest_id: str) -> str:
    return f"{dataset}/ingests/{ingest_id}/{LEASE_FILE}"
