"""`recolor colorize`: color photos with a generator, at their original resolution.

The network sees the photo's L at its own size (256 px by default: the whole frame, resized),
predicts ab there; ab is upsampled to the original size (bicubic; color varies slowly) and joined
with the original full-resolution L, so no detail of the input is lost. The output is a PNG whose
L channel is the input's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ingest.images import ImageRejected, decode_image
from ingest.lab import AB_NORM, XYZ_FROM_RGB, lab_to_rgb_torch, lightness, rgb8_to_lab8
from ingest.sources.folder import is_image_name


@dataclass
class ColorizeSummary:
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)


def list_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(URI, output name) for every image in the given files, folders (recursive) and s3:// prefixes.

    A path that does not exist is listed as given: reading it fails, and it is reported like any unreadable input.
    """
    from ingest.storage import open_storage

    found: list[tuple[str, str]] = []
    for given in inputs:
        if given.startswith("s3://"):
            storage = open_storage(given)
            keys = [obj.key for obj in storage.list("") if is_image_name(obj.key)]
            if keys:
                found += [(storage.uri(key), key) for key in keys]
            else:  # a single object
                found.append((given, given.rstrip("/").rsplit("/", 1)[-1]))
            continue
        path = Path(given)
        if path.is_dir():
            found += [
                (str(p), p.relative_to(path).as_posix())
                for p in sorted(path.rglob("*"))
                if p.is_file() and is_image_name(p.name) and not p.name.startswith(".")
            ]
        else:
            found.append((str(path), path.name))
    return found


def _network_input(rgb: np.ndarray, size: int) -> torch.Tensor:
    from PIL import Image

    small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    lab8 = rgb8_to_lab8(small)
    return torch.from_numpy(lab8[:1].astype(np.float32) * (2.0 / 255.0) - 1.0)


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
    linear = torch.where(pixels > 0.04045, ((pixels.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, pixels / 12.92)
    luminance = torch.as_tensor(XYZ_FROM_RGB[1], dtype=linear.dtype, device=linear.device)
    gray = (linear @ luminance).clamp(0.0, 1.0)[:, None]  # Y: a function of L alone
    # The largest share t of the colour (gray + t * (colour - gray)) that keeps every channel in [0, 1].
    infinity = torch.full_like(linear, float("inf"))
    above = torch.where(linear > 1, (1 - gray) / (linear - gray), infinity)
    below = torch.where(linear < 0, gray / (gray - linear), infinity)
    share = torch.minimum(above, below).amin(dim=1, keepdim=True).clamp(0.0, 1.0)
    mapped = (gray + share * (linear - gray)).clamp(0.0, 1.0)
    fixed = torch.where(mapped > 0.0031308, 1.055 * mapped.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, mapped * 12.92)
    rgb = rgb.permute(0, 2, 3, 1).clone()
    rgb[outside] = fixed
    return rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0)


@torch.no_grad()
def colorize_rgb(generator, photos: list[np.ndarray], size: int, device: torch.device) -> list[np.ndarray]:
    """Color a batch of 8-bit RGB photos of any sizes; returns 8-bit RGB arrays of the same sizes."""
    batch = torch.stack([_network_input(rgb, size) for rgb in photos]).to(device)
    predicted = generator(batch).float()
    results = []
    for rgb, ab in zip(photos, predicted, strict=True):
        height, width = rgb.shape[:2]
        ab_full = torch.nn.functional.interpolate(ab[None], size=(height, width), mode="bicubic", align_corners=False)
        light = torch.from_numpy(lightness(rgb)).to(device)[None, None]
        lab = torch.cat([light, ab_full * AB_NORM], dim=1)
        out = lab_to_rgb_keeping_lightness(lab)[0].permute(1, 2, 0).cpu().numpy()
        results.append((out * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
    return results


def colorize(
    model_uri: str,
    inputs: list[str],
    out_dir: str,
    size: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    tracking_uri: str | None = None,
    progress: bool = True,
) -> ColorizeSummary:
    """Colorize every image of `inputs` into `out_dir` (PNG, same relative names); unreadable ones are reported."""
    from PIL import Image
    from tqdm.auto import tqdm

    from ingest.storage import read_uri
    from pipeline.registry import load_generator, min_side

    torch_device = torch.device(device)
    items = list_inputs(inputs)
    generator = load_generator(model_uri, tracking_uri, torch_device)
    size = max(size, min_side(generator))
    out = Path(out_dir)
    summary = ColorizeSummary()
    pending: list[tuple[str, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        colored = colorize_rgb(generator, [rgb for _, _, rgb in pending], size, torch_device)
        for (_, name, _), rgb in zip(pending, colored, strict=True):
            target = (out / name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(target)
            summary.written.append(str(target))
        pending.clear()

    with tqdm(total=len(items), unit="img", desc="colorize", disable=not progress) as bar:
        for uri, name in items:
            try:
                pending.append((uri, name, decode_image(read_uri(uri), size=None).rgb))
            except ImageRejected as e:
                summary.failed.append((uri, f"{e.reason}: {e.detail}"))
            except FileNotFoundError:
                summary.failed.append((uri, "missing: no such file or object"))
            except (OSError, RuntimeError) as e:
                summary.failed.append((uri, f"unreadable: {e}"))
            if len(pending) == batch_size:
                flush()
            bar.update(1)
        flush()
    return summary
