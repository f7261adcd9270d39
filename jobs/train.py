"""Ray job: train a colorizer with Ray Train DDP. The arguments are those of `recolor train`.

    ray job submit --working-dir . -- python -m jobs.train configs/demo.yaml --dataset demo-photos
    recolor submit train configs/pix2pix_unet.yaml --dataset imagenet-5k@1 --workers 8 --gpu

Inside a Ray job $RAY_ADDRESS names the cluster, so the workers are placed on its (GPU) nodes.
Data comes from --lake / $RECOLOR_LAKE, checkpoints go to --storage / $RECOLOR_STORAGE, the
run is logged to --tracking-uri / $MLFLOW_TRACKING_URI; S3 from the AWS_* variables.
"""

from __future__ import annotations

import os
import sys

from jobs.common import shutdown_ray, start_job


def main(argv: list[str]) -> int:
    from pipeline.cli import main as recolor

    start_job("train")
    # A job log is a file: progress bars (cursor movements, carriage returns) would fill it with fragments.
    os.environ.setdefault("RECOLOR_NO_PROGRESS", "1")
    try:
        return recolor(["train", *argv])
    finally:
        shutdown_ray()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
