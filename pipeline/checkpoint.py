"""A checkpoint is one plain dict, saved with `torch.save` and loaded with `weights_only=True`.

    {"format": 2, "generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d",
     "position": {"stage", "epoch", "step_in_epoch", "global_step"}, "rng": {"torch"},
     "config": TrainConfig as a dict, "data": {"refs", "digests", "size" (the samples' side), "resize",
     "read" (how the epoch in progress is read: `pipeline.data.reader`'s versioned state, carried as it is)}}

Format 1 (before 2026-12-07) kept the read state's fields ("interleave", "global_batch", "splits", "owned") in "data"
itself, some missing in older checkpoints; `load_checkpoint` turns it into format 2 (`upgrade`), so nothing else reads
format 1.

This module is the payload's one owner: `build_payload` makes it, `restore_networks` and
`restore_optimizers` put it back, `payload_config` reads its config. The position is where training
continues: after an epoch's last step it already points at the next epoch (or stage). `step_in_epoch`
counts global batches, so it means the same on any number of workers. Random draws
(dropout, flips, shuffles) are re-derived from the seed and the position, so a resumed run
continues exactly as an uninterrupted one would; the saved CPU RNG state is for inspection only
and is not restored (nor is a CUDA one saved: nothing draws from it that the position does not fix).

Uploading, resuming from and repairing a run's checkpoints on Ray Train is `pipeline.train.checkpoint_store`'s.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ingest.errors import RecolorError
from ingest.images import DEFAULT_RESIZE, RESIZE_MODES

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2


class CheckpointError(RecolorError):
    """A checkpoint could not be uploaded, or none of a run's checkpoints can be read."""


class CorruptCheckpoint(CheckpointError, ValueError):
    """A file that is not a readable checkpoint of this project (damaged, truncated, or something else)."""


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    step_in_epoch: int = 0  # steps of this epoch already trained on
    global_step: int = 0  # steps of the whole run

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_payload(generator, discriminator, optimizers, schedulers, position: Position, config, plan,
                  read_state: dict) -> dict:  # fmt: skip
    """The checkpoint dict of a run at `position`: plain modules (unwrapped from DDP), both optimizers and
    schedulers (generator's first), the config (`TrainConfig`), the data plan's versions and how the epoch in
    progress is read (`read_state`: `pipeline.data.reader.EpochReader.state_dict`, kept as it is)."""
    return {
        "format": FORMAT,
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "opt_g": optimizers[0].state_dict(),
        "opt_d": optimizers[1].state_dict(),
        "sched_g": schedulers[0].state_dict(),
        "sched_d": schedulers[1].state_dict(),
        "position": position.to_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "config": config.to_dict(),
        "data": {
            "refs": plan.refs,
            "digests": plan.digests,
            "size": plan.size,
            "resize": plan.resize,
            "read": read_state,
        },
    }


def read_state(payload: dict) -> dict:
    """How the epoch a checkpoint was taken in is read (`pipeline.data.reader.ReadState`, as a dict; {} for a payload
    that does not say, which `ReadState.from_dict` refuses with its reason)."""
    return (payload.get("data") or {}).get("read") or {}


def upgrade(payload: dict) -> dict:
    """A format-1 checkpoint in format 2 (in place): the read state's fields gathered under "data"["read"], those a
    checkpoint older than them lacks as they were then: one shard read at a time, the samples a step and the worker
    groups and the shuffle window not recorded (0, [], 0: the resuming run's own), shards not owned."""
    if payload.get("format") != 1:
        return payload
    data = payload.setdefault("data", {})
    global_batch, splits = data.pop("global_batch", None), data.pop("splits", None)
    owned = data.pop("owned", None)
    data["read"] = {
        "version": 1,
        "interleave": int(data.pop("interleave", 1)),
        "global_batch": global_batch if isinstance(global_batch, int) and global_batch > 0 else 0,
        "splits": [[int(workers), int(step)] for workers, step in splits] if isinstance(splits, list) else [],
        "owned": owned if isinstance(owned, bool) else False,
        "window": 0,  # not recorded: the resuming run's data.shuffle_window
    }
    payload["format"] = 2
    return payload


