"""One full training step (D update + G update) in images/s: the seed recipe's way vs this project's default.

    python bench/train_step.py                 # on the GPU when there is one, else the CPU
    python bench/train_step.py --device cpu --batch 16 --steps 3
    python bench/train_step.py --json

seed:    the recipe's step as the report ran it: fp32, eager, NCHW, batch 16, two separate
         discriminator passes, float input normalized on the host.
project: `ColorizerTrainer.train_step` with the default config on that device: uint8 batches
         moved to the device and normalized there; on CUDA bf16 autocast and channels_last
         (on the CPU the default is fp32 NCHW, the same arithmetic as the seed).
Also: can the input pipeline on this machine's cores feed the step? (loader samples/s x cores
vs the project's images/s; goal >= 1.5x.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_small, machine  # noqa: E402

sys.path.insert(0, str(REPO))  # ahead of bench/, whose ingest.py would hide the ingest package

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def seed_step_fn(generator, discriminator, opt_g, opt_d, device):
    bce = nn.BCEWithLogitsLoss()

    def step(light_cpu, ab_cpu):
        light, real_ab = light_cpu.to(device), ab_cpu.to(device)
        fake_ab = generator(light)
        opt_d.zero_grad()
        fake_logits = discriminator(torch.cat([light, fake_ab.detach()], 1))
        real_logits = discriminator(torch.cat([light, real_ab], 1))
        loss_d = 0.5 * (
            bce(fake_logits, torch.zeros_like(fake_logits)) + bce(real_logits, torch.ones_like(real_logits))
        )
        loss_d.backward()
        opt_d.step()
        for p in discriminator.parameters():
            p.requires_grad_(False)
        opt_g.zero_grad()
        logits = discriminator(torch.cat([light, fake_ab], 1))
        loss_g = bce(logits, torch.ones_like(logits)) + 100.0 * nn.functional.l1_loss(fake_ab, real_ab)
        loss_g.backward()
        opt_g.step()
        for p in discriminator.parameters():
            p.requires_grad_(True)
        return float(loss_g)

    return step


def timed(step, make_batch, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step(*make_batch())
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        batch = make_batch()
        step(*batch)
        images += batch[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--base-filters", type=int, default=64)
    parser.add_argument("--loader-samples-s", type=float, help="bench/loader.py's local_samples_s (one core)")
    parser.add_argument("--json", action="store_true")
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # as the defaults: flags given beside --small still win
        parser.set_defaults(device="cpu", batch=2, steps=1, warmup=0, base_filters=4)
        args = parser.parse_args()
    device = torch.device(args.device)

    from ingest.lab import lab8_to_network_torch
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.data.plan import DataPlan
    from pipeline.losses import GANLoss
    from pipeline.models import build_discriminator, build_generator
    from pipeline.train.loop import ColorizerTrainer, host_batch

    rng = np.random.default_rng(0)
    lab8 = torch.from_numpy(rng.integers(0, 256, (args.batch, 3, 256, 256), dtype=np.uint8))

    torch.manual_seed(0)
    generator = build_generator("unet_256", base_filters=args.base_filters).to(device)
    discriminator = build_discriminator(base_filters=args.base_filters).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    seed_step = seed_step_fn(generator, discriminator, opt_g, opt_d, device)

    def seed_batch():
        light, ab = lab8_to_network_torch(lab8)  # host-side float batch, as the seed's loader hands it over
        return light.contiguous(), ab.contiguous()

    seed_img_s = timed(seed_step, seed_batch, args.warmup, args.steps, device)
    del generator, discriminator, opt_g, opt_d

    config = TrainConfig(model=ModelConfig(base_filters=args.base_filters), workers=1, use_gpu=device.type == "cuda")
    plan = DataPlan(refs=[], digests={}, uris={}, size=256)
    trainer = ColorizerTrainer(config, plan, rank=0, world_size=1, device=device)
    opts = trainer._optimizers(config.stages[0])
    gan_loss = GANLoss("vanilla")
    pinned = host_batch(lab8.numpy(), device.type == "cuda")  # as the training loop hands batches over

    def project_step(batch):
        return trainer.train_step(batch, config.stages[0], gan_loss, opts[:2])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    project_img_s = timed(project_step, lambda: (pinned,), args.warmup, args.steps, device)
    mfu = trainer._mfu(
        trainer.plain_generator, trainer.plain_discriminator, trainer.plan.size, project_img_s, gan=True
    ).get("train/mfu")

    loader_per_core = args.loader_samples_s
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({machine()})",
        "batch": args.batch,
        "seed_img_s": seed_img_s,
        "project_img_s": project_img_s,
        "project_vs_seed": project_img_s / seed_img_s,
        "torch_threads": torch.get_num_threads(),
        "mfu": mfu,  # of the device's dense bf16 peak, where known (`pipeline.train.throughput`)
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if loader_per_core:
        capacity = loader_per_core * (os.cpu_count() or 1)
        result.update(loader_capacity_samples_s=capacity, feed_ratio=capacity / project_img_s)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"device {result['device']}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"seed recipe step   {seed_img_s:8.2f} img/s")
    print(f"project step       {project_img_s:8.2f} img/s   {result['project_vs_seed']:.2f}x (goal on GPU >= 3)")
    if loader_per_core:
        print(
            f"input pipeline     {result['loader_capacity_samples_s']:8.0f} samples/s on {os.cpu_count()} cores: "
            f"{result['feed_ratio']:.1f}x what the step consumes (goal >= 1.5)"
        )
    else:
        print("(pass --loader-samples-s with bench/loader.py's local_samples_s to check the feed ratio)")


if __name__ == "__main__":
    main()
