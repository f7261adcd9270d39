"""What an evaluation saw image by image: FID features of the model, the truth and the gray baseline, a table
of every image's metrics and source, and the worst images by ab error beside their truth.

`Inspection.on_batch` is `pipeline.evaluation.validation.accumulate`'s hook; after the last batch, `scores`,
`table` and `worst_grid` give what `recolor evaluate` logs.
"""

from __future__ import annotations

import heapq
import logging

import numpy as np
import torch

from ingest.lab import lab_to_rgb_torch
from pipeline.evaluation.metrics import colorization_metrics_per_image

log = logging.getLogger(__name__)
WORST = 16


class Inspection:
    """Per-image metrics (with `keys`: the (shard URI, sample key) of each image, in order, as
    `pipeline.data.batches.validation_batches` fills it), the `WORST` images by ab error, and with `fid` the Inception
    features (`pipeline.evaluation.fid.FeatureSets`; None when the network is not installed: said once)."""

    def __init__(self, keys: list, fid: bool = True, device: torch.device | str | None = None):
        from pipeline.evaluation.fid import FeatureSets, FidUnavailable

        self.keys = keys
        self.rows: list[dict] = []
        self.worst: list[tuple[float, int, tuple[torch.Tensor, ...]]] = []  # a min-heap of the largest errors
        self.features = None
        if fid:
            try:
                self.features = FeatureSets(device)
            except FidUnavailable as e:
                log.warning("%s; the other metrics are computed", e)

    def on_batch(self, lightness: torch.Tensor, pred_ab: torch.Tensor, true_ab: torch.Tensor) -> None:
        per_image = colorization_metrics_per_image(lightness, pred_ab, true_ab)
        first = len(self.rows)
        for index in range(lightness.shape[0]):
            uri, key = self.keys[first + index] if first + index < len(self.keys) else ("", "")
            self.rows.append({"key": key, "shard": uri, **{name: float(v[index]) for name, v in per_image.items()}})
            item = (float(per_image["l1_ab"][index]), first + index,
                    (lightness[index].cpu(), pred_ab[index].cpu(), true_ab[index].cpu()))  # fmt: skip
            if len(self.worst) < WORST:
                heapq.heappush(self.worst, item)
            elif item[0] > self.worst[0][0]:
                heapq.heapreplace(self.worst, item)
        if self.features is not None:
            with torch.no_grad():
                gray = torch.zeros_like(true_ab)
                self.features.add(
                    model=lab_to_rgb_torch(torch.cat([lightness, pred_ab], dim=1)),
                    truth=lab_to_rgb_torch(torch.cat([lightness, true_ab], dim=1)),
                    gray=lab_to_rgb_torch(torch.cat([lightness, gray], dim=1)),
                )

    def scores(self, prefix: str = "eval/") -> dict[str, float]:
        """FID and KID of the model and of the gray baseline against the truth ({} without the network)."""
        return self.features.scores(prefix) if self.features is not None else {}

    def table(self) -> dict[str, list]:
        """The per-image table as columns (MLflow's `log_table`), worst ab error first."""
        rows = sorted(self.rows, key=lambda row: -row["l1_ab"])
        return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}

    def worst_grid(self) -> bytes | None:
        """A PNG of the worst images by ab error, worst first: gray input, the model's, the truth."""
        from pipeline.tracking.plots import sample_grid

        if not self.worst:
            return None
        items = sorted(self.worst, key=lambda item: -item[0])
        light, pred, true = (torch.stack([item[2][part] for item in items]) for part in range(3))
        return sample_grid(light, pred, true, max_images=WORST)


class FidFeatures:
    """Training validation's Inception features: the model's every time; the truth's and the gray baseline's only
    the first time (`reference`: the same samples each validation, so the next ones pass them back in)."""

    def __init__(self, device: torch.device | str | None, reference: tuple[np.ndarray, np.ndarray] | None = None):
        from pipeline.evaluation.fid import network_path

        network_path()  # FidUnavailable now
        self.device = device
        self.model: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.gray: list[np.ndarray] = []
        self.given = reference

    def on_batch(self, lightness: torch.Tensor, pred_ab: torch.Tensor, true_ab: torch.Tensor) -> None:
        from pipeline.evaluation.fid import inception_features

        with torch.no_grad():
            self.model.append(inception_features(lab_to_rgb_torch(torch.cat([lightness, pred_ab], dim=1)),
                                                 self.device))  # fmt: skip
            if self.given is None:
                truth = lab_to_rgb_torch(torch.cat([lightness, true_ab], dim=1))
                gray = lab_to_rgb_torch(torch.cat([lightness, torch.zeros_like(true_ab)], dim=1))
                self.truth.append(inception_features(truth, self.device))
                self.gray.append(inception_features(gray, self.device))

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        if self.given is not None:
            return self.given
        return _stack(self.truth), _stack(self.gray)

    def sets(self) -> dict[str, np.ndarray]:
        """{"model", "truth", "gray"}: float32 features of this rank's share (what is gathered over ranks)."""
        truth, gray = self.reference()
        return {"model": _stack(self.model).astype(np.float32), "truth": truth.astype(np.float32),
                "gray": gray.astype(np.float32)}  # fmt: skip


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 2048))
