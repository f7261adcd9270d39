"""Shared fixtures, one family a module in `tests/fixtures/`: generated photos (`images`), source trees in
ImageNet and COCO layouts (`sources`), S3 servers on loopback (`s3`), a local Ray (`ray`), lake version checks
(`lake`) and the CLI as a real process (`cli`).

Every asset is generated, deterministically from a seed, so no binary is committed and each test writes only
below its own `tmp_path`.
"""

from fixtures.cli import CliResult, cli_runner, recolor, run_cli  # noqa: F401
from fixtures.images import (  # noqa: F401
    color_photo,
    encode,
    make_image,
    make_photo,
    photo_bytes,
    photo_folder,
    photo_writer,
    write_photos,
)
from fixtures.lake import check_version, lake_check, shard_samples  # noqa: F401
from fixtures.ray import ray_local  # noqa: F401
from fixtures.s3 import MotoS3Server, S3Env, moto_s3, own_s3, restart_later, s3_env, s3_server  # noqa: F401
from fixtures.sources import (  # noqa: F401
    COCO_CATEGORIES,
    IMAGENET_NAMES,
    CocoTree,
    ImageNetTree,
    build_coco,
    build_imagenet,
    coco_tree,
    imagenet_tree,
    make_imagenet,
)
