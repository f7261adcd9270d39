"""CIE L*a*b* (sRGB, D65, 2 degree observer) for ingest, training and colorize.

One module owns every colour conversion in the project, so the lake, the training loop
and the colorizer agree to the last digit. The float conversions follow scikit-image's
`rgb2lab` / `lab2rgb` (same matrices, thresholds and white point) and match them within
1e-3; they are vectorized numpy (and torch, for the GPU side), never per-pixel Python.

Stored encoding (what a lake sample's `lab.npy` holds), a uint8 array of shape (3, H, W):

    channel 0: round(L * 255 / 100)    L in 0..100   -> 0..255
    channel 1: round(a) + 128          a in -128..127 -> 0..255
    channel 2: round(b) + 128          b in -128..127 -> 0..255

Every sRGB colour lies inside that range (a in about -86..98, b in about -108..95), and the
rounding error is at most 0.2 in L and 0.5 in a and b (Delta-E 76 at most 0.73).

Network normalization (the recipe): `L_in = L / 50 - 1`, `ab_in = ab / 110`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# sRGB primaries to XYZ, exactly scikit-image's `xyz_from_rgb`.
XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
# D65, 2 degree observer: scikit-image's default reference white.
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])

L_SCALE = 255.0 / 100.0
AB_OFFSET = 128.0
AB_NORM = 110.0
ENCODING = {
    "name": "lab-uint8-v1",
    "dtype": "uint8",
    "layout": "CHW",
    "L": "round(L * 255 / 100)",
    "a": "round(a) + 128",
    "b": "round(b) + 128",
}

# The XYZ matrix with the reference white folded in: one matmul instead of a matmul and a divide.
_XYZN_FROM_RGB = XYZ_FROM_RGB / WHITE_D65[:, None]
_RGB_FROM_XYZN = RGB_FROM_XYZ * WHITE_D65[None, :]
_XYZN_FROM_RGB32 = _XYZN_FROM_RGB.astype(np.float32)


def _srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


# Linearized value of every 8-bit sRGB code: decoding gamma by table lookup is the cheapest step.
_LINEAR_LUT32 = _srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def _f_lab(t: np.ndarray) -> np.ndarray:
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB to Lab, matching `skimage.color.rgb2lab`.

    Args:
        rgb: array (..., 3), uint8 (0..255) or float (0..1).

    Returns:
        float64 array (..., 3): L in 0..100, a and b in real units.
    """
    rgb = np.asarray(rgb)
    rgb = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    xyzn = _srgb_to_linear(rgb) @ _XYZN_FROM_RGB.T
    f = _f_lab(xyzn)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Convert Lab to sRGB in [0, 1], matching `skimage.color.lab2rgb` (negative Z clipped to 0).

    Args:
        lab: array (..., 3) with L in 0..100 and a, b in real units.

    Returns:
        float64 array (..., 3) clipped to [0, 1].
    """
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = lab[..., 1] / 500.0 + fy
    fz = np.maximum(fy - lab[..., 2] / 200.0, 0.0)
    f = np.stack([fx, fy, fz], axis=-1)
    xyzn = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    linear = xyzn @ _RGB_FROM_XYZN.T
    rgb = np.where(linear > 0.0031308, 1.055 * np.power(np.maximum(linear, 0.0031308), 1 / 2.4) - 0.055, linear * 12.92)
    return np.clip(rgb, 0.0, 1.0)


def rgb8_to_lab8(rgb: np.ndarray) -> np.ndarray:
    """The ingest hot path: 8-bit sRGB (H, W, 3) straight to the stored uint8 Lab (3, H, W).

    There are only 2**24 8-bit colours, so the whole conversion is one lookup in a table of
    their stored Lab codes (64 MiB, built once per process in about a third of a second by
    `rgb8_to_lab8_direct`, and identical to it by construction).
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape
    index = rgb[..., 0].astype(np.uint32) << 16
    index |= rgb[..., 1].astype(np.uint32) << 8
    index |= rgb[..., 2]
    packed = _lab8_table().take(index)  # (H, W) little-endian uint32: bytes L, a, b, 0
    return np.ascontiguousarray(packed.view(np.uint8).reshape(height, width, 4)[..., :3].transpose(2, 0, 1))


