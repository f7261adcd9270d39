"""What makes a training step faster on CPUs: the recipe's GAN + L1 step of a preset, one thread (as a Ray Train
worker of one CPU runs it), in each variant a CPU user could turn on, timed in the same run, as ratios to fp32.

    python bench/cpu_step.py                          # the CPU preset (ResNet18-encoder U-Net), 128 px, batch 8
    python bench/cpu_step.py --arch unet_256 --size 256 --batch 4 --json

Variants:
  fp32            eager, NCHW, float32: what the CPU runs today
  channels_last   the networks and the batch in NHWC
  bf16            torch.autocast("cpu", bfloat16) around the forward passes (fast only on CPUs with AVX512-BF16 or AMX)
  bf16_cl         both
  compile         torch.compile (inductor, C++ codegen; the first steps compile, not timed)
  side_x0.5       fp32 at half the side (the networks are fully convolutional: a smaller training side is 4x less
                  work per sample; whether it trains as well is bench/quality.py's question)
  finetune        inception_unet: its pretrained encoder trained too (at a lower lr), not frozen
  bf16_encoder    inception_unet: its frozen encoder run in bfloat16 (the decoder and losses in float32)

Several generators in one run, each beside the others (`--arch resnet18_unet,inception_unet`): the variants that
apply to each are timed, and the table gives each one's samples/s and its ratio to the first generator's fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_small, machine, one_core  # noqa: E402

one_core()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("fp32", "channels_last", "bf16", "bf16_cl", "compile", "side_x0.5")
ENCODER_VARIANTS = ("finetune", "bf16_encoder")  # inception_unet only: its encoder trained, or frozen in bf16


def gan_step(arch: str, size: int, batch: int, variant: str):
    """One D update and one G update of the recipe (vanilla GAN + 100 x L1) as a closure, set up for `variant`."""
    from pipeline.losses import GANLoss
    from pipeline.models import build_discriminator, build_generator

    torch.manual_seed(0)
    options = {"freeze_encoder": variant != "finetune"} if arch == "inception_unet" else {}
    generator, discriminator = build_generator(arch, norm="batch", **options), build_discriminator(base_filters=64)
    if variant == "bf16_encoder":
        generator.encoder_bf16 = True
    side = size // 2 if variant == "side_x0.5" else size
    memory = torch.channels_last if variant in ("channels_last", "bf16_cl") else torch.contiguous_format
    generator, discriminator = generator.to(memory_format=memory), discriminator.to(memory_format=memory)
    groups = generator.parameter_groups(2e-4, 0.1) if hasattr(generator, "parameter_groups") else generator.parameters()
    opt_g = torch.optim.Adam(groups, 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    g, d = (
        (torch.compile(generator), torch.compile(discriminator)) if variant == "compile" else (generator, discriminator)
    )
    gan = GANLoss("vanilla")
    light = (torch.rand(batch, 1, side, side) * 2 - 1).contiguous(memory_format=memory)
    ab = (torch.rand(batch, 2, side, side) * 2 - 1).contiguous(memory_format=memory)
    bf16 = variant in ("bf16", "bf16_cl")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast():
            fake = g(light)
        opt_d.zero_grad(set_to_none=True)
        with autocast():
            real_in, fake_in = torch.cat([light, ab], 1), torch.cat([light, fake.detach()], 1)
            loss_d = (gan(d(fake_in).float(), False) + gan(d(real_in).float(), True)) / 2
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            loss_g = gan(d(torch.cat([light, fake], 1)).float(), True) + 100 * (fake.float() - ab).abs().mean()
        loss_g.backward()
        opt_g.step()

    return step


def time_variant(arch: str, size: int, batch: int, variant: str, steps: int) -> float:
    """Samples per second of `variant` (its own warm-up steps first: compile's compilation is not timed)."""
    step = gan_step(arch, size, batch, variant)
    for _ in range(3 if variant == "compile" else 1):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch", default="resnet18_unet", help="generator, or several comma-separated (default: resnet18_unet)"
    )
    parser.add_argument("--size", type=int, default=128, help="training side in pixels (default: 128)")
    parser.add_argument("--batch", type=int, default=8, help="one worker's batch (default: 8, the CPU preset's)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (default: 4)")
    parser.add_argument("--variants", default=",".join(VARIANTS + ENCODER_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS + ENCODER_VARIANTS)}")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # both generators, every variant but compile (its compilation alone takes minutes)
        args.arch, args.size, args.batch, args.steps = "resnet18_unet,inception_unet", 128, 2, 1
        args.variants = ",".join(v for v in VARIANTS + ENCODER_VARIANTS if v != "compile")
    torch.set_num_threads(1)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    archs = args.arch.split(",")
    report = {"machine": machine(), "arch": args.arch, "size": args.size, "batch": args.batch,
              "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "samples_per_s": {}}  # fmt: skip
    first = None
    for arch in archs:
        variants = [v for v in args.variants.split(",") if arch == "inception_unet" or v not in ENCODER_VARIANTS]
        if args.small and arch == "inception_unet":  # its own variants; the others' code paths ran with resnet18_unet
            variants = [v for v in variants if v == "fp32" or v in ENCODER_VARIANTS]
        for variant in variants:
            key = variant if len(archs) == 1 else f"{arch}/{variant}"
            try:
                size = 64 if args.small and arch == "resnet18_unet" else args.size  # inception_unet: >= 75 px
                report["samples_per_s"][key] = time_variant(arch, size, args.batch, variant, args.steps)
            except Exception as e:  # noqa: BLE001 - e.g. compile without a C++ compiler: say so, time the others
                report["samples_per_s"][key] = None
                print(f"{key}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            first = first or key
            if not args.json:
                rate, base = report["samples_per_s"][key], report["samples_per_s"].get(first)
                ratio = f"{rate / base:5.2f}x {first}" if rate and base else ""
                print(f"{key:30} {rate or float('nan'):8.2f} samples/s  {ratio}", flush=True)
    base = report["samples_per_s"].get(first)
    report["vs_fp32"] = {k: (v / base if v and base else None) for k, v in report["samples_per_s"].items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"machine: {report['machine']}; AVX512-BF16 {report['avx512_bf16']}, AMX {report['amx_bf16']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
