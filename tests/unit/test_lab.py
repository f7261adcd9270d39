"""The Lab codec: parity with scikit-image, the stored uint8 encoding, network normalization, torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skimage.data
import torch
from skimage.color import lab2rgb, rgb2lab

from ingest.lab import (
    decode_lab8,
    denormalize_torch,
    encode_lab8,
    lab8_to_network,
    lab_to_rgb,
    lab_to_rgb_torch,
    normalize_lab,
    rgb8_to_lab8,
    rgb_to_lab,
    rgb_to_lab_torch,
)

# Real photos that ship inside scikit-image (no download): faces, fur, food, sky, stained tissue, a colour wheel.
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel"]


def photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()[..., :3]


def skimage_lab2rgb(lab: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Z < 0" for out-of-gamut Lab: clipped, as ours does
        return lab2rgb(lab)


def random_lab(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Lab over the whole stored range, most of it outside the sRGB gamut."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 100, shape), rng.uniform(-128, 127, shape), rng.uniform(-128, 127, shape)], -1)


def rgb_cube(step: int = 5) -> np.ndarray:
    """Every `step`-th 8-bit code per channel (255 included): a lattice through the whole RGB cube, as (N, 1, 3)."""
    codes = np.unique(np.r_[np.arange(0, 256, step), 255]).astype(np.uint8)
    return np.stack(np.meshgrid(codes, codes, codes, indexing="ij"), -1).reshape(-1, 1, 3)


def delta_e76(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    return np.sqrt(((np.asarray(lab1, np.float64) - np.asarray(lab2, np.float64)) ** 2).sum(-1))


# --- float conversions against scikit-image ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_rgb_to_lab_matches_skimage_on_random_float_and_uint8(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb_float = rng.uniform(0, 1, (48, 40, 3))
    # Values near 0 exercise the linear branches of the gamma and of f(t).
    rgb_float[:4] = rng.uniform(0, 0.05, (4, 40, 3))
    rgb_uint8 = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    assert np.abs(rgb_to_lab(rgb_float) - rgb2lab(rgb_float)).max() < 1e-3
    assert np.abs(rgb_to_lab(rgb_uint8) - rgb2lab(rgb_uint8)).max() < 1e-3


def test_rgb_to_lab_of_black_white_and_primaries() -> None:
    colors = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)[None]
    lab = rgb_to_lab(colors)[0]
    np.testing.assert_allclose(lab[0], [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(lab[1], [100, 0, 0], atol=1e-2)  # D65 white is neutral (to skimage's matrix digits)
    np.testing.assert_allclose(lab, rgb2lab(colors)[0], atol=1e-3)
    assert lab[2, 1] > 75 and lab[3, 1] < -75 and lab[4, 2] < -100  # red +a, green -a, blue -b


@pytest.mark.parametrize("seed", [0, 1])
def test_lab_to_rgb_matches_skimage_inside_and_outside_the_gamut(seed: int) -> None:
    lab = random_lab((64, 48), seed)
    ours = lab_to_rgb(lab)
    assert np.abs(ours - skimage_lab2rgb(lab)).max() < 1e-3
    assert ours.min() >= 0.0 and ours.max() <= 1.0


@pytest.mark.parametrize("name", PHOTOS)
def test_float_conversions_match_skimage_on_real_photos(name: str) -> None:
    rgb = photo(name)
    ours = rgb_to_lab(rgb)
    reference = rgb2lab(rgb)
    assert ours.shape == rgb.shape and ours.dtype == np.float64
    assert np.abs(ours - reference).max() < 1e-3
    assert np.abs(lab_to_rgb(reference) - skimage_lab2rgb(reference)).max() < 1e-3
    # And the round trip gives the photo back.
    assert np.abs(lab_to_rgb(ours) * 255 - rgb).max() < 1e-3


# --- the stored uint8 encoding ---------------------------------------------------------------


def test_rgb8_fast_path_agrees_with_float_encoding_over_the_whole_rgb_cube() -> None:
    cube = rgb_cube(step=5)
    fast = rgb8_to_lab8(cube)
    reference = encode_lab8(rgb_to_lab(cube))
    assert fast.shape == (3, cube.shape[0], 1) and fast.dtype == np.uint8
    difference = np.abs(fast.astype(np.int16) - reference.astype(np.int16))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01  # off by one only where float32 lands on a rounding boundary


@pytest.mark.parametrize("name", PHOTOS)
def test_rgb8_fast_path_agrees_with_float_encoding_on_real_photos(name: str) -> None:
    rgb = photo(name)
    fast = rgb8_to_lab8(rgb)
    assert fast.shape == (3,) + rgb.shape[:2] and fast.dtype == np.uint8 and fast.flags.c_contiguous
    assert np.abs(fast.astype(np.int16) - encode_lab8(rgb_to_lab(rgb)).astype(np.int16)).max() <= 1


@pytest.mark.parametrize("name", PHOTOS)
def test_stored_encoding_delta_e_on_real_photos(name: str) -> None:
    rgb = photo(name)
    exact = rgb_to_lab(rgb)
    for stored in (rgb8_to_lab8(rgb), encode_lab8(exact)):
        error = delta_e76(decode_lab8(stored), exact)
        assert error.mean() <= 0.5, f"{name}: mean Delta-E {error.mean():.3f}"
        assert error.max() <= 1.5, f"{name}: max Delta-E {error.max():.3f}"


def test_encoding_layout_is_documented_formula() -> None:
    lab = np.array([[[0.0, 0.0, 0.0], [100.0, -86.2, 98.2], [60.0, 10.4, -107.9], [53.24, 80.09, 67.2]]])
    stored = encode_lab8(lab)
    assert stored.shape == (3, 1, 4)
    np.testing.assert_array_equal(stored[:, 0, 0], [0, 128, 128])
    np.testing.assert_array_equal(stored[:, 0, 1], [255, 42, 226])  # round(-86.2)+128, round(98.2)+128
    np.testing.assert_array_equal(stored[:, 0, 2], [153, 138, 20])  # round(60 * 255 / 100)
    np.testing.assert_array_equal(stored[:, 0, 3], [136, 208, 195])
    decoded = decode_lab8(stored)
    assert decoded.shape == (1, 4, 3) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded[0, 1], [100.0, -86.0, 98.0], atol=1e-5)


def test_encoding_clips_values_outside_the_stored_range() -> None:
    stored = encode_lab8(np.array([[[120.0, 200.0, -300.0]]]))
    np.testing.assert_array_equal(stored[:, 0, 0], [255, 255, 0])


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((3, 4), np.uint8)]
)
def test_decode_refuses_arrays_that_are_not_stored_lab(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 array of shape"):
        decode_lab8(bad)


# --- network normalization -------------------------------------------------------------------


def test_normalize_lab_follows_the_recipe() -> None:
    lab = np.array([[[0.0, 110.0, -55.0], [100.0, -110.0, 0.0], [50.0, 0.0, 22.0]]])  # (1, 3, 3)
    light, ab = normalize_lab(lab)
    assert light.shape == (1, 1, 3) and ab.shape == (2, 1, 3)
    assert light.dtype == np.float32 and ab.dtype == np.float32
    np.testing.assert_allclose(light[0, 0], [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(ab[0, 0], [1.0, -1.0, 0.0])
    np.testing.assert_allclose(ab[1, 0], [-0.5, 0.0, 0.2])


def test_lab8_to_network_maps_codes_to_the_recipe_range() -> None:
    stored = np.array([[[0, 255, 51]], [[128, 238, 18]], [[128, 18, 183]]], dtype=np.uint8)  # (3, 1, 3)
    light, ab = lab8_to_network(stored)
    assert light.shape == (1, 1, 3) and ab.shape == (2, 1, 3) and light.dtype == ab.dtype == np.float32
    np.testing.assert_allclose(light[0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], atol=1e-6)  # L=0 -> -1, L=100 -> 1
    np.testing.assert_allclose(ab[0, 0], [0.0, 1.0, -1.0], atol=1e-6)  # a = 0, 110, -110
    np.testing.assert_allclose(ab[1, 0], [0.0, -1.0, 0.5], atol=1e-6)
    # The same as normalizing the decoded floats.
    expected_light, expected_ab = normalize_lab(decode_lab8(stored))
    np.testing.assert_allclose(light, expected_light, atol=1e-6)
    np.testing.assert_allclose(ab, expected_ab, atol=1e-6)


def test_denormalize_torch_inverts_normalize() -> None:
    lab = random_lab((5, 7), seed=3).astype(np.float32)
    light, ab = normalize_lab(lab)
    restored = denormalize_torch(torch.from_numpy(light)[None], torch.from_numpy(ab)[None])
    assert restored.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(restored[0].permute(1, 2, 0).numpy(), lab, atol=1e-4)


# --- torch versions --------------------------------------------------------------------------


def test_rgb_to_lab_torch_matches_numpy() -> None:
    rgb = np.stack([photo("astronaut")[:64, :64], photo("coffee")[:64, :64]]) / 255.0  # (2, 64, 64, 3)
    expected = rgb_to_lab(rgb)
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        tensor = torch.as_tensor(rgb, dtype=dtype).permute(0, 3, 1, 2)
        ours = rgb_to_lab_torch(tensor)
        assert ours.shape == (2, 3, 64, 64) and ours.dtype == dtype
        assert np.abs(ours.permute(0, 2, 3, 1).double().numpy() - expected).max() < tolerance


def test_lab_to_rgb_torch_matches_numpy_including_out_of_gamut() -> None:
    lab = random_lab((2, 16, 16), seed=5)  # (2, 16, 16, 3)
    expected = lab_to_rgb(lab)
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        ours = lab_to_rgb_torch(torch.as_tensor(lab, dtype=dtype).permute(0, 3, 1, 2))
        assert ours.shape == (2, 3, 16, 16) and ours.dtype == dtype
        assert np.abs(ours.permute(0, 2, 3, 1).double().numpy() - expected).max() < tolerance


def test_lab_to_rgb_torch_computes_half_precision_in_float32() -> None:
    lab = random_lab((1, 8, 8), seed=6)
    half = torch.as_tensor(lab, dtype=torch.float16).permute(0, 3, 1, 2)
    ours = lab_to_rgb_torch(half)
    assert ours.dtype == torch.float32
    expected = lab_to_rgb(half.permute(0, 2, 3, 1).double().numpy())
    assert np.abs(ours.permute(0, 2, 3, 1).double().numpy() - expected).max() < 1e-4
