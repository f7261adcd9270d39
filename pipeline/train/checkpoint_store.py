"""A run's checkpoints on Ray Train: uploads (retried, in the background), the choice of checkpoint to resume
from (the latest, else the newest older one that loads), and Ray Train's record of them repaired before a rerun.

Faults. On a Ray Train worker, `upload_checkpoint` retries a failed upload with backoff after
removing its partial copy (`upload_with_retries`), and `resume_payload` passes over a latest
checkpoint that is missing or does not load for the newest older one that does (`fallback_order`,
`first_readable`), so a bad write costs the steps since the checkpoint before it, not the run;
with none left the run starts over instead of failing at every rerun. On the driver,
`repair_run_snapshot` makes Ray's record name only checkpoints that are there, and checkpoint
folders Ray has no record of (uploads cut short) are deleted (`delete_unrecorded`).

The payload itself (what a checkpoint holds) is `pipeline.checkpoint`'s.

About 550 lines on purpose: uploads, the resume choice, the record repair and the reading of that record
(`latest_recorded`, `recorded_checkpoints`) keep one guarantee together (a resume never starts from a
checkpoint that is not whole).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from ingest import faults
from ingest.errors import ConfigError, one_line
from ingest.storage import StorageError
from pipeline.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, read_state

log = logging.getLogger(__name__)

T = TypeVar("T")


UPLOAD_ATTEMPTS_ENV = "RECOLOR_CHECKPOINT_UPLOAD_ATTEMPTS"


DEFAULT_UPLOAD_ATTEMPTS = 4


UPLOAD_BACKOFF_S = 1.0  # before the first retry; doubled before each next one


# Ray Train names checkpoint directories `checkpoint_<local time, microseconds>`: names sort by age.
RAY_CHECKPOINT_DIR = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(\.\d+)?$")


def upload_attempts() -> int:
    """How often a checkpoint upload is tried: $RECOLOR_CHECKPOINT_UPLOAD_ATTEMPTS, else 4."""
    value = os.environ.get(UPLOAD_ATTEMPTS_ENV, "").strip()
    if not value:
        return DEFAULT_UPLOAD_ATTEMPTS
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{UPLOAD_ATTEMPTS_ENV}={value!r}: expected a whole number of at least 1")
    return int(value)


def upload_with_retries(
    upload: Callable[[], T],
    destination: str,
    attempts: int,
    discard: Callable[[], None] = lambda: None,
    backoff_s: float = UPLOAD_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `upload` until it succeeds, at most `attempts` times, waiting `backoff_s`, then twice as long, ...

    Only storage and network failures are retried: OSError (pyarrow, boto3's wrappers, the
    `checkpoint_upload` failpoint) and `StorageError` (the project's S3 layer, past its own retries).
    After each failure `discard` removes whatever the attempt left at the destination, so a half-copied
    checkpoint is never taken for a whole one.

    Args:
        upload: one attempt; returns the uploaded checkpoint.
        destination: where it goes, for the messages.
        attempts: tries in all (at least 1).
        discard: removes a failed attempt's partial copy; its own OSError is logged, not raised.
        backoff_s: the wait before the first retry.
        sleep: waits (tests pass a recorder).

    Returns:
        What `upload` returned.

    Raises:
        CheckpointError: the last attempt failed too; names the destination and the last error.
    """
    from ingest.retrying import Backoff, retried

    def cleanup(error: BaseException, attempt: int, wait: float) -> None:
        _discard(discard, destination)
        log.warning("checkpoint upload to %s failed (attempt %d of %d): %s; retrying in %.3g s", destination, attempt,
                    attempts, error, wait)  # fmt: skip

    def storage_trouble(error: BaseException) -> bool:
        return isinstance(error, (OSError, StorageError))

    try:
        return retried(upload, attempts, Backoff(backoff_s), storage_trouble, cleanup, sleep)
    except (OSError, StorageError) as error:
        _discard(discard, destination)
        raise CheckpointError(
            f"checkpoint upload to {destination} failed {attempts} times; last error: {error}"
        ) from error


def _discard(discard: Callable[[], None], destination: str) -> None:
    """Remove a failed attempt's partial copy; a failure to is said, not raised."""
    try:
        discard()
    except OSError as cleanup_error:
        log.warning("could not remove the partial checkpoint at %s: %s", destination, cleanup_error)


