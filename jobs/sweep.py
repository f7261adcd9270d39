"""Ray job: a sweep of training runs (Ray Tune over Ray Train) on the cluster. The arguments are those of
`recolor sweep`.

    ray job submit --working-dir . -- python -m jobs.sweep configs/pix2pix_unet.yaml --dataset imagenet-5k \
        --grid stages.0.lr=1e-4,2e-4 --grid model.norm=batch,instance --workers-per-trial 2 --gpu
    recolor submit sweep configs/demo.yaml --grid stages.0.lr=1e-4,2e-4 --grid model.norm=batch,instance

The data come from --lake / $RECOLOR_LAKE, checkpoints go to --storage / $RECOLOR_STORAGE (s3:// on a
cluster), runs to --tracking-uri / $MLFLOW_TRACKING_URI; S3 from the AWS_* variables.
"""

from __future__ import annotations

import sys

from jobs.common import shutdown_ray, start_job


def main(argv: list[str]) -> int:
    from pipeline.cli import main as recolor

    start_job("sweep")
    try:
        return recolor(["sweep", *argv])
    finally:
        shutdown_ray()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
