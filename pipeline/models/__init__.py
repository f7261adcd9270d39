"""Generators and discriminator of the colorizer, and the factories the training loop builds them with.

`unet.py` (the recipe's U-Net), `resnet.py` (ResNet18, torchvision's key names) and `resnet_unet.py` (the U-Net on
its encoder), `inception.py` (FID's Inception-v3 as a module) and `inception_unet.py` (the U-Net on that pretrained
encoder), `fusion.py` (Deep Koalarization's fusion of what a frozen classifier sees), `patchgan.py` (the 70x70
PatchGAN), `layers.py` (their blocks and norms), `saved.py` (the generator artifact: on disk without pickle).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pipeline.config import ARCHS as GENERATOR_ARCHS
from pipeline.config import FUSIONS as FUSION_KINDS
from pipeline.models.fusion import InceptionFusion
from pipeline.models.inception_unet import InceptionUNet
from pipeline.models.layers import NORM_KINDS, init_weights, norm_layer
from pipeline.models.patchgan import PatchGANDiscriminator
from pipeline.models.resnet import ResNet18, ResNet18Encoder
from pipeline.models.resnet_unet import ResNetUNet, load_backbone_weights
from pipeline.models.unet import UNetGenerator

__all__ = [
    "FUSION_KINDS",
    "GENERATOR_ARCHS",
    "InceptionUNet",
    "NORM_KINDS",
    "PatchGANDiscriminator",
    "ResNet18",
    "ResNet18Encoder",
    "ResNetUNet",
    "UNetGenerator",
    "build_discriminator",
    "build_generator",
    "generator_arch",
    "init_weights",
    "load_backbone_weights",
    "norm_layer",
    "set_inference_mode",
]


def build_generator(
    arch: str,
    norm: str = "batch",
    in_channels: int = 1,
    out_channels: int = 2,
    base_filters: int = 64,
    num_downs: int = 8,
    dropout: float = 0.5,
    init_std: float = 0.02,
    backbone_state_dict: Mapping[str, torch.Tensor] | None = None,
    fusion: str = "none",
    freeze_encoder: bool = True,
) -> nn.Module:
    """Build an initialized generator.

    Args:
        arch: "unet_256" (pix2pix U-Net), "resnet18_unet" (U-Net on a ResNet18 encoder) or "inception_unet"
            (U-Net on FID's ImageNet-trained Inception-v3, `pipeline.models.inception_unet`).
        norm: "batch", "sync_batch" or "instance".
        in_channels: input channels (1: L).
        out_channels: output channels (2: ab).
        base_filters: first-layer filters of "unet_256" (the ResNet encoder's widths are fixed).
        num_downs: downsamplings of "unet_256" (8 for 256 px; the input side must be at least 2**num_downs).
        dropout: dropout probability of "unet_256"'s three innermost up blocks.
        init_std: standard deviation of the N(0, std) init ("resnet18_unet": decoder only).
        backbone_state_dict: torchvision-layout resnet18 weights for "resnet18_unet"'s encoder; None starts
            from torchvision's random init.
        fusion: "inception" fuses a frozen Inception's view of the gray input into the bottleneck
            (`pipeline.models.fusion`, Deep Koalarization); "none" leaves the generator plain.
        freeze_encoder: "inception_unet": keep the pretrained encoder as it is (else it trains).

    Returns:
        The generator, on the CPU, in training mode.

    Raises:
        ValueError: for an unknown arch or norm, or backbone weights given to an arch without a backbone.
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORM_KINDS}")
    if fusion not in FUSION_KINDS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSION_KINDS}")
    if arch == "inception_unet":
        if backbone_state_dict is not None or fusion != "none":
            raise ValueError("inception_unet's encoder is the Inception network: no backbone weights, no fusion")
        return InceptionUNet(in_channels, out_channels, norm=norm, init_std=init_std, freeze_encoder=freeze_encoder)
    generator = _plain_generator(arch, norm, in_channels, out_channels, base_filters, num_downs, dropout, init_std,
                                 backbone_state_dict)  # fmt: skip
    if fusion == "inception":
        generator.fusion = InceptionFusion(generator.bottleneck_channels, init_std)
    return generator


def _plain_generator(arch: str, norm: str, in_channels: int, out_channels: int, base_filters: int, num_downs: int,
                     dropout: float, init_std: float, backbone_state_dict) -> nn.Module:  # fmt: skip
    if arch == "unet_256":
        if backbone_state_dict is not None:
            raise ValueError("unet_256 has no pretrained backbone; backbone weights apply to resnet18_unet only")
        return UNetGenerator(
            in_channels=in_channels,
            out_channels=out_channels,
            base_filters=base_filters,
            num_downs=num_downs,
            norm=norm,
            dropout=dropout,
            init_std=init_std,
        )
    if arch == "resnet18_unet":
        model = ResNetUNet(in_channels=in_channels, out_channels=out_channels, norm=norm, init_std=init_std)
        if backbone_state_dict is not None:
            load_backbone_weights(model, backbone_state_dict)
        return model
    raise ValueError(f"unknown generator arch {arch!r}; expected one of {GENERATOR_ARCHS}")


def generator_arch(generator: nn.Module) -> str:
    """The `model.arch` a generator was built as (DDP and `torch.compile` wrappers looked through)."""
    plain = getattr(generator, "module", None) or getattr(generator, "_orig_mod", None) or generator
    for arch, kind in (("inception_unet", InceptionUNet), ("resnet18_unet", ResNetUNet), ("unet_256", UNetGenerator)):
        if isinstance(plain, kind):
            return arch
    raise ValueError(f"not a generator of this project: {type(plain).__name__}")


def build_discriminator(
    in_channels: int = 3,
    base_filters: int = 64,
    num_layers: int = 3,
    norm: str = "batch",
    init_std: float = 0.02,
) -> PatchGANDiscriminator:
    """Build an initialized 70x70 PatchGAN (with the defaults).

    Args:
        in_channels: input channels (3: L and ab).
        base_filters: first-layer filters.
        num_layers: stride-2 layers (3 gives 70x70 patches and 30x30 logits for 256x256 inputs).
        norm: "batch", "sync_batch" or "instance".
        init_std: standard deviation of the N(0, std) init.

    Returns:
        The discriminator, on the CPU, in training mode.
    """
    return PatchGANDiscriminator(
        in_channels=in_channels, base_filters=base_filters, num_layers=num_layers, norm=norm, init_std=init_std
    )


def set_inference_mode(generator: nn.Module, dropout: bool = False) -> nn.Module:
    """Eval mode (BatchNorm's running statistics, no dropout), or with `dropout` eval mode but the dropout layers
    on, as pix2pix tests: a sampled colorization instead of the deterministic one. Returns the generator."""
    generator.eval()
    if dropout:
        for module in generator.modules():
            if isinstance(module, nn.Dropout):
                module.train()
    return generator