def fallback_order(latest: str, names: Iterable[str]) -> list[str]:
    """The checkpoint directories among `names` older than `latest` (all Ray Train's names), newest first.

    Newer ones are left out: they were never reported (an upload cut short by a crash).
    """
    return sorted((name for name in names if RAY_CHECKPOINT_DIR.match(name) and name < latest), reverse=True)


def first_readable(candidates: Iterable[str], load: Callable[[str], dict]) -> tuple[str, dict]:
    """The first candidate that loads and its payload; a warning names each one that does not.

    A candidate is passed over whatever its load raises (missing, partly written, corrupt, foreign),
    except a `StorageError`: a store that cannot be reached would make every older checkpoint look
    gone too, so that stops the search.

    Args:
        candidates: checkpoints, most wanted first (consumed lazily: later ones are looked up only if needed).
        load: a candidate's payload (`load_checkpoint` raises ValueError for what is not a checkpoint).

    Raises:
        CheckpointError: no candidate loads; names each with its error.
        StorageError: the store could not be reached.
    """
    unreadable: dict[str, str] = {}
    for candidate in candidates:
        try:
            payload = load(candidate)
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - any other reason makes it one to pass over
            reason = one_line(error)
            log.warning("%s is unreadable: %s", candidate, reason)
            unreadable[candidate] = reason
            continue
        if unreadable:
            log.warning("resuming from %s instead of the unreadable %s", candidate, ", ".join(unreadable))
        return candidate, payload
    tried = "; ".join(f"{name}: {error}" for name, error in unreadable.items()) or "none found"
    raise CheckpointError(f"no readable checkpoint to resume from ({tried})")


def upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train's `checkpoint_upload_fn`: Ray's own copy to the run's storage, retried with backoff.

    Ray retries an upload only on AWS error codes; a dropped connection to any store would fail the
    worker group and cost the steps since the last checkpoint. After the last attempt the worker
    fails all the same (CheckpointError), and Ray restarts it from the previous checkpoint.
    """
    import pyarrow.fs
    import ray.train

    context = ray.train.get_context()
    storage = context.get_storage()
    rank = context.get_world_rank()
    destination = storage.build_checkpoint_path_from_name(dir_name)

    def upload():
        faults.maybe_fail("checkpoint_upload", rank)
        return storage.persist_current_checkpoint(checkpoint, dir_name)

    def discard():
        filesystem = storage.storage_filesystem
        if filesystem.get_file_info(destination).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(destination)

    try:
        return upload_with_retries(upload, destination, upload_attempts(), discard)
    except BaseException:
        shutil.rmtree(checkpoint.path, ignore_errors=True)  # Ray deletes the local copy only after a success
        raise
    finally:
        upload_finished()


# Uploads handed to Ray's upload thread and not finished yet (rank 0's, in this worker process).
_uploads = threading.Condition()


_uploads_pending = 0


_warned_slow = False


SLOW_UPLOAD_WARNING_S = 5.0


def upload_started() -> None:
    global _uploads_pending
    with _uploads:
        _uploads_pending += 1


def upload_finished() -> None:
    global _uploads_pending
    with _uploads:
        _uploads_pending = max(0, _uploads_pending - 1)
        _uploads.notify_all()


def wait_for_uploads(at_most: int) -> float:
    """Block until at most `at_most` uploads are pending; returns the seconds waited (a warning when it waited)."""
    global _warned_slow
    start = time.monotonic()
    with _uploads:
        _uploads.wait_for(lambda: _uploads_pending <= at_most)
    waited = time.monotonic() - start
    if waited > SLOW_UPLOAD_WARNING_S and not _warned_slow:
        _warned_slow = True
        log.warning(
            "training waited %.1f s for a checkpoint upload: the store takes longer than checkpoint_every steps "
            "to take a checkpoint (said once)",
            waited,
        )
    return waited


def resume_payload(latest, rank: int) -> dict | None:
    """The checkpoint payload this rank resumes from: the run's latest, else the newest older one that loads.

    Rank 0 tries them in order (a warning names each unreadable one) and tells every rank which it
    took, so all ranks resume from the same step. Older checkpoints are found by listing the run's
    storage: Ray Train hands a worker the latest only. When none loads (every checkpoint deleted,
    or none whole) the run starts from its first step, with a warning saying so; what is there is
    left in place.

    Raises:
        StorageError: the run's storage could not be reached.
    """
    import pyarrow.fs
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    if rank == 0:
        # Uploads a killed worker group left half done: Ray keeps no record of them and would never delete them.
        # Best effort: rank 0 must reach the broadcast below whatever happens here, or the other ranks wait.
        try:
            delete_unrecorded(_run_uri(storage))
        except Exception as error:  # noqa: BLE001 - see above
            log.warning("could not delete unrecorded checkpoints in %s: %s", storage.experiment_fs_path, error)
    if latest is None:
        return None
    latest_name = posixpath.basename(latest.path.rstrip("/"))

    def load(name: str) -> dict:
        path = storage.build_checkpoint_path_from_name(name)
        with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as directory:
            return load_checkpoint(directory)

    def candidates():
        yield latest_name
        listing = filesystem.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
        names = [posixpath.basename(info.path) for info in listing if info.type == pyarrow.fs.FileType.Directory]
        yield from fallback_order(latest_name, names)

    chosen, payload, failure = None, None, None
    if rank == 0:
        try:
            chosen, payload = first_readable(candidates(), load)
        except CheckpointError as error:
            log.warning(
                "%s; starting run %s from its first step (the MLflow run's metrics restart at step 0)",
                error,
                storage.experiment_fs_path,
            )
            chosen = ""
        except Exception as error:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            failure, chosen = error, None
    chosen = broadcast_from_rank_zero(chosen)  # a name, not the error: the broadcast carries 1 kB at most
    if failure is not None:
        raise failure
    if chosen is None:
        raise CheckpointError(f"rank 0 could not read the checkpoints in {storage.experiment_fs_path} (see its log)")
    if chosen == "":
        return None
    if rank != 0:
        payload = load(chosen)
    return payload


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
# What this module reads and writes of that record, a private format of Ray Train (`_CheckpointManagerState` and
# `_TrainingResultState` in ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py), checked against
# RAY_CHECKED; `tests/unit/test_ray_internals.py` fails, naming what changed, on any other Ray.
RAY_CHECKED = "2.60"  # pyproject.toml pins ray to this release line
SNAPSHOT_FIELDS = frozenset({
    "ray_version", "checkpoint_results", "checkpoint_report_indices", "latest_checkpoint_result",
    "pending_training_results", "pending_validation_specs", "current_report_index", "validated_checkpoint_dir_names",
    "timed_out_validation_checkpoint_dir_names", "failed_validation_checkpoint_dir_names",
})  # fmt: skip
RESULT_FIELDS = frozenset({"version", "checkpoint_dir_name", "metrics"})


def repair_run_snapshot(run_uri: str) -> str | None:
    """Make Ray Train's record of the run at `run_uri` name only checkpoints that are there, before a rerun.

    Ray Train refuses to start a run whose record names a checkpoint folder that is gone (deleted by
    hand, by a lifecycle rule, or never completed), and says to pick a new name: every rerun would
    fail the same way. Checkpoints without their `checkpoint.pt` are dropped from the record; the
    latest becomes the newest one left. With none left the record is removed and the run starts from
    its first step. Each change is one warning naming the checkpoints.

    A whole checkpoint newer than the record's latest (uploaded, then the driver was stopped before Ray
    recorded it) is work done: it is added to the record and becomes the resume point, once its
    `checkpoint.pt` loads as a resume loads it (`adopt_newer`). Other checkpoint folders the record does not
    name (uploads cut short, rotated-out ones whose deletion failed) are deleted, each said in a warning.
    Call it only while no driver runs this run.

    Returns:
        What was done, in one line (None when the record was whole or there is none).

    Raises:
        StorageError: the run's storage could not be reached.
    """
    import json

    from ingest.storage import open_storage

    store = open_storage(run_uri)
    record = _read_snapshot(store)
    adopted = adopt_newer(store, record)
    if adopted:
        record = _read_snapshot(store)
    if record is None:
        _delete_unrecorded(store, set())
        return None
    results = record.get("checkpoint_results") or []
    present = {
        result["checkpoint_dir_name"]
        for result in results
        if store.exists(posixpath.join(result["checkpoint_dir_name"], CHECKPOINT_FILE))
    }
    missing = [result["checkpoint_dir_name"] for result in results if result["checkpoint_dir_name"] not in present]
    _delete_unrecorded(store, {result["checkpoint_dir_name"] for result in results})
    if not missing:
        return adopted
    if not present:
        store.delete(SNAPSHOT_FILE)
        message = (
            f"none of the checkpoints recorded for {run_uri} is left ({', '.join(missing)} missing): "
            "starting the run from its first step"
        )
        log.warning(message)
        return message
    indices = record["checkpoint_report_indices"]
    kept = [(r, i) for r, i in zip(results, indices, strict=True) if r["checkpoint_dir_name"] in present]
    record["checkpoint_results"] = [result for result, _ in kept]
    record["checkpoint_report_indices"] = [index for _, index in kept]
    latest = record.get("latest_checkpoint_result")
    if latest is None or latest["checkpoint_dir_name"] not in present:
        record["latest_checkpoint_result"] = max(kept, key=lambda pair: pair[1])[0]
    pending_results, specs = record.get("pending_training_results", []), record.get("pending_validation_specs", [])
    pending = [(r, s) for r, s in zip(pending_results, specs, strict=True) if r["checkpoint_dir_name"] in present]
    record["pending_training_results"] = [result for result, _ in pending]
    record["pending_validation_specs"] = [spec for _, spec in pending]
    for field in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                  "failed_validation_checkpoint_dir_names"):  # fmt: skip
        if field in record:
            record[field] = [name for name in record[field] if name in present]
    store.write_bytes(SNAPSHOT_FILE, json.dumps(record).encode())
    chosen = record["latest_checkpoint_result"]["checkpoint_dir_name"]
    message = f"checkpoints {', '.join(missing)} of {run_uri} are missing: resuming from {chosen}"
    log.warning(message)
    return message


METRICS_FILE = "metrics.json"  # beside checkpoint.pt: the metrics reported with it, for `adopt_newer`


def adopt_newer(store, record: dict | None) -> str | None:
    """Add to Ray Train's record the whole checkpoints newer than its latest, so a rerun resumes from the newest.

    A driver stopped (SIGTERM, Ctrl-C, a lost head node) after a checkpoint was uploaded but before Ray
    recorded it leaves a checkpoint no record names. Such a folder is taken only when its `checkpoint.pt` loads
    as a resume loads it (`load_checkpoint`, `weights_only=True`); its metrics are those reported with it
    (`METRICS_FILE`; from its position for checkpoints written without that file). One warning names them.

    Returns:
        What was done, in one line (None when nothing was newer and whole).
    """
    import json

    results = (record or {}).get("checkpoint_results") or []
    recorded = {result["checkpoint_dir_name"] for result in results}
    latest = ((record or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")
    newer = sorted(name for name in store.list_children("", follow_links=False)
                   if RAY_CHECKPOINT_DIR.match(name) and name not in recorded and name > latest)  # fmt: skip
    adopted = [(name, metrics) for name in newer if (metrics := _whole_checkpoint_metrics(store, name)) is not None]
    if not adopted:
        return None
    if record is None:
        import ray

        scalars = {"ray_version": ray.__version__, "latest_checkpoint_result": None, "current_report_index": 0}
        record = scalars | {field: [] for field in SNAPSHOT_FIELDS - scalars.keys()}  # the rest are lists
    index = max([int(record.get("current_report_index", 0)), *(i + 1 for i in record["checkpoint_report_indices"])])
    for name, metrics in adopted:
        entry = {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}
        record["checkpoint_results"].append(entry)
        record["checkpoint_report_indices"].append(index)
        record["latest_checkpoint_result"] = entry
        index += 1
    record["current_report_index"] = index
    store.write_bytes(SNAPSHOT_FILE, json.dumps(record).encode())
    names = ", ".join(name for name, _ in adopted)
    step = adopted[-1][1].get("global_step")
    message = (f"resuming {store.uri('')} from {adopted[-1][0]}" + (f" (step {int(step)})" if step is not None else "")
               + f": whole checkpoint(s) {names} were written after Ray Train's last record of the run (a stopped "
               "driver) and are kept")  # fmt: skip
    log.warning(message)
    return message


def _whole_checkpoint_metrics(store, name: str) -> dict | None:
    """The metrics reported with checkpoint folder `name`, if its `checkpoint.pt` loads; else None."""
    import json

    from pipeline.checkpoint import CorruptCheckpoint

    try:
        payload = load_checkpoint(store.read_bytes(posixpath.join(name, CHECKPOINT_FILE)), name=store.uri(name))
    except (FileNotFoundError, CorruptCheckpoint, OSError, StorageError):
        return None
    try:
        metrics = json.loads(store.read_bytes(posixpath.join(name, METRICS_FILE)))
        if isinstance(metrics, dict) and all(isinstance(v, (int, float)) for v in metrics.values()):
            return metrics
    except (FileNotFoundError, OSError, StorageError, ValueError):
        pass
    position = payload.get("position") or {}
    metrics = {"global_step": float(position.get("global_step", 0)), "stage": float(position.get("stage", 0))}
    global_batch = read_state(payload).get("global_batch")
    if isinstance(global_batch, int) and global_batch > 0:
        metrics["global_batch"] = float(global_batch)
    return metrics


def latest_recorded(run_uri: str) -> tuple[str, dict] | None:
    """The latest checkpoint Ray Train recorded for the run at `run_uri`: (folder name, the metrics reported with
    it), or None when there is none. Read from Ray's record, without downloading the checkpoint."""
    from ingest.storage import open_storage

    try:
        record = _read_snapshot(open_storage(run_uri))
    except CheckpointError:
        return None
    latest = (record or {}).get("latest_checkpoint_result")
    if not latest:
        return None
    return latest["checkpoint_dir_name"], dict(latest.get("metrics") or {})


