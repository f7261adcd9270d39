"""Shared by the benchmarks: one-core setup, sample photos, a machine description, the `--small` flag."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_core() -> None:
    """Measure per core: one thread for BLAS/OpenMP (call before importing numpy or torch)."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    # bench/ingest.py is named like the `ingest` package: the repository root must come first.
    if sys.path[0] != str(REPO):
        sys.path.insert(0, str(REPO))


SMALL_HELP = (
    "seconds, not minutes: tiny sizes on generated data (never ../shared/data), to check that the script "
    "runs (CI runs every script so: tests/integration/test_bench.py); its figures mean nothing"
)


def add_small(parser) -> None:
    """`--small` on a benchmark's parser: the same code paths at sizes that take seconds."""
    parser.add_argument("--small", action="store_true", help=SMALL_HELP)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def sample_photos(out_dir: Path, count: int, source: str | None = None) -> list[Path]:
    """`count` distinct colour JPEGs: the photos under `source`, or crops of scikit-image's bundled photos.

    Crops at different offsets and scales give distinct content (distinct content hashes) at realistic
    JPEG sizes (about 500x375, like ImageNet's median) from the few photos every install has.
    """
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    if source:
        from ingest.sources import list_folder

        items = list_folder(str(Path(source).resolve()))
        paths = []
        for index, item in enumerate(items[:count]):
            target = out_dir / f"{index:06d}{Path(item.uri).suffix.lower()}"
            target.write_bytes(Path(item.uri).read_bytes())
            paths.append(target)
        return paths
    import skimage.data

    photos = [
        np.asarray(getattr(skimage.data, name)())
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
    ]
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        scale = rng.uniform(0.6, 1.0)
        crop_h, crop_w = int(height * scale), int(width * scale)
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w, :3])
        crop = crop.resize((500, 375), Image.BICUBIC)
        target = out_dir / f"{index:06d}.jpg"
        crop.save(target, quality=90)
        paths.append(target)
    return paths
