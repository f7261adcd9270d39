"""The recipe's losses: adversarial (vanilla or LSGAN) and L1, named as the training loop logs them.

`generator_loss` and `discriminator_loss` are pure functions of tensors: the loop runs the discriminator (on
detached fakes for its own step) and hands the logits in, so the algorithm stays readable in the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DEFAULT_L1_LAMBDA, GAN_MODES

# The recipe's weight of the L1 term in the generator loss.


class GANLoss(nn.Module):
    """Adversarial loss against constant targets: real = 1, fake = 0.

    Args:
        mode: "vanilla" (binary cross-entropy on logits, pix2pix's default) or "lsgan" (mean squared error).
        real_label: target for "real".
        fake_label: target for "fake".
    """

    def __init__(self, mode: str = "vanilla", real_label: float = 1.0, fake_label: float = 0.0) -> None:
        super().__init__()
        if mode == "vanilla":
            self.criterion: nn.Module = nn.BCEWithLogitsLoss()
        elif mode == "lsgan":
            self.criterion = nn.MSELoss()
        else:
            raise ValueError(f"unknown GAN mode {mode!r}; expected one of {GAN_MODES}")
        self.mode = mode
        self.real_label = real_label
        self.fake_label = fake_label

    def target(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """The label as a tensor of the prediction's shape, dtype and device (an expanded view, no copy)."""
        label = self.real_label if target_is_real else self.fake_label
        return prediction.new_tensor(label).expand_as(prediction)

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """Loss of discriminator logits against the real or the fake label.

        Args:
            prediction: discriminator logits, any shape (e.g. (N, 1, 30, 30)).
            target_is_real: whether the prediction should say "real".

        Returns:
            scalar loss averaged over every logit.
        """
        return self.criterion(prediction, self.target(prediction, target_is_real))


def discriminator_loss(
    gan_loss: GANLoss, fake_logits: torch.Tensor, real_logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The discriminator's terms: fakes judged fake, reals judged real, and their mean.

    Args:
        gan_loss: the adversarial criterion.
        fake_logits: D(L, G(L)) with the generated ab detached, so this loss trains the discriminator only.
        real_logits: D(L, true ab).

    Returns:
        {"loss_D_fake", "loss_D_real", "loss_D"}, scalars; backpropagate "loss_D".
    """
    loss_fake = gan_loss(fake_logits, target_is_real=False)
    loss_real = gan_loss(real_logits, target_is_real=True)
    return {"loss_D_fake": loss_fake, "loss_D_real": loss_real, "loss_D": (loss_fake + loss_real) * 0.5}


def generator_loss(
    gan_loss: GANLoss,
    fake_logits: torch.Tensor,
    fake_ab: torch.Tensor,
    real_ab: torch.Tensor,
    l1_lambda: float = DEFAULT_L1_LAMBDA,
) -> dict[str, torch.Tensor]:
    """The generator's terms: fool the discriminator, stay close to the truth in L1.

    Args:
        gan_loss: the adversarial criterion.
        fake_logits: D(L, G(L)) without detaching (gradients flow into the generator).
        fake_ab: generated ab, normalized (ab / 110).
        real_ab: true ab, normalized the same way.
        l1_lambda: weight of the L1 term (100 in the recipe).

    Returns:
        {"loss_G_GAN", "loss_G_L1" (already times l1_lambda), "loss_G" (their sum)}, scalars.
    """
    loss_gan = gan_loss(fake_logits, target_is_real=True)
    loss_l1 = nn.functional.l1_loss(fake_ab, real_ab) * l1_lambda
    return {"loss_G_GAN": loss_gan, "loss_G_L1": loss_l1, "loss_G": loss_gan + loss_l1}
