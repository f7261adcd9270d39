"""U-Net generator on a ResNet18 encoder (the recipe's pretrained-encoder variant): L in, ab out, 256x256.

The encoder is `ResNet18Encoder` (torchvision's layout, no pool or classifier) with a 1-channel stem. The decoder
climbs back through every encoder scale with skip connections, fastai `DynamicUnet`-like but plainer:

    layer4 (1/32, 512) -> up + layer3 (1/16, 256) -> 256
                       -> up + layer2 (1/8, 128)  -> 128
                       -> up + layer1 (1/4, 64)   -> 64
                       -> up + stem   (1/2, 64)   -> 64
                       -> up + input  (1/1, 1)    -> 32 -> 1x1 conv -> 2, tanh

each "up" a 4x4 stride-2 transposed convolution, norm, ReLU; the skip is concatenated and fused by a 3x3
convolution, norm, ReLU.

Initialization: the decoder gets the recipe's N(0, 0.02) init; the encoder keeps torchvision's default init
(Kaiming normal) when no pretrained weights are given, so "from scratch" means the same as a fresh torchvision
resnet18, and `load_backbone_weights` replaces it afterwards. Nothing re-initializes the encoder after loading.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pipeline.models.layers import conv_bias_for, init_weights, norm_layer
from pipeline.models.resnet import STAGE_CHANNELS, ResNet18Encoder

# The stem's output channels (ResNet18 conv1) and the width of the full-resolution decoder block.
STEM_CHANNELS = 64
FULL_RESOLUTION_CHANNELS = 32


class UpBlock(nn.Module):
    """Upsample x2, concatenate the encoder's skip at that scale, fuse.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the skip connection.
        out_channels: channels of the output (and of the upsampled map).
        norm: "batch", "sync_batch" or "instance".
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        use_bias = conv_bias_for(norm)
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=use_bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 3, 1, 1, bias=use_bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.upsample(x), skip], dim=1))


class ResNetUNetDecoder(nn.Module):
    """The decoder half: five `UpBlock`s from 1/32 to full resolution, then a 1x1 head and tanh.

    Args:
        in_channels: channels of the network input (the last skip).
        out_channels: output channels (2: ab).
        norm: "batch", "sync_batch" or "instance".
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.up4 = UpBlock(STAGE_CHANNELS[3], STAGE_CHANNELS[2], STAGE_CHANNELS[2], norm)
        self.up3 = UpBlock(STAGE_CHANNELS[2], STAGE_CHANNELS[1], STAGE_CHANNELS[1], norm)
        self.up2 = UpBlock(STAGE_CHANNELS[1], STAGE_CHANNELS[0], STAGE_CHANNELS[0], norm)
        self.up1 = UpBlock(STAGE_CHANNELS[0], STEM_CHANNELS, STEM_CHANNELS, norm)
        self.up0 = UpBlock(STEM_CHANNELS, in_channels, FULL_RESOLUTION_CHANNELS, norm)
        self.head = nn.Sequential(nn.Conv2d(FULL_RESOLUTION_CHANNELS, out_channels, 1), nn.Tanh())

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Decode the encoder's features.

        Args:
            image: the network input, (N, in_channels, H, W), used as the full-resolution skip.
            features: `ResNet18Encoder.forward_features` output: stem, layer1 .. layer4.

        Returns:
            (N, out_channels, H, W) in -1..1.
        """
        stem, stage1, stage2, stage3, stage4 = features
        x = self.up4(stage4, stage3)
        x = self.up3(x, stage2)
        x = self.up2(x, stage1)
        x = self.up1(x, stem)
        x = self.up0(x, image)
        return self.head(x)


class ResNetUNet(nn.Module):
    """U-Net with a ResNet18 encoder. Input sides must be multiples of 32.

    Args:
        in_channels: input channels (1: L).
        out_channels: output channels (2: ab).
        norm: decoder norm, "batch", "sync_batch" or "instance". The encoder always uses BatchNorm ("sync_batch"
            when asked for it) because pretrained weights come with BatchNorm running statistics.
        init_std: standard deviation of the decoder's N(0, std) init.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, norm: str = "batch", init_std: float = 0.02
    ) -> None:
        super().__init__()
        encoder_norm = "sync_batch" if norm == "sync_batch" else "batch"
        self.encoder = ResNet18Encoder(in_channels=in_channels, norm=encoder_norm)
        self.decoder = ResNetUNetDecoder(in_channels=in_channels, out_channels=out_channels, norm=norm)
        # Decoder only: the encoder keeps torchvision's init or, later, the loaded pretrained weights.
        init_weights(self.decoder, std=init_std)
        self.fusion: nn.Module | None = None  # `pipeline.models.fusion` at the bottleneck (model.fusion)
        self.bottleneck_channels = STAGE_CHANNELS[3]

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """Predict normalized ab (N, out_channels, H, W) in -1..1 from normalized L (N, in_channels, H, W)."""
        features = self.encoder.forward_features(lightness)
        if self.fusion is not None:
            features = [*features[:-1], self.fusion(features[-1], lightness)]
        return self.decoder(lightness, features)


def load_backbone_weights(model: ResNetUNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision-layout resnet18 state dict into the encoder of `model`, in place.

    The classifier (`fc.*`) is dropped. `conv1.weight` is summed over its input-channel (RGB) axis when the
    model's stem has one channel: a gray image replicated to RGB gives exactly that response, so the pretrained
    filters keep their meaning for L. Every other key must be present with the encoder's shape; BatchNorm's
    `num_batches_tracked` may be absent (torchvision's older files lack it; it is then set to 0).

    Args:
        model: the generator whose encoder receives the weights.
        state_dict: tensors keyed as torchvision's `resnet18().state_dict()` (e.g. "layer2.0.downsample.1.weight").

    Raises:
        ValueError: naming the missing keys, unexpected keys and shape mismatches, if any.
    """
    expected = model.encoder.state_dict()
    weights = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}

    stem_key = "conv1.weight"
    if stem_key in weights:
        stem_weight = weights[stem_key]
        target_in_channels = expected[stem_key].shape[1]
        if stem_weight.ndim == 4 and stem_weight.shape[1] == 3 and target_in_channels == 1:
            weights[stem_key] = stem_weight.sum(dim=1, keepdim=True)

    missing = sorted(key for key in expected if key not in weights and not key.endswith("num_batches_tracked"))
    unexpected = sorted(key for key in weights if key not in expected)
    mismatched = sorted(
        f"{key}: got {tuple(weights[key].shape)}, expected {tuple(expected[key].shape)}"
        for key in weights
        if key in expected and weights[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        raise ValueError("backbone state dict does not fit a torchvision resnet18 encoder; " + "; ".join(problems))

    for key in expected:
        if key.endswith("num_batches_tracked") and key not in weights:
            weights[key] = torch.zeros((), dtype=torch.long)
    model.encoder.load_state_dict(weights, strict=True)
