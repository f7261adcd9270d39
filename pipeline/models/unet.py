"""The pix2pix U-Net generator (`unet_256`): gray L in, ab out.

Same layers and parameter count as pix2pix's `UnetGenerator` built from nested `UnetSkipConnectionBlock`s, but
written flat: one list of down blocks, one list of up blocks, and a forward pass that keeps the skips in a list.

    down 0:  conv(in -> 64)                          no norm, no activation before (outermost)
    down i:  LeakyReLU(0.2), conv, norm              i = 1 .. num_downs - 2
    down n:  LeakyReLU(0.2), conv                    innermost: no norm (the 1x1 bottleneck)
    up 0:    ReLU, convT, norm                       innermost: takes the bottleneck alone
    up j:    ReLU, convT(cat(skip, x)), norm [, Dropout(0.5) for j = 1, 2, 3]
    up n:    ReLU, convT(cat(skip, x) -> out), Tanh  outermost: bias, no norm

Every convolution is 4x4, stride 2, padding 1. As in pix2pix, a convolution's bias follows the norm kind (no bias
with batch norm, bias with instance norm), including the outermost and innermost down convolutions, which have no
norm after them; only the outermost up convolution always has a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import conv_bias_for, init_weights, norm_layer

# The three up blocks right after the innermost one carry dropout (pix2pix's `use_dropout` blocks).
NUM_DROPOUT_BLOCKS = 3


class UNetGenerator(nn.Module):
    """pix2pix U-Net with `num_downs` stride-2 downsamplings (8 for 256x256 inputs: 256 -> 1).

    Args:
        in_channels: input channels (1: L).
        out_channels: output channels (2: ab), squashed by tanh to -1..1.
        base_filters: filters of the outermost layer; deeper layers use 2x, 4x, then 8x this.
        num_downs: number of downsamplings; an input side of 2**num_downs reaches a 1x1 bottleneck.
        norm: "batch", "sync_batch" or "instance" (see `layers.norm_layer`).
        dropout: dropout probability in the three up blocks after the innermost one (0.5 in pix2pix).
        init_std: standard deviation of the N(0, std) weight init applied at construction.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        base_filters: int = 64,
        num_downs: int = 8,
        norm: str = "batch",
        dropout: float = 0.5,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be at least 5 (4 widening levels plus the bottleneck), got {num_downs}")
        use_bias = conv_bias_for(norm)

        # Output channels of each down block: 64, 128, 256, 512, then 512 down to the bottleneck.
        down_channels = [base_filters * min(2**level, 8) for level in range(num_downs)]

        down_blocks: list[nn.Module] = [nn.Conv2d(in_channels, down_channels[0], 4, 2, 1, bias=use_bias)]
        for level in range(1, num_downs - 1):
            down_blocks.append(
                nn.Sequential(
                    nn.LeakyReLU(0.2, inplace=True),
                    nn.Conv2d(down_channels[level - 1], down_channels[level], 4, 2, 1, bias=use_bias),
                    norm_layer(norm, down_channels[level]),
                )
            )
        down_blocks.append(
            nn.Sequential(
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(down_channels[-2], down_channels[-1], 4, 2, 1, bias=use_bias),
            )
        )
        self.down_blocks = nn.ModuleList(down_blocks)

        # Up block j mirrors down block num_downs - 1 - j and produces that block's input width.
        up_blocks: list[nn.Module] = [
            nn.Sequential(
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(down_channels[-1], down_channels[-2], 4, 2, 1, bias=use_bias),
                norm_layer(norm, down_channels[-2]),
            )
        ]
        for step in range(1, num_downs - 1):
            level = num_downs - 1 - step
            layers: list[nn.Module] = [
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(2 * down_channels[level], down_channels[level - 1], 4, 2, 1, bias=use_bias),
                norm_layer(norm, down_channels[level - 1]),
            ]
            if step <= NUM_DROPOUT_BLOCKS:
                layers.append(nn.Dropout(dropout))
            up_blocks.append(nn.Sequential(*layers))
        up_blocks.append(
            nn.Sequential(
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(2 * down_channels[0], out_channels, 4, 2, 1, bias=True),
                nn.Tanh(),
            )
        )
        self.up_blocks = nn.ModuleList(up_blocks)

        init_weights(self, std=init_std)
        self.fusion: nn.Module | None = None  # `pipeline.models.fusion` at the bottleneck (model.fusion)
        self.bottleneck_channels = down_channels[-1]

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """Predict ab from L.

        Args:
            lightness: normalized L, (N, in_channels, H, W) with H and W multiples of 2**num_downs.

        Returns:
            normalized ab in -1..1, (N, out_channels, H, W).
        """
        skips: list[torch.Tensor] = []
        x = lightness
        for block in self.down_blocks:
            x = block(x)
            skips.append(x)
        # The bottleneck feeds the innermost up block directly; every later one sees cat(skip, x) as in pix2pix.
        bottleneck = skips.pop()
        if self.fusion is not None:
            bottleneck = self.fusion(bottleneck, lightness)
        x = self.up_blocks[0](bottleneck)
        for block in self.up_blocks[1:]:
            x = block(torch.cat([skips.pop(), x], dim=1))
        return x
