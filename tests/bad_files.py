"""A zoo of odd and broken image files, written for real, and what ingest and colorize should do with each.

`write_zoo(folder)` writes every case below `folder` and returns {relative path: Case}. Shared by the
ingest and colorize tests (`tests/integration/test_bad_files.py`), so both face the same files:

    zero-byte.jpg, truncated.jpg, error-page.jpg (HTML), notes.jpg (text), gray-16bit.png (I;16),
    rgb-16bit.png, cmyk.jpg, palette-transparent.png (P + tRNS), gray-alpha.png (LA), animated.gif
    (3 frames), rotated-exif6.jpg, one-pixel.png, tall-1x4000.png, wide-4000x1.png, bomb.png
    (30000 x 30000, 110 kB), multipage.tif, "café photo ü.jpg", folder.jpg/inside.png (a folder
    named like an image, holding one), empty-folder.jpg/ (a folder named like an image, holding nothing).

Every accepted picture has its own content (ingest drops repeated content as duplicates) and is
colourful enough not to count as gray, except the gray ones, which are gray on purpose.
"""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OK = "ok"
# The EXIF-rotated photo shows red over blue once turned upright; stored, red is on the left.
ROTATED_TOP, ROTATED_BOTTOM = (220, 30, 30), (30, 40, 220)
BOMB_SIDE = 30_000


@dataclass(frozen=True)
class Case:
    """One zoo entry and the expected outcome of each command."""

    ingest: str | None  # OK, the reject reason, or None: not listed at all (a folder)
    colorize: str  # OK or the failure reason (for a folder given by name: what listing it gives)
    size: tuple[int, int] | None = None  # (width, height) as displayed (EXIF applied), when accepted
    what: str = ""  # a few words for messages


