"""ResNet18 (BasicBlock) in torchvision's exact state-dict layout, written here: torchvision is not a dependency.

Attribute names mirror `torchvision.models.resnet18` one for one (`conv1`, `bn1`, `layer1` .. `layer4` of
`BasicBlock`s with `conv1`, `bn1`, `conv2`, `bn2`, `downsample.0` / `downsample.1`, then `fc`), so a torchvision
state-dict file loads with `strict=True` and no renaming. The default init is torchvision's too (Kaiming normal,
fan-out, for convolutions; BatchNorm weight 1, bias 0), so an encoder built without pretrained weights starts where
a torchvision one would.
"""

from __future__ import annotations

import torch
from torch import nn

# Channels of layer1 .. layer4 and the blocks in each: ResNet18.
STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)
# Norm kinds the encoder accepts: both keep torchvision's BatchNorm weights and running statistics.
ENCODER_NORMS = ("batch", "sync_batch")


def _batch_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "sync_batch":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"ResNet18 needs BatchNorm to hold torchvision's statistics; norm must be one of {ENCODER_NORMS}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's `BasicBlock`).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution; with a channel change it also adds a 1x1 downsample shortcut.
        norm: "batch" or "sync_batch".
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = _batch_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = _batch_norm(norm, out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _batch_norm(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Encoder(nn.Module):
    """ResNet18 without its pooling and classifier: the stem and the four stages.

    Args:
        in_channels: input channels (3 for RGB as torchvision; 1 for the colorizer's L).
        norm: "batch" or "sync_batch".
    """

    def __init__(self, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STAGE_CHANNELS[0], 7, 2, 3, bias=False)
        self.bn1 = _batch_norm(norm, STAGE_CHANNELS[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(STAGE_CHANNELS[0], STAGE_CHANNELS[0], BLOCKS_PER_STAGE[0], 1, norm)
        self.layer2 = self._make_stage(STAGE_CHANNELS[0], STAGE_CHANNELS[1], BLOCKS_PER_STAGE[1], 2, norm)
        self.layer3 = self._make_stage(STAGE_CHANNELS[1], STAGE_CHANNELS[2], BLOCKS_PER_STAGE[2], 2, norm)
        self.layer4 = self._make_stage(STAGE_CHANNELS[2], STAGE_CHANNELS[3], BLOCKS_PER_STAGE[3], 2, norm)
        self._init_torchvision_style()

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int, norm: str) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride, norm)]
        blocks += [BasicBlock(out_channels, out_channels, 1, norm) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_torchvision_style(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder and keep every scale for a U-Net decoder.

        Args:
            x: input image, (N, in_channels, H, W).

        Returns:
            [stem (1/2, 64 ch), layer1 (1/4, 64), layer2 (1/8, 128), layer3 (1/16, 256), layer4 (1/32, 512)].
        """
        stem = self.relu(self.bn1(self.conv1(x)))
        stage1 = self.layer1(self.maxpool(stem))
        stage2 = self.layer2(stage1)
        stage3 = self.layer3(stage2)
        stage4 = self.layer4(stage3)
        return [stem, stage1, stage2, stage3, stage4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's feature map, (N, 512, H/32, W/32)."""
        return self.forward_features(x)[-1]


class ResNet18(ResNet18Encoder):
    """The full classifier, torchvision's `resnet18`: encoder, global average pool, `fc`.

    Args:
        in_channels: input channels.
        num_classes: classifier outputs (1000 for ImageNet).
        norm: "batch" or "sync_batch".
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, norm: str = "batch") -> None:
        super().__init__(in_channels=in_channels, norm=norm)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(STAGE_CHANNELS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits, (N, num_classes)."""
        features = self.forward_features(x)[-1]
        return self.fc(torch.flatten(self.avgpool(features), 1))
