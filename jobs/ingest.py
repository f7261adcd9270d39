"""Ray job: ingest an image set into a new lake version. The arguments are those of `recolor ingest`.

    ray job submit --working-dir . -- python -m jobs.ingest folder s3://lake/sources/photos \
        --dataset photos --lake s3://lake/lake
    recolor submit ingest folder s3://lake/sources/photos --dataset photos --lake s3://lake/lake

Inside a Ray job $RAY_ADDRESS names the cluster, so the chunk tasks run on its nodes. The lake
comes from --lake, else $RECOLOR_LAKE; S3 from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (`recolor submit` forwards them from the submitter's shell).
"""

from __future__ import annotations

import sys

from jobs.common import shutdown_ray, start_job


def main(argv: list[str]) -> int:
    from pipeline.cli import main as recolor

    start_job("ingest")
    try:
        # A job log is a file: a progress bar's carriage returns would fill it with partial lines.
        return recolor(["ingest", *argv, "--no-progress"])
    finally:
        shutdown_ray()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
