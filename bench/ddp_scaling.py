"""DDP scaling: training throughput with 1 and 2 Ray Train workers of one thread each, same data.

    python bench/ddp_scaling.py
    python bench/ddp_scaling.py --json

Runs `pipeline.train.driver.run_training` (real Ray Train, gloo DDP on the CPU) on a lake of generated
256 px photos with a narrower U-Net (base_filters 16: the same layers and the same ratio of compute
to gradient traffic as the full model, 1/16 of both), `--steps` steps per run, and reads the images/s
that rank 0 logs for every step (all ranks' images), skipping the warm-up steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_small, machine, one_core, sample_photos  # noqa: E402

one_core()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402


class FileLogger:
    """Rank 0's logger for the benchmark: appends every logged dict to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_image(self, png: bytes, artifact_path: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_file_logger(path: str):
    def factory(config, plan, payload):
        return FileLogger(path)

    return factory


def run(workers: int, lake: str, work: Path, steps: int, batch: int, base_filters: int) -> list[float]:
    from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig
    from pipeline.train.driver import run_training

    log_path = work / f"steps-{workers}.jsonl"
    config = TrainConfig(
        name=f"ddp-{workers}",
        model=ModelConfig(base_filters=base_filters),
        stages=[StageConfig(epochs=1)],
        data=DataConfig(datasets=["bench"], lake=lake, batch_size=batch, max_val_batches=1),
        workers=workers,
        cpus_per_worker=1,
        storage=str(work / "runs"),
        checkpoint_every=10_000,
        log_every=1,
        max_steps=steps,
    )
    run_training(config, logger_factory=make_file_logger(str(log_path)))
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    return [row["train/images_per_s"] for row in rows if "train/images_per_s" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="per worker (default: 8)")
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # as the defaults: flags given beside --small still win
        parser.set_defaults(steps=3, warmup=1, batch=2, base_filters=4)
        args = parser.parse_args()
    os.environ.setdefault("RECOLOR_NO_PROGRESS", "1")

    from ingest.cluster import ensure_ray
    from ingest.driver import IngestConfig, run_ingest

    work = Path(tempfile.mkdtemp(prefix="recolor-bench-ddp-"))
    try:
        sample_photos(work / "photos", 2 * args.batch * (args.steps + 1) + 8)
        lake = str(work / "lake")
        run_ingest(
            IngestConfig(
                kind="folder",
                source=str(work / "photos"),
                dataset="bench",
                lake=lake,
                val_fraction=0.05,
                use_ray=False,
                progress=False,
            )
        )
        with ensure_ray(None, 2):  # a local instance, or the cluster in $RAY_ADDRESS
            one = run(1, lake, work, args.steps, args.batch, args.base_filters)[args.warmup :]
            two = run(2, lake, work, args.steps, args.batch, args.base_filters)[args.warmup :]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "one_worker_img_s": statistics.median(one),
        "two_workers_img_s": statistics.median(two),
        "batch_per_worker": args.batch,
        "base_filters": args.base_filters,
        "machine": machine(),
    }
    result["speedup"] = result["two_workers_img_s"] / result["one_worker_img_s"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"1 worker   {result['one_worker_img_s']:7.2f} img/s")
    print(f"2 workers  {result['two_workers_img_s']:7.2f} img/s   {result['speedup']:.2f}x (goal >= 1.6)")


if __name__ == "__main__":
    main()
