"""`recolor colorize` for films: a video in, a colorized video out, on one machine (PyAV: FFmpeg in its wheel).

Each frame is colorized as a photo is (`pixels`: the network sees its L at the model's side, the ab it predicts
is upsampled onto the frame's own L), so frames keep the source's luminance. The output keeps the source's frame
rate and timestamps (variable frame rates included), size and audio (copied, not re-encoded), and a rotated
source's rotation as the output stream's `rotate` tag (untested with real phone videos); the video
is encoded with `--codec` at `--crf` into a temporary file beside the output and renamed into place once whole.

Flicker: a network colorizing frame by frame makes still regions shimmer. With `temporal` (the default) each
frame's predicted ab, at the network's resolution, is blended with the previous frame's result carried along
the optical flow (OpenCV's DIS flow on L, no learned weights) where the flow is reliable (forward and backward
flow agree): still and smoothly moving regions keep their colour, occluded and new ones take the prediction.

Refused, one line each, nothing left under the output name: a file that is no video, a video without a video
track, HDR (PQ or HLG transfer: colorizing their code values as sRGB would be wrong; tone-map first), frames
over `max_pixels`; a stream that breaks off mid-way is reported with the frame it reached.

About 530 lines on purpose: a film's listing, refusals, decoding, colorizing and encoding (with its sound) share
the container and stream state of one PyAV pipeline; the temporal step and the chunked Ray path are their own modules.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ingest.errors import ConfigError
from ingest.sources.folder import IMAGE_EXTENSIONS, hidden
from ingest.storage import is_s3
from pipeline.colorize.files import CODECS, DEFAULT_CRF, VIDEO_SUFFIXES  # noqa: E402 - torch-free, for the parser
from pipeline.colorize.pixels import compose, network_input, predict_photos
from pipeline.colorize.temporal import FlowSmoother

HDR_TRANSFERS = {16: "smpte2084 (PQ)", 18: "arib-std-b67 (HLG)"}  # AVColorTransferCharacteristic values
RECOLOR_MARK = "colorized by recolor"  # the container's comment: --overwrite replaces only files that carry it
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160 * 2  # 8K UHD is 4x 4K: refused by default (each frame is held whole)


class VideoRefused(Exception):
    """An input video that cannot be colorized: `reason` is "<kind>: <detail>" as `ColorizeSummary.failed` has."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_video(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


def video_output_name(name: str) -> str:
    """The output's name for input `name`: the same name where H.264 fits the container, else `.mkv`."""
    path = Path(name)
    return str(path if path.suffix.lower() in {".mp4", ".mov", ".mkv", ".m4v"} else path.with_suffix(".mkv"))


@dataclass(frozen=True)
class VideoOptions:
    """How a film is colorized and encoded.

    Attributes:
        codec: h264 (default), h265, vp9, or ffv1 (lossless, RGB: for archives and tests).
        crf: quality of h264/h265/vp9 (lower is better; 0 is lossless for h264 in 4:4:4).
        temporal: blend each frame with the previous one carried along the optical flow (see the module).
        batch_size: frames a generator call.
        max_pixels: refuse frames larger than this.
    """

    codec: str = "h264"
    crf: int = DEFAULT_CRF
    temporal: bool = True
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_FRAME_PIXELS


@dataclass
class VideoResult:
    frames: int
    seconds: float  # the source's duration as its timestamps say
    fps: float
    audio: bool
    note: str = ""  # what the output could not keep (e.g. a 10-bit source written in 8 bits)
    elapsed: float = 0.0  # seconds this took


