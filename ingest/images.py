"""Decode any photo a user has into a square 8-bit sRGB array, or say why not.

Shared by ingest and colorize. The rules:
- JPEG draft mode (DCT-domain downscaling) when the photo is at least twice the target size:
  decoding a 4000 px photo at 1/8 scale is much faster and loses nothing at 256 px.
- EXIF orientation applied; the first frame of animations and multi-page files.
- Every mode turned into RGB: CMYK, palette, 16-bit, and alpha composited over white.
- Grayscale sources (L, LA, I, I;16, 1, F, or RGB whose chroma is near zero) are reported:
  a colorizer trained on gray photos learns to desaturate.
- Decompression bombs refused before decoding, by pixel count.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x MAX_IMAGE_PIXELS)
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
RESIZE_MODES = ("cover", "squash")
DEFAULT_RESIZE = "cover"  # how ingest cuts photos to the side unless told (and what a model that does not say used)
DEFAULT_SIDE = 256  # the recipe's side in pixels: ingest's default, and what an old model that does not say used
# Mean |a| + |b| (stored units) under which an RGB photo counts as gray: JPEG noise in a gray
# photo stays well under 1, while the faintest real colour photos sit above 3.
GRAY_CHROMA_THRESHOLD = 1.5


class ImageRejected(Exception):
    """The file cannot become a sample; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (size, size, 3) uint8, or the original size when size is None
    width: int  # original width and height, after EXIF orientation
    height: int
    source_mode: str


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only), refusing empty, unknown and oversized files.

    Raises:
        ImageRejected: reason `empty`, `not_an_image` or `too_large`.
    """
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    with warnings.catch_warnings():
        # Pillow warns, then raises, on bombs by its own global limit; ours is explicit and per call.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image", "not a recognized image format") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file
            raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit {max_pixels}")
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"image size {width}x{height}")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16/32-bit gray: scale to 8 bits instead of Pillow's clipping conversion.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def _crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def decode_image(
    data: bytes,
    size: int | None = DEFAULT_SIDE,
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode bytes to an RGB array of `size` x `size` (or the original size when `size` is None).

    Args:
        data: the file's bytes.
        size: output side; None keeps the original resolution (colorize).
        resize: "cover" scales the shorter side to `size` and center-crops (antialiased bicubic);
            "squash" resizes straight to size x size, as the seed recipe did.
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Returns:
        The RGB array, the original width and height, and the source mode.

    Raises:
        ImageRejected: reasons `empty`, `not_an_image`, `too_large`, `corrupt` (truncated or undecodable).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    image = open_image(data, max_pixels)
    source_mode = image.mode
    file_width, file_height = image.size  # before draft() shrinks it
    try:
        orientation = image.getexif().get(0x0112, 1)
        if size is not None and image.format == "JPEG":
            # Draft keeps both sides >= the request; rotation by EXIF does not change that for a square.
            image.draft("RGB", (size, size))
        image.load()
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        transposed = orientation in (5, 6, 7, 8)
        original_width, original_height = (file_height, file_width) if transposed else (file_width, file_height)
        rgb = _to_rgb(image)
        if size is not None:
            if resize == "cover":
                rgb = rgb.resize((size, size), Image.BICUBIC, box=_crop_box(*rgb.size))
            else:
                rgb = rgb.resize((size, size), Image.BICUBIC)
        array = np.asarray(rgb)
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - truncated streams and decoder errors are the file's fault
        raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ImageRejected("corrupt", f"decoded to an unexpected array {array.dtype} {array.shape}")
    return DecodedImage(array, original_width, original_height, source_mode)


def is_gray_mode(mode: str) -> bool:
    return mode in GRAY_MODES


def mean_chroma(lab8: np.ndarray) -> float:
    """Mean |a| + |b| of a stored uint8 Lab array (3, H, W), in Lab units."""
    # Every 4th pixel each way: a gray verdict does not need all of them.
    ab = lab8[1:, ::4, ::4].astype(np.int16) - 128
    return float(np.abs(ab).mean() * 2)


def is_grayscale(source_mode: str, lab8: np.ndarray) -> bool:
    """True for gray sources: a gray mode, or colour channels that carry (almost) no chroma."""
    return is_gray_mode(source_mode) or mean_chroma(lab8) < GRAY_CHROMA_THRESHOLD
