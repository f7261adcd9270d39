"""Deep Koalarization's fusion (Baldassarre et al. 2017): what a frozen ImageNet classifier sees in the gray input,
fused into the generator's bottleneck (config `model.fusion: inception`).

The classifier is the Inception network FID already uses (`pipeline.evaluation.fid`, the `recolor[fid]` extra):
its 2048 global pool features of the gray image (L with ab = 0, as sRGB, resized to 299) are projected to 256,
repeated over the bottleneck's positions, concatenated to it and mixed back to its width by a 1x1 convolution, as
the paper's fusion layer (its ReLU is the next layer's: the U-Net's innermost up block begins with one; the ResNet
U-Net's bottleneck feeds a transposed convolution). The generator's own encoder and decoder are unchanged.

The fusion starts as the identity on the bottleneck (the 1x1 convolution's weights are an identity on the
bottleneck's channels and 0 on the projected features; the projection is N(0, 0.02)), so a fused generator begins
exactly as the plain one, and its first step starts learning how much of the classifier's view to use. The
Inception network is frozen and not a submodule: it is not in the state dict, the optimizer or DDP's buckets; it
is loaded from the extra's file on the input's device and runs in float32.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 2048  # Inception's pool features
PROJECTED = 256  # the paper's fusion width


def gray_features(lightness: torch.Tensor) -> torch.Tensor:
    """Inception pool features (N, 2048, float32) of the gray images whose normalized L (N, 1, H, W) is given.

    Under `torch.compile` it is one clean graph break (a TorchScript network behind a file lookup): the fusion layer
    calls it through `torch.compiler.disable`, applied when the layer is built, not here at import (the decorator
    imports torch._dynamo, a second of every process that imports the models)."""
    from ingest.lab import denormalize_torch, lab_to_rgb_torch
    from pipeline.evaluation.fid import pool_features

    with torch.no_grad(), torch.autocast(lightness.device.type, enabled=False):
        light = lightness.detach().float()
        gray_ab = light.new_zeros(light.shape[0], 2, *light.shape[2:])
        return pool_features(lab_to_rgb_torch(denormalize_torch(light, gray_ab)))


_compiled_around = None  # gray_features behind torch.compiler.disable, made once a process (`_outside_compile`)


def _outside_compile():
    """`gray_features` behind `torch.compiler.disable`, made at the first use in this process: at a layer's build
    (before any `compile` traces it), or at the first forward of a layer that came unpickled (a generator shipped
    to Ray actors is never built there)."""
    global _compiled_around
    if _compiled_around is None:
        _compiled_around = torch.compiler.disable(gray_features)
    return _compiled_around


class InceptionFusion(nn.Module):
    """The fusion layer at a bottleneck of `channels` channels (see the module's docstring).

    Raises:
        FidUnavailable: at construction, when the Inception network (`recolor[fid]`) is not installed.
    """

    def __init__(self, channels: int, init_std: float = 0.02) -> None:
        super().__init__()
        from pipeline.evaluation.fid import network_path

        network_path()  # the missing extra is named now, not at the first step
        _outside_compile()
        self.project = nn.Linear(FEATURES, PROJECTED)
        self.mix = nn.Conv2d(channels + PROJECTED, channels, 1)
        with torch.no_grad():
            nn.init.normal_(self.project.weight, 0.0, init_std)
            nn.init.zeros_(self.project.bias)
            self.mix.weight.zero_()
            self.mix.weight[:, :channels, 0, 0] = torch.eye(channels)
            nn.init.zeros_(self.mix.bias)

    def forward(self, bottleneck: torch.Tensor, lightness: torch.Tensor) -> torch.Tensor:
        features = self.project(_outside_compile()(lightness).to(bottleneck.dtype))
        tiled = features[:, :, None, None].expand(-1, -1, bottleneck.shape[2], bottleneck.shape[3])
        return self.mix(torch.cat([bottleneck, tiled.to(bottleneck.dtype)], dim=1))
