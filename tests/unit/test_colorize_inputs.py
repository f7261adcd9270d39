"""What `recolor colorize` reads and where it writes: listing inputs, output names, clashes, unwritable outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_files import hue_picture, write_checkpoint
from PIL import Image

from pipeline.colorize.files import ColorizeOptions, list_inputs, output_names
from pipeline.colorize.local import colorize

QUIET = ColorizeOptions(progress=False)
AT_64 = ColorizeOptions(size=64, progress=False)


def picture(path: Path, seed: int, size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hue_picture(seed, *size).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"))


# --- output names ----------------------------------------------------------------------------------


def test_output_names_swap_the_extension_for_png() -> None:
    assert output_names(["a/photo.jpg", "café photo ü.JPEG", "scan.tiff", "noext", "a.b.c.gif"]) == [
        "a/photo.png",
        "café photo ü.png",
        "scan.png",
        "noext.png",
        "a.b.c.png",
    ]


def test_inputs_that_would_share_an_output_keep_their_extension() -> None:
    assert output_names(["photo.jpg", "photo.png", "other.jpg"]) == ["photo.jpg.png", "photo.png.png", "other.png"]
    # A file's output would be the name of a folder of outputs: the file keeps its extension.
    assert output_names(["shot.jpg", "shot.png/inner.jpg"]) == ["shot.jpg.png", "shot.png/inner.png"]


# --- listing -----------------------------------------------------------------------------------------


def test_folders_are_listed_like_ingest_lists_them(tmp_path) -> None:
    root = tmp_path / "photos"
    for name in ("b.jpg", "a/c.png", "folder.jpg/inside.jpg", ".hidden.jpg", ".cache/d.jpg"):
        picture(root / name, len(name))
    (root / "notes.txt").write_text("not an image name")
    items, failed = list_inputs([str(root)])
    assert items == [(str(root / name), out) for name, out in [
        ("a/c.png", "a/c.png"), ("b.jpg", "b.png"), ("folder.jpg/inside.jpg", "folder.jpg/inside.png"),
    ]]  # fmt: skip
    assert failed == []


def test_a_given_folder_without_images_is_reported(tmp_path) -> None:
    (tmp_path / "empty.jpg").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("hello")
    items, failed = list_inputs([str(tmp_path / "empty.jpg"), str(tmp_path / "texts")])
    assert items == []
    assert [(uri, reason.split(":")[0]) for uri, reason in failed] == [
        (str(tmp_path / "empty.jpg"), "no_images"),
        (str(tmp_path / "texts"), "no_images"),
    ]
    assert "no images" in failed[0][1]


def test_one_name_in_two_given_folders_is_a_clash_not_an_overwrite(tmp_path) -> None:
    first, second = picture(tmp_path / "a" / "x.jpg", 1), picture(tmp_path / "b" / "x.jpg", 2)
    items, failed = list_inputs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert items == [(str(first), "x.png")]
    [(uri, reason)] = failed
    assert uri == str(second) and reason.startswith("name_clash: ") and str(first) in reason


def test_a_missing_path_is_listed_as_given(tmp_path) -> None:
    items, failed = list_inputs([str(tmp_path / "gone.jpg")])
    assert items == [(str(tmp_path / "gone.jpg"), "gone.png")] and failed == []


# --- colorize ----------------------------------------------------------------------------------------


def test_same_stem_inputs_both_get_an_output(tmp_path, checkpoint) -> None:
    inputs = tmp_path / "in"
    picture(inputs / "photo.jpg", 1, (30, 20))
    picture(inputs / "photo.png", 2, (20, 30))
    summary = colorize(str(checkpoint), [str(inputs)], str(tmp_path / "out"), AT_64)
    assert summary.failed == []
    assert sorted(Path(p).name for p in summary.written) == ["photo.jpg.png", "photo.png.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "photo.png.png")).shape == (30, 20, 3)


def test_an_unwritable_output_skips_that_input_only(tmp_path, checkpoint) -> None:
    inputs = tmp_path / "in"
    picture(inputs / "a.jpg", 1)
    picture(inputs / "b.jpg", 2)
    out = tmp_path / "out"
    (out / "a.png").mkdir(parents=True)  # a folder where the output should go
    summary = colorize(str(checkpoint), [str(inputs)], str(out), AT_64)
    assert summary.written == [str(out / "b.png")]
    [(uri, reason)] = summary.failed
    assert uri == str(inputs / "a.jpg") and reason.startswith(f"unwritable: {out / 'a.png'}: ")


def test_max_pixels_refuses_larger_inputs(tmp_path, checkpoint) -> None:
    small, large = picture(tmp_path / "small.png", 1, (10, 10)), picture(tmp_path / "large.png", 2, (11, 10))
    summary = colorize(str(checkpoint), [str(small), str(large)], str(tmp_path / "out"), replace(AT_64, max_pixels=100))
    assert summary.written == [str(tmp_path / "out" / "small.png")]
    [(uri, reason)] = summary.failed
    assert uri == str(large) and reason.startswith("too_large: 11x10 = 110 pixels")


# --- never over an input, never an earlier output -----------------------------------------------------


def test_an_output_folder_that_is_the_input_folder_is_refused_and_nothing_is_written(tmp_path, checkpoint) -> None:
    from ingest.errors import ConfigError

    photos = tmp_path / "photos"
    original = picture(photos / "a.png", 1).read_bytes()
    with pytest.raises(ConfigError, match=r"the output folder .*photos is the input folder .*photos"):
        colorize(str(checkpoint), [str(photos)], str(photos), QUIET)
    assert (photos / "a.png").read_bytes() == original and sorted(p.name for p in photos.iterdir()) == ["a.png"]


def test_an_output_that_would_land_on_an_input_file_is_refused(tmp_path, checkpoint, monkeypatch) -> None:
    from ingest.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    original = picture(tmp_path / "photo.png", 2).read_bytes()
    with pytest.raises(ConfigError, match=r"the output photo.png of photo.png would overwrite the input photo.png"):
        colorize(str(checkpoint), ["photo.png"], ".", QUIET)  # `recolor colorize photo.png -o .`
    assert (tmp_path / "photo.png").read_bytes() == original
    picture(tmp_path / "b.jpg", 3)  # b.jpg's output b.png is no input: that one may go here
    assert colorize(str(checkpoint), ["b.jpg"], ".", QUIET).written == [str(tmp_path / "b.png")]


def test_outputs_in_a_subfolder_of_the_input_are_never_colorized_again(tmp_path, checkpoint) -> None:
    from ingest.errors import ConfigError

    photos = tmp_path / "photos"
    picture(photos / "a.png", 4)
    picture(photos / "b.png", 5)
    first = colorize(str(checkpoint), [str(photos)], str(photos / "colorized"), QUIET)
    assert sorted(Path(p).name for p in first.written) == ["a.png", "b.png"]
    again = colorize(str(checkpoint), [str(photos)], str(photos / "colorized"), replace(QUIET, overwrite=True))
    assert sorted(Path(p).name for p in again.written) == ["a.png", "b.png"]  # the photos only, not the outputs
    other = colorize(str(checkpoint), [str(photos)], str(photos / "second"), QUIET)
    assert sorted(Path(p).relative_to(photos / "second").as_posix() for p in other.written) == ["a.png", "b.png"]
    with pytest.raises(ConfigError, match=r"colorized/a.png is a colorized picture"):
        colorize(str(checkpoint), [str(photos / "colorized" / "a.png")], str(tmp_path / "x"), QUIET)


# --- the network's view of a photo: as its training samples were cut ---------------------------------------


def test_cover_keeps_the_aspect_at_the_training_side_and_pads_to_the_networks_multiple() -> None:
    from pipeline.colorize.pixels import network_input

    rgb = np.asarray(hue_picture(3, 500, 375))  # 4:3 landscape, like ImageNet's median photo
    tensor, (height, width) = network_input(rgb, 256, 32, "cover")
    assert (height, width) == (256, 341) and tuple(tensor.shape) == (1, 256, 352)
    # The padding mirrors the photo (no black band for the network to colour): column 341 + k is column 339 - k.
    assert torch.equal(tensor[:, :, 341:], tensor[:, :, 340 - np.arange(1, 12)])
    portrait, (height, width) = network_input(rgb.transpose(1, 0, 2).copy(), 256, 256, "cover")
    assert (height, width) == (341, 256) and tuple(portrait.shape) == (1, 512, 256)
    squashed, (height, width) = network_input(rgb, 256, 32, "squash")
    assert (height, width) == (256, 256) and tuple(squashed.shape) == (1, 256, 256)


def test_colorize_predicts_each_photo_at_its_own_shape_and_crops_the_padding_off() -> None:
    from pipeline.colorize.pixels import colorize_rgb, network_input, predict_photos
    from pipeline.models import build_generator

    torch.manual_seed(0)
    generator = build_generator("unet_256", base_filters=4, num_downs=5).eval()  # a multiple of 32
    photos = [np.asarray(hue_picture(seed, w, h)) for seed, (w, h) in enumerate([(90, 60), (60, 90), (90, 60)])]
    inputs = [network_input(rgb, 64, 32, "cover") for rgb in photos]
    assert [tuple(t.shape) for t, _ in inputs] == [(1, 64, 96), (1, 96, 64), (1, 64, 96)]
    predicted = predict_photos(generator, inputs, torch.device("cpu"))
    assert [tuple(ab.shape) for ab in predicted] == [(2, 64, 96), (2, 96, 64), (2, 64, 96)]
    with torch.no_grad():  # batched by shape, yet the same as one photo at a time
        alone = generator(inputs[2][0][None])[0][:, :64, :96]
    assert torch.allclose(predicted[2], alone, atol=1e-6)
    outputs = colorize_rgb(generator, photos, 64, torch.device("cpu"), "cover")
    assert [out.shape for out in outputs] == [rgb.shape for rgb in photos]


def test_names_that_would_leave_the_output_folder_are_refused() -> None:
    from pipeline.colorize.files import _safe_names

    kept, refused = _safe_names([("s3://b/p//etc/x.jpg", "/etc/x.jpg"), ("s3://b/p/a/../../x.jpg", "a/../../x.jpg"),
                                 ("s3://b/p/ok/x.jpg", "ok/x.jpg")])  # fmt: skip
    assert kept == [("s3://b/p/ok/x.jpg", "ok/x.jpg")]
    assert [reason.split(":")[0] for _, reason in refused] == ["bad_name", "bad_name"]


def test_a_strip_photo_is_squashed_not_fed_to_the_network_at_its_length() -> None:
    from pipeline.colorize.pixels import network_input

    strip = np.asarray(hue_picture(1, 4000, 2))
    tensor, crop = network_input(strip, 64, 32, "cover")
    assert crop == (64, 64) and tuple(tensor.shape) == (1, 64, 64)


def test_the_serving_model_reads_paths_only_below_its_root_and_caps_max_pixels(tmp_path, monkeypatch) -> None:
    import pandas as pd

    from pipeline.models.saved import GeneratorSpec, save_generator
    from pipeline.serving.pyfunc import ColorizerModel

    spec = GeneratorSpec("unet_256", "batch", 4, 5, 32)
    model = ColorizerModel(str(save_generator(spec.build(), spec, tmp_path / "model")), device="cpu")
    inside = picture(tmp_path / "served" / "a.png", 1)
    outside = picture(tmp_path / "private" / "b.png", 2)
    monkeypatch.delenv("RECOLOR_SERVE_PATH_ROOT", raising=False)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="path_refused: reading paths is off"):
        model.predict(pd.DataFrame({"path": [str(inside)]}))
    monkeypatch.setenv("RECOLOR_SERVE_PATH_ROOT", str(tmp_path / "served"))
    answer = model.predict(
        pd.DataFrame({"path": [str(inside), str(outside), str(tmp_path / "served/../private/b.png")]})
    )
    assert answer["error"][0] == "" and answer["width"][0] == 24
    assert answer["error"][1].startswith("row 1: path_refused") and answer["error"][2].startswith("row 2: path_refused")
    big = model.predict(pd.DataFrame({"path": [str(inside)]}), params={"max_pixels": 10**12})  # capped, not raised
    assert big["error"][0] == ""
    with pytest.raises(MlflowException, match="too_large"):  # a request may lower the limit
        model.predict(pd.DataFrame({"path": [str(inside)]}), params={"max_pixels": 10})


# --- the side-by-side picture ---------------------------------------------------------------------------


def test_side_by_side_shows_each_photos_gray_input_its_colorized_picture_and_the_photo(tmp_path, checkpoint) -> None:
    inputs = [picture(tmp_path / "in" / f"{name}.png", seed, (48, 32)) for seed, name in enumerate("ab", 1)]
    target = tmp_path / "compare" / "side.png"
    target.parent.mkdir()
    options = replace(AT_64, side_by_side=str(target))
    summary = colorize(str(checkpoint), [str(path) for path in inputs], str(tmp_path / "out"), options)
    assert len(summary.written) == 2 and not summary.failed
    side = np.asarray(Image.open(target).convert("RGB")).astype(int)
    height, gap, label, header = 256, 6, 16, 18  # pipeline.colorize.pixels.side_by_side's layout
    assert side.shape[0] == header + 2 * (height + label + gap) + gap
    width = round(48 * height / 32)
    for row, path in enumerate(inputs):
        top = header + row * (height + label + gap) + label
        cells = [side[top : top + height, gap + i * (width + gap) : gap + i * (width + gap) + width] for i in range(3)]
        gray, colored, photo = cells
        assert np.abs(gray - gray.mean(axis=2, keepdims=True)).max() <= 2  # no colour: the network's input
        expected = [np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BICUBIC)).astype(int)
                    for p in (path, tmp_path / "out" / path.name)]  # fmt: skip
        assert np.abs(photo - expected[0]).max() <= 1 and np.abs(colored - expected[1]).max() <= 1


def test_side_by_side_is_refused_with_ray(tmp_path, checkpoint, capsys) -> None:
    from pipeline.cli import main

    photo = picture(tmp_path / "a.png", 1)
    code = main(["colorize", "--model", str(checkpoint), str(photo), "-o", str(tmp_path / "out"), "--ray",
                 "--side-by-side", str(tmp_path / "s.png")])  # fmt: skip
    assert code == 2 and "--side-by-side applies without --ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.png").exists()


def test_side_by_side_never_replaces_an_input_nor_a_file_recolor_did_not_write(tmp_path, checkpoint, capsys) -> None:
    """The hostile pass: `--side-by-side photos/000000000009.jpg` replaced the original photo (and any other file)
    with the comparison PNG, and exited 0."""
    from pipeline.cli import main

    photos = tmp_path / "photos"
    first, second = picture(photos / "000000000009.jpg", 1), picture(photos / "000000000025.jpg", 2)
    original = first.read_bytes()
    out = tmp_path / "out"
    for target in (first, photos / "sub" / ".." / first.name):  # named, or reached another way
        code = main(["colorize", "--model", str(checkpoint), str(photos), "-o", str(out), "--size", "64",
                     "--no-progress", "--side-by-side", str(target)])  # fmt: skip
        assert code == 2 and "is an input: the comparison picture never replaces a photo" in capsys.readouterr().err
        assert first.read_bytes() == original and not out.exists()
    code = main(["colorize", "--model", str(checkpoint), str(second), "-o", str(out), "--size", "64", "--no-progress",
                 "--side-by-side", str(out / "000000000025.png")])  # fmt: skip
    assert code == 2 and "one of this run's colorized pictures" in capsys.readouterr().err

    important = tmp_path / "important.txt"
    important.write_text("keep me")
    command = ["colorize", "--model", str(checkpoint), str(photos), "-o", str(out), "--size", "64", "--no-progress",
               "--side-by-side", str(important)]  # fmt: skip
    assert main(command) == 1
    captured = capsys.readouterr()
    assert "the comparison picture was not written: not_ours: --side-by-side" in captured.err
    assert "could not be colorized" not in captured.err  # the photos were colorized: no input failed
    assert important.read_text() == "keep me" and len(list(out.glob("*.png"))) == 2
    assert main([*command, "--overwrite-any"]) == 0  # asked for: replaced, whole
    assert important.read_bytes().startswith(b"\x89PNG") and f"side by side: {important}" in capsys.readouterr().out

    ours = out / "side.png"  # written by an earlier run: kept without --overwrite, replaced with it
    again = ["colorize", "--model", str(checkpoint), str(photos), "-o", str(out), "--size", "64", "--no-progress",
             "--side-by-side", str(ours)]  # fmt: skip
    assert main([*again, "--overwrite"]) == 0 and ours.exists()
    assert ours.name in (out / ".recolor-colorized").read_text().splitlines()  # in the folder's ledger
    ours.write_bytes(b"marker")
    assert main(again) == 0 and ours.read_bytes() == b"marker"
    assert main([*again, "--overwrite"]) == 0 and ours.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith((".tmp", "tmp"))] == []  # no partial file left


def test_side_by_side_to_an_unwritable_path_is_its_own_error_not_an_input_failure(tmp_path, checkpoint,
                                                                                  capsys) -> None:  # fmt: skip
    from pipeline.cli import main

    photo = picture(tmp_path / "a.png", 1)
    (tmp_path / "file").write_text("a file where a folder should be")
    code = main(["colorize", "--model", str(checkpoint), str(photo), "-o", str(tmp_path / "out"), "--size", "64",
                 "--no-progress", "--side-by-side", str(tmp_path / "file" / "side.png")])  # fmt: skip
    captured = capsys.readouterr()  # refused before any picture is colorized, in one line naming it
    assert code == 2 and "could not be colorized" not in captured.err and "Traceback" not in captured.err
    assert f"recolor: error: --side-by-side {tmp_path / 'file' / 'side.png'}: " in captured.err
    assert not list((tmp_path / "out").glob("*.png"))
    # A folder that cannot take the picture once it is made (removed meanwhile, full): said as its own error.
    from pipeline.colorize.files import ColorizeSummary, OutputFolder
    from pipeline.colorize.local import write_side_by_side

    summary = ColorizeSummary()
    rows = [("a.png", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))]
    write_side_by_side(OutputFolder(tmp_path / "file" / "deeper"), "side.png", rows, summary)
    assert summary.failed == [] and summary.side_by_side_error.startswith("unwritable: --side-by-side ")


def test_a_file_recolor_did_not_write_that_blocks_an_output_is_not_reported_done(tmp_path, checkpoint,
                                                                                 capsys) -> None:  # fmt: skip
    """The hostile pass: with `out/000000000025.png` a text file, colorize said "1 already there" and exited 0."""
    from pipeline.cli import main

    photo = picture(tmp_path / "photos" / "000000000025.jpg", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000000025.png").write_text("not a picture recolor wrote")
    code = main(["colorize", "--model", str(checkpoint), str(photo), "-o", str(out), "--size", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "already there" not in captured.out
    assert f"skipped {photo}: not_ours: {out / '000000000025.png'} exists and recolor did not write it" in captured.err
    assert (out / "000000000025.png").read_text() == "not a picture recolor wrote"
    # An earlier run's own picture is still skipped, and said so.
    (out / "000000000025.png").unlink()
    assert main(["colorize", "--model", str(checkpoint), str(photo), "-o", str(out), "--size", "64",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["colorize", "--model", str(checkpoint), str(photo), "-o", str(out), "--size", "64",
                 "--no-progress"]) == 0  # fmt: skip
    assert "1 already there" in capsys.readouterr().out
