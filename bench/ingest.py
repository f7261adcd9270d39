"""Ingest throughput on one core: the seed recipe's per-image work vs this project's ingest vs the floor.

    python bench/ingest.py                          # scikit-image's bundled photos
    python bench/ingest.py --images ../shared/data  # real ImageNet + COCO JPEGs
    python bench/ingest.py --json

(a) seed: PIL open, RGB, resize to 256x256 bicubic, scikit-image `rgb2lab`, float32 `.npy` file
(b) ingest: `recolor ingest folder` in this process (no Ray) into a fresh local lake: hashing,
    draft decoding, cover resize, Lab, gray check, shards, manifest and commit included
(c) floor: decode + resize alone (this project's decoder), nothing else

All three run in the same process on the same files, one thread, best of --rounds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_small, machine, one_core  # noqa: E402

# One core; and the repository root ahead of bench/ (this file is named like the `ingest` package).
one_core()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def seed_recipe(paths: list[str], out_dir: Path) -> int:
    """The report's loader work per image, written to disk as float32 .npy. Returns bytes written."""
    from skimage.color import rgb2lab

    total = 0
    for index, path in enumerate(paths):
        image = Image.open(path).convert("RGB").resize((256, 256), Image.BICUBIC)
        lab = rgb2lab(np.asarray(image)).astype(np.float32)
        target = out_dir / f"{index:06d}.npy"
        np.save(target, lab)
        total += target.stat().st_size
    return total


def project_ingest(source: str, lake: Path) -> tuple[int, int]:
    """This project's ingest, single process. Returns (bytes of shards, samples ingested)."""
    from ingest.driver import IngestConfig, run_ingest
    from ingest.lake import Lake

    summary = run_ingest(
        IngestConfig(kind="folder", source=source, dataset="bench", lake=str(lake), use_ray=False, progress=False)
    )
    record = Lake(str(lake)).resolve("bench").record
    return sum(record["bytes"].values()), summary.ingested


def floor(paths: list[str]) -> None:
    from ingest.images import decode_image

    for path in paths:
        decode_image(Path(path).read_bytes(), 256, "cover")


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of images (default: scikit-image's bundled photos)")
    parser.add_argument("--rounds", type=int, default=5, help="repeat each measurement, keep the best (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_small(parser)
    args = parser.parse_args()
    if args.small:  # scikit-image's photos once each
        args.images, args.rounds = None, 1

    if args.images:
        source = str(Path(args.images).resolve())
    else:
        import skimage.data

        source = os.path.dirname(skimage.data.__file__)
    from ingest.sources import list_folder

    paths = [item.uri for item in list_folder(source)]
    readable = []
    for path in paths:  # the seed recipe crashes on files Pillow cannot open: measure on the readable ones
        try:
            Image.open(path).convert("RGB")
            readable.append(path)
        except Exception:  # noqa: BLE001
            pass
    work = Path(tempfile.mkdtemp(prefix="recolor-bench-"))
    try:
        image_dir = work / "images"
        image_dir.mkdir()
        for index, path in enumerate(readable):
            shutil.copyfile(path, image_dir / f"{index:06d}{Path(path).suffix.lower()}")
        count = len(readable)

        seed_bytes = [0]

        def run_seed():
            out = Path(tempfile.mkdtemp(dir=work))
            seed_bytes[0] = seed_recipe(readable, out)

        ingest_result = [(0, 0)]

        def run_ingest_once():
            lake = Path(tempfile.mkdtemp(dir=work))
            ingest_result[0] = project_ingest(str(image_dir), lake)

        seed_s = best_of(args.rounds, run_seed)
        ingest_s = best_of(args.rounds, run_ingest_once)
        floor_s = best_of(args.rounds, lambda: floor(readable))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    shard_bytes, ingested = ingest_result[0]
    result = {
        "images": count,
        "ingested": ingested,
        "seed_img_s": count / seed_s,
        "ingest_img_s": count / ingest_s,
        "floor_img_s": count / floor_s,
        "seed_bytes": seed_bytes[0] / count,
        "ingest_bytes": shard_bytes / max(ingested, 1),
        "machine": machine(),
    }
    result["ingest_vs_seed"] = result["ingest_img_s"] / result["seed_img_s"]
    result["floor_vs_ingest"] = result["floor_img_s"] / result["ingest_img_s"]
    result["bytes_ratio"] = result["ingest_bytes"] / result["seed_bytes"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{count} images from {source} ({ingested} ingested; gray photos are decoded, then set aside)")
    print(f"(a) seed recipe   {result['seed_img_s']:8.1f} img/s   {result['seed_bytes'] / 1024:8.1f} KiB/sample")
    print(f"(b) ingest        {result['ingest_img_s']:8.1f} img/s   {result['ingest_bytes'] / 1024:8.1f} KiB/sample")
    print(f"(c) decode+resize {result['floor_img_s']:8.1f} img/s")
    print(f"ingest / seed     {result['ingest_vs_seed']:.2f}x   (goal >= 2)")
    print(f"floor / ingest    {result['floor_vs_ingest']:.2f}x   (goal <= 1.3)")
    print(f"bytes ingest/seed {result['bytes_ratio']:.2f}x   (goal <= 0.3)")


if __name__ == "__main__":
    main()