_LAB8_TABLE: np.ndarray | None = None


def _lab8_table() -> np.ndarray:
    global _LAB8_TABLE
    if _LAB8_TABLE is None:
        table = np.empty(1 << 24, dtype="<u4")
        plane = np.empty((256, 256, 3), dtype=np.uint8)
        plane[..., 1] = np.arange(256, dtype=np.uint8)[:, None]
        plane[..., 2] = np.arange(256, dtype=np.uint8)[None, :]
        for red in range(256):
            plane[..., 0] = red
            lab8 = rgb8_to_lab8_direct(plane).reshape(3, -1).astype("<u4")
            table[red << 16 : (red + 1) << 16] = lab8[0] | (lab8[1] << 8) | (lab8[2] << 16)
        _LAB8_TABLE = table
    return _LAB8_TABLE


def rgb8_to_lab8_direct(rgb: np.ndarray) -> np.ndarray:
    """`rgb8_to_lab8` computed arithmetically (builds its table; also the reference in tests).

    Float32 throughout (the result is rounded to integers, far coarser than float32's error),
    gamma by table lookup, the white point folded into the matrix.
    """
    height, width, _ = rgb.shape
    linear = np.take(_LINEAR_LUT32, rgb.reshape(-1, 3))  # (P, 3) float32
    # (3, 3) @ (3, P): channel-major rows keep every following pass on contiguous memory.
    xyzn = _XYZN_FROM_RGB32 @ linear.T
    # cbrt for the whole array then patch the rare dark pixels: cheaper than np.where on both branches.
    f = np.cbrt(xyzn)
    dark = xyzn <= 0.008856
    if dark.any():
        f[dark] = 7.787 * xyzn[dark] + np.float32(16.0 / 116.0)
    out = np.empty((3, height * width), dtype=np.float32)
    np.multiply(f[1], 116.0 * L_SCALE, out=out[0])
    out[0] -= 16.0 * L_SCALE
    np.subtract(f[0], f[1], out=out[1])
    out[1] *= 500.0
    np.subtract(f[1], f[2], out=out[2])
    out[2] *= 200.0
    out[1:] += AB_OFFSET
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(3, height, width)


def encode_lab8(lab: np.ndarray) -> np.ndarray:
    """Quantize float Lab (H, W, 3) to the stored uint8 layout (3, H, W)."""
    lab = np.asarray(lab, dtype=np.float64)
    out = np.empty((3,) + lab.shape[:2], dtype=np.float64)
    out[0] = lab[..., 0] * L_SCALE
    out[1:] = np.moveaxis(lab[..., 1:], -1, 0) + AB_OFFSET
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def decode_lab8(lab8: np.ndarray) -> np.ndarray:
    """Stored uint8 Lab (3, H, W) back to float32 Lab (H, W, 3) in real units."""
    lab8 = np.asarray(lab8)
    if lab8.dtype != np.uint8 or lab8.ndim != 3 or lab8.shape[0] != 3:
        raise ValueError(f"expected a uint8 array of shape (3, H, W), got {lab8.dtype} {lab8.shape}")
    out = np.empty(lab8.shape[1:] + (3,), dtype=np.float32)
    out[..., 0] = lab8[0] / np.float32(L_SCALE)
    out[..., 1] = lab8[1].astype(np.float32) - AB_OFFSET
    out[..., 2] = lab8[2].astype(np.float32) - AB_OFFSET
    return out


