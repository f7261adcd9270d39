"""Shared fixtures: generated photos and source trees, a loopback S3 server, a local Ray instance.

Every asset is generated here, deterministically from a seed, so no binary is committed and
each test writes only below its own `tmp_path`.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Photos


def color_photo(seed: int, width: int = 96, height: int = 72) -> Image.Image:
    """A clearly colourful RGB picture: a diagonal gradient between two saturated colours plus shapes.

    Different seeds give different content (so different SHA-256 keys); the same seed gives the same pixels.
    """
    rng = np.random.default_rng(seed)

    def saturated() -> np.ndarray:
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)
        return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255

    start, end = saturated(), saturated()
    y, x = np.mgrid[0:height, 0:width]
    t = (0.6 * x / max(width - 1, 1) + 0.4 * y / max(height - 1, 1))[..., None]
    pixels = start * (1 - t) + end * t
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        fill = tuple(int(c) for c in saturated())
        if rng.uniform() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    """The image's file bytes in `fmt` (JPEG at quality 92 unless told)."""
    if fmt == "JPEG":
        options.setdefault("quality", 92)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_bytes(seed: int, width: int = 96, height: int = 72, fmt: str = "JPEG", gray: bool = False) -> bytes:
    """File bytes of `color_photo(seed)`; `gray` stores it as a mode L picture."""
    image = color_photo(seed, width, height)
    if gray:
        image = image.convert("L")
    return encode(image, fmt)


