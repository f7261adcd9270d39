"""What every source yields, and the seeded subset selection they share."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from ingest.errors import ConfigError, RecolorError
from ingest.storage import ObjectInfo, Storage, StorageError, object_stamp, open_storage


class SourceError(RecolorError):
    """The source cannot be read as asked (missing root, wrong layout, bad annotation file)."""


@dataclass(frozen=True, slots=True)  # slots: a listing of ImageNet holds 1.28M of these
class SourceItem:
    """One image of a source and what the source knows about it."""

    uri: str  # full URI: a local path or s3://bucket/key
    name: str  # path relative to the source root, for messages and the manifest
    label: str | None = None  # ImageNet WordNet id
    label_name: str | None = None  # its human-readable name, from LOC_synset_mapping.txt
    coco_id: int | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)  # COCO category names
    source_split: str | None = None  # the source's own split: "train", "val", "val2017"
    size: int | None = None  # bytes, as listed (None: not known without reading)
    stamp: str | None = None  # ETag or mtime, as listed (`ingest.storage.object_stamp`): a re-ingest skips
    # files whose (uri, size, stamp) the dataset already holds


def listed(info: ObjectInfo) -> dict:
    """The `SourceItem` fields a listing gives for free: size and stamp."""
    return {"size": info.size, "stamp": object_stamp(info)}


def open_source_root(root: str) -> Storage:
    """Open a source root, failing with one clear line when it does not exist."""
    try:
        storage = open_storage(root)
        storage.check_access()
    except StorageError as e:
        raise SourceError(str(e)) from None
    if not root.startswith("s3://"):
        from pathlib import Path

        path = Path(root).expanduser()
        if not path.exists():
            raise SourceError(f"source {root} does not exist: check the path")
        if not path.is_dir():
            raise SourceError(f"source {root} is a file: give the folder that holds the images")
    return storage


def select_subset(items: list[SourceItem], limit: int | None, seed: int, by_label: bool = False) -> list[SourceItem]:
    """Pick `limit` items reproducibly; with `by_label`, spread evenly across labels (round robin).

    The result is sorted by name, so the choice of subset does not change the shard layout's order.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    rng = random.Random(seed)
    if not by_label:
        chosen = rng.sample(items, limit)
    else:
        groups: dict[str | None, list[SourceItem]] = defaultdict(list)
        for item in items:
            groups[item.label].append(item)
        order = sorted(groups, key=lambda label: label or "")
        for label in order:
            rng.shuffle(groups[label])
        rng.shuffle(order)
        chosen = []
        depth = 0
        while len(chosen) < limit:
            for label in order:
                if depth < len(groups[label]):
                    chosen.append(groups[label][depth])
                    if len(chosen) == limit:
                        break
            depth += 1
    return sorted(chosen, key=lambda item: item.name)