def list_videos(inputs: list[str], out: str) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """The videos among `inputs` (files with a video suffix, and those below given folders, hidden ones skipped)
    and where each goes: `out` itself when it names one video file (`film.mp4 -o film-color.mp4`), else below the
    folder `out` by its name below the given folder (`video_output_name`).

    Returns:
        ([(video, output path)], the inputs that are not videos, [(video, "reason: detail")] refused).
    """
    videos: list[tuple[str, str]] = []  # (path, name below the output folder)
    rest = []
    for given in inputs:
        path = Path(given)
        if is_s3(given) and not is_video(given):  # a prefix: its videos here, its images the photo path's
            found, has_images = _s3_videos_below(given, out)
            videos += found
            if not found or has_images:
                rest.append(given)
        elif is_s3(given):
            videos.append((given, given.rsplit("/", 1)[-1]))
        elif path.is_dir():
            found, has_images = _videos_below(path, Path(out).resolve())
            videos += [(str(p), str(p.relative_to(path))) for p in found]
            if not found or has_images:
                rest.append(given)  # its images are the photo path's (a folder of neither: `no_images` there)
        elif is_video(given):
            videos.append((given, path.name))
        else:
            rest.append(given)
    single = is_video(out) and (is_s3(out) or not Path(out).is_dir())
    one_file = bool(inputs) and (is_video(inputs[0]) if is_s3(inputs[0]) else not Path(inputs[0]).is_dir())
    if single and not (len(videos) == 1 and len(inputs) == 1 and one_file):
        raise ConfigError(f"-o {out} names one output film: give it one input film (for several, -o a folder)")
    planned, refused, claimed = [], [], {}
    for path, name in videos:
        if is_s3(out):
            target = out if single else f"{out.rstrip('/')}/{video_output_name(name)}"
        else:
            target = Path(out) if single else Path(out) / video_output_name(name)
        if _same(target, path):
            refused.append((path, f"name_clash: the output {target} is the input"))
        elif target in claimed:
            refused.append((path, f"name_clash: its output {target} is already that of {claimed[target]}"))
        else:
            claimed[target] = path
            planned.append((path, str(target)))
    return planned, rest, refused


def _same(target, path: str) -> bool:
    if is_s3(str(target)) or is_s3(path):
        return str(target) == path
    return Path(target).resolve() == Path(path).resolve()


def _s3_videos_below(prefix: str, out: str) -> tuple[list[tuple[str, str]], bool]:
    """The videos below an s3:// prefix, sorted (hidden names and those below the output prefix `out` skipped),
    named below it; and whether it holds images too."""
    from ingest.storage import StorageError, open_storage

    storage = open_storage(prefix)
    try:
        keys = [info.key for info in storage.list()]
    except StorageError as e:
        raise ConfigError(f"cannot list {prefix}: {e}") from None
    outputs = out.rstrip("/") + "/"
    shown = [key for key in keys if not hidden(key) and not storage.uri(key).startswith(outputs)]
    videos = [(storage.uri(key), key) for key in sorted(shown) if is_video(key)]
    return videos, any(Path(key).suffix.lower() in IMAGE_EXTENSIONS for key in shown)


def readable(uri: str) -> str:
    """What FFmpeg opens for `uri`: a local path as it is; an s3:// object as a presigned URL (FFmpeg reads it over
    HTTP with range requests, seeking included: a film is never downloaded whole)."""
    if not is_s3(uri):
        return uri
    from ingest.storage import open_storage, split_uri

    parent, name = split_uri(uri)
    return open_storage(parent).presigned_url(name, expires=7 * 24 * 3600)


def uri_exists(uri: str) -> bool:
    """Whether the file or s3:// object at `uri` exists."""
    if not is_s3(uri):
        return Path(uri).exists()
    from ingest.storage import open_storage, split_uri

    parent, name = split_uri(uri)
    return open_storage(parent).exists(name)


def written_by_recolor(path: str) -> bool:
    """Whether the video at `path` (a file or an s3:// object) is one recolor wrote (its container's comment)."""
    import av

    try:
        with av.open(readable(path)) as container:
            # Matroska keeps its tags upper-case (COMMENT), MP4 lower-case (comment)
            return any(key.lower() == "comment" and value == RECOLOR_MARK for key, value in container.metadata.items())
    except (av.error.FFmpegError, OSError):
        return False


