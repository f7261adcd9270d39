"""Generators and discriminator: the recipe's parameter counts, shapes, dropout, norms and backbone loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import (
    PatchGANDiscriminator,
    ResNet18,
    ResNetUNet,
    UNetGenerator,
    build_discriminator,
    build_generator,
    load_backbone_weights,
)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def unet_256() -> UNetGenerator:
    torch.manual_seed(0)
    model = build_generator("unet_256", norm="batch")
    assert isinstance(model, UNetGenerator)
    return model


@pytest.fixture
def torchvision_state_dict(tmp_path) -> dict[str, torch.Tensor]:
    """A resnet18 state dict in torchvision's layout, round-tripped through a file like a downloaded one."""
    torch.manual_seed(1)
    classifier = ResNet18()
    # Non-default BatchNorm statistics, so loading them is observable.
    for module in classifier.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    return torch.load(path, weights_only=True)


def test_unet_256_has_the_recipe_parameter_count(unet_256: UNetGenerator) -> None:
    assert count_parameters(unet_256) == 54_409_858


def test_patchgan_has_the_recipe_parameter_count_and_30x30_logits() -> None:
    discriminator = build_discriminator()
    assert count_parameters(discriminator) == 2_765_633
    logits = discriminator(torch.randn(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30)


def test_resnet18_matches_torchvision_parameter_count() -> None:
    assert count_parameters(ResNet18()) == 11_689_512


def test_unet_256_maps_256_gray_to_two_tanh_channels(unet_256: UNetGenerator) -> None:
    torch.manual_seed(2)
    output = unet_256(torch.randn(2, 1, 256, 256) * 5.0)
    assert output.shape == (2, 2, 256, 256)
    assert output.abs().max().item() <= 1.0
    # A live network, not a constant: outputs vary across pixels.
    assert output.std().item() > 1e-3


def test_unet_256_has_dropout_in_exactly_the_three_innermost_up_blocks(unet_256: UNetGenerator) -> None:
    dropouts = [module for module in unet_256.modules() if isinstance(module, nn.Dropout)]
    assert len(dropouts) == 3
    assert all(dropout.p == 0.5 for dropout in dropouts)
    blocks_with_dropout = [
        index
        for index, block in enumerate(unet_256.up_blocks)
        if any(isinstance(module, nn.Dropout) for module in block.modules())
    ]
    # up_blocks[0] is the innermost (1x1 -> 2x2) block; pix2pix puts dropout in the three after it.
    assert blocks_with_dropout == [1, 2, 3]
    assert not any(isinstance(module, nn.Dropout) for module in unet_256.down_blocks.modules())


def test_unet_256_structure_follows_pix2pix(unet_256: UNetGenerator) -> None:
    assert len(unet_256.down_blocks) == 8
    assert len(unet_256.up_blocks) == 8
    convolutions = [module for module in unet_256.modules() if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(conv.kernel_size == (4, 4) and conv.stride == (2, 2) for conv in convolutions)
    # Only the outermost up convolution has a bias with batch norm.
    assert [conv.bias is not None for conv in convolutions].count(True) == 1
    assert unet_256.up_blocks[-1][1].bias is not None
    assert unet_256.down_blocks[0].in_channels == 1
    assert unet_256.up_blocks[-1][1].out_channels == 2
    assert isinstance(unet_256.up_blocks[-1][-1], nn.Tanh)
    batch_norms = [module for module in unet_256.modules() if isinstance(module, nn.BatchNorm2d)]
    # 6 in the encoder (not outermost, not innermost), 7 in the decoder (not outermost).
    assert len(batch_norms) == 13


def test_dropout_is_the_only_noise() -> None:
    torch.manual_seed(3)
    model = UNetGenerator(num_downs=5, base_filters=8)
    gray = torch.randn(2, 1, 32, 32)
    model.train()
    assert not torch.equal(model(gray), model(gray))
    model.eval()
    assert torch.equal(model(gray), model(gray))


def test_init_weights_follows_the_recipe(unet_256: UNetGenerator) -> None:
    convolution_weights = torch.cat(
        [
            module.weight.flatten()
            for module in unet_256.modules()
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
        ]
    )
    assert convolution_weights.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert convolution_weights.std().item() == pytest.approx(0.02, rel=0.02)
    norm_weights = torch.cat([module.weight for module in unet_256.modules() if isinstance(module, nn.BatchNorm2d)])
    assert norm_weights.mean().item() == pytest.approx(1.0, abs=5e-3)
    assert norm_weights.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.all(module.bias == 0) for module in unet_256.modules() if isinstance(module, nn.BatchNorm2d))


def test_instance_norm_builds_with_biases_and_runs() -> None:
    generator = build_generator("unet_256", norm="instance")
    assert not any(isinstance(module, nn.BatchNorm2d) for module in generator.modules())
    assert sum(isinstance(module, nn.InstanceNorm2d) for module in generator.modules()) == 13
    # pix2pix keeps every convolution's bias with instance norm.
    convolutions = [module for module in generator.modules() if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(conv.bias is not None for conv in convolutions)
    discriminator = build_discriminator(norm="instance")
    assert sum(isinstance(module, nn.InstanceNorm2d) for module in discriminator.modules()) == 3
    small = UNetGenerator(num_downs=5, base_filters=8, norm="instance")
    assert small(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_sync_batch_norm_builds_and_runs_on_one_process() -> None:
    generator = build_generator("unet_256", norm="sync_batch")
    assert sum(isinstance(module, nn.SyncBatchNorm) for module in generator.modules()) == 13
    assert count_parameters(generator) == 54_409_858
    discriminator = build_discriminator(norm="sync_batch")
    assert count_parameters(discriminator) == 2_765_633
    resnet_unet = build_generator("resnet18_unet", norm="sync_batch")
    assert isinstance(resnet_unet.encoder.bn1, nn.SyncBatchNorm)
    small = UNetGenerator(num_downs=5, base_filters=8, norm="sync_batch")
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_factories_reject_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown generator arch 'unet_128'"):
        build_generator("unet_128")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_generator("unet_256", norm="layer")
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        PatchGANDiscriminator(norm="group")
    with pytest.raises(ValueError, match="resnet18_unet only"):
        build_generator("unet_256", backbone_state_dict={})


# A few keys and shapes of the real `torchvision.models.resnet18().state_dict()` (122 entries).
TORCHVISION_RESNET18_SHAPES = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.weight": (64,),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.running_var": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.downsample.1.bias": (512,),
    "layer4.1.bn2.weight": (512,),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}


def test_resnet18_state_dict_has_torchvision_keys_and_shapes() -> None:
    state_dict = ResNet18().state_dict()
    assert len(state_dict) == 122
    for key, shape in TORCHVISION_RESNET18_SHAPES.items():
        assert tuple(state_dict[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in state_dict  # layer1 keeps 64 channels and stride 1
    assert "avgpool" not in " ".join(state_dict)


def test_resnet_unet_maps_256_to_256() -> None:
    torch.manual_seed(4)
    model = build_generator("resnet18_unet")
    assert isinstance(model, ResNetUNet)
    output = model(torch.randn(2, 1, 256, 256))
    assert output.shape == (2, 2, 256, 256)
    assert output.abs().max().item() <= 1.0
    features = model.encoder.forward_features(torch.randn(1, 1, 64, 64))
    assert [tuple(feature.shape[1:]) for feature in features] == [
        (64, 32, 32),
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
    ]


def test_backbone_weights_load_with_conv1_summed_over_rgb(torchvision_state_dict) -> None:
    model = build_generator("resnet18_unet", backbone_state_dict=torchvision_state_dict)
    encoder_state = model.encoder.state_dict()
    assert "fc.weight" not in encoder_state
    for key, value in torchvision_state_dict.items():
        if key.startswith("fc.") or key == "conv1.weight":
            continue
        assert torch.equal(encoder_state[key], value), key
    rgb_weight = torchvision_state_dict["conv1.weight"]
    assert encoder_state["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(encoder_state["conv1.weight"], rgb_weight.sum(dim=1, keepdim=True))
    # The point of the sum: the adapted stem sees L exactly as the RGB stem sees the gray image replicated.
    gray = torch.rand(1, 1, 32, 32)
    rgb_response = nn.functional.conv2d(gray.expand(1, 3, 32, 32), rgb_weight, stride=2, padding=3)
    gray_response = model.encoder.conv1(gray)
    assert torch.allclose(gray_response, rgb_response, atol=1e-5)


def test_decoder_init_does_not_touch_loaded_or_default_encoder_weights(torchvision_state_dict) -> None:
    torch.manual_seed(5)
    fresh = build_generator("resnet18_unet")
    # No weights: torchvision's Kaiming fan-out init, std sqrt(2 / (64 * 3 * 3)) = 0.059 in layer1, not 0.02.
    layer1_std = torch.cat(
        [fresh.encoder.layer1[0].conv1.weight.flatten(), fresh.encoder.layer1[1].conv1.weight.flatten()]
    ).std()
    assert layer1_std.item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    assert torch.all(fresh.encoder.bn1.weight == 1)
    decoder_weights = torch.cat(
        [
            module.weight.flatten()
            for module in fresh.decoder.modules()
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
        ]
    )
    assert decoder_weights.std().item() == pytest.approx(0.02, rel=0.02)

    loaded = build_generator("resnet18_unet", backbone_state_dict=torchvision_state_dict)
    assert torch.equal(loaded.encoder.layer3[1].bn2.weight, torchvision_state_dict["layer3.1.bn2.weight"])
    assert torch.equal(
        loaded.encoder.layer2[0].downsample[1].running_var, torchvision_state_dict["layer2.0.downsample.1.running_var"]
    )


def test_backbone_loading_names_every_problem(torchvision_state_dict) -> None:
    model = ResNetUNet()
    broken = dict(torchvision_state_dict)
    del broken["layer2.0.downsample.1.running_var"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    broken["layer4.1.bn2.weight"] = torch.zeros(256)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(model, broken)
    message = str(error.value)
    assert "missing keys: ['layer2.0.downsample.1.running_var']" in message
    assert "unexpected keys: ['layer5.0.conv1.weight']" in message
    assert "layer4.1.bn2.weight: got (256,), expected (512,)" in message


def test_backbone_loading_accepts_files_without_num_batches_tracked(torchvision_state_dict) -> None:
    # torchvision's older weight files predate BatchNorm's num_batches_tracked buffer.
    old_style = {key: value for key, value in torchvision_state_dict.items() if not key.endswith("num_batches_tracked")}
    model = ResNetUNet()
    load_backbone_weights(model, old_style)
    assert torch.equal(model.encoder.bn1.running_mean, torchvision_state_dict["bn1.running_mean"])
    assert model.encoder.bn1.num_batches_tracked.item() == 0


def test_inference_mode_is_deterministic_and_dropout_on_request_samples() -> None:
    from pipeline.models import build_generator, set_inference_mode

    torch.manual_seed(0)
    generator = build_generator("unet_256", base_filters=4, num_downs=5)
    light = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        set_inference_mode(generator)
        assert torch.equal(generator(light), generator(light))  # eval: dropout off, running statistics
        set_inference_mode(generator, dropout=True)
        assert not torch.equal(generator(light), generator(light))  # dropout on: another draw each call
        assert not any(m.training for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
