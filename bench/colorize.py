"""Colorizing throughput: the single-process command against the Ray Data job with 1 and 2 CPU actors.

    python bench/colorize.py                   # 256 generated 500x375 photos, the full recipe's U-Net
    python bench/colorize.py --count 64 --json

Every configuration colorizes the same photos with the same generator (the recipe's 54.4M-parameter
U-Net at 256 px, untrained: the cost does not depend on the weights) into a fresh folder, through
the code the commands run (`pipeline.colorize.local.colorize`, `pipeline.colorize.cluster.colorize_on_ray`).
The single-process command uses torch's threads on every core; a Ray actor holds one CPU. The Ray
job's time includes its start (listing, the model put into the object store, the actors' start), not
the local Ray instance's. With a GPU, images/s per GPU at batch 32 on one actor is printed too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, sample_photos  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=256, help="photos (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray
    import torch

    from pipeline.colorize.cluster import colorize_on_ray
    from pipeline.colorize.files import ColorizeOptions
    from pipeline.colorize.local import colorize
    from pipeline.models.saved import GeneratorSpec, save_generator

    results = {"machine": machine(), "count": args.count, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="bench-colorize-") as scratch:
        root = Path(scratch)
        sample_photos(root / "photos", args.count)
        spec = GeneratorSpec("unet_256", "batch", 64, 8, 256)
        model = save_generator(spec.build(), spec, root / "model")

        def timed(name: str, run) -> None:
            start = time.perf_counter()
            summary = run(str(root / name))
            seconds = time.perf_counter() - start
            assert len(summary.written) == args.count and not summary.failed, summary.failed[:3]
            results[name] = {"seconds": round(seconds, 2), "images_per_s": round(args.count / seconds, 2)}
            print(f"{name:<18} {seconds:8.1f} s  {args.count / seconds:7.2f} images/s", flush=True)

        inputs = [str(root / "photos")]
        options = ColorizeOptions(batch_size=args.batch_size, progress=False)
        timed("single_process", lambda out: colorize(str(model), inputs, out, options))
        ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False)
        try:
            for actors in (1, 2):
                timed(f"ray_{actors}_actor", lambda out, n=actors: colorize_on_ray(str(model), inputs, out, options, n))
            if torch.cuda.is_available():
                timed("ray_1_gpu_batch32", lambda out: colorize_on_ray(
                    str(model), inputs, out, ColorizeOptions(batch_size=32, progress=False), gpu=True))  # fmt: skip
        finally:
            ray.shutdown()
    base = results["single_process"]["images_per_s"]
    for name in [key for key in results if key.startswith("ray_")]:
        results[name]["vs_single_process"] = round(results[name]["images_per_s"] / base, 2)
        print(f"{name} / single_process: {results[name]['vs_single_process']:.2f}x")
    if not any(key.endswith("gpu_batch32") for key in results):
        print("no GPU here: images/s per GPU not measured")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