def recorded_checkpoints(run_uri: str) -> list[tuple[str, dict]]:
    """Every checkpoint Ray Train still records for the run at `run_uri` (the last `keep_checkpoints`), oldest
    first: (folder name, the metrics reported with it). Empty when there is no record."""
    from ingest.storage import open_storage

    record = _read_snapshot(open_storage(run_uri)) or {}
    return [(result["checkpoint_dir_name"], dict(result.get("metrics") or {}))
            for result in record.get("checkpoint_results") or []]  # fmt: skip


def _run_uri(storage) -> str:
    """The URI of a Ray Train run's folder (its `StorageContext`) for `ingest.storage.open_storage`."""
    from ingest.storage.arrow import S3Handler

    path = storage.experiment_fs_path
    handler = getattr(storage.storage_filesystem, "handler", None)
    return f"s3://{path}" if isinstance(handler, S3Handler) else path


def delete_unrecorded(run_uri: str) -> None:
    """Delete the checkpoint folders of the run at `run_uri` that Ray Train's record does not name. A worker group
    calls it as it (re)starts, after the driver's `repair_run_snapshot` adopted the whole ones a stopped driver
    left: what is unrecorded now is an upload cut short, or one the group being replaced made after Ray's last
    record, whose steps this run trains again."""
    from ingest.storage import open_storage

    store = open_storage(run_uri)
    try:
        record = _read_snapshot(store) or {}
    except CheckpointError:
        return  # a damaged record: the driver reports it (repair_run_snapshot); deleting by it would be a guess
    _delete_unrecorded(store, {result["checkpoint_dir_name"] for result in record.get("checkpoint_results", [])})


