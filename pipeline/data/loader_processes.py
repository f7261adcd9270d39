"""Loader processes: `data.loader_workers` N > 1 as N processes that make one rank's shuffle windows.

Threads cannot: past its checksum and copy, what a sample costs is tar headers and Python under one interpreter
lock, so 2 threads read 0.9x what one does (bench/loader.py). Here the epoch's shards are dealt out: process k opens
every Nth shard the stream opens (`owned_items`), reads, checks and decodes only its own samples, and writes each,
mirrored and rotated, to its shuffled row of the window's block, a block of shared memory (memfd) the training
process lent to all N. Every process knows every window's layout without reading the others' shards (the stream's
order and each window's draws are pure functions of the plan, the seed and the epoch), so the training process
gets the same samples, draws and counts as from one thread (`pipeline.data.batches.train_blocks`), in the same order,
whatever N; nothing is copied between processes. 2 processes read 1.85x what one does on 2 cores.

    training process                              loader process k of N
    lend block b for window w to all  ---------->  fill the rows of window w's items from its own shards
    yield block b as batches          <----------  (w, its length, [(index, shard, key, ok)], cache bytes)

A corrupt sample's row is filled by the training process (it needs the whole window's verdicts), reading the good
sample again: rare (`data.max_bad_fraction`). A block stays the training process's: once no batch cut from it is
left, the pool lends it again (N + 1 blocks lent, plus those the consumer holds: about (N + 3) x 100 MB at the
default `shuffle_window` 512). The processes (about 0.1 s to start: numpy, not torch) and their blocks are kept
from epoch to epoch; an epoch closed early stops them, and one that dies stops the epoch with a `DataError` naming
it. They open the shards themselves: a local lake, or S3 through the node's shard cache (`ShardCache`), which
`pipeline.data.batches` checks. Linux only (memfd); elsewhere, and without a cache on S3, threads.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

from pipeline.data.plan import DataError

log = logging.getLogger(__name__)

AHEAD = 1  # windows lent ahead of the one the training process waits for, past one a process (measured)
DONE = ("done",)  # after a job's end: no more blocks for it
DRAINED = ("drained",)  # the answer: the blocks lent past the end were taken


def available() -> bool:
    """Whether this platform has what the processes use (Linux's memfd, file descriptors sent over a socket)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "AF_UNIX")


class SharedStorages:
    """`BlockPool`'s allocator for loader processes: each storage a memfd's map, its descriptor kept (in the pool's
    order) to lend it to a process."""

    def __init__(self):
        self.fds: list[int] = []

    def __call__(self, nbytes: int) -> np.ndarray:
        fd = os.memfd_create("recolor-window", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            mapped = _map(fd, nbytes)
        except OSError:
            os.close(fd)
            raise
        self.fds.append(fd)
        return np.frombuffer(mapped, dtype=np.uint8)

    def close(self) -> None:
        """Close the descriptors (the maps last as long as a block of them does)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _map(fd: int, nbytes: int) -> mmap.mmap:
    """A shared map of a memfd, its pages mapped at once (`MAP_POPULATE`): a block's 12,000 page faults, taken one
    by one in each process, cost more than filling it."""
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


def process_windows(job: dict, count: int, cache=None) -> Iterator[tuple]:
    """`_window_block` results ([(shard, key, ok)], block or None, first shard) of the windows `job` describes, in
    window order, made by `count` loader processes: an idle group of this process's, or a new one. `job` is
    {"stream": the rank's `EpochStream`, "cache": (root, capacity) of the node's shard cache or None}; each process
    is sent it with its "index" and the "count". The shard cache's bytes (`cache.stats`) are added at the end."""
    group = _acquire(count, job["stream"].block_bytes)
    ended = False
    try:
        yield from group.windows(job, cache)
        ended = True
    finally:
        _release(group, ended)


_IDLE: list[LoaderGroup] = []
MAX_IDLE = 2  # idle groups kept: a run uses one shape (workers, window); benchmarks and tests, several
_IDLE_LOCK = threading.RLock()  # reentrant: the GC may close a suspended epoch (and release its group) while held


def _acquire(count: int, nbytes: int) -> LoaderGroup:
    """An idle group of this shape whose processes are all alive (one that died between epochs, to the OOM killer
    say, is stopped), or a new one."""
    with _IDLE_LOCK:
        shaped = [group for group in _IDLE if (group.count, group.pool.nbytes) == (count, nbytes)]
        for group in shaped:
            _IDLE.remove(group)
    for group in shaped:
        if group.alive():
            return group
        group.close()
    return LoaderGroup(count, nbytes)


def _release(group: LoaderGroup, ended: bool) -> None:
    """Keep a group whose processes all ended their stream for the next epoch (one idle group for each shape);
    stop any other (closed mid-epoch, or failed)."""
    stopped = [group]
    with _IDLE_LOCK:
        if ended and group.alive() and not any((g.count, g.pool.nbytes) == (group.count, group.pool.nbytes)
                                               for g in _IDLE):  # fmt: skip
            _IDLE.append(group)
            stopped = _IDLE[:-MAX_IDLE]  # the oldest shapes past the limit
            del _IDLE[:-MAX_IDLE]
    for old in stopped:
        old.close()


@atexit.register
def close_idle() -> None:
    """Stop the idle groups' processes (they also end by themselves when this process does)."""
    with _IDLE_LOCK:
        groups, _IDLE[:] = list(_IDLE), []
    for group in groups:
        group.close()


class LoaderGroup:
    """`count` loader processes and the shared blocks they fill (`BlockPool`), kept from epoch to epoch: a process
    starts in about 0.1 s and maps each block once."""

    def __init__(self, count: int, nbytes: int):
        from pipeline.data.reading import BlockPool

        self.count = count
        self.broken = False  # out of step with a process: never reused
        self.storages = SharedStorages()
        self.pool = BlockPool(nbytes, self.storages)
        self.processes: list[subprocess.Popen] = []
        self.connections: list[Connection] = []
        self.known: list[set[int]] = [set() for _ in range(count)]  # the blocks each process has mapped
        try:
            for index in range(count):
                process, connection = _start(index)
                self.processes.append(process)
                self.connections.append(connection)
        except BaseException:
            self.close()
            raise
        log.info("started %d loader processes (pids %s)", count, ", ".join(str(p.pid) for p in self.processes))

    def alive(self) -> bool:
        return not self.broken and all(process.poll() is None for process in self.processes)

    def windows(self, job: dict, cache) -> Iterator[tuple]:
        from pipeline.data.reading import shaped

        lent: dict[int, tuple[int, np.ndarray]] = {}  # window number -> (block index, storage)
        stats = [0, 0]  # bytes from the store, bytes from the cache
        stream = job["stream"]
        first = stream.first_window
        try:
            for index in range(self.count):
                self._send(index, {**job, "index": index, "count": self.count})
            number = lend = first
            while True:
                while lend < number + AHEAD + self.count:  # every process fills part of every window
                    slot, storage = self.pool.take()
                    lent[lend] = (slot, storage)
                    for index in range(self.count):
                        self._lend(index, slot)
                    lend += 1
                parts = [self._receive(index) for index in range(self.count)]
                for part in parts:
                    stats[0] += part[-2]
                    stats[1] += part[-1]
                kinds = {part[0] for part in parts}
                if kinds == {"end"}:
                    self._drain()
                    return
                lengths = {part[2] for part in parts if part[0] == "window"}
                if kinds != {"window"} or {part[1] for part in parts} != {number} or len(lengths) != 1:
                    raise DataError(f"the loader processes disagree on window {number}: {[p[:3] for p in parts]}")
                length = lengths.pop()
                window = stream.shuffle_window(number, length)
                slot, storage = lent.pop(number)
                block = shaped(storage, length - window.start, window.size)
                del storage
                records = [record for part in parts for record in part[3]]
                where = {index: (uri, key) for index, uri, key, _ in records}
                yield window.finish(block, records, lambda wanted, where=where: reread(wanted, where, job, cache))
                del block
                number += 1
        finally:
            lent.clear()
            if cache is not None:
                cache.stats.add(store=stats[0], cache=stats[1])

    def _drain(self) -> None:
        """After every process's end: each drains the blocks lent past it and says so, or the group is not kept
        (what a process says after its end must never reach the next epoch)."""
        for index in range(self.count):
            try:
                self.connections[index].send(DONE)
                if self.connections[index].recv() != DRAINED:
                    self.broken = True
            except Exception:  # noqa: BLE001 - died, failed, or out of step: the epoch was whole, the group is not
                self.broken = True

    def _send(self, index: int, message) -> None:
        try:
            self.connections[index].send(message)
        except OSError as e:
            raise self._died(index) from e

    def _lend(self, index: int, slot: int) -> None:
        """Lend block `slot` to process `index` for its next window (with the block's descriptor, the first time)."""
        fresh = slot not in self.known[index]
        try:
            self.connections[index].send((slot, fresh))
            if fresh:
                send_handle(self.connections[index], self.storages.fds[slot], self.processes[index].pid)
                self.known[index].add(slot)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died: its end of the socket, read next, says how
        except OSError as e:  # alive, but the message or descriptor did not go (EMFILE...): out of step from here
            raise DataError(f"cannot lend a block to loader process {index}: {e}") from e

    def _receive(self, index: int):
        try:
            message = self.connections[index].recv()
        except (EOFError, OSError) as e:
            raise self._died(index) from e
        if message[0] == "error":
            _, error, text = message
            if not isinstance(error, BaseException):
                error = DataError(str(error))
            where = f"in loader process {index} (pid {self.processes[index].pid}):\n{text}"
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(where)
            else:  # pragma: no cover - Python 3.10
                log.error("%s", where)
            raise error
        return message

    def _died(self, index: int) -> DataError:
        process = self.processes[index]
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = ("is not answering" if code is None else
               f"was killed by signal {-code}" if code < 0 else f"exited ({code})")  # fmt: skip
        return DataError(
            f"loader process {index} (pid {process.pid}) {how}; its error output, if any, is above. Out of memory? "
            "`data.loader_workers: 1` reads in the training process"
        )

    def close(self) -> None:
        """Stop the processes (a process mid-window is killed: a cache fill it leaves is never trusted) and let the
        blocks go."""
        for connection in self.connections:
            connection.close()  # a process waiting for a job or a block reads the end and exits
        for process in self.processes:
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.connections, self.processes = [], []
        self.storages.close()


def reread(wanted: set[int], where: dict[int, tuple[str, str]], job: dict, cache) -> dict[int, tuple]:
    """The items (uri, key, lab bytes, json bytes) of the window's samples `wanted` (indexes; `where`: index ->
    (uri, key)), read again by the training process, one pass a shard: the good samples that take corrupt ones'
    places (rare: `data.max_bad_fraction`). A sample no longer there comes back as (uri, key, None, None)."""
    from ingest.shards import iter_samples
    from pipeline.data.reading import open_shard, shard_openers

    by_shard: dict[str, dict[str, list[int]]] = {}
    for index in wanted:
        uri, key = where[index]
        by_shard.setdefault(uri, {}).setdefault(key, []).append(index)
    items = {index: (*where[index], None, None) for index in wanted}
    openers = shard_openers(list(by_shard), job["stream"].segments, open_shard, 0, 1, cache)
    for (uri, keys), opener in zip(by_shard.items(), openers, strict=True):
        left = set(keys)
        with opener() as stream:
            for sample in iter_samples(stream, views=True):
                if sample["__key__"] in left:
                    for index in keys[sample["__key__"]]:
                        items[index] = (uri, sample["__key__"], sample.get("lab.npy"), sample.get("json"))
                    left.discard(sample["__key__"])
                    if not left:
                        break
    return items


def _start(index: int) -> tuple[subprocess.Popen, Connection]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    # The child imports this package as the training process does (a Ray job's working_dir, an editable install).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.data.loader_processes", str(theirs.fileno()), str(index)],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, Connection(ours.detach())


# --- the loader process ----------------------------------------------------------------------------------------


def serve(connection: Connection) -> None:
    """One loader process: for each job (an epoch), fill its part of each window into the block it is lent, until
    the stream ends; until the connection ends."""
    from pipeline.data.shard_cache import node_cache

    storages: dict[int, np.ndarray] = {}  # the blocks lent so far, mapped
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return  # the training process is done with this group
        cache = node_cache(*job["cache"]) if job["cache"] else None
        serve_job(connection, job, cache, storages)


def serve_job(connection: Connection, job: dict, cache, storages: dict[int, np.ndarray]) -> None:
    from pipeline.data.reading import shaped

    def lent() -> int | None:
        """The block lent for the next window (None: the job is done), mapped the first time."""
        message = connection.recv()
        if message == DONE:
            return None
        slot, fresh = message
        if fresh:
            fd = recv_handle(connection)
            storages[slot] = np.frombuffer(_map(fd, job["stream"].block_bytes), dtype=np.uint8)
            os.close(fd)
        return slot

    for number, length, items in owned_items(job, cache):
        slot = lent()
        window = job["stream"].shuffle_window(number, length)
        records = window.fill(shaped(storages[slot], length - window.start, window.size), items)
        store, cached = cache.stats.take() if cache is not None else (0, 0)
        connection.send(("window", number, length, records, store, cached))
    store, cached = cache.stats.take() if cache is not None else (0, 0)
    connection.send(("end", store, cached))
    while lent() is not None:
        pass  # lent past the stream's end
    connection.send(DRAINED)


def owned_items(job: dict, cache) -> Iterator[tuple[int, int, list[tuple[int, tuple]]]]:
    """(window number, its length, [(index in the window, item)]) of each window of the job's stream
    (`EpochStream.groups`, what `read_segments` reads), with the items of the shards this process owns: every
    `count`th shard opened, from the `index`th. Each process reads only its own shards; all of them agree on every
    window's items."""
    from pipeline.data.reading import no_samples, open_shard, segment_samples, shard_openers

    epoch = job["stream"]
    pending = epoch.groups()
    opened = [(g, j) for g, group in enumerate(pending)
              for j, (segment, start) in enumerate(zip(group.segments, group.offsets, strict=True))
              if start < segment.stop]  # fmt: skip
    mine = {pair for ordinal, pair in enumerate(opened) if ordinal % job["count"] == job["index"]}
    uris = [pending[g].segments[j].shard.uri for g, j in opened if (g, j) in mine]
    openers = shard_openers(uris, epoch.segments, open_shard, None, epoch.interleave, cache)
    window, number, position, items = epoch.window, epoch.first_window, 0, []
    for g, group in enumerate(pending):
        streams = [
            segment_samples(segment, start, next(openers), verify=False) if (g, j) in mine else no_samples()
            for j, (segment, start) in enumerate(zip(group.segments, group.offsets, strict=True))
        ]
        for j in group.order:
            if (g, j) in mine:
                items.append((position, next(streams[j])))
            position += 1
            if position == window:
                yield number, window, items
                number, position, items = number + 1, 0, []
        for stream in streams:
            stream.close()
    if position:
        yield number, position, items


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format=f"loader process {sys.argv[2]}: %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle: it stops this one
    connection = Connection(int(sys.argv[1]))
    try:
        serve(connection)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the training process closed the epoch early (or is gone): nothing to report to
    except BaseException as e:  # noqa: BLE001 - sent to the training process, which raises it
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))  # some exceptions pickle but do not unpickle (botocore's ClientError)
            connection.send(("error", e, text))
        except Exception:  # noqa: BLE001 - not picklable: its words then
            with contextlib.suppress(OSError):
                connection.send(("error", f"{type(e).__name__}: {e}", text))
        sys.exit(1)


if __name__ == "__main__":
    main()
