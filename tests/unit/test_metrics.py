"""Colorization metrics against scikit-image and hand-computed values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.evaluation.metrics import (
    METRIC_NAMES,
    auc_per_image,
    colorfulness_per_image,
    colorization_metric_sums,
    colorization_metrics_per_image,
    gray_baseline_metric_sums,
    metric_means,
    psnr_per_image,
    ssim_per_image,
)


def skimage_rgb(lightness: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) L and (N, 2, H, W) ab to a (N, H, W, 3) RGB array through scikit-image."""
    lab = torch.cat([lightness, ab], dim=1).permute(0, 2, 3, 1).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lab2rgb warns when it clips out-of-gamut colours
        return np.stack([lab2rgb(image) for image in lab])


def reference_colorfulness(rgb01: np.ndarray) -> float:
    """Hasler and Suesstrunk on an (H, W, 3) image, written the way the paper states it."""
    red, green, blue = (rgb01 * 255.0).transpose(2, 0, 1)
    rg = red - green
    yb = 0.5 * (red + green) - blue
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def reference_auc(pred_ab: np.ndarray, true_ab: np.ndarray) -> float:
    """Zhang et al.'s AuC the slow way: the cumulative curve at every threshold 0..150, averaged."""
    error = np.sqrt(((pred_ab - true_ab) ** 2).sum(axis=0)).ravel()
    return float(np.mean([(error <= threshold).mean() for threshold in range(151)]))


