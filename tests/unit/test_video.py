"""`recolor colorize` on videos (`pipeline.colorize.video`): generated clips of a few frames (tests/fixtures/videos),
a tiny generator checkpoint, the command line as a user runs it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from fixtures import videos
from fixtures.videos import clip_frames, read_clip, write_clip

from ingest.lab import lightness
from pipeline.cli import main
from pipeline.colorize.pixels import colorize_rgb
from pipeline.colorize.video import VideoOptions, colorize_video

model, generator = videos.model, videos.generator  # the module's fixtures: a checkpoint, and it loaded


def colorize_file(generator, src: Path, dst: Path, **options):
    loaded, size, resize = generator
    return colorize_video(loaded, size, resize, torch.device("cpu"), str(src), str(dst), VideoOptions(**options),
                          progress=False)  # fmt: skip


def test_frames_keep_their_lightness_and_take_the_photo_paths_colours_without_smoothing(generator, tmp_path) -> None:
    frames = clip_frames(6, 48, 32)
    src = write_clip(tmp_path / "pan.mkv", frames)
    result = colorize_file(generator, src, tmp_path / "out" / "pan.mkv", codec="ffv1", temporal=False)
    out, _, info = read_clip(tmp_path / "out" / "pan.mkv")
    assert result.frames == len(out) == len(frames) and (info["width"], info["height"]) == (48, 32)
    assert info["fps"] == result.fps == 10
    loaded, size, resize = generator
    as_photos = colorize_rgb(loaded, frames, size, torch.device("cpu"), resize)
    for index, (frame, colored, photo) in enumerate(zip(frames, out, as_photos, strict=True)):
        assert np.abs(lightness(colored) - lightness(frame)).max() <= 1.0, index  # L kept within 1 unit
        assert np.abs(colored.astype(int) - photo.astype(int)).max() <= 1, index  # the photo path's colours


def test_rate_timestamps_audio_and_odd_sides_are_kept(generator, tmp_path) -> None:
    pts = [0, 1, 2, 4, 7, 8, 12]  # a variable frame rate: gaps of 1 to 4 ticks
    src = write_clip(tmp_path / "vfr.mp4", clip_frames(len(pts), 47, 33), fps=25, codec="h264", audio=True, pts=pts)
    result = colorize_file(generator, src, tmp_path / "out.mp4")
    source_frames, source_pts, _ = read_clip(src)
    frames, out_pts, info = read_clip(tmp_path / "out.mp4")
    assert len(frames) == len(source_frames) == result.frames and out_pts == source_pts
    assert info["audio"] and result.audio and (info["width"], info["height"]) == (47, 33)
    assert 12 / 25 < result.seconds <= 16 / 25  # where the last frame (at tick 12) ends


def shimmering(generator):
    """The tiny generator with its last layer 30x stronger: its colours then follow the camera noise of a still
    scene from frame to frame, as an undertrained colorizer's do (a trained one shimmers less, never not at all)."""
    loaded, size, resize = generator
    louder = copy.deepcopy(loaded)
    last = [m for m in louder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.weight.mul_(30)
    return louder, size, resize


def smooth_all(inputs, predicted) -> list[torch.Tensor]:
    from pipeline.colorize.temporal import FlowSmoother

    smoother = FlowSmoother()
    return [smoother(light[:, : crop[0], : crop[1]], ab) for (light, crop), ab in zip(inputs, predicted, strict=True)]


def test_the_temporal_step_at_least_halves_the_colour_change_of_a_still_noisy_scene(generator) -> None:
    """What the step controls: the ab the network adds, frame to frame, at its resolution. (The output's own ab
    also moves with the camera's noise in L, which the output keeps by design: bench/colorize.py reports both.)"""
    from pipeline.colorize.pixels import network_input, predict_photos
    from pipeline.models.saved import min_side

    loaded, size, resize = shimmering(generator)
    inputs = [network_input(frame, size, min_side(loaded), resize) for frame in clip_frames(8, 64, 48, still=True)]
    predicted = predict_photos(loaded, inputs, torch.device("cpu"))
    smoothed = smooth_all(inputs, predicted)

    def change(sequence) -> float:
        return float(np.mean([(b - a).abs().mean() for a, b in zip(sequence, sequence[1:], strict=False)]))

    assert change(predicted) > 0  # it does shimmer
    assert change(smoothed) <= change(predicted) / 2, (change(predicted), change(smoothed))


def test_a_panned_scene_keeps_following_the_prediction(generator) -> None:
    """Moving content is not frozen: on a pan the smoothed colours stay close to the frame's own prediction."""
    from pipeline.colorize.pixels import network_input, predict_photos
    from pipeline.models.saved import min_side

    loaded, size, resize = shimmering(generator)
    inputs = [network_input(frame, size, min_side(loaded), resize) for frame in clip_frames(8, 64, 48)]
    predicted = predict_photos(loaded, inputs, torch.device("cpu"))
    smoothed = smooth_all(inputs, predicted)
    frozen = [predicted[0]] * len(predicted)  # what a step that ignored motion would give
    gap = np.mean([(s - p).abs().mean() for s, p in zip(smoothed, predicted, strict=True)])
    stale = np.mean([(f - p).abs().mean() for f, p in zip(frozen, predicted, strict=True)])
    assert gap < stale / 2, (gap, stale)


# --- the command line and bad input -----------------------------------------------------------------------


def test_one_film_to_one_file_and_a_folder_of_films_to_a_folder(model, tmp_path, capsys) -> None:
    film = write_clip(tmp_path / "films" / "a.mp4", clip_frames(4, 32, 32), codec="h264")
    write_clip(tmp_path / "films" / "sub" / "b.avi", clip_frames(3, 32, 32), codec="mpeg4")
    assert main(["colorize", "--model", str(model), str(film), "-o", str(tmp_path / "a-color.mp4"), "--size", "64",
                 "--no-progress"]) == 0  # fmt: skip
    assert len(read_clip(tmp_path / "a-color.mp4")[0]) == 4
    out = tmp_path / "films" / "colored"  # inside the input folder: never an input on the next run
    for _ in range(2):
        assert main(["colorize", "--model", str(model), str(tmp_path / "films"), "-o", str(out), "--size", "64",
                     "--no-progress"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "a.mp4 -> " in said and "b.avi -> " in said and "is there already" in said
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.m*")) == ["a.mp4", "sub/b.mkv"]


def test_bad_videos_are_refused_one_line_each_and_the_others_go_on(model, tmp_path, capsys) -> None:
    good = write_clip(tmp_path / "in" / "good.mp4", clip_frames(3, 32, 32), codec="h264")
    (tmp_path / "in" / "text.mp4").write_text("not a video at all")
    audio_only = tmp_path / "in" / "sound.mp4"
    _audio_only(audio_only)
    whole = write_clip(tmp_path / "long.mkv", clip_frames(30, 32, 32)).read_bytes()
    (tmp_path / "in" / "cut.mkv").write_bytes(whole[: len(whole) // 3])  # a download that broke off
    mp4 = write_clip(tmp_path / "long.mp4", clip_frames(30, 32, 32), codec="h264").read_bytes()
    (tmp_path / "in" / "noindex.mp4").write_bytes(mp4[: len(mp4) // 2])  # cut before its index (moov at the end)
    write_clip(tmp_path / "in" / "hdr.mkv", clip_frames(2, 32, 32), transfer=16)
    write_clip(tmp_path / "in" / "big.mkv", clip_frames(2, 64, 64))
    code = main(["colorize", "--model", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--size",
                 "64", "--no-progress", "--max-pixels", "2000"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    reasons = {line.split(": ")[0].split("/")[-1]: line for line in captured.err.splitlines() if "skipped" in line}
    assert "not_a_video" in reasons["text.mp4"] and "no_video_track" in reasons["sound.mp4"]
    assert "corrupt" in reasons["cut.mkv"] and "hdr" in reasons["hdr.mkv"] and "too_large" in reasons["big.mkv"]
    assert "corrupt: it begins as a MP4/MOV film" in reasons["noindex.mp4"]  # not "not_a_video"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["good.mp4"], written  # no half-written file under any name, hidden ones included
    assert len(read_clip(tmp_path / "out" / "good.mp4")[0]) == 3 and good.exists()


def _audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        sound = out.add_stream("aac", rate=16000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        silence.sample_rate, silence.pts = 16000, 0
        for packet in [*sound.encode(silence), *sound.encode(None)]:
            out.mux(packet)


def audio_packets(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(container.streams.audio[0]) if packet.dts is not None)


def test_every_audio_packet_is_copied_even_those_before_the_first_decoded_frame(generator, tmp_path) -> None:
    src = write_clip(tmp_path / "talk.mp4", clip_frames(20, 32, 32), codec="h264", audio=True)
    colorize_file(generator, src, tmp_path / "out.mp4")
    assert audio_packets(tmp_path / "out.mp4") == audio_packets(src) > 0


def test_outputs_never_clash_never_replace_a_stranger_and_a_codec_must_fit_its_file(model, tmp_path, capsys) -> None:
    for name in ("c.avi", "c.webm"):  # both would be c.mkv
        write_clip(
            tmp_path / "x" / name, clip_frames(2, 32, 32), codec="mpeg4" if name.endswith("avi") else "libvpx-vp9"
        )
    base = ["colorize", "--model", str(model), "--size", "64", "--no-progress"]
    assert main([*base, str(tmp_path / "x"), "-o", str(tmp_path / "out")]) == 1
    assert "name_clash" in capsys.readouterr().err and [p.name for p in (tmp_path / "out").iterdir()] == ["c.mkv"]

    film = write_clip(tmp_path / "a.mp4", clip_frames(2, 32, 32), codec="h264")
    assert main([*base, str(film), str(film), "-o", str(tmp_path / "two.mp4")]) == 2  # one output file, two films
    assert "names one output film" in capsys.readouterr().err

    stranger = tmp_path / "mine.mp4"
    stranger.write_bytes(film.read_bytes())  # not written by recolor: a plain run does not call it done
    assert main([*base, str(film), "-o", str(stranger)]) == 1
    said = capsys.readouterr()
    assert "not_ours" in said.err and "is there already" not in said.out
    # --overwrite leaves it too
    assert main([*base, str(film), "-o", str(stranger), "--overwrite"]) == 1
    assert "not_ours" in capsys.readouterr().err and stranger.read_bytes() == film.read_bytes()
    assert main([*base, str(film), "-o", str(stranger), "--overwrite-any"]) == 0
    assert main([*base, str(film), "-o", str(stranger), "--overwrite"]) == 0  # now it is recolor's own

    assert main([*base, str(film), "-o", str(tmp_path / "web.webm")]) == 1  # WebM takes VP8, VP9, AV1 only
    assert "bad_option: --codec h264 cannot be written in a .webm file" in capsys.readouterr().err
    assert not (tmp_path / "web.webm").exists() and not list(tmp_path.glob(".*partial*"))


def test_the_warping_error_is_near_zero_for_a_steady_film_and_grows_with_flicker() -> None:
    from pipeline.colorize.temporal import warping_error

    frames = clip_frames(6, 64, 48)  # a pan of 2 px a frame: the flow of the source carries each frame onto the next
    steady = warping_error(frames, frames)
    tint = np.array([1, -1, 0])
    flickering = [(frame.astype(int) + (12 if index % 2 else -12) * tint).clip(0, 255).astype(np.uint8)
                  for index, frame in enumerate(frames)]  # fmt: skip
    assert steady < 0.003
    assert warping_error(flickering, frames) > 5 * max(steady, 1e-4)
    assert warping_error(flickering[:1], frames[:1]) == 0.0  # one frame: no pair