def _read_snapshot(store) -> dict | None:
    """Ray Train's record of the run in `store`, or None when there is none.

    Raises:
        CheckpointError: the record is not readable JSON; says what to do.
    """
    import json

    try:
        return json.loads(store.read_bytes(SNAPSHOT_FILE))
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise CheckpointError(
            f"{store.uri(SNAPSHOT_FILE)} is not readable JSON ({error}): Ray Train's record of the run's checkpoints "
            "is damaged. Delete it to start the run from its first step, or train under another --name"
        ) from None


def _delete_unrecorded(store, recorded: set[str]) -> None:
    """Delete checkpoint folders Ray Train has no record of: uploads cut short by a crash or a stop (never
    resumed from) and rotated-out ones whose deletion failed. Left alone they would pile up run after run.
    Each deletion is a warning: the console says what went."""
    from ingest.storage import LocalStorage

    for name in store.list_children("", follow_links=False):
        if RAY_CHECKPOINT_DIR.match(name) and name not in recorded:
            for item in list(store.list(name, include_partial=True, follow_links=False)):
                store.delete(item.key)
            if isinstance(store, LocalStorage):
                shutil.rmtree(store.root / name, ignore_errors=True)  # the emptied folders too
            log.warning(
                "deleted %s: a checkpoint folder Ray Train has no record of (an upload cut short, one rotated out, "
                "or one a replaced worker group made after Ray's last record)",
                store.uri(name),
            )
