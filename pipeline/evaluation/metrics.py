"""Colorization metrics on batches of Lab, ready to be summed across DDP ranks.

Inputs are real units: L in 0..100, (N, 1, H, W); ab, (N, 2, H, W), for both prediction and truth. The RGB
images are rebuilt with the truth's L (the colorizer keeps its input L) through `ingest.lab.lab_to_rgb_torch`.

Per image:
- `l1_ab`: mean absolute ab error.
- `psnr`: PSNR of RGB in [0, 1] (data range 1), as `skimage.metrics.peak_signal_noise_ratio`; the MSE is floored
  at 1e-10 so identical images (gray photos under the gray baseline) give 100 dB instead of infinity, which
  would poison every mean it enters.
- `ssim`: SSIM of RGB, as `skimage.metrics.structural_similarity(..., channel_axis=-1, data_range=1.0)`: 7x7
  uniform window, sample covariance, the 3-pixel border cropped, mean over channels.
- `colorfulness` / `colorfulness_true` / `colorfulness_abs_diff`: Hasler and Suesstrunk (2003) on RGB in 0..255
  for the prediction and the truth, and their absolute difference.
- `auc`: area under the cumulative curve of per-pixel ab L2 error, thresholds 0..150 in steps of 1 (Zhang et
  al. 2016), normalized to 0..1.

`colorization_metric_sums` returns each of these summed over the batch plus `count`, all float64 scalars on the
input's device: all-reduce them (SUM) across ranks, then `metric_means` divides by the count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ingest.lab import lab_to_rgb_torch

METRIC_NAMES = ("l1_ab", "psnr", "ssim", "colorfulness", "colorfulness_true", "colorfulness_abs_diff", "auc")
AUC_MAX_THRESHOLD = 150
# Floor of the MSE in PSNR: caps it at 100 dB for identical images.
PSNR_MIN_MSE = 1e-10
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr_per_image(pred_rgb: torch.Tensor, true_rgb: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per image over all pixels and channels.

    Args:
        pred_rgb: (N, C, H, W).
        true_rgb: (N, C, H, W).
        data_range: the images' value range.

    Returns:
        (N,) float64, in dB.
    """
    mse = (pred_rgb.double() - true_rgb.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp(min=PSNR_MIN_MSE))


