"""Image sources: each lists a dataset's images, in its native layout, as `SourceItem`s.

- `imagenet ROOT`: `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` or flat `val/` with `LOC_val_solution.csv`.
- `coco ROOT --annotations FILE`: the images of `<split>2017/` that a COCO-format JSON lists.
- `folder ROOT`: any tree of images.

ROOT may be a local path or `s3://bucket/prefix`. Listings are sorted, so every run sees the
same order and the same subset. One module each (`imagenet.py`, `coco.py`, `folder.py`); `base.py` holds what
every source yields and the seeded subset selection they share.
"""

from ingest.sources.base import SourceError, SourceItem, select_subset
from ingest.sources.coco import list_coco
from ingest.sources.folder import IMAGE_EXTENSIONS, list_folder
from ingest.sources.imagenet import list_imagenet

__all__ = [
    "IMAGE_EXTENSIONS",
    "SourceError",
    "SourceItem",
    "list_coco",
    "list_folder",
    "list_imagenet",
    "select_subset",
]
