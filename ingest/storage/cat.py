"""Write one object or file to stdout: the `pipe:` form of a lake's shard URLs for webdataset.

    python -m ingest.storage.cat s3://lake/photos/ingests/ab12/shards/train-ab12-000000.tar | tar t

Credentials and endpoint come from the environment (AWS_*), as for every command of this project.
"""

from __future__ import annotations

import shutil
import sys

CHUNK = 4 * 2**20


def main(argv: list[str]) -> int:
    import signal

    from ingest.storage import StorageError, open_uri

    # A reader that stops early (webdataset closing the pipe mid-shard) ends this process as `cat` would end:
    # by SIGPIPE (status 141 in the shell), which webdataset expects, not by an error message.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    if len(argv) != 1:
        print("usage: python -m ingest.storage.cat URI", file=sys.stderr)
        return 2
    try:
        with open_uri(argv[0]) as source:
            shutil.copyfileobj(source, sys.stdout.buffer, CHUNK)
    except (FileNotFoundError, StorageError, OSError) as e:
        print(f"ingest.storage.cat: {argv[0]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
