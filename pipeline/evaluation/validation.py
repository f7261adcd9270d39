"""Validation metrics of a generator over Lab batches, beside the gray baseline (ab = 0).

One implementation for the validation inside training (summed per rank, then all-reduced) and
for `recolor evaluate` (one process), so the numbers agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ingest.lab import lab8_to_network_torch, network_to_lab_torch
from pipeline.evaluation.metrics import colorization_metric_sums, gray_baseline_metric_sums, metric_means


def metric_names() -> list[str]:
    """The names `accumulate` sums, in its order."""
    zeros = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    sums = colorization_metric_sums(zeros, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
    return sorted([*sums, *(f"gray_{name}" for name in sums)])


@torch.no_grad()
def accumulate(
    generator: nn.Module,
    batches: Iterable[np.ndarray],
    device: torch.device,
    autocast=contextlib.nullcontext,
    memory_format=torch.contiguous_format,
    on_batch=None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Sum every metric (model and gray baseline) over uint8 Lab batches; `on_batch(lightness, pred_ab, true_ab)`
    (real units) sees each batch too (FID features, the per-image table).

    Returns:
        (a float64 vector of sums in `metric_names()` order, on `device`;
         the first batch as (L 0..100, predicted ab, true ab) on the CPU, for sample grids, or None).
    """
    names = metric_names()
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    first = None
    for batch in batches:
        lab8 = torch.from_numpy(batch).to(device)
        light, real_ab = lab8_to_network_torch(lab8)
        with autocast():
            fake_ab = generator(light.contiguous(memory_format=memory_format))
        lightness, pred_ab = network_to_lab_torch(light, fake_ab)
        _, true_ab = network_to_lab_torch(light, real_ab)
        sums = colorization_metric_sums(lightness, pred_ab, true_ab)
        sums.update({f"gray_{k}": v for k, v in gray_baseline_metric_sums(lightness, true_ab).items()})
        totals += torch.stack([sums[name] for name in names])
        if on_batch is not None:
            on_batch(lightness, pred_ab, true_ab)
        if first is None:
            first = (lightness.cpu(), pred_ab.cpu(), true_ab.cpu())
    return totals, first


def finalize(totals: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    """Sums (possibly all-reduced) to means: `{prefix}l1_ab`, ..., `{prefix}gray_l1_ab`, ..., `{prefix}count`."""
    sums = dict(zip(metric_names(), totals, strict=True))
    if float(sums["count"]) == 0:
        return {}
    model = metric_means({k: v for k, v in sums.items() if not k.startswith("gray_")})
    gray = metric_means({k[5:]: v for k, v in sums.items() if k.startswith("gray_")})
    result = {f"{prefix}{k}": v for k, v in model.items()}
    result.update({f"{prefix}gray_{k}": v for k, v in gray.items()})
    result[f"{prefix}count"] = float(sums["count"])
    return result