def random_lab(generator: torch.Generator, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    lightness = torch.rand(batch, 1, height, width, generator=generator, dtype=torch.float64) * 100.0
    ab = (torch.rand(batch, 2, height, width, generator=generator, dtype=torch.float64) - 0.5) * 120.0
    return lightness, ab


def structured_lab(height: int = 40, width: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth scene: an L ramp, a colour wheel in ab, and a dark square with a hard edge."""
    rows = torch.linspace(0, 1, height, dtype=torch.float64)[:, None].expand(height, width)
    columns = torch.linspace(0, 1, width, dtype=torch.float64)[None, :].expand(height, width)
    lightness = 20.0 + 70.0 * columns
    lightness = torch.where((rows > 0.3) & (rows < 0.6) & (columns > 0.2) & (columns < 0.5), 15.0, lightness)
    angle = 2 * torch.pi * (rows + columns)
    ab = torch.stack([50.0 * torch.cos(angle), 40.0 * torch.sin(angle)])
    return lightness[None, None], ab[None]


def assert_matches_skimage(lightness: torch.Tensor, pred_ab: torch.Tensor, true_ab: torch.Tensor) -> None:
    metrics = colorization_metrics_per_image(lightness, pred_ab, true_ab)
    pred_rgb = skimage_rgb(lightness, pred_ab)
    true_rgb = skimage_rgb(lightness, true_ab)
    for index in range(lightness.shape[0]):
        expected_psnr = peak_signal_noise_ratio(true_rgb[index], pred_rgb[index], data_range=1.0)
        expected_ssim = structural_similarity(true_rgb[index], pred_rgb[index], channel_axis=-1, data_range=1.0)
        expected_pred_colorfulness = reference_colorfulness(pred_rgb[index])
        expected_true_colorfulness = reference_colorfulness(true_rgb[index])
        assert metrics["psnr"][index].item() == pytest.approx(expected_psnr, abs=1e-3)
        assert metrics["ssim"][index].item() == pytest.approx(expected_ssim, abs=1e-3)
        assert metrics["colorfulness"][index].item() == pytest.approx(expected_pred_colorfulness, abs=1e-3)
        assert metrics["colorfulness_true"][index].item() == pytest.approx(expected_true_colorfulness, abs=1e-3)
        assert metrics["colorfulness_abs_diff"][index].item() == pytest.approx(
            abs(expected_pred_colorfulness - expected_true_colorfulness), abs=1e-3
        )
        expected_l1 = np.abs(pred_ab[index].numpy() - true_ab[index].numpy()).mean()
        assert metrics["l1_ab"][index].item() == pytest.approx(expected_l1, abs=1e-9)
        expected_auc = reference_auc(pred_ab[index].numpy(), true_ab[index].numpy())
        assert metrics["auc"][index].item() == pytest.approx(expected_auc, abs=1e-9)


def test_psnr_and_ssim_on_rgb_match_skimage_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    true_rgb = torch.rand(2, 3, 24, 31, generator=generator, dtype=torch.float64)
    pred_rgb = (true_rgb + 0.1 * torch.randn(2, 3, 24, 31, generator=generator, dtype=torch.float64)).clamp(0, 1)
    psnr = psnr_per_image(pred_rgb, true_rgb)
    ssim = ssim_per_image(pred_rgb, true_rgb)
    for index in range(2):
        true_image = true_rgb[index].permute(1, 2, 0).numpy()
        pred_image = pred_rgb[index].permute(1, 2, 0).numpy()
        assert psnr[index].item() == pytest.approx(
            peak_signal_noise_ratio(true_image, pred_image, data_range=1.0), abs=1e-9
        )
        expected_ssim = structural_similarity(true_image, pred_image, channel_axis=-1, data_range=1.0)
        assert ssim[index].item() == pytest.approx(expected_ssim, abs=1e-9)
    # Sanity of the scale: noise of std 0.1 is about 20 dB.
    assert 19.0 < psnr[0].item() < 22.0


def test_metrics_on_random_lab_match_skimage() -> None:
    generator = torch.Generator().manual_seed(1)
    lightness, true_ab = random_lab(generator, 2, 20, 27)
    _, pred_ab = random_lab(generator, 2, 20, 27)
    assert_matches_skimage(lightness, pred_ab, true_ab)


def test_metrics_on_structured_lab_match_skimage() -> None:
    lightness, true_ab = structured_lab()
    # A plausible colorizer's mistakes: washed-out colour with a hue shift.
    pred_ab = torch.stack([0.6 * true_ab[:, 0] + 5.0, 0.6 * true_ab[:, 1] - 8.0], dim=1)
    assert_matches_skimage(
        torch.cat([lightness, lightness]), torch.cat([pred_ab, true_ab * 0.9]), torch.cat([true_ab, true_ab])
    )
    metrics = colorization_metrics_per_image(lightness, pred_ab, true_ab)
    assert 0.0 < metrics["auc"].item() < 1.0
    assert metrics["colorfulness"].item() < metrics["colorfulness_true"].item()


def test_colorfulness_of_known_images() -> None:
    gray = torch.full((1, 3, 8, 8), 0.4)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert colorfulness_per_image(gray).item() == pytest.approx(0.0, abs=1e-9)
    # Uniform red: rg = 255, yb = 127.5, no spread, so 0.3 * sqrt(255^2 + 127.5^2).
    assert colorfulness_per_image(red).item() == pytest.approx(0.3 * (255.0**2 + 127.5**2) ** 0.5, abs=1e-6)


def test_auc_edges_and_a_known_value() -> None:
    true_ab = torch.zeros(1, 2, 4, 4)
    assert auc_per_image(true_ab, true_ab).item() == 1.0
    assert auc_per_image(torch.full((1, 2, 4, 4), 200.0), true_ab).item() == 0.0
    # Error exactly 10 (a 6-8-10 triangle): counted for thresholds 10..150, 141 of 151.
    off_by_ten = torch.stack([torch.full((4, 4), 6.0), torch.full((4, 4), 8.0)])[None]
    assert auc_per_image(off_by_ten, true_ab).item() == pytest.approx(141 / 151, abs=1e-12)
    # Half the pixels right, half off by 10.5 (counted for 11..150).
    mixed = off_by_ten.clone() * 1.05
    mixed[..., :2, :] = 0.0
    assert auc_per_image(mixed, true_ab).item() == pytest.approx(0.5 + 0.5 * 140 / 151, abs=1e-12)


def test_sums_add_up_across_batches_like_an_all_reduce() -> None:
    generator = torch.Generator().manual_seed(2)
    lightness, true_ab = random_lab(generator, 4, 16, 16)
    pred_ab = true_ab * 0.5
    whole = colorization_metric_sums(lightness, pred_ab, true_ab)
    first = colorization_metric_sums(lightness[:1], pred_ab[:1], true_ab[:1])
    rest = colorization_metric_sums(lightness[1:], pred_ab[1:], true_ab[1:])
    assert set(whole) == set(METRIC_NAMES) | {"count"}
    assert whole["count"].item() == 4.0
    for name in whole:
        assert whole[name].dtype == torch.float64
        assert (first[name] + rest[name]).item() == pytest.approx(whole[name].item(), rel=1e-12)
    per_image = colorization_metrics_per_image(lightness, pred_ab, true_ab)
    means = metric_means(whole)
    for name in METRIC_NAMES:
        assert means[name] == pytest.approx(per_image[name].mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="count is 0"):
        metric_means({name: torch.tensor(0.0) for name in (*METRIC_NAMES, "count")})


def test_gray_baseline_predicts_zero_ab() -> None:
    lightness, true_ab = structured_lab()
    baseline = gray_baseline_metric_sums(lightness, true_ab)
    explicit = colorization_metric_sums(lightness, torch.zeros_like(true_ab), true_ab)
    for name in baseline:
        assert baseline[name].item() == pytest.approx(explicit[name].item(), rel=1e-12)
    # Not exactly 0: the sRGB matrix and the D65 white point round to a neutral that is off by ~1e-5.
    assert baseline["colorfulness"].item() == pytest.approx(0.0, abs=0.01)
    assert baseline["colorfulness_true"].item() > 10.0
    assert baseline["l1_ab"].item() == pytest.approx(true_ab.abs().mean().item(), rel=1e-9)
    assert_matches_skimage(lightness, torch.zeros_like(true_ab), true_ab)


def test_gray_baseline_on_a_gray_photo_is_perfect_and_finite() -> None:
    lightness, _ = structured_lab()
    gray_truth = torch.zeros(1, 2, *lightness.shape[2:], dtype=torch.float64)
    means = metric_means(gray_baseline_metric_sums(lightness, gray_truth))
    assert means["l1_ab"] == 0.0
    assert means["auc"] == 1.0
    assert means["ssim"] == pytest.approx(1.0, abs=1e-12)
    # Identical images: PSNR is capped at 100 dB instead of infinity, so means stay finite.
    assert means["psnr"] == pytest.approx(100.0)
    assert means["colorfulness_abs_diff"] == pytest.approx(0.0, abs=1e-6)


def test_float32_inputs_agree_with_float64() -> None:
    generator = torch.Generator().manual_seed(3)
    lightness, true_ab = random_lab(generator, 2, 16, 16)
    pred_ab = true_ab * 0.7 + 3.0
    exact = colorization_metrics_per_image(lightness, pred_ab, true_ab)
    single = colorization_metrics_per_image(lightness.float(), pred_ab.float(), true_ab.float())
    for name in METRIC_NAMES:
        assert torch.allclose(single[name], exact[name], atol=1e-3), name