def lab8_to_network(lab8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored uint8 Lab (3, H, W) to the network's inputs: L_in (1, H, W) and ab_in (2, H, W), float32.

    `L_in = L / 50 - 1` and `ab_in = ab / 110`, as the recipe.
    """
    lab8 = np.asarray(lab8)
    light = lab8[:1].astype(np.float32) * np.float32(2.0 / 255.0) - 1.0
    ab = (lab8[1:].astype(np.float32) - AB_OFFSET) / np.float32(AB_NORM)
    return light, ab


def normalize_lab(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float Lab (H, W, 3) to the network's (1, H, W) L and (2, H, W) ab, as the recipe."""
    lab = np.asarray(lab, dtype=np.float32)
    return lab[None, ..., 0] / 50.0 - 1.0, np.moveaxis(lab[..., 1:], -1, 0) / AB_NORM


def denormalize_torch(light: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Network L (N, 1, H, W) and ab (N, 2, H, W) back to Lab (N, 3, H, W) in real units."""
    import torch

    return torch.cat(network_to_lab_torch(light, ab), dim=1)


def srgb_to_linear_torch(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] to linear light (the sRGB transfer function), on any device."""
    import torch

    return torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def linear_to_srgb_torch(linear: torch.Tensor) -> torch.Tensor:
    """Linear light to sRGB (the inverse transfer function); values outside [0, 1] stay outside."""
    import torch

    return torch.where(
        linear > 0.0031308, 1.055 * torch.clamp(linear, min=0.0031308) ** (1 / 2.4) - 0.055, linear * 12.92
    )


def lab_to_rgb_torch(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Lab (N, 3, H, W) in real units to sRGB (N, 3, H, W) in [0, 1], matching `lab_to_rgb`.

    Runs on whatever device the tensor is on; computes in float32 at least. `clip=False` leaves
    colours outside the sRGB gamut outside [0, 1], so that callers can see them.
    """
    import torch

    lab = lab.float() if lab.dtype in (torch.float16, torch.bfloat16) else lab
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = lab[:, 1] / 500.0 + fy
    fz = torch.clamp(fy - lab[:, 2] / 200.0, min=0.0)
    f = torch.stack([fx, fy, fz], dim=1)
    xyzn = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    matrix = torch.as_tensor(_RGB_FROM_XYZN, dtype=lab.dtype, device=lab.device)
    rgb = linear_to_srgb_torch(torch.einsum("ij,njhw->nihw", matrix, xyzn))
    return rgb.clamp(0.0, 1.0) if clip else rgb


def rgb_to_lab_torch(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (N, 3, H, W) in [0, 1] to Lab (N, 3, H, W), matching `rgb_to_lab`."""
    import torch

    linear = srgb_to_linear_torch(rgb)
    matrix = torch.as_tensor(_XYZN_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    xyzn = torch.einsum("ij,njhw->nihw", matrix, linear)
    f = torch.where(xyzn > 0.008856, xyzn.clamp(min=0.008856) ** (1.0 / 3.0), 7.787 * xyzn + 16.0 / 116.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1)


def lab8_to_network_torch(lab8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored uint8 Lab batches (N, 3, H, W), on any device, to the network's float L_in and ab_in."""
    values = lab8.float()
    # In place on the fresh float copy: no temporaries (this runs on every training batch).
    light = values[:, :1].mul_(2.0 / 255.0).sub_(1.0)
    ab = values[:, 1:].sub_(AB_OFFSET).mul_(1.0 / AB_NORM)
    return light, ab


def network_to_lab_torch(light: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network L_in (N, 1, H, W) and ab_in (N, 2, H, W) to L in 0..100 and ab in real units."""
    return (light.float() + 1.0) * 50.0, ab.float() * AB_NORM


def lightness(rgb: np.ndarray) -> np.ndarray:
    """L (0..100, float32) of 8-bit sRGB (..., 3) without computing a and b: cheap at full resolution."""
    linear = np.take(_LINEAR_LUT32, np.asarray(rgb, dtype=np.uint8))
    y = linear @ XYZ_FROM_RGB[1].astype(np.float32)  # Y of D65 white is 1: no normalization needed
    f = np.where(y > 0.008856, np.cbrt(y), 7.787 * y + np.float32(16.0 / 116.0))
    return (116.0 * f - 16.0).astype(np.float32)
