"""How many classes a training batch mixes: shards laid out by path (before) vs by a seeded permutation (after).

    python bench/class_mix.py                       # a generated 100-class source, and ../shared/data's ImageNet
    python bench/class_mix.py --imagenet ROOT --json

For each source, ingest twice (`--order sorted`, `--order shuffled`), then walk one epoch exactly as training
orders it (`pipeline.data.batches.epoch_keys`: the epoch's shard schedule, `data.interleave` shards at a time, the
shuffle window) and count the distinct classes in each batch of 16. A uniform shuffle over 100 balanced classes gives
about 14.9; the goal (issue 10) is at least 12.

The generated source keeps ImageNet's proportions, scaled down: a class holds more samples than a shard
(ImageNet: 1,300 vs ~338), and the shuffle window is a few shards' worth (512).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_small, machine  # noqa: E402

BATCH = 16


def generated_source(root: Path, classes: int, per_class: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"n{c:08d}_{n}.JPEG", quality=90)
    return root


def ingest(source: str, lake: Path, order: str, shard_samples: int) -> None:
    from ingest.driver import IngestConfig, run_ingest

    size = 16
    run_ingest(IngestConfig(kind="imagenet", source=source, dataset="mix", lake=str(lake), size=size, order=order,
                            val_fraction=0.0, shard_size=shard_samples * (3 * size * size + 1536), use_ray=False,
                            progress=False))  # fmt: skip


def mean_classes(lake: Path, window: int, interleave: int, world_size: int) -> float:
    from ingest.lake import Lake
    from pipeline.data.batches import epoch_keys
    from pipeline.data.plan import resolve_data

    catalog = Lake(str(lake))
    manifest = catalog.manifest(catalog.resolve("mix"))
    labels = dict(zip(manifest["key"].to_pylist(), manifest["label"].to_pylist(), strict=True))
    plan = resolve_data(["mix"], str(lake))
    counts = []
    for rank in range(world_size):
        keys = epoch_keys(plan, 0, 0, rank, world_size, BATCH, window, interleave=interleave)
        counts += [len({labels[k] for k in keys[i : i + BATCH]}) for i in range(0, len(keys), BATCH)]
    return sum(counts) / len(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--imagenet", action="append", help="ImageNet-layout roots (default: ../shared/data's)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=130, help="generated images a class (default: 130)")
    parser.add_argument("--shard-samples", type=int, default=34, help="samples a shard (default: 34)")
    parser.add_argument("--window", type=int, default=51, help="shuffle window (default: 51)")
    parser.add_argument("--json", action="store_true")
    add_small(parser)
    args = parser.parse_args()
    roots = args.imagenet or [str(p) for p in (shared / "imagenet-sample", shared / "imagenet-more") if p.exists()]
    if args.small:
        args.classes, args.per_class, args.shard_samples, args.window, roots = 6, 6, 4, 8, []
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mix-") as temp:
        sources = [("generated", str(generated_source(Path(temp) / "gen", args.classes, args.per_class)))]
        sources += [(Path(root).name, root) for root in roots]
        for name, source in sources:
            for order in ("sorted", "shuffled"):
                lake = Path(temp) / f"lake-{name}-{order}"
                ingest(source, lake, order, args.shard_samples)
                for interleave in (1, 4):
                    for world_size in (1, 2):
                        mean = mean_classes(lake, args.window, interleave, world_size)
                        results.append({"source": name, "order": order, "interleave": interleave,
                                        "workers": world_size, "classes_per_batch": mean})  # fmt: skip
    report = {"machine": machine(), "batch": BATCH, "window": args.window, "shard_samples": args.shard_samples,
              "results": results}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"distinct classes in a batch of {BATCH} (window {args.window}, ~{args.shard_samples} samples a shard)")
    print(f"{'source':18} {'order':9} {'interleave':>10} {'workers':>8} {'classes/batch':>14}")
    for r in results:
        mean = r["classes_per_batch"]
        print(f"{r['source']:18} {r['order']:9} {r['interleave']:>10} {r['workers']:>8} {mean:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