def ssim_per_image(pred_rgb: torch.Tensor, true_rgb: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image, as scikit-image's defaults (see the module docstring).

    Args:
        pred_rgb: (N, C, H, W), H and W at least 7.
        true_rgb: (N, C, H, W).
        data_range: the images' value range.

    Returns:
        (N,) float64, averaged over the cropped pixels and then over channels.
    """
    x = pred_rgb.double()
    y = true_rgb.double()

    # An unpadded 7x7 mean gives exactly the (H - 6, W - 6) centre that scikit-image keeps after cropping its
    # filter's 3-pixel border, so its border mode never matters.
    def window_mean(image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(image, kernel_size=SSIM_WINDOW, stride=1)

    # float64 throughout: E[x^2] - E[x]^2 cancels badly in float32.
    mean_x, mean_y = window_mean(x), window_mean(y)
    window_pixels = SSIM_WINDOW * SSIM_WINDOW
    covariance_norm = window_pixels / (window_pixels - 1)  # sample covariance, scikit-image's default
    var_x = covariance_norm * (window_mean(x * x) - mean_x * mean_x)
    var_y = covariance_norm * (window_mean(y * y) - mean_y * mean_y)
    cov_xy = covariance_norm * (window_mean(x * y) - mean_x * mean_y)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def colorfulness_per_image(rgb: torch.Tensor) -> torch.Tensor:
    """Hasler and Suesstrunk (2003) colorfulness: sigma_rgyb + 0.3 * mu_rgyb.

    Args:
        rgb: (N, 3, H, W) in [0, 1]; scaled to 0..255 as in the paper.

    Returns:
        (N,) float64; 0 for a gray image, about 100+ for vivid ones.
    """
    rgb = rgb.double() * 255.0
    red, green, blue = rgb[:, 0].flatten(1), rgb[:, 1].flatten(1), rgb[:, 2].flatten(1)
    rg = red - green
    yb = 0.5 * (red + green) - blue
    sigma = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mu = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return sigma + 0.3 * mu


def auc_per_image(pred_ab: torch.Tensor, true_ab: torch.Tensor, max_threshold: int = AUC_MAX_THRESHOLD) -> torch.Tensor:
    """Area under the cumulative per-pixel ab error curve (Zhang et al. 2016), normalized to 0..1.

    The curve is the fraction of pixels whose ab L2 error is <= t, for t = 0, 1, .., max_threshold; the AuC is its
    mean over those thresholds. A pixel with error e counts for every integer t >= e, that is for
    max(0, max_threshold + 1 - ceil(e)) thresholds, which avoids materializing a (pixels x thresholds) mask.

    Args:
        pred_ab: (N, 2, H, W) in real units.
        true_ab: (N, 2, H, W).
        max_threshold: the largest threshold (150).

    Returns:
        (N,) float64 in 0..1.
    """
    error = torch.linalg.vector_norm(pred_ab.double() - true_ab.double(), dim=1).flatten(1)
    num_thresholds = max_threshold + 1
    thresholds_passed = (num_thresholds - torch.ceil(error)).clamp(min=0, max=num_thresholds)
    return thresholds_passed.mean(dim=1) / num_thresholds


def colorization_metrics_per_image(
    lightness: torch.Tensor, pred_ab: torch.Tensor, true_ab: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every metric of `METRIC_NAMES`, one value per image.

    Args:
        lightness: L in 0..100, (N, 1, H, W); used for both prediction and truth.
        pred_ab: predicted ab in real units (not divided by 110), (N, 2, H, W).
        true_ab: true ab in real units, (N, 2, H, W).

    Returns:
        {name: (N,) float64 tensor} for each name in `METRIC_NAMES`.
    """
    with torch.no_grad():
        pred_rgb = lab_to_rgb_torch(torch.cat([lightness, pred_ab], dim=1))
        true_rgb = lab_to_rgb_torch(torch.cat([lightness, true_ab], dim=1))
        colorfulness = colorfulness_per_image(pred_rgb)
        colorfulness_true = colorfulness_per_image(true_rgb)
        return {
            "l1_ab": (pred_ab.double() - true_ab.double()).abs().flatten(1).mean(dim=1),
            "psnr": psnr_per_image(pred_rgb, true_rgb),
            "ssim": ssim_per_image(pred_rgb, true_rgb),
            "colorfulness": colorfulness,
            "colorfulness_true": colorfulness_true,
            "colorfulness_abs_diff": (colorfulness - colorfulness_true).abs(),
            "auc": auc_per_image(pred_ab, true_ab),
        }


def colorization_metric_sums(
    lightness: torch.Tensor, pred_ab: torch.Tensor, true_ab: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image metrics summed over the batch, plus the image count, for all-reducing across ranks.

    Args:
        lightness: L in 0..100, (N, 1, H, W).
        pred_ab: predicted ab in real units, (N, 2, H, W).
        true_ab: true ab in real units, (N, 2, H, W).

    Returns:
        {name: float64 scalar sum} for each name in `METRIC_NAMES`, and "count": N as a float64 scalar.
    """
    per_image = colorization_metrics_per_image(lightness, pred_ab, true_ab)
    sums = {name: values.sum() for name, values in per_image.items()}
    sums["count"] = torch.tensor(float(lightness.shape[0]), dtype=torch.float64, device=lightness.device)
    return sums


def gray_baseline_metric_sums(lightness: torch.Tensor, true_ab: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same sums for the "gray" baseline, which predicts ab = 0 everywhere.

    Args:
        lightness: L in 0..100, (N, 1, H, W).
        true_ab: true ab in real units, (N, 2, H, W).

    Returns:
        As `colorization_metric_sums`.
    """
    return colorization_metric_sums(lightness, torch.zeros_like(true_ab), true_ab)


def metric_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn (all-reduced) sums into means per image.

    Args:
        sums: output of `colorization_metric_sums`, possibly added over batches and ranks.

    Returns:
        {name: mean} for each name in `METRIC_NAMES`.

    Raises:
        ValueError: if the count is zero.
    """
    count = float(sums["count"])
    if count <= 0:
        raise ValueError("no images were measured (count is 0)")
    return {name: float(sums[name]) / count for name in METRIC_NAMES}