@contextlib.contextmanager
def published(dst: str) -> Iterator[Path]:
    """A temporary file to write the output into, put in place only when the block ends without an error: renamed
    over `dst` (a hidden file beside it), or uploaded to an s3:// `dst` (one whole object); removed in any case."""
    import tempfile

    if is_s3(dst):
        from ingest.storage import StorageError, open_storage, split_uri

        folder = Path(tempfile.mkdtemp(prefix="recolor-film-"))
        temp = folder / f"partial{Path(dst).suffix}"
        try:
            yield temp
            parent, name = split_uri(dst)
            try:
                open_storage(parent).upload_file(name, temp)
            except (StorageError, OSError) as e:
                raise VideoRefused(f"unwritable: {dst}: {e}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    from ingest.storage.local import replaced_on_success

    target = Path(dst)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoRefused(f"unwritable: {target}: {e}") from None
    with replaced_on_success(target, suffix=f".partial{target.suffix}") as temp:  # PyAV picks the container by name
        yield temp


def _videos_below(folder: Path, outputs: Path) -> tuple[list[Path], bool]:
    """The videos below `folder`, sorted (hidden files and folders skipped, and those below the output folder
    `outputs`: an earlier run's outputs are no inputs), and whether it holds images too; one walk of the tree."""
    found, has_images = [], False
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        has_images = has_images or suffix in IMAGE_EXTENSIONS
        if suffix not in VIDEO_SUFFIXES or hidden(path.relative_to(folder).as_posix()):
            continue
        if path.is_file() and outputs not in path.resolve().parents:
            found.append(path)
    return sorted(found), has_images


def video_library():
    """PyAV, and OpenCV (the temporal step's optical flow), or a `ConfigError` naming the extra to install."""
    try:
        import av
        import cv2  # noqa: F401 - checked here, once, before any video is opened
    except ImportError as e:
        raise ConfigError(f"colorizing videos needs PyAV and OpenCV ({e}): pip install 'recolor[video]'") from None
    return av


def open_video(src: str):
    """The source opened for reading (an s3:// object through a presigned URL, `readable`)."""
    import av

    if is_s3(src) and not uri_exists(src):
        raise VideoRefused("missing: no such object")
    try:
        container = av.open(readable(src))
    except FileNotFoundError:
        raise VideoRefused("missing: no such file") from None
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        container_kind = _container_signature(src)
        if container_kind:  # a film's header, then nothing FFmpeg can use: cut short or damaged
            raise VideoRefused(
                f"corrupt: it begins as a {container_kind} film but FFmpeg cannot read it "
                f"({e}); a file cut before its index (an interrupted copy) reads like this"
            ) from None
        raise VideoRefused(f"not_a_video: FFmpeg cannot read it ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoRefused("no_video_track: the file holds no video stream")
    return container


def _container_signature(src: str) -> str | None:
    """The container a file's first bytes announce (MP4/MOV, Matroska/WebM, AVI, Ogg, FLV, MPEG-TS), or None."""
    try:
        if is_s3(src):
            from ingest.storage import open_storage, split_uri

            parent, name = split_uri(src)
            head = open_storage(parent).read_range(name, 0, 12)
        else:
            with open(src, "rb") as file:
                head = file.read(12)
    except (OSError, ValueError, AttributeError):
        return None
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "MP4/MOV"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "Matroska/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"OggS"):
        return "Ogg"
    if head.startswith(b"FLV"):
        return "FLV"
    if head[:1] == b"\x47" and len(head) >= 1 and src.lower().endswith((".ts", ".m2ts", ".mts")):
        return "MPEG-TS"
    return None


def check_stream(stream, max_pixels: int) -> str:
    """Refuse what cannot be colorized faithfully; returns a note on what the output will not keep."""
    context = stream.codec_context
    width, height = context.width, context.height
    if width * height > max_pixels:
        raise VideoRefused(f"too_large: {width}x{height} frames, over --max-pixels {max_pixels}")
    transfer = int(getattr(context, "color_trc", 0) or 0)
    if transfer in HDR_TRANSFERS:
        raise VideoRefused(
            f"hdr: the video is HDR (transfer {HDR_TRANSFERS[transfer]}); tone-map it to SDR first, e.g. "
            "ffmpeg -i in.mp4 -vf zscale=t=linear,tonemap=hable,zscale=t=bt709:m=bt709,format=yuv420p out.mp4"
        )
    fmt = context.format
    bits = max((component.bits for component in fmt.components), default=8) if fmt is not None else 8
    return f"a {bits}-bit source written in 8 bits" if bits > 8 else ""


def _check_complete(container, stream, end) -> None:
    """A file cut short (a broken download) often decodes without an error: its frames end before the duration
    its header states (the video stream's, or the container's when the video is its only stream). Refused as
    `corrupt` when more than two frames' time (at least 0.2 s) is missing. `end`: where the last frame ends (its
    timestamp plus its duration), in the stream's time base."""
    if end is None or not stream.time_base:
        return
    if stream.duration:
        stated = float((stream.duration + (stream.start_time or 0)) * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        stated = container.duration / 1_000_000 + float((stream.start_time or 0) * stream.time_base)
    else:
        return
    reached = float(end * stream.time_base)
    rate = float(stream.average_rate or 25)
    if stated - reached > max(2 / rate, 0.2):
        raise VideoRefused(f"corrupt: the frames end at {reached:.2f} s of the {stated:.2f} s its header states "
                           "(a file cut short?)")  # fmt: skip


def _output_streams(out, source, audio, options: VideoOptions, rotation: int):
    codec = CODECS[options.codec]
    rate = source.average_rate or source.guessed_rate or Fraction(25)
    try:
        video = out.add_stream(codec, rate=rate)
    except ValueError as e:
        suffix = Path(out.name).suffix
        raise VideoRefused(f"bad_option: --codec {options.codec} cannot be written in a {suffix} file ({e}); "
                           "use .mkv, which takes every codec") from None  # fmt: skip
    out.metadata["comment"] = RECOLOR_MARK
    width, height = source.codec_context.width, source.codec_context.height
    video.width, video.height = width, height
    video.time_base = source.time_base
    video.codec_context.time_base = source.time_base  # the source's timestamps as they are (variable rates too)
    if options.codec == "ffv1":
        video.pix_fmt = "bgr0"  # lossless RGB
    elif options.codec == "vp9":
        video.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        video.options = {"crf": str(options.crf), "b": "0"}
    else:  # 4:2:0 needs even sides; 4:4:4 takes any (and is what crf 0 needs to be lossless)
        even = width % 2 == 0 and height % 2 == 0
        video.pix_fmt = "yuv420p" if even and options.crf > 0 else "yuv444p"
        video.options = {"crf": str(options.crf), "preset": "medium"}
    if rotation:
        video.metadata["rotate"] = str(-rotation % 360)
    copied = out.add_stream_from_template(audio) if audio is not None else None
    return video, copied


class _Film:
    """The output being written: its streams (made at the first decoded frame, which knows the rotation), the
    frames waiting for a generator call, the audio that arrived before the video streams existed."""

    def __init__(self, out, source, audio, options: VideoOptions, colorize_frames, bar):
        self.out, self.source, self.audio, self.options = out, source, audio, options
        self.colorize_frames, self.bar = colorize_frames, bar
        self.video_out = self.audio_out = None
        self.pending: list = []
        self.early_audio: list = []
        self.frames = 0
        self.end = None  # the latest frame end seen, in the source's time base

    def add_audio(self, packet) -> None:
        if packet.dts is None:  # a flush packet
            return
        if self.audio_out is None:
            self.early_audio.append(packet)
            return
        packet.stream = self.audio_out
        self._mux(packet)

    def add_frame(self, frame) -> None:
        if self.video_out is None:
            rotation = int(getattr(frame, "rotation", 0) or 0)
            self.video_out, self.audio_out = _output_streams(self.out, self.source, self.audio, self.options, rotation)
            for packet in self.early_audio:
                self.add_audio(packet)
            self.early_audio.clear()
        self.pending.append(frame)
        end = (frame.pts or 0) + int(getattr(frame, "duration", 0) or 0)
        self.end = end if self.end is None else max(self.end, end)
        if len(self.pending) >= self.options.batch_size:
            self.flush()

    def flush(self) -> None:
        import av

        if not self.pending:
            return
        for frame, array in zip(self.pending, self.colorize_frames(self.pending), strict=True):
            colored = av.VideoFrame.from_ndarray(array, format="rgb24")
            colored.pts, colored.time_base = frame.pts, frame.time_base
            for packet in self._encode(colored):
                self._mux(packet)
        self.frames += len(self.pending)
        self.bar.update(len(self.pending))
        self.pending.clear()

    def finish(self) -> None:
        self.flush()
        for packet in self._encode(None):
            self._mux(packet)

    def _encode(self, frame) -> list:
        import av

        try:
            return self.video_out.encode(frame)
        except av.error.FFmpegError as e:
            raise VideoRefused(f"unwritable: the {self.options.codec} encoder failed: {e}") from None

    def _mux(self, packet) -> None:
        import av

        try:
            self.out.mux(packet)
        except av.error.FFmpegError as e:
            raise VideoRefused(f"unwritable: writing the output failed: {e}") from None


def _frame_colorizer(generator, size: int, resize: str, device: torch.device, temporal: bool,
                     stored_ab: Iterator[torch.Tensor] | None = None):  # fmt: skip
    """frames -> their colorized 8-bit RGB arrays, the temporal step carried from call to call. The ab of each
    frame is the generator's, or with `stored_ab` the next of those (computed before, `pipeline.colorize.chunks`)."""
    from pipeline.models.saved import min_side

    multiple = min_side(generator)
    smoother = FlowSmoother() if temporal else None

    def predict(inputs: list) -> list[torch.Tensor]:
        if stored_ab is None:
            return predict_photos(generator, inputs, device)
        predicted = []
        for _, crop in inputs:
            ab = next(stored_ab, None)
            if ab is None or tuple(ab.shape[1:]) != tuple(crop):
                raise VideoRefused("corrupt: the film decodes to other frames than when its chunks were colorized")
            predicted.append(ab)
        return predicted

    def colorize_frames(frames: list) -> list[np.ndarray]:
        photos = [frame.to_ndarray(format="rgb24") for frame in frames]
        inputs = [network_input(rgb, size, multiple, resize) for rgb in photos]
        colored = []
        for rgb, (light, crop), ab in zip(photos, inputs, predict(inputs), strict=True):
            if smoother is not None:
                ab = smoother(light[:, : crop[0], : crop[1]], ab)
            colored.append(compose(rgb, ab))
        return colored

    return colorize_frames


def colorize_video(generator, size: int, resize: str, device: torch.device, src: str, dst: str,
                   options: VideoOptions = VideoOptions(), progress: bool = True,
                   stored_ab: Iterator[torch.Tensor] | None = None) -> VideoResult:  # fmt: skip
    """Colorize the video file `src` into `dst` (written whole: a temporary file beside it, then renamed). With
    `stored_ab`, the network's ab of every frame in order (a film colorized by chunks on a cluster), the generator
    is not run: this is the pass that joins the chunks, with the temporal step over the whole film.

    Raises:
        VideoRefused: `src` cannot be colorized, or `dst` not written (see the module); nothing is left at `dst`.
    """
    from tqdm.auto import tqdm

    av = video_library()
    if options.codec not in CODECS:
        raise VideoRefused(f"bad_option: --codec must be one of {', '.join(CODECS)}, got {options.codec!r}")
    source_file = open_video(src)
    started = time.perf_counter()
    with source_file, published(dst) as temp:
        source = source_file.streams.video[0]
        source.thread_type = "AUTO"
        note = check_stream(source, options.max_pixels)
        time_base, fps = source.time_base, float(source.average_rate or 0)
        audio = source_file.streams.audio[0] if source_file.streams.audio else None
        try:
            out = av.open(str(temp), "w")  # the muxer by the temporary file's suffix, the output's
        except (OSError, av.error.FFmpegError) as e:
            raise VideoRefused(f"unwritable: {dst}: {e}") from None
        colorize_frames = _frame_colorizer(generator, size, resize, device, options.temporal, stored_ab)
        with out, tqdm(total=source.frames or None, unit="frame", desc=Path(src).name, disable=not progress) as bar:
            film = _Film(out, source, audio, options, colorize_frames, bar)
            _decode_into(source_file, source, audio, film)
            _check_complete(source_file, source, film.end)
            film.finish()
        if stored_ab is not None and next(stored_ab, None) is not None:
            raise VideoRefused("corrupt: the film decodes to fewer frames than when its chunks were colorized")
    seconds = float((film.end or 0) * time_base) if time_base else 0.0
    return VideoResult(frames=film.frames, seconds=seconds, fps=fps, audio=audio is not None, note=note,
                       elapsed=time.perf_counter() - started)  # fmt: skip


def _decode_into(source_file, source, audio, film: _Film) -> None:
    """Demux and decode the source into `film`; a stream that breaks off is `corrupt` (encoder and writer errors
    are `unwritable`, raised as such by `film`)."""
    import av

    streams = [source] + ([audio] if audio is not None else [])
    try:
        for packet in source_file.demux(*streams):
            if packet.stream is audio:
                film.add_audio(packet)
                continue
            for frame in packet.decode():
                film.add_frame(frame)
    except av.error.FFmpegError as e:
        raise VideoRefused(f"corrupt: the stream breaks off after frame {film.frames + len(film.pending)} "
                           f"({e})") from None  # fmt: skip
    if film.video_out is None:
        raise VideoRefused("corrupt: the video track holds no decodable frame")
