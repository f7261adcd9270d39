"""Ray job: colorize photos as a Ray Data job on the cluster. The arguments are those of `recolor colorize`
(`--ray` is implied).

    ray job submit --working-dir . -- python -m jobs.colorize s3://archive/scans -o s3://archive/colorized \
        --model models:/colorizer@champion --actors 4 --gpu
    recolor submit colorize s3://archive/scans -o s3://archive/colorized --model models:/colorizer@champion --gpu

The model and the registry come from --tracking-uri / $MLFLOW_TRACKING_URI; S3 from the AWS_* variables.
Inputs and outputs are read and written by the cluster's nodes: use s3:// prefixes (or a file system every
node mounts). Films are cut into chunks at keyframes, colorized in parallel and joined (`pipeline.colorize.chunks`);
they are read by path: a file system every node mounts.
"""

from __future__ import annotations

import sys

from jobs.common import shutdown_ray, start_job


def main(argv: list[str]) -> int:
    from pipeline.cli import main as recolor

    start_job("colorize")
    try:
        return recolor(["colorize", *([] if "--ray" in argv else ["--ray"]), *argv])
    finally:
        shutdown_ray()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
