"""What limits a run: model FLOPs utilization (MFU) against the device's peak, beside the loader's wait.

MFU = model FLOPs of one training step per sample x samples/s per device / the device's peak. The
FLOPs are counted once by `torch.utils.flop_counter` on one sample through both networks; a step
is the generator's forward and backward (3x its forward) plus, in a GAN stage, the discriminator
three times forward with its backward (on the fake twice, the real once: 9x its forward).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# Dense bf16 tensor-core peaks, FLOP/s (vendor data sheets); RECOLOR_PEAK_TFLOPS overrides (any device, CPU too).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX: oneDNN's bf16 kernels), where bf16 autocast
    nearly halves a step (bench/cpu_step.py); elsewhere it emulates bf16 and is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_autocast(mode: str) -> bool:
    """Whether a CPU worker runs bf16 autocast and channels_last under config `cpu_amp` ("off", "auto", "on")."""
    return mode == "on" or (mode == "auto" and cpu_has_bf16())


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s: $RECOLOR_PEAK_TFLOPS, else the table by CUDA device name, else None."""
    override = os.environ.get("RECOLOR_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def step_flops_per_sample(generator: nn.Module, discriminator: nn.Module, size: int, gan: bool,
                          device: torch.device) -> float:  # fmt: skip
    """Model FLOPs of one training step for one sample of side `size` (see the module's docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    light = torch.zeros(1, 1, size, size, device=device)
    was_training = generator.training, discriminator.training
    generator.eval()
    discriminator.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fake = generator(light)
        generator_forward = counter.get_total_flops()
        frozen = 0  # a fused generator's Inception runs forward only, once a step, without gradients
        if getattr(generator, "fusion", None) is not None:
            from pipeline.models.fusion import gray_features

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                gray_features(light)
            frozen = counter.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            discriminator(torch.cat([light, fake], dim=1))
        discriminator_forward = counter.get_total_flops()
    finally:
        generator.train(was_training[0])
        discriminator.train(was_training[1])
    return float(3 * (generator_forward - frozen) + frozen + (9 * discriminator_forward if gan else 0))


class MfuMeter:
    """{"train/mfu": ...} of a run's steps where the device's peak is known (`peak_flops`), else {}; the model FLOPs
    of a step are counted once for steps that train the discriminator and once for those that do not."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = peak_flops(device)
        self._step_flops: dict[bool, float] = {}  # model FLOPs of a step per sample, by whether D trains

    def __call__(self, generator: nn.Module, discriminator: nn.Module, size: int, samples_per_s: float,
                 gan: bool) -> dict[str, float]:  # fmt: skip
        if self.peak is None:
            return {}
        if gan not in self._step_flops:
            self._step_flops[gan] = step_flops_per_sample(generator, discriminator, size, gan, self.device)
        return {"train/mfu": samples_per_s * self._step_flops[gan] / self.peak}
