"""GAN and L1 losses on tensors whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import GANLoss, discriminator_loss, generator_loss
from pipeline.models import UNetGenerator

LOGITS = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])  # (1, 1, 2, 2)


def softplus(value: float) -> float:
    return math.log1p(math.exp(value))


def test_vanilla_loss_is_bce_with_logits_against_ones_and_zeros() -> None:
    loss = GANLoss("vanilla")
    values = [0.0, 2.0, -1.0, 3.0]
    # BCE(x, 1) = log(1 + e^-x), BCE(x, 0) = log(1 + e^x).
    expected_real = sum(softplus(-value) for value in values) / 4
    expected_fake = sum(softplus(value) for value in values) / 4
    assert loss(LOGITS, target_is_real=True).item() == pytest.approx(expected_real, abs=1e-6)
    assert loss(LOGITS, target_is_real=False).item() == pytest.approx(expected_fake, abs=1e-6)
    assert expected_real == pytest.approx(0.5454805, abs=1e-6)
    assert expected_fake == pytest.approx(1.5454805, abs=1e-6)


def test_lsgan_loss_is_mse_against_ones_and_zeros() -> None:
    loss = GANLoss("lsgan")
    # (x - 1)^2: 1, 1, 4, 4 and x^2: 0, 4, 1, 9.
    assert loss(LOGITS, target_is_real=True).item() == pytest.approx(2.5)
    assert loss(LOGITS, target_is_real=False).item() == pytest.approx(3.5)


def test_targets_are_labels_expanded_to_the_prediction_shape() -> None:
    loss = GANLoss("vanilla")
    prediction = torch.zeros(2, 1, 30, 30, dtype=torch.float64)
    real = loss.target(prediction, target_is_real=True)
    fake = loss.target(prediction, target_is_real=False)
    assert real.shape == prediction.shape and real.dtype == torch.float64
    assert torch.all(real == 1.0) and torch.all(fake == 0.0)


def test_unknown_gan_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown GAN mode 'wgan'"):
        GANLoss("wgan")


def test_discriminator_loss_terms() -> None:
    fake_logits = torch.zeros(2, 1, 3, 3)
    real_logits = torch.full((2, 1, 3, 3), 2.0)
    terms = discriminator_loss(GANLoss("vanilla"), fake_logits, real_logits)
    assert set(terms) == {"loss_D_fake", "loss_D_real", "loss_D"}
    assert terms["loss_D_fake"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert terms["loss_D_real"].item() == pytest.approx(softplus(-2.0), abs=1e-6)
    assert terms["loss_D"].item() == pytest.approx((math.log(2.0) + softplus(-2.0)) / 2, abs=1e-6)

    lsgan_terms = discriminator_loss(GANLoss("lsgan"), fake_logits + 0.5, real_logits)
    assert lsgan_terms["loss_D_fake"].item() == pytest.approx(0.25)
    assert lsgan_terms["loss_D_real"].item() == pytest.approx(1.0)
    assert lsgan_terms["loss_D"].item() == pytest.approx(0.625)


def test_generator_loss_terms_and_gradients() -> None:
    fake_logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    fake_ab = torch.tensor([[[[0.1, -0.2]], [[0.3, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    real_ab = torch.tensor([[[[0.0, 0.2]], [[0.1, 0.5]]]])
    terms = generator_loss(GANLoss("vanilla"), fake_logits, fake_ab, real_ab)
    assert set(terms) == {"loss_G_GAN", "loss_G_L1", "loss_G"}
    # |diff| = 0.1, 0.4, 0.2, 0.5: mean 0.3, times lambda 100.
    assert terms["loss_G_L1"].item() == pytest.approx(30.0, abs=1e-5)
    assert terms["loss_G_GAN"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert terms["loss_G"].item() == pytest.approx(30.0 + math.log(2.0), abs=1e-5)
    terms["loss_G"].backward()
    # d/dx mean BCE(x, 1) at 0 = -sigmoid(0) / 4; d L1 = 100 * sign / 4.
    assert torch.allclose(fake_logits.grad, torch.full((1, 1, 2, 2), -0.125))
    assert torch.allclose(fake_ab.grad, torch.tensor([[[[25.0, -25.0]], [[25.0, -25.0]]]]))

    lsgan = generator_loss(GANLoss("lsgan"), fake_logits.detach() + 3.0, fake_ab, real_ab, l1_lambda=10.0)
    assert lsgan["loss_G_GAN"].item() == pytest.approx(4.0)
    assert lsgan["loss_G_L1"].item() == pytest.approx(3.0, abs=1e-5)
    assert lsgan["loss_G"].item() == pytest.approx(7.0, abs=1e-5)


def test_adam_on_generator_l1_lowers_it() -> None:
    torch.manual_seed(0)
    generator = UNetGenerator(num_downs=5, base_filters=8)
    lightness = torch.rand(2, 1, 32, 32) * 2 - 1
    # ab as a function of L, something a generator can learn in a few steps.
    true_ab = torch.cat([0.4 * lightness, -0.3 * lightness.flip(-1)], dim=1)
    # The recipe's optimizer settings.
    optimizer = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    fake_logits = torch.zeros(2, 1, 2, 2)

    def l1_now() -> float:
        with torch.no_grad():
            return generator_loss(GANLoss("vanilla"), fake_logits, generator(lightness), true_ab)["loss_G_L1"].item()

    generator.train()
    before = l1_now()
    for _ in range(50):
        optimizer.zero_grad()
        terms = generator_loss(GANLoss("vanilla"), fake_logits, generator(lightness), true_ab)
        terms["loss_G_L1"].backward()
        optimizer.step()
    after = l1_now()
    # About 12% lower after 50 steps at the recipe's learning rate, dropout noise included.
    assert after < 0.95 * before
