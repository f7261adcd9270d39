"""A checkpoint is one plain dict, saved with `torch.save` and loaded with `weights_only=True`.

    {"format": 1, "generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d",
     "position": {"stage", "epoch", "step_in_epoch", "global_step"}, "rng": {"torch", "cuda"},
     "config": TrainConfig as a dict, "data": {"refs", "digests"}}

The position is where training continues: after an epoch's last step it already points at the
next epoch (or stage). Random draws (dropout, flips, shuffles) are re-derived from the seed and
the position, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    step_in_epoch: int = 0  # steps of this epoch already trained on
    global_step: int = 0  # steps of the whole run

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def save_checkpoint(directory: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(payload, path)
    return path


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict from a file, a directory holding `checkpoint.pt`, or bytes; never unpickles code.

    Raises:
        ValueError: the file is not a checkpoint of this project.
    """
    if isinstance(source, bytes):
        handle: Any = io.BytesIO(source)
    else:
        path = Path(source)
        handle = path / CHECKPOINT_FILE if path.is_dir() else path
    name = "checkpoint bytes" if isinstance(source, bytes) else str(source)
    try:
        payload = torch.load(handle, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files
        raise ValueError(f"{name} is not a readable checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "generator" not in payload:
        raise ValueError(f"{name} is not a recolor checkpoint")
    return payload
