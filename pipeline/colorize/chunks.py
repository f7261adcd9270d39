"""`recolor colorize --ray` for films: cut at keyframes, the network run on the chunks in parallel, one joining pass.

    plan (driver: packets only, no decoding) -> network ab of each chunk (Ray tasks, one GPU each with --gpu)
                                             -> join (driver: decode in order, temporal step, encode, audio)

A chunk starts at a keyframe and holds at least `chunk_frames` frames (the last one what is left). A task seeks to
its keyframe, decodes the chunk's frames (those whose timestamps fall in it), runs the generator as the
single-process path does and keeps the ab it predicts, at the network's side, in float16 (`chunk-NNNNN.npz`,
compressed; 256 KiB a frame at 256 px before compression): never a picture. The files sit in a work folder
beside the output (`.<name>.chunks/`), each written to a temporary name and renamed once whole, under a plan
that names the source (its size and `object_stamp`), the model (a digest of its weights) and the settings. An
interrupted job run again with the same plan keeps the chunks already there and computes the others; another
plan starts over.

The join is `colorize_video` fed with those ab in frame order instead of the generator: the temporal step (the
optical flow is computed on the CPU) runs over the whole film in one pass, so chunk boundaries show no jump, and
the output has the source's frames, in order, as many as it has, with its timestamps, size and audio; it is
written whole and the work folder removed. Only the network, which a GPU does best, is spread over the cluster.

Where: a film may be a local path (on a cluster, on a file system every node mounts) or an s3:// object, which
tasks read through a presigned URL (FFmpeg's range requests: each task reads its chunk, not the film; no
credentials travel). A task returns its chunk to the driver, which writes it (beside a local output, or under
an s3:// output's prefix) and writes the output: only the driver needs the output's store.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ingest.storage import StorageError, is_s3, object_stamp, open_storage, split_uri
from pipeline.colorize.files import CHUNK_FRAMES  # noqa: F401 - defined torch-free, for the CLI's parser
from pipeline.colorize.video import VideoOptions, VideoRefused, VideoResult, readable

PLAN_NAME = "plan.json"
PLAN_FORMAT = 1  # bumped when what a chunk file holds changes: older chunks are then not reused


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) of the video stream by presentation timestamp (its time base); `stop` None: to the end."""

    index: int
    start: int
    stop: int | None
    frames: int

    @property
    def name(self) -> str:
        return f"chunk-{self.index:05d}.npz"


def plan_chunks(src: str, chunk_frames: int = CHUNK_FRAMES, max_pixels: int | None = None) -> list[Chunk]:
    """Cut the film at keyframes into chunks of at least `chunk_frames` frames, reading packets only.

    Raises:
        VideoRefused: not a video the single-process path would colorize (`not_a_video`, `no_video_track`,
            `corrupt`, `hdr`, `too_large` past `max_pixels`).
    """
    import av

    from pipeline.colorize.video import DEFAULT_MAX_FRAME_PIXELS, check_stream, open_video

    stamps, keys, keyed = [], [], False
    with open_video(src) as container:
        stream = container.streams.video[0]
        check_stream(stream, max_pixels or DEFAULT_MAX_FRAME_PIXELS)
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue  # a flush packet
                keyed = keyed or packet.is_keyframe
                if not keyed or getattr(packet, "is_discard", False):
                    continue  # before the first keyframe (a file cut mid-GOP), or trimmed by an edit list: no frame
                stamps.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except av.error.FFmpegError as e:
            raise VideoRefused(f"corrupt: the stream breaks off after packet {len(stamps)} ({e})") from None
    if not stamps:
        raise VideoRefused("corrupt: the video track holds no frame")
    stamps.sort()
    starts = [stamps[0]]  # the first frame opens the first chunk whatever it is
    for key in sorted(set(keys)):
        held = bisect.bisect_left(stamps, key) - bisect.bisect_left(stamps, starts[-1])  # frames since the last start
        if key > starts[-1] and held >= chunk_frames:
            starts.append(key)
    chunks = []
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else None
        last = bisect.bisect_left(stamps, stop) if stop is not None else len(stamps)
        chunks.append(Chunk(index, start, stop, last - bisect.bisect_left(stamps, start)))
    return chunks


