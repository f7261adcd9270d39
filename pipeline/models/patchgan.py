"""The 70x70 PatchGAN discriminator (pix2pix `NLayerDiscriminator` with 3 layers).

It judges (L, ab) pairs: each of its 30x30 output logits (for a 256x256 input) sees a 70x70 patch of the input.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import conv_bias_for, init_weights, norm_layer


class PatchGANDiscriminator(nn.Module):
    """C64 (no norm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel logits (stride 1).

    Args:
        in_channels: input channels (3: L and ab concatenated).
        base_filters: filters of the first layer; later layers double it up to 8x.
        num_layers: number of stride-2 layers (3 gives the 70x70 receptive field).
        norm: "batch", "sync_batch" or "instance" (see `layers.norm_layer`).
        init_std: standard deviation of the N(0, std) weight init applied at construction.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_filters: int = 64,
        num_layers: int = 3,
        norm: str = "batch",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        use_bias = conv_bias_for(norm)
        # The first layer has no norm, so it keeps its bias whatever the norm kind.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_filters, 4, 2, 1, bias=True),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = base_filters
        for layer_index in range(1, num_layers + 1):
            next_channels = base_filters * min(2**layer_index, 8)
            # The last of these layers keeps the resolution: it widens the receptive field to 70x70.
            stride = 1 if layer_index == num_layers else 2
            layers += [
                nn.Conv2d(channels, next_channels, 4, stride, 1, bias=use_bias),
                norm_layer(norm, next_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = next_channels
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1, bias=True))
        self.model = nn.Sequential(*layers)

        init_weights(self, std=init_std)

    def forward(self, lab: torch.Tensor) -> torch.Tensor:
        """Score every patch.

        Args:
            lab: normalized L and ab concatenated, (N, in_channels, H, W).

        Returns:
            real/fake logits (no sigmoid), (N, 1, H', W'); 30x30 for a 256x256 input.
        """
        return self.model(lab)