def hue_picture(seed: int, width: int, height: int) -> Image.Image:
    """Saturated colours varying along both axes; different seeds shift the hues, so the bytes differ."""
    y, x = np.mgrid[0:height, 0:width]
    hue = (seed * 0.137 + 0.7 * x / max(width, 2) + 0.3 * y / max(height, 2)) % 1.0
    rgb = np.stack(np.vectorize(colorsys.hsv_to_rgb)(hue, 0.85, 0.9), axis=-1)
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgb16_png(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    return png(width, height, 16, 2, zlib.compress(raw))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A real, valid 1-bit PNG of side x side black pixels: ~110 kB that decode to 900 MB (2.7 GB as RGB)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    blocks = [compressor.compress(row * min(rows_per_block, side - start)) for start in range(0, side, rows_per_block)]
    return png(side, side, 1, 0, b"".join(blocks) + compressor.flush())


def rotated_jpeg() -> bytes:
    """Stored 120 x 80 (left red, right blue) with EXIF orientation 6: displayed 80 x 120, red above blue."""
    image = Image.new("RGB", (120, 80), ROTATED_BOTTOM)
    image.paste(ROTATED_TOP, (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a portrait photo from a phone
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    """Mode P with a tRNS chunk: index 0 transparent (left quarter), the rest colourful."""
    colour = hue_picture(7, 64, 48).quantize(colors=255)
    shifted = Image.eval(colour, lambda index: index + 1)  # free index 0 for the transparent colour
    shifted.putpalette([0, 0, 0] + colour.getpalette()[: 255 * 3])
    shifted.paste(0, (0, 0, 16, 48))
    return encode(shifted, "PNG", transparency=0)


def gray_alpha() -> bytes:
    ramp = np.tile(np.linspace(20, 235, 50, dtype=np.uint8), (40, 1))
    alpha = np.full_like(ramp, 255)
    alpha[:, :10] = 0
    return encode(Image.fromarray(np.stack([ramp, alpha], -1), "LA"), "PNG")


def animated_gif() -> bytes:
    frames = [hue_picture(seed, 40, 30).convert("P", palette=Image.ADAPTIVE) for seed in (11, 12, 13)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    pages = [hue_picture(14, 50, 40), hue_picture(15, 70, 20)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")


def write_zoo(folder: Path) -> dict[str, Case]:
    """Write every case below `folder` (created); returns {path relative to folder (POSIX): Case}."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = encode(hue_picture(1, 200, 150), "JPEG", quality=90)
    gray16 = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16))
    assert gray16.mode == "I;16"
    rgb16 = (np.asarray(hue_picture(2, 30, 20), np.uint16) * 257).astype(np.uint16)
    files: dict[str, tuple[bytes, Case]] = {
        "zero-byte.jpg": (b"", Case("empty", "empty", what="zero bytes")),
        "truncated.jpg": (photo[: len(photo) // 2], Case("corrupt", "corrupt", what="first half of a JPEG")),
        "error-page.jpg": (
            b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>\n",
            Case("not_an_image", "not_an_image", what="an HTML page"),
        ),
        "notes.jpg": (b"remember to buy milk\n" * 10, Case("not_an_image", "not_an_image", what="plain text")),
        "gray-16bit.png": (encode(gray16, "PNG"), Case("grayscale", OK, (64, 48), "16-bit gray PNG (I;16)")),
        "rgb-16bit.png": (rgb16_png(rgb16), Case(OK, OK, (30, 20), "16-bit RGB PNG")),
        "cmyk.jpg": (encode(hue_picture(3, 90, 60).convert("CMYK"), "JPEG", quality=92), Case(OK, OK, (90, 60))),
        "palette-transparent.png": (palette_with_transparency(), Case(OK, OK, (64, 48), "palette + tRNS")),
        "gray-alpha.png": (gray_alpha(), Case("grayscale", OK, (50, 40), "gray with alpha (LA)")),
        "animated.gif": (animated_gif(), Case(OK, OK, (40, 30), "3-frame GIF")),
        "rotated-exif6.jpg": (rotated_jpeg(), Case(OK, OK, (80, 120), "EXIF orientation 6")),
        "one-pixel.png": (encode(hue_picture(4, 1, 1), "PNG"), Case(OK, OK, (1, 1), "1 x 1")),
        "tall-1x4000.png": (encode(hue_picture(5, 1, 4000), "PNG"), Case(OK, OK, (1, 4000), "1 x 4000")),
        "wide-4000x1.png": (encode(hue_picture(6, 4000, 1), "PNG"), Case(OK, OK, (4000, 1), "4000 x 1")),
        "bomb.png": (bomb_png(), Case("too_large", "too_large", what=f"{BOMB_SIDE} x {BOMB_SIDE} decompression bomb")),
        "multipage.tif": (multipage_tiff(), Case(OK, OK, (50, 40), "2-page TIFF")),
        "café photo ü.jpg": (encode(hue_picture(8, 60, 45), "JPEG", quality=92), Case(OK, OK, (60, 45))),
        "folder.jpg/inside.png": (encode(hue_picture(9, 33, 22), "PNG"), Case(OK, OK, (33, 22), "inside a folder")),
    }
    for name, (data, _) in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "empty-folder.jpg").mkdir()
    cases = {name: case for name, (_, case) in files.items()}
    cases["empty-folder.jpg"] = Case(None, "no_images", what="empty folder named like an image")
    return cases


def write_checkpoint(folder: Path) -> Path:
    """An untrained U-Net (4 base filters, 6 downsamplings: 64 px network inputs) as a training checkpoint.

    Enough to drive `recolor colorize` through every input path in well under a second per batch.
    """
    import torch

    from pipeline.checkpoint import FORMAT, save_checkpoint
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.models import build_generator

    config = TrainConfig(model=ModelConfig(base_filters=4, num_downs=6))
    model = config.model
    torch.manual_seed(0)
    generator = build_generator(model.arch, norm=model.norm, base_filters=model.base_filters, num_downs=model.num_downs)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder, {"format": FORMAT, "generator": generator.state_dict(), "config": config.to_dict()})
