"""Does it colorize? Train a preset for a fixed budget on one dataset, score it on another, beside the gray baseline.

    python bench/quality.py                         # CPU: 128 px, the Inception-encoder U-Net (pretrained, frozen)
    python bench/quality.py --arch resnet18_unet    # CPU: the ResNet18-encoder U-Net from random init, <= 20 min
    python bench/quality.py --gpu --minutes 5       # GPU: 256 px, the full recipe's preset
    python bench/quality.py --fusion inception --grid bench/quality-samples-fusion.png   # Deep Koalarization
    python bench/quality.py --train ~/imagenet-sub --test ~/coco --annotations ~/coco/annotations/x.json --json

What it does, with this project's own commands underneath:
  1. ingest every --train root (ImageNet layout) into a dataset `train` of a scratch lake (5% validation, which
     training needs for its per-epoch metrics), and the --test root (COCO layout, images its --annotations
     file lists) into `test` with --val-fraction 1: a scoring-only dataset, as the recipe scores
     ImageNet-trained models on COCO;
  2. time a few training steps of the preset here (as many processes as workers), size the L1 pretraining
     stage to about 40% of the budget, and run `recolor train`'s `run_training` (Ray Train, DDP over
     --workers, MLflow tracking off); the GAN + L1 stage runs until the budget is spent, when the run is
     stopped as Ctrl-C stops it and its latest checkpoint (an epoch's end) is scored;
  3. score the L1 stage's last generator and the final one (eval mode, fp32) on every test image: FID and KID
     (the field's Inception network, `recolor[fid]`), AuC, PSNR, SSIM, L1 on ab and colorfulness, each next to
     the gray baseline (ab = 0), with 95% bootstrap intervals over images (2,000 resamples, the same resample for
     both; FID 200; KID: +-2 standard deviations over 100 subsets), and write a sample grid (L | prediction |
     truth) of the final generator.

On CPUs with native bf16 (AVX512-BF16, AMX) the workers train in bf16 autocast and channels_last (config
`cpu_amp: auto`; 1.9x a step here, bench/cpu_step.py).

Goals (issue 24), in the CPU budget: the final generator's FID and KID below gray's with intervals apart, its
colorfulness within 15 of the truth's, its PSNR no more than 0.5 dB under gray's; the L1 stage's generator above
gray on PSNR (intervals apart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, add_small, machine  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SCORED = ("auc", "psnr", "ssim", "l1_ab", "colorfulness")
HIGHER_IS_BETTER = {"auc": True, "psnr": True, "ssim": True, "l1_ab": False}
BATCH = 16
L1_SHARE = 0.4
GPU_EPOCH_OVERHEAD_S = 2.9  # measured on an H200: see train()


def ingest_sets(lake: str, train_roots: list[str], test_root: str, annotations: str, size: int) -> dict:
    from ingest.driver import IngestConfig, run_ingest

    counts = {}
    for root in train_roots:
        summary = run_ingest(IngestConfig(kind="imagenet", source=root, dataset="train", lake=lake, size=size,
                                          val_fraction=0.05, progress=False))  # fmt: skip
        counts["train"] = summary.counts
    summary = run_ingest(IngestConfig(kind="coco", source=test_root, annotations=annotations, dataset="test",
                                      lake=lake, size=size, val_fraction=1.0, progress=False))  # fmt: skip
    counts["test"] = summary.counts
    return counts


def step_seconds(config, size: int, device: str, batch: int, steps: int = 3) -> tuple[float, float]:
    """Seconds of one L1-only and one GAN step of the preset's networks at one worker's batch, in this process
    (on the CPU with one thread, as a Ray Train worker of one CPU runs)."""
    import torch

    from pipeline.losses import GANLoss
    from pipeline.models import build_discriminator, build_generator

    dev = torch.device(device)
    generator = build_generator(config.model.arch, norm=config.model.norm, fusion=config.model.fusion,
                                freeze_encoder=config.model.encoder == "frozen").to(dev)  # fmt: skip
    discriminator = build_discriminator(base_filters=config.model.base_filters).to(dev)
    groups = getattr(generator, "parameter_groups", None)
    opt_g = torch.optim.Adam(groups(2e-4, config.model.encoder_lr_scale) if groups else generator.parameters(), 2e-4,
                             betas=(0.5, 0.999))  # fmt: skip
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    gan = GANLoss("vanilla").to(dev)
    light = torch.rand(batch, 1, size, size, device=dev) * 2 - 1
    ab = torch.rand(batch, 2, size, size, device=dev) * 2 - 1

    def l1_step():
        opt_g.zero_grad()
        (generator(light) - ab).abs().mean().backward()
        opt_g.step()

    def gan_step():
        fake = generator(light)
        opt_d.zero_grad()
        real_in, fake_in = torch.cat([light, ab], 1), torch.cat([light, fake.detach()], 1)
        ((gan(discriminator(fake_in), False) + gan(discriminator(real_in), True)) / 2).backward()
        opt_d.step()
        opt_g.zero_grad()
        (gan(discriminator(torch.cat([light, fake], 1)), True) + 100 * (fake - ab).abs().mean()).backward()
        opt_g.step()

    timed = []
    for step in (l1_step, gan_step):
        step()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timed.append((time.perf_counter() - started) / steps)
    return timed[0], timed[1]


def gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def calibrate(preset: Path, size: int, gpu: bool, workers: int, fusion: str = "none",
              encoder: str = "frozen", batch: int | None = None) -> tuple[float, float]:  # fmt: skip
    """Seconds of an L1 and a GAN step as the run will take them: on the CPU, `workers` processes of one thread
    each at one worker's batch, all at once (they share the machine as the DDP workers do), plus 15% for the
    gradient all-reduce; on a GPU, one process."""
    import subprocess

    per_worker = batch or max(1, 16 // workers)
    command = [
        sys.executable,
        __file__,
        "--calibrate",
        str(preset),
        str(size),
        str(per_worker),
        "cuda" if gpu else "cpu",
        fusion,
        encoder,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(1 if gpu else workers)]
    timings = [json.loads(run.communicate()[0].strip().splitlines()[-1]) for run in runs]
    return max(t[0] for t in timings) * 1.15, max(t[1] for t in timings) * 1.15


PRESETS = {"resnet18_unet": "resnet18_unet.yaml", "inception_unet": "inception_unet.yaml"}  # --arch, on the CPU


def train(lake: str, storage: str, size: int, minutes: float, gpu: bool, workers: int, fusion: str = "none",
          arch: str = "inception_unet", encoder: str = "frozen",
          epochs: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """Stage 1 (L1) for about 40% of the budget, as calibrated; stage 2 (GAN + L1) until the budget is spent: the
    run is stopped then (SIGTERM, as a user's Ctrl-C) and its latest checkpoint, an epoch's end, is scored.
    `epochs` (L1, GAN) instead: that many epochs of each, within the budget (`--small`)."""
    import signal
    import threading

    from pipeline.config import load_config
    from pipeline.data.plan import resolve_data
    from pipeline.train.checkpoint_store import latest_recorded, recorded_checkpoints
    from pipeline.train.driver import TrackingOptions, run_training
    from pipeline.train.failures import Stopped

    preset = REPO / "configs" / ("pix2pix_unet.yaml" if gpu and arch == "resnet18_unet" else PRESETS[arch])
    common = ["data.datasets=[train]", f"data.lake={lake}", f"storage={storage}", f"workers={workers}",
              f"use_gpu={str(gpu).lower()}", "name=quality", "checkpoint_every=1000000",
              "keep_checkpoints=100000", "cpu_amp=auto", f"model.fusion={fusion}",
              f"model.encoder={encoder}"]  # fmt: skip
    l1_s, gan_s = calibrate(preset, size, gpu, workers, fusion, encoder, 2 if epochs else None)  # small: batch 2
    plan = resolve_data(["train"], lake)
    steps_per_epoch = plan.count("train") // 16
    # Measured here: an epoch takes about 1.6x its steps' compute (loading, validation, the epoch's checkpoint).
    # On a GPU the steps are so short that an epoch's fixed cost (validation, the epoch's checkpoint of the 57M
    # parameters and their optimizer states) is most of it: 2.9 s an epoch on an H200 (2026-12-04), where sizing
    # by the steps alone planned 615 L1 epochs for 52 that fitted, and the GAN stage never began.
    epoch_s = 1.6 * steps_per_epoch * l1_s + (GPU_EPOCH_OVERHEAD_S if gpu else 0.0)
    l1_epochs, gan_epochs = epochs or (max(1, math.floor(L1_SHARE * minutes * 60 / epoch_s)), 10_000)
    # The pix2pix preset trains with the GAN from the start; both presets get an L1 stage here, to score it.
    stages = (f"stages=[{{name: pretrain_l1, epochs: {l1_epochs}, gan_mode: null, lr: 2.0e-4}}, "
              f"{{name: gan, epochs: {gan_epochs}, gan_mode: vanilla, lr: 2.0e-4, decay_epochs: 0}}]")  # fmt: skip
    config = load_config(preset, [*common, stages])
    started = time.perf_counter()
    deadline = threading.Timer(minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    deadline.daemon = True
    deadline.start()
    try:
        result = run_training(config, tracking=TrackingOptions(enabled=False))
        checkpoint, metrics = result.checkpoint, result.metrics
    except Stopped:
        run_uri = f"{storage}/quality"
        found = latest_recorded(run_uri)
        if found is None:
            message = f"the budget of {minutes} min ended before the first epoch did: give more --minutes"
            raise SystemExit(message) from None
        checkpoint, metrics = f"{run_uri}/{found[0]}", found[1]
    finally:
        deadline.cancel()
    l1_stage = [name for name, reported in recorded_checkpoints(f"{storage}/quality") if reported.get("stage") == 0]
    return {
        "preset": preset.name, "checkpoint": checkpoint, "train_seconds": time.perf_counter() - started,
        "l1_checkpoint": f"{storage}/quality/{l1_stage[-1]}" if l1_stage else None,
        "l1_epochs": l1_epochs, "global_step": int(metrics.get("global_step", 0)),
        "gan_epochs": max(0, int(metrics.get("global_step", 0)) // steps_per_epoch - l1_epochs),
        "steps_per_epoch": steps_per_epoch, "step_seconds": {"l1": l1_s, "gan": gan_s},
        "train_samples": plan.count("train"), "workers": workers, "fusion": fusion, "arch": arch, "encoder": encoder,
        "recorded": recorded_checkpoints(f"{storage}/quality"),
    }  # fmt: skip


def score(checkpoint: str, lake: str, gpu: bool, fid: bool = True) -> tuple[dict, object, object]:
    """Per-image metrics of the model and of gray on the whole `test` dataset, the first batch for a grid, and the
    Inception features of the model, the truth and gray (None without `recolor[fid]`, or with `fid` False)."""
    import torch

    from ingest.lab import lab8_to_network_torch, network_to_lab_torch
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.batches import validation_batches
    from pipeline.data.plan import resolve_data
    from pipeline.evaluation.fid import FidUnavailable
    from pipeline.evaluation.metrics import colorization_metrics_per_image
    from pipeline.evaluation.per_image import FidFeatures
    from pipeline.models.saved import generator_from_checkpoint

    device = torch.device("cuda" if gpu else "cpu")
    generator = generator_from_checkpoint(load_checkpoint(checkpoint)).to(device).eval()
    plan = resolve_data(["test"], lake)
    values: dict[str, list] = {}
    first = None
    features = None
    try:
        features = FidFeatures(device) if fid else None
    except FidUnavailable as e:
        print(f"no FID or KID: {e}", file=sys.stderr)
    with torch.no_grad():
        for batch in validation_batches(plan, 0, 1, BATCH):
            light, real_ab = lab8_to_network_torch(torch.from_numpy(batch).to(device))
            lightness, pred_ab = network_to_lab_torch(light, generator(light).float())
            _, true_ab = network_to_lab_torch(light, real_ab)
            for prefix, ab in (("", pred_ab), ("gray_", torch.zeros_like(true_ab))):
                for name, per_image in colorization_metrics_per_image(lightness, ab, true_ab).items():
                    values.setdefault(prefix + name, []).append(per_image.cpu())
            if features is not None:
                features.on_batch(lightness, pred_ab, true_ab)
            if first is None:
                first = (lightness.cpu(), pred_ab.cpu(), true_ab.cpu())
    per_image = {name: torch.cat(parts).numpy() for name, parts in values.items()}
    return per_image, first, features.sets() if features is not None else None


def learning_curve(trained: dict, storage: str, lake: str, gpu: bool) -> list[dict]:
    """Each epoch's checkpoint of the run scored on the test set (means over images; no FID), beside the
    validation metrics training reported then (the ImageNet split it holds out: in-distribution)."""
    rows = []
    for name, reported in trained["recorded"]:
        values, _, _ = score(f"{storage}/quality/{name}", lake, gpu, fid=False)
        means = {key: float(array.mean()) for key, array in values.items()}
        test = {key: means[key] for key in ("psnr", "gray_psnr", "colorfulness", "auc", "l1_ab")}
        val = {key: float(value) for key, value in reported.items() if key.startswith("val/")}
        rows.append({"checkpoint": name, "stage": int(reported.get("stage", -1)),
                     "global_step": int(reported.get("global_step", 0)), "test": test, "val": val})  # fmt: skip
    return rows


def fid_summary(sets: dict, resamples: int = 200, seed: int = 0) -> dict:
    """FID (95% bootstrap interval over images: one resample serves the model, gray and the truth) and KID (its
    spread over 100 subsets) of the model and of gray against the truth."""
    import numpy as np

    from pipeline.evaluation.fid import frechet_distance, kernel_inception_distance

    truth = sets["truth"].astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(truth), (resamples, len(truth)))
    summary = {}
    for label, name in (("", "model"), ("gray_", "gray")):
        images = sets[name].astype(np.float64)
        boot = [frechet_distance(images[p], truth[p]) for p in picks]
        low, high = np.percentile(boot, [2.5, 97.5])
        kid, kid_std = kernel_inception_distance(images, truth)
        summary[f"{label}fid"] = {"mean": frechet_distance(images, truth), "low": float(low), "high": float(high)}
        summary[f"{label}kid"] = {"mean": kid, "low": kid - 2 * kid_std, "high": kid + 2 * kid_std}
    return summary


def bootstrap(values: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% interval of each metric over images; one resample of image indices serves every metric."""
    import numpy as np

    count = len(next(iter(values.values())))
    picks = np.random.default_rng(seed).integers(0, count, (resamples, count))
    summary = {}
    for name, array in values.items():
        means = array[picks].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        summary[name] = {"mean": float(array.mean()), "low": float(low), "high": float(high)}
    return summary


def verdict(summary: dict, l1_summary: dict | None) -> dict:
    """Issue 24's goals: the final generator's FID and KID intervals below gray's, colorfulness within 15 of the
    truth's, PSNR no more than 0.5 dB under gray's; the L1 stage's PSNR interval above gray's."""
    goals = {}
    for name in ("fid", "kid"):  # lower is better: the model's interval below gray's
        if name in summary:
            goals[f"{name}_below_gray"] = summary[name]["high"] < summary[f"gray_{name}"]["low"]
    gap = abs(summary["colorfulness"]["mean"] - summary["colorfulness_true"]["mean"])
    goals["colorfulness_within_15"] = gap <= 15
    psnr_gap = summary["gray_psnr"]["mean"] - summary["psnr"]["mean"]
    goals["psnr_within_0.5_db_of_gray"] = psnr_gap <= 0.5
    if l1_summary is not None:
        goals["l1_stage_psnr_above_gray"] = l1_summary["psnr"]["low"] > l1_summary["gray_psnr"]["high"]
    return {"goals": goals, "colorfulness_gap": gap, "psnr_under_gray_db": psnr_gap, "met": all(goals.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="append", metavar="ROOT",
                        help="ImageNet-layout root to train on, repeatable (default: ../shared/data/imagenet-sample "
                        "and imagenet-more)")  # fmt: skip
    parser.add_argument("--test", metavar="ROOT", help="COCO-layout root to score on (default: shared coco-sample)")
    parser.add_argument("--annotations", metavar="FILE", help="COCO annotation JSON of --test (default: the one there)")
    parser.add_argument("--minutes", type=float, help="training budget (default: 17.5 on the CPU, 5 with --gpu)")
    parser.add_argument("--size", type=int, help="sample side in pixels (default: 128 on the CPU, 256 with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="train and score on GPUs: the full recipe (pix2pix U-Net)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default: 2; with --gpu, 1 a GPU)")
    parser.add_argument("--grid", help="sample grid PNG path (default: bench/quality-samples.png; with --small a "
                        "temporary folder's)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fusion", choices=("none", "inception"), default="none",
                        help="model.fusion: 'inception' fuses a frozen Inception's view of the gray input at the "
                        "generator's bottleneck (Deep Koalarization; needs recolor[fid])")  # fmt: skip
    parser.add_argument("--curve", action="store_true",
                        help="also score every epoch's checkpoint on the test set (PSNR, colorfulness, AuC, L1; "
                        "no FID): the learning curve, to see how many steps the goals would take")  # fmt: skip
    parser.add_argument("--arch", choices=sorted(PRESETS), default="inception_unet",
                        help="the generator (default: inception_unet, FID's ImageNet-trained Inception-v3 as its "
                        "encoder, frozen: the best CPU recipe measured, bench/RESULTS.md; resnet18_unet: the recipe's "
                        "ResNet18 variant, its encoder from random init here); with --gpu, resnet18_unet trains the "
                        "full recipe (pix2pix U-Net)")  # fmt: skip
    parser.add_argument(
        "--encoder",
        choices=("frozen", "finetune"),
        default="frozen",
        help="inception_unet's encoder: frozen (default) or fine-tuned at 0.1x the learning rate",
    )
    parser.add_argument("--calibrate", nargs=6, help=argparse.SUPPRESS)  # PRESET SIZE BATCH DEVICE FUSION ENCODER
    add_small(parser)
    args = parser.parse_args()
    if args.calibrate:
        import torch

        from pipeline.config import load_config

        torch.set_num_threads(1)
        preset, size, batch, device, fusion, encoder = args.calibrate
        config = load_config(preset, [f"model.fusion={fusion}", f"model.encoder={encoder}"])
        print(json.dumps(step_seconds(config, int(size), device, int(batch))))
        return 0
    scratch = tempfile.TemporaryDirectory(prefix="bench-quality-small-")  # --small's sources and grid
    if args.small:  # generated ImageNet and COCO trees, one worker, one epoch of each stage at 96 px
        args.train, args.test, args.annotations = small_sources(Path(scratch.name))
        args.size, args.workers, args.grid = args.size or 96, args.workers or 1, args.grid or f"{scratch.name}/grid.png"
    args.grid = args.grid or str(REPO / "bench" / "quality-samples.png")
    train_roots = args.train or [str(SHARED / "imagenet-sample"), str(SHARED / "imagenet-more")]
    test_root = args.test or str(SHARED / "coco-sample")
    found = [p for pattern in ("instances_*.json", "panoptic_*.json", "*.json")
             for p in sorted(Path(test_root, "annotations").glob(pattern))]  # fmt: skip
    annotations = args.annotations or (found[0] if found else None)
    if annotations is None:
        parser.error(f"no --annotations given and no annotations/*.json under {test_root}")
    size = args.size or (256 if args.gpu else 128)
    minutes = args.minutes or (5.0 if args.gpu else 17.5)
    os.environ.setdefault("RECOLOR_NO_PROGRESS", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as temp:
        lake, storage = str(Path(temp) / "lake"), str(Path(temp) / "runs")
        counts = ingest_sets(lake, train_roots, test_root, str(annotations), size)
        workers = args.workers or (gpu_count() if args.gpu else 2)
        trained = train(lake, storage, size, minutes, args.gpu, workers, args.fusion, args.arch, args.encoder,
                        (1, 1) if args.small else None)  # fmt: skip
        scored = {"final": score(trained["checkpoint"], lake, args.gpu)}
        if trained["l1_checkpoint"]:
            scored["l1_stage"] = score(trained["l1_checkpoint"], lake, args.gpu)
        curve = learning_curve(trained, storage, lake, args.gpu) if args.curve else None
    from pipeline.tracking.plots import sample_grid

    values, first, _ = scored["final"]
    Path(args.grid).write_bytes(sample_grid(*first, max_images=8))
    summaries = {}
    for stage, (stage_values, _, fid_sets) in scored.items():
        summaries[stage] = bootstrap(stage_values)
        if fid_sets is not None:
            summaries[stage] |= fid_summary(fid_sets)
    report = {
        "machine": machine(), "device": "gpu" if args.gpu else "cpu", "size": size, "budget_minutes": minutes,
        "total_seconds": time.perf_counter() - started, "train": train_roots, "test": test_root,
        "counts": counts,
        "training": {k: v for k, v in trained.items() if not k.endswith("checkpoint") and k != "recorded"},
        "test_images": int(len(values["auc"])), "metrics": summaries,
        "goal": verdict(summaries["final"], summaries.get("l1_stage")), "grid": args.grid, "curve": curve,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, size)
    scratch.cleanup()
    return 0


def small_sources(root: Path) -> tuple[list[str], str, str]:
    """An ImageNet-layout tree of 24 generated photos (a global batch of 16 fits once) and a COCO-layout tree of 6,
    as the tests build them (`tests/fixtures/sources.py`): `--train` roots, `--test` and `--annotations`."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.sources import IMAGENET_NAMES, build_coco, build_imagenet

    build_imagenet(root / "imagenet", per_class={wnid: 8 for wnid in IMAGENET_NAMES})
    coco = build_coco(root / "coco")
    return [str(root / "imagenet")], str(root / "coco"), str(coco.instances)


def print_report(report: dict, size: int) -> None:
    t = report["training"]
    print(f"machine: {report['machine']} ({report['device']})")
    print(f"trained {t['preset']} at {size} px on {t['train_samples']} samples for {t['train_seconds'] / 60:.1f} min "
          f"({t['l1_epochs']} L1 + {t['gan_epochs']} GAN epochs of {t['steps_per_epoch']} steps, {t['workers']} "
          f"workers, {t['arch']}, encoder {t['encoder']}, fusion {t['fusion']}); scored on {report['test_images']} "
          "test images")  # fmt: skip
    for stage, summary in report["metrics"].items():
        print(f"\n{stage} generator:")
        print(f"{'metric':14} {'model':>8} {'95% interval':>20} {'gray':>8} {'95% interval':>20}")
        for name in (("fid", "kid") if "fid" in summary else ()) + SCORED:
            m, g = summary[name], summary[f"gray_{name}"]
            print(f"{name:14} {m['mean']:8.4f} [{m['low']:8.4f}, {m['high']:8.4f}] {g['mean']:8.4f} "
                  f"[{g['low']:8.4f}, {g['high']:8.4f}]")  # fmt: skip
        print(f"{'colorfulness of the truth':26} {summary['colorfulness_true']['mean']:8.4f}")
    goal = report["goal"]
    shown = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in goal["goals"].items())
    print(f"\ngoals: {shown} -> {'met' if goal['met'] else 'missed'} (colorfulness gap {goal['colorfulness_gap']:.1f}, "
          f"PSNR {goal['psnr_under_gray_db']:+.2f} dB under gray)")  # fmt: skip
    print(f"sample grid: {report['grid']}")
    if report.get("curve"):
        print("\nlearning curve (test set, means; val: the training's held-out ImageNet split):")
        print(f"{'stage':>5} {'step':>6} {'PSNR':>7} {'gray':>7} {'colorful':>8} {'AuC':>7} {'val':>40}")
        for row in report["curve"]:
            t = row["test"]
            val = ", ".join(f"{k[4:]} {v:.3g}" for k, v in sorted(row["val"].items())[:3])
            print(f"{row['stage']:5d} {row['global_step']:6d} {t['psnr']:7.2f} {t['gray_psnr']:7.2f} "
                  f"{t['colorfulness']:8.2f} {t['auc']:7.4f} {val:>40}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