def chunk_frames_ab(generator, src: str, chunk: Chunk, size: int, resize: str, device: torch.device,
                    batch_size: int) -> np.ndarray:  # fmt: skip
    """The network's ab (frames, 2, h, w) of one chunk's frames, in order: seek to its keyframe, decode, predict."""
    import av

    from pipeline.colorize.pixels import network_input, predict_photos
    from pipeline.models.saved import min_side

    multiple = min_side(generator)
    predicted: list[torch.Tensor] = []
    pending: list = []

    def flush() -> None:
        inputs = [network_input(frame.to_ndarray(format="rgb24"), size, multiple, resize) for frame in pending]
        predicted.extend(predict_photos(generator, inputs, device))
        pending.clear()

    try:
        container = av.open(readable(src))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoRefused(f"unreadable: chunk {chunk.index} cannot open the film ({e})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            container.seek(chunk.start, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts < chunk.start:
                    continue  # before the chunk: the keyframe seek lands at or before its start
                if chunk.stop is not None and frame.pts >= chunk.stop:
                    break
                pending.append(frame)
                if len(pending) >= batch_size:
                    flush()
        except av.error.FFmpegError as e:
            raise VideoRefused(f"corrupt: chunk {chunk.index} breaks off ({e})") from None
    if pending:
        flush()
    if len(predicted) != chunk.frames:
        raise VideoRefused(f"corrupt: chunk {chunk.index} decodes to {len(predicted)} frames, its packets say "
                           f"{chunk.frames}")  # fmt: skip
    return torch.stack(predicted).numpy().astype(np.float16)


def packed(ab: np.ndarray) -> bytes:
    """A chunk's ab as the bytes of its file (compressed npz)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, ab=ab)
    return buffer.getvalue()


def write_chunk(folder: str, chunk: Chunk, data: bytes | np.ndarray) -> None:
    """The chunk's ab (`packed`), whole under its name or not at all (a file renamed into place, or one S3 PUT)."""
    open_storage(folder).write_bytes(chunk.name, data if isinstance(data, bytes) else packed(data))


def stored_ab(folder: str, chunks: list[Chunk]) -> Iterator[torch.Tensor]:
    """Every frame's ab, in order, chunk after chunk (one chunk in memory at a time)."""
    storage = open_storage(folder)
    for chunk in chunks:
        try:
            with np.load(io.BytesIO(storage.read_bytes(chunk.name))) as data:
                ab = data["ab"]
        except (OSError, StorageError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise VideoRefused(f"corrupt: the chunk file {folder}/{chunk.name} cannot be read ({e}); run again: "
                               "it is computed anew") from None  # fmt: skip
        if len(ab) != chunk.frames:
            raise VideoRefused(f"corrupt: the chunk file {folder}/{chunk.name} holds {len(ab)} frames, not "
                               f"{chunk.frames}; run again: it is computed anew")  # fmt: skip
        for frame in ab:
            yield torch.from_numpy(frame.astype(np.float32))


def model_digest(generator) -> str:
    """A digest of the generator's weights: chunks computed by another model are not reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def work_folder(dst: str) -> str:
    """Where a film's chunks wait: `.<output name>.chunks` beside the output (a folder, or an s3:// prefix)."""
    parent, name = split_uri(dst) if is_s3(dst) else (str(Path(dst).parent), Path(dst).name)
    return f"{parent}/.{name}.chunks"


def source_identity(src: str) -> dict:
    """What says the source is the same film as when chunks were computed: its size and `object_stamp` (an s3://
    object's ETag; a file's mtime, ctime and inode, so a copy that keeps the mtime is another film)."""
    parent, name = split_uri(src) if is_s3(src) else (str(Path(src).parent), Path(src).name)
    try:
        info = open_storage(parent).info(name)
    except (OSError, StorageError) as e:
        raise VideoRefused(f"unreadable: {src}: {e}") from None
    if info is None:
        raise VideoRefused(f"missing: no such {'object' if is_s3(src) else 'file'}")
    return {"source": src, "source_bytes": info.size, "source_tag": object_stamp(info)}


def prepare(folder: str, plan: dict) -> set[str]:
    """The work folder for `plan`: the chunk files already whole there when an earlier run had the same plan;
    else an emptied folder holding the plan."""
    storage = open_storage(folder)
    names = [info.key for info in storage.list()]  # never the temporary files of unfinished writes
    if PLAN_NAME in names:
        try:
            same = json.loads(storage.read_bytes(PLAN_NAME)) == plan
        except (OSError, StorageError, ValueError):
            same = False
        if same:
            return {name for name in names if name.startswith("chunk-") and name.endswith(".npz")}
    remove(folder)
    storage.write_bytes(PLAN_NAME, json.dumps(plan, indent=1).encode())
    return set()


def remove(folder: str) -> None:
    """The work folder and all in it."""
    if not is_s3(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    storage = open_storage(folder)
    for info in list(storage.list(include_partial=True)):
        storage.delete(info.key)


def _chunk_task(generator_ref, src: str, chunk: Chunk, size: int, resize: str, batch_size: int, gpu: bool,
                dropout: bool) -> tuple[Chunk, bytes]:  # fmt: skip
    """(A Ray task) one chunk's ab, packed; the driver writes it (tasks need no access to the output's store)."""
    import ray

    from pipeline.models import set_inference_mode

    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    generator = set_inference_mode(ray.get(generator_ref[0]).to(device), dropout)
    torch.manual_seed(0)
    return chunk, packed(chunk_frames_ab(generator, src, chunk, size, resize, device, batch_size))


@dataclass
class ChunkedResult:
    result: VideoResult
    chunks: int
    reused: int  # chunks an earlier run had computed


def colorize_video_on_ray(generator, model_key: str, size: int, resize: str, src: str, dst: str,
                          options: VideoOptions = VideoOptions(), *, chunk_frames: int = CHUNK_FRAMES,
                          actors: int = 1, gpu: bool = False, dropout: bool = False, ray_address: str | None = None,
                          progress: bool = True) -> ChunkedResult:  # fmt: skip
    """Colorize the film `src` into `dst` by chunks on Ray (see the module), resuming an interrupted run.

    Args:
        generator: the loaded model (on the CPU); `model_key` names it in the plan (with a digest of its weights).
        actors: chunks colorized at once (one GPU each with `gpu`).

    Raises:
        VideoRefused: `src` cannot be colorized, or `dst` not written; nothing is left at `dst`.
    """
    from tqdm.auto import tqdm

    from ingest.cluster import ensure_ray
    from pipeline.colorize.video import colorize_video, video_library

    video_library()
    # Tasks run in other working directories; s3:// films are read through presigned URLs (`readable`).
    src, dst = (uri if is_s3(uri) else str(Path(uri).absolute()) for uri in (src, dst))
    chunks = plan_chunks(src, chunk_frames, options.max_pixels)
    plan = {"format": PLAN_FORMAT, **source_identity(src), "model": model_key, "weights": model_digest(generator),
            "size": size, "resize": resize, "dropout": dropout,
            "chunks": [asdict(chunk) for chunk in chunks]}  # fmt: skip
    folder = work_folder(dst)
    try:
        done = prepare(folder, plan)
    except (OSError, StorageError) as e:
        raise VideoRefused(f"unwritable: {folder}: {e}") from None
    todo = [chunk for chunk in chunks if chunk.name not in done]
    if todo:
        import ray

        with ensure_ray(ray_address):
            generator_ref = [ray.put(generator.cpu())]  # in a list: Ray passes a bare ref to the task resolved
            task = ray.remote(_chunk_task).options(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=2)
            total = sum(chunk.frames for chunk in todo)
            with tqdm(total=total, unit="frame", desc=f"{Path(src).name} chunks", disable=not progress) as bar:
                waiting, queue = [], list(todo)
                try:
                    while queue or waiting:
                        while queue and len(waiting) < actors:
                            chunk = queue.pop(0)  # a fresh URL each: a long job outlives temporary credentials
                            waiting.append(task.remote(generator_ref, readable(src), chunk, size, resize,
                                                       options.batch_size, gpu, dropout))  # fmt: skip
                        finished, waiting = ray.wait(waiting, num_returns=1)
                        chunk, data = ray.get(finished[0])
                        try:
                            write_chunk(folder, chunk, data)
                        except (OSError, StorageError) as e:
                            raise VideoRefused(f"unwritable: {folder}/{chunk.name}: {e}") from None
                        bar.update(chunk.frames)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, VideoRefused):
                        raise VideoRefused(cause.reason) from None
                    # Anything else (a GPU out of memory, a lost node past its retries) ends this film, not the job.
                    raise VideoRefused(f"failed: a chunk task failed: {type(cause or e).__name__}: {cause or e}; "
                                       "run again to resume from the chunks done") from None  # fmt: skip
                finally:
                    for ref in waiting:  # the other chunks of a film that failed: their results are not wanted
                        ray.cancel(ref)
    try:
        result = colorize_video(generator, size, resize, torch.device("cpu"), src, dst, options, progress,
                                stored_ab=stored_ab(folder, chunks))  # fmt: skip
    except VideoRefused as e:
        if e.reason.startswith("corrupt:"):  # the chunks disagree with the film: a rerun computes them anew
            remove(folder)
        raise
    remove(folder)
    return ChunkedResult(result, len(chunks), len(chunks) - len(todo))