def write_photos(folder: Path, seeds, width: int = 96, height: int = 72, ext: str = ".jpg") -> list[Path]:
    """Write one photo per seed as `folder/img<seed><ext>`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[ext.lower()]
    paths = []
    for seed in seeds:
        path = folder / f"img{seed:04d}{ext}"
        path.write_bytes(photo_bytes(seed, width, height, fmt))
        paths.append(path)
    return paths


@pytest.fixture
def make_photo():
    """`make_photo(seed, width=96, height=72, fmt="JPEG", gray=False) -> bytes`."""
    return photo_bytes


@pytest.fixture
def lake_check():
    """`lake_check(lake, ref) -> manifest rows`: assert a committed version is whole (see `check_version`)."""
    return check_version


@pytest.fixture
def make_image():
    """`make_image(seed, width=96, height=72) -> PIL.Image` (RGB, colourful)."""
    return color_photo


@pytest.fixture
def photo_folder(tmp_path):
    """`photo_folder(seeds, name="photos", **size) -> Path`: a folder of colour JPEGs below tmp_path."""

    def build(seeds, name: str = "photos", **kwargs) -> Path:
        folder = tmp_path / name
        write_photos(folder, seeds, **kwargs)
        return folder

    return build


# ---------------------------------------------------------------------------------------------
# ImageNet-like tree


@dataclass
class ImageNetTree:
    root: Path
    names: dict[str, str]  # wnid -> human-readable name, as in LOC_synset_mapping.txt
    train: dict[str, list[str]]  # wnid -> file names in train/<wnid>/
    val: dict[str, str] = field(default_factory=dict)  # flat val/ file name -> wnid (from the CSV)


IMAGENET_NAMES = {
    "n01440764": "tench, Tinca tinca",
    "n01530575": "brambling, Fringilla montifringilla",
    "n02085620": "Chihuahua",
}


def build_imagenet(
    root: Path,
    per_class: dict[str, int] | None = None,
    val_per_class: int = 2,
    val_layout: str = "flat",
    synsets: bool = True,
    seed: int = 1000,
) -> ImageNetTree:
    """Write an ImageNet-like tree: train/<wnid>/<wnid>_<n>.JPEG, val/ (flat + CSV, or class folders)."""
    per_class = per_class or {wnid: 4 for wnid in IMAGENET_NAMES}
    tree = ImageNetTree(root=root, names={w: IMAGENET_NAMES.get(w, w) for w in per_class}, train={})
    for wnid, count in per_class.items():
        tree.train[wnid] = []
        for n in range(count):
            name = f"{wnid}_{n + 1}.JPEG"
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / name).write_bytes(photo_bytes(seed, 80, 64))
            tree.train[wnid].append(name)
            seed += 1
    rows = []
    index = 1
    for wnid in per_class:
        for _ in range(val_per_class):
            image_id = f"ILSVRC2012_val_{index:08d}"
            folder = root / "val" if val_layout == "flat" else root / "val" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{image_id}.JPEG").write_bytes(photo_bytes(seed, 80, 64))
            tree.val[f"{image_id}.JPEG"] = wnid
            rows.append({"ImageId": image_id, "PredictionString": f"{wnid} 10 20 60 50 {wnid} 1 2 3 4"})
            seed += 1
            index += 1
    if val_layout == "flat":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["ImageId", "PredictionString"])
            writer.writeheader()
            writer.writerows(rows)
    if synsets:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in tree.names.items()))
    return tree


@pytest.fixture
def imagenet_tree(tmp_path) -> ImageNetTree:
    """Three classes of four train images each, a flat val/ of six with LOC_val_solution.csv, synset names."""
    return build_imagenet(tmp_path / "imagenet")


@pytest.fixture
def make_imagenet(tmp_path):
    """`make_imagenet(name="imagenet", **build_imagenet options) -> ImageNetTree` below tmp_path."""

    def build(name: str = "imagenet", **kwargs) -> ImageNetTree:
        return build_imagenet(tmp_path / name, **kwargs)

    return build


# ---------------------------------------------------------------------------------------------
# COCO-like tree


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
]


@dataclass
class CocoTree:
    root: Path
    instances: Path  # instances_val2017.json: images, categories, annotations with category_id
    panoptic: Path  # panoptic_val2017.json: annotations with segments_info
    captions: Path  # captions_val2017.json: images and captions, no categories
    categories: dict[int, tuple[str, ...]]  # image id -> sorted category names
    missing_id: int  # listed by the instances file, absent from val2017/

    def file_name(self, image_id: int) -> str:
        return f"{image_id:012d}.jpg"


def build_coco(root: Path, seed: int = 2000) -> CocoTree:
    """Write val2017/<id>.jpg for six images and instances, panoptic and captions JSON files for them."""
    by_id = {
        139: ("person",),
        285: ("dog",),
        632: ("cat", "dog"),
        724: ("person", "dog"),
        776: (),  # no annotation at all
        785: ("cat",),
    }
    missing_id = 9999
    ids = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for offset, image_id in enumerate(by_id):
        name = f"{image_id:012d}.jpg"
        (root / "val2017" / name).write_bytes(photo_bytes(seed + offset, 96, 64))
        images.append({"id": image_id, "file_name": name, "width": 96, "height": 64})
    instances_annotations, panoptic_annotations, captions = [], [], []
    for image_id, names in by_id.items():
        for n, category in enumerate(names):
            instances_annotations.append(
                {"id": image_id * 10 + n, "image_id": image_id, "category_id": ids[category], "bbox": [1, 2, 3, 4]}
            )
        panoptic_annotations.append(
            {
                "image_id": image_id,
                "file_name": f"{image_id:012d}.png",
                "segments_info": [{"id": n + 1, "category_id": ids[c], "area": 10} for n, c in enumerate(names)],
            }
        )
        captions.append({"id": image_id, "image_id": image_id, "caption": "a photo"})
    missing = {"id": missing_id, "file_name": f"{missing_id:012d}.jpg", "width": 96, "height": 64}
    instances = root / "annotations" / "instances_val2017.json"
    instances.write_text(
        json.dumps(
            {
                "info": {"description": "test"},
                "images": images + [missing],
                "annotations": instances_annotations + [{"id": 1, "image_id": missing_id, "category_id": 1}],
                "categories": COCO_CATEGORIES,
            }
        )
    )
    panoptic = root / "annotations" / "panoptic_val2017.json"
    panoptic.write_text(
        json.dumps({"images": images, "annotations": panoptic_annotations, "categories": COCO_CATEGORIES})
    )
    captions_path = root / "annotations" / "captions_val2017.json"
    captions_path.write_text(json.dumps({"images": images, "annotations": captions}))
    return CocoTree(
        root=root,
        instances=instances,
        panoptic=panoptic,
        captions=captions_path,
        categories={image_id: tuple(sorted(names)) for image_id, names in by_id.items()},
        missing_id=missing_id,
    )


@pytest.fixture
def coco_tree(tmp_path) -> CocoTree:
    """Six images in val2017/ plus instances, panoptic and captions files (instances also lists a missing one)."""
    return build_coco(tmp_path / "coco")


# ---------------------------------------------------------------------------------------------
# S3 (rclone serve s3 on loopback)


@dataclass
class S3Env:
    server: object  # infra.stack.s3_server.LocalS3Server
    bucket: str
    env: dict[str, str]  # the AWS_* variables, for subprocesses

    @property
    def bucket_dir(self) -> Path:
        """The folder the server stores the bucket in: what a test checks for "nothing written"."""
        return self.server.root / self.bucket


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One `rclone serve s3` for the session, serving a temporary folder."""
    from infra.stack.s3_server import LocalS3Server

    base = tmp_path_factory.mktemp("s3")
    server = LocalS3Server(base / "root", log_path=base / "rclone.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Env:
    """Point boto3 at the session's S3 server and create a fresh, empty bucket for this test."""
    from ingest.storage import make_s3_client

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    # Through the S3 API, not `create_bucket` (a mkdir): rclone caches its listing of buckets for
    # minutes, so a folder made behind its back after the first request stays invisible.
    make_s3_client().create_bucket(Bucket=bucket)
    return S3Env(server=s3_server, bucket=bucket, env=env)


# ---------------------------------------------------------------------------------------------
# Ray


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A `rclone serve s3` of this test's own, with a bucket "faults", that the test may stop and restart
    (same port, keys and files); the environment points boto3 at it."""
    from infra.stack.s3_server import LocalS3Server

    server = LocalS3Server(tmp_path / "s3root", log_path=tmp_path / "rclone.log").start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    server.create_bucket("faults")
    try:
        yield server
    finally:
        server.stop()


class MotoS3Server:
    """moto's standalone S3 server on 127.0.0.1: unlike rclone it honours `If-None-Match: *` (conditional PUTs),
    as AWS S3 and MinIO do."""

    def __init__(self, log_path: Path):
        from infra.stack.s3_server import free_port

        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "moto-" + uuid.uuid4().hex[:8],
            "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> MotoS3Server:
        from infra.stack.s3_server import wait_for_port

        binary = Path(sys.executable).parent / "moto_server"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, 60, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


@pytest.fixture
def moto_s3(tmp_path, monkeypatch):
    """A moto S3 server of this test's own with a bucket "faults"; the environment points boto3 at it."""
    from ingest.storage import make_s3_client

    server = MotoS3Server(tmp_path / "moto.log").start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    make_s3_client().create_bucket(Bucket="faults")
    try:
        yield server
    finally:
        server.stop()


def _restart_later(server, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def restart_later():
    """`restart_later(server, seconds) -> Thread`: start a stopped server again in the background."""
    return _restart_later


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the session; `ingest.cluster.ensure_ray` reuses it instead of starting one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Lake checks


def shard_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in order, read with plain `tarfile`: [(key, {"lab.npy": bytes, "json": bytes})]."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            assert info.isfile(), info.name
            key, _, suffix = info.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(info).read()
    return samples


def check_version(lake, ref) -> list[dict]:
    """Assert that a committed version is whole and self-consistent; returns its manifest rows.

    Every shard the record lists exists with the recorded size and count; the manifest has one row
    per stored sample (unique keys), each pointing at the right shard and position; counts and bytes
    per split add up; the manifest's SHA-256 is the recorded one.
    """
    record = ref.record
    manifest_bytes = lake.storage.read_bytes(f"{ref.dataset}/{record['manifest']}")
    assert hashlib.sha256(manifest_bytes).hexdigest() == record["manifest_sha256"]
    rows = lake.manifest(ref).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "duplicate keys in the manifest"
    assert len(rows) == sum(record["counts"].values())
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    listed = set()
    for split, entries in record["shards"].items():
        assert record["counts"][split] == sum(entry["count"] for entry in entries)
        assert record["bytes"][split] == sum(entry["bytes"] for entry in entries)
        for entry in entries:
            listed.add(entry["path"])
            data = lake.storage.read_bytes(f"{ref.dataset}/{entry['path']}")
            assert len(data) == entry["bytes"], entry["path"]
            samples = shard_samples(data)
            assert len(samples) == entry["count"], entry["path"]
            shard_rows = sorted(by_shard.get(entry["path"], []), key=lambda row: row["index_in_shard"])
            assert [row["key"] for row in shard_rows] == [key for key, _ in samples], entry["path"]
            assert [row["index_in_shard"] for row in shard_rows] == list(range(len(samples)))
            assert all(row["split"] == split for row in shard_rows)
            for key, members in samples:
                assert set(members) == {"lab.npy", "json"}
                assert json.loads(members["json"])["key"] == key
    assert listed == set(by_shard), "manifest rows point at shards the record does not list"
    return rows


# ---------------------------------------------------------------------------------------------
# The CLI as a real process


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


_CLEARED_ENV = ("RAY_ADDRESS", "RECOLOR_FAILPOINT", "RECOLOR_FAILPOINT_ONCE", "RECOLOR_LAKE")


def run_cli(*args, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run `python -m pipeline.cli ARGS` in its own process group, which is SIGKILLed afterwards
    (so a killed run leaks no Ray process). `env` adds variables to the current environment."""
    full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    full_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: the driver and its Ray processes
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return CliResult(process.returncode, stdout, stderr)


@pytest.fixture
def recolor(tmp_path):
    """`recolor(*args, env=None, timeout=120) -> CliResult`, run in tmp_path (so a default ./lake lands there)."""

    def run(*args, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        return run_cli(*args, cwd=tmp_path, env=env, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def cli_runner():
    """`run_cli` for module- and session-scoped fixtures (pass `cwd=`)."""
    return run_cli


@pytest.fixture(scope="session")
def photo_writer():
    """`write_photos(folder, seeds, width=96, height=72, ext=".jpg") -> paths`, for wider-scoped fixtures."""
    return write_photos
