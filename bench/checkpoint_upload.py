"""Does a checkpoint upload stall training? Step times around uploads of the full recipe's checkpoint.

    python bench/checkpoint_upload.py             # both modes, against a loopback `rclone serve s3`
    python bench/checkpoint_upload.py --steps 16 --every 6 --json

The checkpoint is the full recipe's: the 54.4M-parameter U-Net, the 2.8M-parameter PatchGAN and
both Adam states (about 690 MB), written by the training's own reporter (`ray_reporter`) from a
one-worker Ray Train run whose storage is s3:// through the project's file system. A "step" is a
fixed amount of CPU work (a stand-in for a GPU step, which would leave the CPU free: on a GPU
host the asynchronous upload competes even less). The seed's way is `sync`: each report
uploads before the step returns. The project's default is `async`: the upload runs in Ray's
upload thread while the next steps train.
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
import tempfile  # noqa: E402
import time  # noqa: E402


def worker(config: dict) -> None:
    import ray.train
    import torch

    from pipeline.checkpoint import FORMAT
    from pipeline.models import build_discriminator, build_generator
    from pipeline.train.checkpoint_store import wait_for_uploads
    from pipeline.train.worker import ray_reporter

    torch.set_num_threads(1)
    width = config["base_filters"]  # 64: the full recipe's checkpoint
    generator, discriminator = build_generator("unet_256", base_filters=width), build_discriminator(base_filters=width)
    optimizers = []
    for network in (generator, discriminator):
        optimizer = torch.optim.Adam(network.parameters(), lr=2e-4, betas=(0.5, 0.999))
        for parameter in network.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # creates both moment buffers: the checkpoint's real size
        optimizers.append(optimizer)
    payload = {
        "format": FORMAT,
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict(),
        "opt_g": optimizers[0].state_dict(),
        "opt_d": optimizers[1].state_dict(),
    }
    report = ray_reporter(config["mode"])
    work = torch.randn(384, 384)
    times, reported = [], []
    for step in range(1, config["steps"] + 1):
        start = time.perf_counter()
        for _ in range(config["work"]):
            work = torch.tanh(work @ work.T / 384)
        if step % config["every"] == 0:
            report({"step": step}, payload)
            reported.append(step)
        times.append(time.perf_counter() - start)
    flush_start = time.perf_counter()
    wait_for_uploads(at_most=0)
    flush = time.perf_counter() - flush_start
    size = sum(t.numel() * t.element_size() for t in _tensors(payload))
    Path(config["out"]).write_text(json.dumps({"times": times, "reported": reported, "flush_s": flush, "bytes": size}))
    ray.train.report({"done": 1.0})


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def run_mode(mode: str, steps: int, every: int, work: int, storage: str, out: Path, base_filters: int = 64) -> dict:
    import ray.train

    from pipeline.train.trainer import storage_filesystem, storage_path_for_ray, trainer_class

    loop_config = {"mode": mode, "steps": steps, "every": every, "work": work, "out": str(out),
                   "base_filters": base_filters}  # fmt: skip
    start = time.perf_counter()
    trainer = trainer_class(placement_group_cleaner=False)(  # Ray Train's TorchTrainer, as `recolor train` runs it
        worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=f"bench-{mode}-{int(time.time())}",
            storage_path=storage_path_for_ray(storage),
            storage_filesystem=storage_filesystem(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    times, reported = result["times"], set(result["reported"])
    with_upload = [t for step, t in enumerate(times, 1) if step in reported]
    # The step after each report is where an asynchronous upload's CPU use lands.
    after = [t for step, t in enumerate(times, 1) if step - 1 in reported]
    plain = [t for step, t in enumerate(times, 1) if step not in reported and step - 1 not in reported]
    return {
        "mode": mode,
        "checkpoint_mb": result["bytes"] / 2**20,
        "plain_step_s": sum(plain) / len(plain),
        "checkpoint_step_s": sum(with_upload) / len(with_upload),
        "step_after_checkpoint_s": sum(after) / len(after) if after else None,
        "train_loop_s": sum(times),
        "final_flush_s": result["flush_s"],
        "fit_wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    parser.add_argument("--every", type=int, default=5, help="a checkpoint every N steps (default 5)")
    parser.add_argument("--work", type=int, default=200, help="matrix products per step (default 200: about 0.3 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_small(parser)
    args = parser.parse_args()
    # Small: 5 steps (plain, checkpointed and after-checkpoint steps each), networks of width 4 (a 3 MB checkpoint).
    base_filters = 4 if args.small else 64
    if args.small:
        args.steps, args.every, args.work = 5, 2, 2
    os.environ.setdefault("RECOLOR_NO_PROGRESS", "1")
    from infra.stack.s3_server import LocalS3Server, apply_env
    from ingest.cluster import ensure_ray

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
        server = LocalS3Server(Path(root) / "s3", log_path=Path(root) / "rclone.log").start()
        try:
            apply_env(server.env())
            server.create_bucket("bench")
            with ensure_ray(None, 2):  # a local instance, or the cluster in $RAY_ADDRESS
                results = [run_mode(mode, args.steps, args.every, args.work, "s3://bench/runs",
                                    Path(root) / f"{mode}.json", base_filters)
                           for mode in ("sync", "async")]  # fmt: skip
        finally:
            server.stop()
    sync, project = results
    summary = {
        "machine": machine(),
        "results": results,
        "checkpoint_step_ratio_sync_over_async": sync["checkpoint_step_s"] / project["checkpoint_step_s"],
        "train_loop_ratio_sync_over_async": sync["train_loop_s"] / project["train_loop_s"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"machine: {summary['machine']}")
    print(f"checkpoint: {sync['checkpoint_mb']:.0f} MB, to rclone serve s3 on loopback")
    print(f"{'mode':6} {'plain step':>11} {'step w/ ckpt':>13} {'step after':>11} {'loop':>8} {'final wait':>11}")
    for r in results:
        after = f"{r['step_after_checkpoint_s']:.2f} s" if r["step_after_checkpoint_s"] is not None else "-"
        print(f"{r['mode']:6} {r['plain_step_s']:9.2f} s {r['checkpoint_step_s']:11.2f} s {after:>11} "
              f"{r['train_loop_s']:6.1f} s {r['final_flush_s']:9.2f} s")  # fmt: skip
    print(f"step with a checkpoint: sync / async = {summary['checkpoint_step_ratio_sync_over_async']:.2f}x")
    print(f"training loop:          sync / async = {summary['train_loop_ratio_sync_over_async']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
