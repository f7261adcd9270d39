"""Pictures people would rather look at: sample grids and loss curves, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch

from ingest.lab import lab_to_rgb_torch


def sample_grid(lightness: torch.Tensor, fake_ab: torch.Tensor, real_ab: torch.Tensor, max_images: int = 8) -> bytes:
    """A PNG with one column per image and three rows: gray input, generated, ground truth (the recipe's figure).

    Args:
        lightness: L in 0..100, (N, 1, H, W); fake_ab and real_ab: ab in real units, (N, 2, H, W).
    """
    from PIL import Image

    count = min(max_images, lightness.shape[0])
    light = lightness[:count].float().cpu()
    zeros = torch.zeros_like(fake_ab[:count].float().cpu())
    rows = [
        lab_to_rgb_torch(torch.cat([light, zeros], dim=1)),
        lab_to_rgb_torch(torch.cat([light, fake_ab[:count].float().cpu()], dim=1)),
        lab_to_rgb_torch(torch.cat([light, real_ab[:count].float().cpu()], dim=1)),
    ]
    height, width = light.shape[-2:]
    gap = 4
    canvas = np.full((3 * height + 2 * gap, count * width + (count - 1) * gap, 3), 255, dtype=np.uint8)
    for row, images in enumerate(rows):
        pixels = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        for column in range(count):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = pixels[column]
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


LOSS_PANELS = {
    "discriminator": ("train/loss_D_real", "train/loss_D_fake", "train/loss_D"),
    "generator": ("train/loss_G_GAN", "train/loss_G_L1", "train/loss_G"),
}


def loss_curves(history: dict[str, list[tuple[int, float]]], title: str = "") -> bytes:
    """A PNG of the recipe's loss curves over steps: discriminator real/fake/total, generator GAN/L1/total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    for axis, (panel, names) in zip(axes, LOSS_PANELS.items(), strict=True):
        for name in names:
            points = sorted(history.get(name, []))
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=name.removeprefix("train/"), linewidth=1)
        axis.set_title(panel)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
