"""Building blocks shared by the generators and the discriminator: normalization choice and weight init."""

from __future__ import annotations

from torch import nn

from pipeline.config import NORMS as NORM_KINDS


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Build the normalization layer the config asks for.

    Args:
        kind: "batch" (BatchNorm2d), "sync_batch" (SyncBatchNorm: statistics over all DDP ranks; on a single
            process it behaves as BatchNorm2d) or "instance" (InstanceNorm2d without affine parameters or running
            statistics, as pix2pix's `--norm instance`).
        channels: number of feature channels.

    Returns:
        The normalization module.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")


def conv_bias_for(kind: str) -> bool:
    """Whether a convolution followed by a `kind` norm should carry a bias.

    A BatchNorm's shift makes a preceding bias redundant. pix2pix keeps the bias with instance norm (its
    InstanceNorm has no affine shift), and so does this project, so "instance" models match pix2pix's.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")
    return kind == "instance"


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialize every layer under `module` as the recipe (pix2pix "normal" init), in place.

    Convolution, transposed convolution and linear weights are drawn from N(0, std); BatchNorm (also
    SyncBatchNorm) and affine InstanceNorm weights from N(1, std); all biases are set to 0.

    Args:
        module: the module whose submodules (and itself) are initialized.
        std: standard deviation of the normal draws.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d)) and layer.affine:
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)
