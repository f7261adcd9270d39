"""Ray job: evaluate a generator on a lake dataset, optionally promote it. The arguments are those of
`recolor evaluate`.

    ray job submit --working-dir . -- python -m jobs.evaluate --model models:/colorizer/1 \
        --dataset demo-photos --promote
    recolor submit evaluate --model models:/colorizer/1 --dataset demo-photos --promote

The model and the registry come from --tracking-uri / $MLFLOW_TRACKING_URI, the data from
--lake / $RECOLOR_LAKE; S3 from the AWS_* variables.
"""

from __future__ import annotations

import sys

from jobs.common import shutdown_ray, start_job


def main(argv: list[str]) -> int:
    from pipeline.cli import main as recolor

    start_job("evaluate")
    try:
        return recolor(["evaluate", *argv])
    finally:
        shutdown_ray()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
