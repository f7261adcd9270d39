"""The pixels of colorizing: a photo's network input, the prediction, and the full-resolution picture.

The network sees the photo as it saw its training samples: for a lake cut with "cover" (the
default) the photo is resized to the training side on its short side, aspect kept, and padded (by
reflection) to the network's multiple; for "squash" the whole frame is resized to a square. The
predicted ab (the padding cropped off) is upsampled to the original size (bicubic; colour varies
slowly) and joined with the original full-resolution L, so no detail of the input is lost and the
output's L channel is the input's. The single-process command, the Ray Data job and the serving model all colorize
with these functions, so they produce the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ingest.images import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE, ImageRejected, decode_image
from ingest.lab import (
    AB_NORM,
    XYZ_FROM_RGB,
    lab8_to_network,
    lab_to_rgb_torch,
    lightness,
    linear_to_srgb_torch,
    rgb8_to_lab8,
    srgb_to_linear_torch,
)
from pipeline.colorize.files import PICTURE_FORMATS, SUFFIXES  # noqa: E402, F401 - torch-free, for the parser

MAX_ASPECT = 4  # "cover" keeps the aspect up to 4:1 (the network sees at most 4x the training area); beyond, squash


class PhotoRefused(Exception):
    """A photo that cannot be colorized; `reason` is `reason: detail` as the summaries print it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_photo(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The 8-bit RGB pixels of a photo file or object, at its own size (EXIF orientation applied).

    Raises:
        PhotoRefused: reasons `empty`, `not_an_image`, `corrupt`, `too_large`, `missing`, `unreadable`.
    """
    return decode_photo(read_uri_bytes(uri), max_pixels)


def read_uri_bytes(uri: str) -> bytes:
    """A photo file's or object's bytes. Raises: PhotoRefused (`missing`, `unreadable`)."""
    from ingest.storage import read_uri

    try:
        return read_uri(uri)
    except FileNotFoundError:
        raise PhotoRefused("missing: no such file or object") from None
    except (OSError, RuntimeError) as e:
        raise PhotoRefused(f"unreadable: {e}") from None


def decode_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`read_photo` for bytes already read."""
    try:
        return decode_image(data, size=None, max_pixels=max_pixels).rgb
    except ImageRejected as e:
        raise PhotoRefused(f"{e.reason}: {e.detail}") from None


def network_input(rgb: np.ndarray, size: int, multiple: int = 1, resize: str = "squash") -> tuple[torch.Tensor, tuple]:
    """The network's input for an 8-bit RGB photo: its L in [-1, 1], (1, H, W), and the (h, w) of the photo in it.

    "squash": the whole frame at `size` x `size`. "cover": the short side at `size`, the aspect kept, padded by
    reflection on the bottom and right to multiples of `multiple` (the generator's: 2**num_downs for the U-Net);
    a photo more elongated than MAX_ASPECT is squashed instead.
    """
    from PIL import Image

    height, width = rgb.shape[:2]
    if resize == "squash" or max(height, width) > MAX_ASPECT * min(height, width):
        # Beyond MAX_ASPECT (a 1 x 4000 strip) the short-side fit would feed the network a huge input.
        target = (size, size)
    else:
        scale = size / min(height, width)
        target = (max(size, round(height * scale)), max(size, round(width * scale)))
    small = np.asarray(Image.fromarray(rgb).resize((target[1], target[0]), Image.BICUBIC))
    light, _ = lab8_to_network(rgb8_to_lab8(small))
    tensor = torch.from_numpy(light)
    pad_h, pad_w = -target[0] % multiple, -target[1] % multiple
    if pad_h or pad_w:
        tensor = torch.nn.functional.pad(tensor[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
    return tensor, target


def lab_to_rgb_keeping_lightness(lab: torch.Tensor) -> torch.Tensor:
    """Lab (N, 3, H, W) to sRGB in [0, 1] with every pixel's L kept.

    A predicted colour outside the sRGB gamut (a strong colour on a bright sky or in a deep shadow)
    is mixed, in linear light, with the gray of its own luminance until it fits: luminance, and so L,
    stays; only chroma goes. Clipping R, G and B one by one instead would change L by several units,
    and the output's L would no longer be the photo's.
    """
    rgb = lab_to_rgb_torch(lab, clip=False)
    outside = ((rgb < 0) | (rgb > 1)).any(dim=1)  # (N, H, W)
    if not outside.any():
        return rgb.clamp(0.0, 1.0)
    pixels = rgb.permute(0, 2, 3, 1)[outside]  # (P, 3), only the pixels to fix
    linear = srgb_to_linear_torch(pixels)
    luminance = torch.as_tensor(XYZ_FROM_RGB[1], dtype=linear.dtype, device=linear.device)
    gray = (linear @ luminance).clamp(0.0, 1.0)[:, None]  # Y: a function of L alone
    # The largest share t of the colour (gray + t * (colour - gray)) that keeps every channel in [0, 1].
    infinity = torch.full_like(linear, float("inf"))
    above = torch.where(linear > 1, (1 - gray) / (linear - gray), infinity)
    below = torch.where(linear < 0, gray / (gray - linear), infinity)
    share = torch.minimum(above, below).amin(dim=1, keepdim=True).clamp(0.0, 1.0)
    mapped = (gray + share * (linear - gray)).clamp(0.0, 1.0)
    fixed = linear_to_srgb_torch(mapped)
    rgb = rgb.permute(0, 2, 3, 1).clone()
    rgb[outside] = fixed
    return rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0)


@torch.no_grad()
def predict_ab(generator, light: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ab in [-1, 1], (N, 2, S, S) float32 on the CPU, for network inputs (N, 1, S, S); bf16 on a GPU."""
    light = light.to(device)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return generator(light).float().cpu()
    return generator(light).float().cpu()


@torch.no_grad()
def compose(rgb: np.ndarray, ab: torch.Tensor) -> np.ndarray:
    """The colorized picture of an 8-bit RGB photo: its own L with `ab` (2, S, S) upsampled to its size, 8-bit RGB."""
    height, width = rgb.shape[:2]
    ab_full = torch.nn.functional.interpolate(
        ab[None].float(), size=(height, width), mode="bicubic", align_corners=False
    )
    light = torch.from_numpy(lightness(rgb))[None, None]
    lab = torch.cat([light, ab_full * AB_NORM], dim=1)
    out = lab_to_rgb_keeping_lightness(lab)[0].permute(1, 2, 0).numpy()
    return (out * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def predict_photos(generator, inputs: list[tuple[torch.Tensor, tuple]], device: torch.device) -> list[torch.Tensor]:
    """ab (2, h, w) for each `network_input`: inputs of one shape go through the network as one batch."""
    results: list[torch.Tensor | None] = [None] * len(inputs)
    by_shape: dict[tuple, list[int]] = {}
    for index, (tensor, _) in enumerate(inputs):
        by_shape.setdefault(tuple(tensor.shape), []).append(index)
    for indices in by_shape.values():
        predicted = predict_ab(generator, torch.stack([inputs[i][0] for i in indices]), device)
        for index, ab in zip(indices, predicted, strict=True):
            height, width = inputs[index][1]
            results[index] = ab[:, :height, :width]  # the padding off
    return results


def colorize_rgb(generator, photos: list[np.ndarray], size: int, device: torch.device,
                 resize: str = DEFAULT_RESIZE) -> list[np.ndarray]:  # fmt: skip
    """Color a batch of 8-bit RGB photos of any sizes; returns 8-bit RGB arrays of the same sizes."""
    from pipeline.models.saved import min_side

    multiple = min_side(generator)
    inputs = [network_input(rgb, size, multiple, resize) for rgb in photos]
    return [compose(rgb, ab) for rgb, ab in zip(photos, predict_photos(generator, inputs, device), strict=True)]


def side_by_side(rows: list[tuple[str, np.ndarray, np.ndarray]], height: int = 256) -> bytes:
    """A PNG comparing each photo's gray input, its colorized picture and the photo itself, one row a photo
    (`rows`: name, the photo, the colorized picture, 8-bit RGB of one size), each `height` pixels high, under a
    header naming the columns and beside each row's name."""
    from PIL import Image, ImageDraw

    gap, label, header = 6, 16, 18
    cells = []
    for name, photo, colored in rows:
        width = max(1, round(photo.shape[1] * height / photo.shape[0]))
        gray = compose(photo, torch.zeros(2, 1, 1))  # the photo's L, no colour: what the network sees
        cells.append(
            (name, [Image.fromarray(a).resize((width, height), Image.BICUBIC) for a in (gray, colored, photo)])
        )
    column = max((images[0].width for _, images in cells), default=height)
    canvas = Image.new("RGB", (3 * column + 4 * gap, header + len(cells) * (height + label + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for index, title in enumerate(("gray input (L)", "colorized", "the photo")):
        draw.text((gap + index * (column + gap), 3), title, fill="black")
    for row, (name, images) in enumerate(cells):
        top = header + row * (height + label + gap)
        draw.text((gap, top), name, fill="black")
        for index, image in enumerate(images):
            canvas.paste(image, (gap + index * (column + gap), top + label))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


PNG_LEVEL = 1  # zlib level: lossless at any level; 1 encodes a 500x375 photo 3.8x faster than Pillow's 6, 9% larger


def encode_picture(rgb: np.ndarray, picture_format: str = "png", quality: int = 95) -> bytes:
    """An 8-bit RGB array as PNG (lossless, `PNG_LEVEL`) or JPEG bytes (`quality` 1-95, no chroma subsampling).

    Pillow releases the GIL while it encodes: threads encode pictures in parallel (`pipeline.colorize.local`)."""
    from PIL import Image

    buffer = io.BytesIO()
    if picture_format == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    elif picture_format == "jpeg":
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        raise ValueError(f"picture format must be one of {PICTURE_FORMATS}, got {picture_format!r}")
    return buffer.getvalue()
