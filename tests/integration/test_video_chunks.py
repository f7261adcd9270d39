"""Films on Ray (`pipeline.colorize.chunks`): cut at keyframes, chunks colorized by Ray tasks, joined in one pass;
the same film as the single-process path, resumed by chunk, never a half-written chunk trusted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import videos
from fixtures.videos import clip_frames, read_clip, write_clip

from ingest.lab import lightness
from pipeline.cli import main
from pipeline.colorize.chunks import (
    chunk_frames_ab,
    colorize_video_on_ray,
    plan_chunks,
    prepare,
    work_folder,
    write_chunk,
)
from pipeline.colorize.video import VideoOptions, VideoRefused, colorize_video

model, generator = videos.model, videos.generator  # the module's fixtures: a checkpoint, and it loaded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def film(tmp_path_factory) -> Path:
    """45 frames of a pan, a keyframe every 10 with B-frames between, and audio: 3 chunks of >= 12 frames."""
    folder = tmp_path_factory.mktemp("film")
    return write_clip(folder / "pan.mp4", clip_frames(45, 48, 32), codec="h264", gop=10, audio=True)


def test_chunks_start_at_keyframes_and_hold_every_frame_once(film) -> None:
    chunks = plan_chunks(str(film), 12)
    assert [chunk.frames for chunk in chunks] == [20, 20, 5]  # keyframes every 10 frames: cut at the 2nd and 4th
    assert [chunk.start for chunk in chunks[1:]] == [chunk.stop for chunk in chunks[:-1]]
    assert chunks[-1].stop is None
    every_frame = plan_chunks(str(film), 1)
    assert [chunk.frames for chunk in every_frame] == [10, 10, 10, 10, 5]
    one_keyframe = write_clip(film.parent / "intra.mkv", clip_frames(7, 16, 16))  # ffv1 here: one keyframe
    assert [chunk.frames for chunk in plan_chunks(str(one_keyframe), 3)] == [7]  # one chunk: no cut without a key


def test_the_chunks_ab_are_the_films_frame_by_frame(generator, film) -> None:
    loaded, size, resize = generator
    frames, _, _ = read_clip(film)
    from pipeline.colorize.pixels import network_input, predict_photos
    from pipeline.models.saved import min_side

    inputs = [network_input(frame, size, min_side(loaded), resize) for frame in frames]
    whole = torch.stack(predict_photos(loaded, inputs, torch.device("cpu"))).numpy()
    parts = [chunk_frames_ab(loaded, str(film), chunk, size, resize, torch.device("cpu"), 7)
             for chunk in plan_chunks(str(film), 12)]  # fmt: skip
    assert sum(len(part) for part in parts) == len(frames)
    np.testing.assert_allclose(np.concatenate(parts).astype(np.float32), whole, atol=2e-3)  # float16 kept


def test_a_film_on_ray_is_the_single_process_film(ray_local, generator, film, tmp_path, capsys) -> None:
    loaded, size, resize = generator
    options = VideoOptions(codec="ffv1")
    local = colorize_video(loaded, size, resize, torch.device("cpu"), str(film), str(tmp_path / "local.mkv"), options,
                           progress=False)  # fmt: skip
    done = colorize_video_on_ray(loaded, "test-model", size, resize, str(film), str(tmp_path / "ray.mkv"), options,
                                 chunk_frames=12, actors=2, progress=False)  # fmt: skip
    assert done.chunks == 3 and done.reused == 0 and done.result.frames == local.frames == 45
    source, _, _ = read_clip(film)
    ours, ours_pts, info = read_clip(tmp_path / "ray.mkv")
    theirs, their_pts, _ = read_clip(tmp_path / "local.mkv")
    # Every frame, in order, with the timestamps the single-process path writes (the source's, checked by
    # tests/unit/test_video.py); the audio kept.
    assert len(ours) == len(source) and ours_pts == their_pts and info["audio"]
    for index, (frame, colored, single) in enumerate(zip(source, ours, theirs, strict=True)):
        assert np.abs(lightness(colored) - lightness(frame)).max() <= 1.0, index
        # The temporal step ran over the whole film in one pass: no jump at the chunk boundaries (frames 20, 40).
        assert np.abs(colored.astype(int) - single.astype(int)).max() <= 2, index
    assert not Path(work_folder(str(tmp_path / "ray.mkv"))).exists()  # the chunks go once the film is whole


def test_an_interrupted_film_resumes_by_chunk(ray_local, generator, film, tmp_path) -> None:
    loaded, size, resize = generator
    dst = str(tmp_path / "out.mkv")
    options = VideoOptions(codec="ffv1")
    # A first run stopped after two chunks: those two whole, a third cut off mid-write (a temporary file).
    first = colorize_video_on_ray(loaded, "m", size, resize, str(film), str(tmp_path / "probe.mkv"), options,
                                  chunk_frames=12, progress=False)  # fmt: skip
    assert first.chunks == 3
    from pipeline.colorize import chunks as module

    plan = module_plan(module, loaded, size, resize, film, "m")
    folder = work_folder(dst)
    assert prepare(folder, plan) == set()
    chunks = plan_chunks(str(film), 12)
    for chunk in chunks[:2]:
        write_chunk(folder, chunk, chunk_frames_ab(loaded, str(film), chunk, size, resize, torch.device("cpu"), 8))
    (Path(folder) / f".{chunks[2].name}.999.tmp").write_bytes(b"PK\x03\x04 half a chunk")
    resumed = colorize_video_on_ray(loaded, "m", size, resize, str(film), dst, options, chunk_frames=12,
                                    progress=False)  # fmt: skip
    assert (resumed.chunks, resumed.reused) == (3, 2)
    np.testing.assert_array_equal(np.stack(read_clip(Path(dst))[0]), np.stack(read_clip(tmp_path / "probe.mkv")[0]))
    # Another source under the same name (or another model): the old chunks are not reused.
    write_clip(tmp_path / "film2.mp4", clip_frames(45, 48, 32, seed=5), codec="h264", gop=10)
    other = str(tmp_path / "other.mkv")
    prepare(work_folder(other), plan)  # a plan of the first film left where the second one's output goes
    for chunk in chunks:
        write_chunk(work_folder(other), chunk, np.zeros((chunk.frames, 2, 32, 48), np.float16))
    again = colorize_video_on_ray(loaded, "m", size, resize, str(tmp_path / "film2.mp4"), other, options,
                                  chunk_frames=12, progress=False)  # fmt: skip
    assert again.reused == 0


def module_plan(module, loaded, size, resize, film, key) -> dict:
    """The plan `colorize_video_on_ray` writes for `film` (what makes chunks reusable)."""
    from dataclasses import asdict

    src = str(Path(film).absolute())
    return {"format": module.PLAN_FORMAT, **module.source_identity(src), "model": key,
            "weights": module.model_digest(loaded), "size": size, "resize": resize, "dropout": False,
            "chunks": [asdict(c) for c in module.plan_chunks(src, 12)]}  # fmt: skip


def test_the_command_line_colorizes_films_on_ray_and_refuses_bad_ones(ray_local, model, film, tmp_path,
                                                                      capsys) -> None:  # fmt: skip
    (tmp_path / "films").mkdir()
    os.link(film, tmp_path / "films" / "pan.mp4")
    (tmp_path / "films" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a film")
    code = main(["colorize", "--model", str(model), "--size", "64", str(tmp_path / "films"), "-o",
                 str(tmp_path / "out"), "--ray", "--chunk-frames", "12", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 1  # one film could not be colorized; the other was
    assert "3 chunk(s) cut at keyframes" in printed.out and "45 frames" in printed.out
    assert "broken.mp4: corrupt" in printed.err  # an MP4 header and nothing after it: a film cut short
    frames, _, info = read_clip(tmp_path / "out" / "pan.mp4")
    assert len(frames) == 45 and info["audio"]
    assert not (tmp_path / "out" / "broken.mp4").exists()


def test_a_refused_chunk_is_the_films_one_line(ray_local, generator, tmp_path) -> None:
    loaded, size, resize = generator
    hdr = write_clip(tmp_path / "hdr.mkv", clip_frames(4, 16, 16), transfer=16)
    with pytest.raises(VideoRefused, match="^hdr: "):
        colorize_video_on_ray(loaded, "m", size, resize, str(hdr), str(tmp_path / "o.mkv"), progress=False)
    assert not (tmp_path / "o.mkv").exists()


@pytest.mark.s3
def test_films_in_and_out_of_s3_in_one_process_and_on_ray(ray_local, s3_env, model, film, tmp_path, capsys) -> None:
    from ingest.storage import open_storage

    films = open_storage(f"s3://{s3_env.bucket}/films")
    films.upload_file("pan.mp4", film)
    films.upload_file("trip/day-1.mp4", film)
    for out, extra in (("one-process", []), ("on-ray", ["--ray", "--chunk-frames", "12"])):
        target = f"s3://{s3_env.bucket}/{out}"
        code = main(["colorize", "--model", str(model), "--size", "64", f"s3://{s3_env.bucket}/films", "-o", target,
                     "--no-progress", *extra])  # fmt: skip
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert printed.out.count("3 chunk(s) cut at keyframes") == (2 if extra else 0)
        outputs = open_storage(target)
        # The films under the prefix, named below it; nothing else left there (no chunks, no partial upload).
        assert sorted(info.key for info in outputs.list(include_partial=True)) == ["pan.mp4", "trip/day-1.mp4"]
        local = tmp_path / out / "day-1.mp4"
        local.parent.mkdir()
        local.write_bytes(outputs.read_bytes("trip/day-1.mp4"))
        frames, _, info = read_clip(local)
        assert len(frames) == 45 and info["audio"]
        again = main(["colorize", "--model", str(model), "--size", "64", f"s3://{s3_env.bucket}/films", "-o", target,
                      "--no-progress", *extra])  # fmt: skip
        assert again == 0 and capsys.readouterr().out.count("is there already") == 2
    # An output prefix below the input prefix: its films are not taken as inputs on the next run.
    inside = f"s3://{s3_env.bucket}/films/color"
    for _ in range(2):
        assert main(["colorize", "--model", str(model), "--size", "64", f"s3://{s3_env.bucket}/films", "-o", inside,
                     "--no-progress"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("is there already") == 2
    assert sorted(info.key for info in open_storage(inside).list()) == ["pan.mp4", "trip/day-1.mp4"]
    code = main(["colorize", "--model", str(model), f"s3://{s3_env.bucket}/films/gone.mp4", "-o",
                 f"s3://{s3_env.bucket}/gone.mp4", "--no-progress"])  # fmt: skip
    assert code == 1 and "missing: no such object" in capsys.readouterr().err


def remuxed(src: Path, dst: Path, drop_first: int = 0, shift: int = 0) -> Path:
    """`src`'s video packets copied into `dst` (no re-encoding): the first `drop_first` in decode order left out (a
    file cut mid-GOP), timestamps moved back by `shift` ticks (an MP4 whose edit list then trims frames)."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for number, packet in enumerate(source.demux(stream)):
            if packet.dts is None or number < drop_first:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    return dst


@pytest.mark.parametrize("cut", ["mid-gop", "edit-list"])
def test_films_cut_by_stream_copy_have_as_many_frames_on_ray_as_in_one_process(ray_local, generator, film, tmp_path,
                                                                                cut) -> None:  # fmt: skip
    # What `ffmpeg -ss ... -c copy` makes: frames before the first keyframe, or trimmed by the edit list, that the
    # decoder does not output. The chunks must count the frames the film decodes to, not its packets.
    loaded, size, resize = generator
    src = remuxed(film, tmp_path / f"{cut}.mp4", **({"drop_first": 4} if cut == "mid-gop" else {"shift": 3}))
    options = VideoOptions(codec="ffv1")
    local = colorize_video(loaded, size, resize, torch.device("cpu"), str(src), str(tmp_path / "local.mkv"), options,
                           progress=False)  # fmt: skip
    done = colorize_video_on_ray(loaded, "m", size, resize, str(src), str(tmp_path / "ray.mkv"), options,
                                 chunk_frames=12, progress=False)  # fmt: skip
    assert done.result.frames == local.frames == len(read_clip(src)[0])
    assert read_clip(tmp_path / "ray.mkv")[1] == read_clip(tmp_path / "local.mkv")[1]