def restore_networks(payload: dict, generator, discriminator) -> Position:
    """Load both networks' weights from `payload`; returns the position training continues at.

    Raises:
        ConfigError: the checkpoint's generator has another `model.arch` (another encoder), `model.encoder` or
            `model.fusion` than `generator`.
    """
    from ingest.errors import ConfigError
    from pipeline.models import generator_arch

    model = payload.get("config", {}).get("model") or {}
    trained_arch, wanted_arch = model.get("arch", "unet_256"), generator_arch(generator)
    if trained_arch != wanted_arch:
        raise ConfigError(f"the checkpoint was trained with model.arch={trained_arch}, this run asks for "
                          f"{wanted_arch}: another encoder and decoder; resume with the arch it began with, or start "
                          "a new run (--name)")  # fmt: skip
    if wanted_arch == "inception_unet":
        trained_encoder = model.get("encoder", "frozen")
        wanted_encoder = "frozen" if generator.freeze_encoder else "finetune"
        if trained_encoder != wanted_encoder:
            raise ConfigError(f"the checkpoint was trained with model.encoder={trained_encoder}, this run asks for "
                              f"{wanted_encoder}: resume with the setting it began with, or start a new run "
                              "(--name)")  # fmt: skip
    trained = model.get("fusion", "none")
    wanted = "none" if getattr(generator, "fusion", None) is None else "inception"
    if trained != wanted:
        raise ConfigError(f"the checkpoint was trained with model.fusion={trained}, this run asks for {wanted}: "
                          "resume with the setting it began with, or start a new run (--name)")  # fmt: skip
    generator.load_state_dict(payload["generator"])
    discriminator.load_state_dict(payload["discriminator"])
    return Position(**payload["position"])


def restore_optimizers(payload: dict, stage: int, optimizers, schedulers) -> bool:
    """Load the optimizers and schedulers of `stage` from `payload` if it was saved in that stage (a later stage
    starts its own); returns whether it did."""
    if payload["position"]["stage"] != stage:
        return False
    optimizers[0].load_state_dict(payload["opt_g"])
    optimizers[1].load_state_dict(payload["opt_d"])
    schedulers[0].load_state_dict(payload["sched_g"])
    schedulers[1].load_state_dict(payload["sched_d"])
    return True


def trained_side(payload: dict) -> int:
    """The side of the samples a checkpoint trained on (256 for checkpoints written before it was recorded)."""
    size = payload.get("data", {}).get("size")
    return size if isinstance(size, int) and size > 0 else 256


def trained_resize(payload: dict) -> str:
    """How the samples a checkpoint trained on were cut ("cover" for checkpoints that do not say)."""
    resize = payload.get("data", {}).get("resize")
    return resize if resize in RESIZE_MODES else DEFAULT_RESIZE


def payload_config(payload: dict):
    """The `TrainConfig` a checkpoint was trained with."""
    from pipeline.config import TrainConfig

    return TrainConfig.from_dict(payload["config"])


def safe_torch_load(handle, map_location: str | torch.device = "cpu"):
    """`torch.load(..., weights_only=True)`, whose failure is one line of what is wrong with the file.

    Raises:
        ValueError: the file is not a torch file of tensors and plain containers: truncated, foreign, or
            carrying code (the reason, never torch's advice to load it with `weights_only=False`).
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on pickle protocols, for files refused anyway
            return torch.load(handle, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, foreign or code-carrying files
        raise ValueError(_load_failure(e)) from None


def _load_failure(error: Exception) -> str:
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        details = [line for line in lines if not line.startswith(("Please file an issue", "Check the documentation"))]
        if any("GLOBAL" in line for line in details):
            return "it holds Python objects, not only tensors (refused: loading them could run code)"
        return "not a torch file of tensors" + (f" ({details[0]})" if details else "")
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__


def save_checkpoint(directory: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(payload, path)
    return path


def load_checkpoint(
    source: str | Path | bytes, map_location: str | torch.device = "cpu", name: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint dict from a file, a directory holding `checkpoint.pt`, or bytes (read from `name`);
    never unpickles code.

    Raises:
        ValueError: the file is not a checkpoint of this project.
    """
    if isinstance(source, bytes):
        handle: Any = io.BytesIO(source)
    else:
        path = Path(source)
        handle = path / CHECKPOINT_FILE if path.is_dir() else path
    name = name or ("checkpoint bytes" if isinstance(source, bytes) else str(source))
    try:
        if isinstance(handle, io.BytesIO):
            head = source[:4]
        else:
            with open(handle, "rb") as file:
                head = file.read(4)
    except OSError as e:
        raise CorruptCheckpoint(f"{name} is not a readable checkpoint: {e.strerror or e}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle
        raise CorruptCheckpoint(f"{name} is not a readable checkpoint: not a torch file of tensors")
    try:
        payload = safe_torch_load(handle, map_location)
    except ValueError as e:
        raise CorruptCheckpoint(f"{name} is not a readable checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT) or "generator" not in payload:
        raise CorruptCheckpoint(f"{name} is not a recolor checkpoint")
    return upgrade(payload)
