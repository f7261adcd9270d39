"""`decode_image` on a zoo of odd and broken files, grayscale detection, and the cover/squash geometry."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from bad_files import encode, png_chunk
from PIL import Image

from ingest.images import ImageRejected, decode_image, is_gray_mode, is_grayscale, mean_chroma
from ingest.lab import rgb8_to_lab8

RED, GREEN, BLUE, YELLOW, WHITE = (220, 20, 30), (30, 180, 40), (20, 40, 220), (240, 230, 20), (255, 255, 255)


def png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims `width` x `height`: a decompression bomb's signature."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR's CRC over type + data
    return bytes(png)


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def assert_rejected(data: bytes, reason: str, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, **kwargs)
    assert caught.value.reason == reason, caught.value.detail
    assert caught.value.detail
    return caught.value


# --- files that cannot become samples ----------------------------------------------------------


def test_zero_byte_file_is_rejected_as_empty() -> None:
    assert_rejected(b"", "empty", size=64)


def test_truncated_jpeg_is_rejected_as_corrupt(make_photo) -> None:
    data = make_photo(1, 200, 150)
    error = assert_rejected(data[: len(data) // 2], "corrupt", size=64)
    assert "truncated" in error.detail
    assert_rejected(data[: len(data) // 2], "corrupt", size=None)  # also without draft mode


@pytest.mark.parametrize(
    "data", [b"<!DOCTYPE html><html><body>404 Not Found</body></html>", b"just some text\n" * 20, b"\xff\xd8\xff"]
)
def test_text_html_and_stubs_named_like_images_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, size=64)
    assert caught.value.reason in ("not_an_image", "corrupt")
    if data.startswith((b"<", b"just")):
        assert caught.value.reason == "not_an_image"


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    error = assert_rejected(png_claiming_size(100_000, 100_000), "too_large", size=64)
    assert "100000x100000" in error.detail


def test_max_pixels_is_configurable(make_photo) -> None:
    data = make_photo(2, 100, 50, fmt="PNG")
    assert_rejected(data, "too_large", size=32, max_pixels=4999)
    assert decode_image(data, size=32, max_pixels=5000).rgb.shape == (32, 32, 3)  # the limit itself is allowed


# --- modes turned into RGB ---------------------------------------------------------------------


def test_16_bit_gray_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    image = Image.fromarray(ramp)
    decoded = decode_image(encode(image, "PNG"), size=None)
    assert decoded.source_mode.startswith("I")
    assert decoded.rgb.shape == (48, 64, 3)
    row = decoded.rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[32] - 130) <= 2  # 65535 * 32/63 -> ~130, not 255
    assert is_gray_mode(decoded.source_mode)


def test_16_bit_rgb_png_keeps_its_colour() -> None:
    array = np.zeros((20, 30, 3), np.uint16)
    array[..., 0], array[..., 1], array[..., 2] = 65535, 32768, 0
    decoded = decode_image(png_rgb16(array), size=None)
    assert decoded.rgb.shape == (20, 30, 3)
    np.testing.assert_allclose(decoded.rgb[5, 5], [255, 128, 0], atol=1)
    assert not is_grayscale(decoded.source_mode, rgb8_to_lab8(decoded.rgb))


def test_cmyk_jpeg_decodes_to_the_same_colours(make_image) -> None:
    image = make_image(3, 120, 80)
    reference = decode_image(encode(image, "JPEG", quality=95), size=64).rgb.astype(int)
    decoded = decode_image(encode(image.convert("CMYK"), "JPEG", quality=95), size=64)
    assert decoded.source_mode == "CMYK"
    assert np.abs(decoded.rgb.astype(int) - reference).mean() < 8  # not inverted, not channel-swapped


def test_palette_with_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0] + list(RED) + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 20, 40))  # left half: palette index 0, declared transparent
    decoded = decode_image(encode(image, "PNG", transparency=0), size=None)
    assert decoded.source_mode == "P"
    assert tuple(decoded.rgb[10, 5]) == WHITE  # transparent black -> white, not black
    assert tuple(decoded.rgb[10, 35]) == RED


def test_gray_with_alpha_is_composited_over_white_and_counts_as_gray() -> None:
    image = Image.new("LA", (40, 40), (60, 255))
    image.paste((0, 0), (0, 0, 20, 40))  # left half fully transparent
    decoded = decode_image(encode(image, "PNG"), size=None)
    assert decoded.source_mode == "LA"
    assert tuple(decoded.rgb[10, 5]) == WHITE
    assert tuple(decoded.rgb[10, 35]) == (60, 60, 60)
    assert is_grayscale(decoded.source_mode, rgb8_to_lab8(decoded.rgb))


def test_rgba_is_composited_over_white() -> None:
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 128))  # half-transparent red
    image.paste((0, 0, 255, 0), (0, 0, 20, 40))  # transparent blue: must vanish entirely
    decoded = decode_image(encode(image, "PNG"), size=None)
    np.testing.assert_allclose(decoded.rgb[10, 35], [255, 127, 127], atol=1)
    assert tuple(decoded.rgb[10, 5]) == WHITE


def test_animated_gif_gives_its_first_frame() -> None:
    # Pure colours: they survive GIF's palette quantization exactly.
    frames = [solid(color, mode="RGB").convert("P") for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data, size=32)
    assert decoded.rgb.shape == (32, 32, 3)
    assert tuple(decoded.rgb[16, 16]) == (255, 0, 0)


def test_multi_page_tiff_gives_its_first_page() -> None:
    pages = [solid(color, (50, 40)) for color in (BLUE, RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    decoded = decode_image(data, size=None)
    assert (decoded.width, decoded.height) == (50, 40)
    assert tuple(decoded.rgb[20, 25]) == BLUE


@pytest.mark.parametrize("size", [None, 64])
def test_exif_orientation_6_rotates_and_swaps_width_and_height(size) -> None:
    image = Image.new("RGB", (120, 80), GREEN)  # stored landscape
    image.paste(RED, (20, 0, 36, 16))  # marker on the stored top edge, inside the displayed central square
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo from a phone
    decoded = decode_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()), size=size)
    assert (decoded.width, decoded.height) == (80, 120)
    if size is None:
        assert decoded.rgb.shape == (120, 80, 3)
        near = decoded.rgb[26, 75].astype(int)  # the stored top edge is now the right edge
    else:
        assert decoded.rgb.shape == (64, 64, 3)
        near = decoded.rgb[4, 60].astype(int)  # and the top-right of the displayed central square
    assert np.abs(near - RED).max() < 40
    assert np.abs(decoded.rgb[4, 4].astype(int) - GREEN).max() < 40


def test_exif_rotated_large_jpeg_reports_file_size_despite_draft_mode(make_image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(make_image(4, 640, 400), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, size=64)  # draft decodes at 1/4 or 1/8 scale
    assert (decoded.width, decoded.height) == (400, 640)
    assert decoded.rgb.shape == (64, 64, 3)


def test_draft_mode_decoding_matches_a_full_decode(make_image) -> None:
    image = make_image(5, 800, 600)
    data = encode(image, "JPEG", quality=95)
    decoded = decode_image(data, size=64)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC, box=(100, 0, 700, 600))
    )
    assert (decoded.width, decoded.height) == (800, 600)
    assert np.abs(decoded.rgb.astype(int) - full.astype(int)).mean() < 4


def test_one_pixel_image_fills_the_output() -> None:
    decoded = decode_image(encode(solid(RED, (1, 1)), "PNG"), size=64)
    assert decoded.rgb.shape == (64, 64, 3) and (decoded.width, decoded.height) == (1, 1)
    assert (decoded.rgb == RED).all()


@pytest.mark.parametrize("resize", ["cover", "squash"])
@pytest.mark.parametrize("shape", [(4000, 3), (3, 4000)])
def test_extreme_aspect_ratio(make_image, shape, resize: str) -> None:
    decoded = decode_image(encode(make_image(6, *shape), "PNG"), size=64, resize=resize)
    assert decoded.rgb.shape == (64, 64, 3)
    assert (decoded.width, decoded.height) == shape


def test_size_none_keeps_the_original_resolution(make_photo) -> None:
    decoded = decode_image(make_photo(7, 123, 45, fmt="PNG"), size=None)
    assert decoded.rgb.shape == (45, 123, 3) and decoded.rgb.dtype == np.uint8


def test_unknown_resize_mode_is_a_value_error(make_photo) -> None:
    with pytest.raises(ValueError, match="resize must be one of"):
        decode_image(make_photo(8), size=64, resize="stretch")


# --- grayscale ---------------------------------------------------------------------------------


def lab_of(data: bytes):
    decoded = decode_image(data, size=64)
    return decoded.source_mode, rgb8_to_lab8(decoded.rgb)


def test_mode_l_photo_is_grayscale(make_photo) -> None:
    mode, lab8 = lab_of(make_photo(9, gray=True))
    assert mode == "L" and is_grayscale(mode, lab8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_rgb_photo_with_equal_channels_is_grayscale(make_image, fmt: str) -> None:
    gray_rgb = make_image(10).convert("L").convert("RGB")
    mode, lab8 = lab_of(encode(gray_rgb, fmt))
    assert mode == "RGB" and not is_gray_mode(mode)
    assert mean_chroma(lab8) < 1.0
    assert is_grayscale(mode, lab8)


def test_colour_photo_is_not_grayscale(make_photo) -> None:
    mode, lab8 = lab_of(make_photo(11))
    assert mode == "RGB" and mean_chroma(lab8) > 10 and not is_grayscale(mode, lab8)


def test_faint_sepia_photo_is_not_grayscale(make_image) -> None:
    gray = np.asarray(make_image(12).convert("L"), dtype=np.float64)
    # A warm tint of a few Lab units, as an old print: still a colour photo.
    sepia = np.stack([gray + 6, gray + 2, gray - 5], -1).clip(0, 255).astype(np.uint8)
    mode, lab8 = lab_of(encode(Image.fromarray(sepia), "PNG"))
    assert 3 < mean_chroma(lab8) < 10
    assert not is_grayscale(mode, lab8)


# --- geometry ----------------------------------------------------------------------------------


def marked(width: int, height: int) -> Image.Image:
    """Green picture; red marks the top-left of its central square, blue its bottom-right,
    yellow the picture's own top-left corner (outside the central square)."""
    image = Image.new("RGB", (width, height), GREEN)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste(RED, (left, top, left + 10, top + 10))
    image.paste(BLUE, (left + side - 10, top + side - 10, left + side, top + side))
    image.paste(YELLOW, (0, 0, 10, 10))
    return image


def near(pixel, color, tolerance: int = 30) -> bool:
    return bool(np.abs(pixel.astype(int) - color).max() <= tolerance)


@pytest.mark.parametrize("shape", [(200, 100), (100, 200)])
def test_cover_scales_the_shorter_side_and_crops_the_center(shape) -> None:
    rgb = decode_image(encode(marked(*shape), "PNG"), size=50, resize="cover").rgb
    assert rgb.shape == (50, 50, 3)
    assert near(rgb[1, 1], RED) and near(rgb[48, 48], BLUE)  # the central square's corners land in the corners
    assert near(rgb[25, 25], GREEN)
    assert not (np.abs(rgb.astype(int) - YELLOW).max(-1) < 40).any()  # outside the crop


def test_squash_resizes_the_whole_picture() -> None:
    rgb = decode_image(encode(marked(200, 100), "PNG"), size=50, resize="squash").rgb
    assert rgb.shape == (50, 50, 3)
    assert near(rgb[1, 1], YELLOW)  # the picture's own corner stays in the corner
    assert near(rgb[2, 13], RED)  # the central square's top-left is squashed to x = 50/200 * 50
    assert near(rgb[47, 36], BLUE)
