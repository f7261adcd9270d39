"""`recolor colorize --ray` for films: cut at keyframes, the network run on the chunks in parallel, one joining pass.

    plan (driver: packets only, no decoding) -> network ab of each chunk (Ray tasks, one GPU each with --gpu)
                                             -> join (driver: decode in order, temporal step, encode, audio)

A chunk starts at a keyframe and holds at least `chunk_frames` frames (the last one what is left). A task seeks to
its keyframe, decodes the chunk's frames (those whose timestamps fall in it), runs the generator as the
single-process path does and keeps the ab it predicts, at the network's side, in float16 (`chunk-NNNNN.npz`,
compressed; 256 KiB a frame at 256 px before compression): never a picture. The files sit in a work folder
beside the output (`.<name>.chunks/`), each written to a temporary name and renamed once whole, under a plan
that names the source (size, modification time), the model (a digest of its weights) and the settings. An
interrupted job run again with the same plan keeps the chunks already there and computes the others; another
plan starts over.

The join is `colorize_video` fed with those ab in frame order instead of the generator: the temporal step (the
optical flow is computed on the CPU) runs over the whole film in one pass, so chunk boundaries show no jump, and
the output has the source's frames, in order, as many as it has, with its timestamps, size and audio; it is
written whole and the work folder removed. Only the network, which a GPU does best, is spread over the cluster.

Paths: the tasks open the source by its path, so on a cluster the films and the output folder must be on a
file system every node sees (s3:// films are not supported yet).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.colorize.video import VideoOptions, VideoRefused, VideoResult

CHUNK_FRAMES = 240  # 10 s at 24 fps: a task's work is seconds on a GPU, minutes on a CPU
PLAN_NAME = "plan.json"


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

    from pipeline.colorize.video import DEFAULT_MAX_FRAME_PIXELS, _check, _open

    stamps, keys = [], []
    with _open(src) as container:
        stream = container.streams.video[0]
        _check(stream, max_pixels or DEFAULT_MAX_FRAME_PIXELS)
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
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

    with av.open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        container.seek(chunk.start, stream=stream, backward=True, any_frame=False)
        try:
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


def write_chunk(folder: Path, chunk: Chunk, ab: np.ndarray) -> None:
    """The chunk's ab, whole under its name or not at all (a temporary name, then a rename)."""
    temp = folder / f".{chunk.name}.{os.getpid()}.tmp"
    try:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, ab=ab)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, folder / chunk.name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def stored_ab(folder: Path, chunks: list[Chunk]) -> Iterator[torch.Tensor]:
    """Every frame's ab, in order, chunk after chunk (one chunk in memory at a time)."""
    for chunk in chunks:
        with np.load(folder / chunk.name) as data:
            ab = data["ab"]
        for frame in ab:
            yield torch.from_numpy(frame.astype(np.float32))


def model_digest(generator) -> str:
    """A digest of the generator's weights: chunks computed by another model are not reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def work_folder(dst: str) -> Path:
    target = Path(dst)
    return target.with_name(f".{target.name}.chunks")


def prepare(folder: Path, plan: dict) -> set[str]:
    """The work folder for `plan`: the chunk files already whole there when an earlier run had the same plan;
    else an empty folder holding the plan."""
    written = folder / PLAN_NAME
    if written.exists():
        try:
            same = json.loads(written.read_text()) == plan
        except (OSError, ValueError):
            same = False
        if same:
            return {path.name for path in folder.glob("chunk-*.npz")}
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{PLAN_NAME}.tmp"
    temp.write_text(json.dumps(plan, indent=1))
    os.replace(temp, written)
    return set()


def _chunk_task(generator_ref, src: str, chunk: Chunk, size: int, resize: str, batch_size: int, gpu: bool,
                folder: str, dropout: bool) -> int:  # fmt: skip
    """(A Ray task) one chunk's ab into its file; returns its frames."""
    import ray

    from pipeline.models import set_inference_mode

    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    generator = set_inference_mode(ray.get(generator_ref[0]).to(device), dropout)
    torch.manual_seed(0)
    ab = chunk_frames_ab(generator, src, chunk, size, resize, device, batch_size)
    write_chunk(Path(folder), chunk, ab)
    return chunk.frames


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
    src, dst = str(Path(src).absolute()), str(Path(dst).absolute())  # tasks run in other working directories
    chunks = plan_chunks(src, chunk_frames, options.max_pixels)
    stat = os.stat(src)
    plan = {"source": src, "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns, "model": model_key,
            "weights": model_digest(generator), "size": size, "resize": resize, "dropout": dropout,
            "chunks": [asdict(chunk) for chunk in chunks]}  # fmt: skip
    folder = work_folder(dst)
    try:
        done = prepare(folder, plan)
    except OSError as e:
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
                            chunk = queue.pop(0)
                            waiting.append(task.remote(generator_ref, src, chunk, size, resize, options.batch_size,
                                                       gpu, str(folder), dropout))  # fmt: skip
                        finished, waiting = ray.wait(waiting, num_returns=1)
                        bar.update(ray.get(finished[0]))
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, VideoRefused):
                        raise VideoRefused(cause.reason) from None
                    raise
    result = colorize_video(generator, size, resize, torch.device("cpu"), src, dst, options, progress,
                            stored_ab=stored_ab(folder, chunks))  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return ChunkedResult(result, len(chunks), len(chunks) - len(todo))
