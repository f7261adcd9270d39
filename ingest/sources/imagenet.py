"""ImageNet (ILSVRC 2012) in its native layout, local or on S3.

ROOT/train/<wnid>/<wnid>_<n>.JPEG
ROOT/val/<wnid>/*.JPEG                      (class folders), or
ROOT/val/*.JPEG + ROOT/LOC_val_solution.csv (flat, Kaggle layout)
ROOT/LOC_synset_mapping.txt                 (optional: "<wnid> <names>" per line)
"""

from __future__ import annotations

import csv
import io
import sys

from ingest.sources.base import SourceError, SourceItem, listed, open_source_root
from ingest.sources.folder import is_image_name
from ingest.storage import Storage

SPLITS = ("train", "val")


def _read_text(storage: Storage, key: str) -> str | None:
    try:
        return storage.read_bytes(key).decode("utf-8")
    except FileNotFoundError:
        return None


def read_synsets(storage: Storage) -> dict[str, str]:
    text = _read_text(storage, "LOC_synset_mapping.txt")
    if text is None:
        return {}
    names = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def _val_labels(storage: Storage) -> dict[str, str]:
    text = _read_text(storage, "LOC_val_solution.csv")
    if text is None:
        return {}
    labels = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError):
            raise SourceError(
                "LOC_val_solution.csv must have columns ImageId,PredictionString (as in the Kaggle ILSVRC release)"
            ) from None
    return labels


def list_imagenet(root: str, splits: tuple[str, ...] = ("train",)) -> list[SourceItem]:
    """List ImageNet images of the given source splits with their class (WordNet id and name).

    Raises:
        SourceError: the root has none of the requested split folders, or a flat val/ lacks its labels.
    """
    for split in splits:
        if split not in SPLITS:
            raise SourceError(f"unknown ImageNet split {split!r}: use one of {', '.join(SPLITS)}")
    storage = open_source_root(root)
    synsets = read_synsets(storage)
    items: list[SourceItem] = []
    for split in splits:
        flat_labels = None
        for obj in storage.list(split):  # one at a time: ImageNet lists 1.28M of them
            key = obj.key
            if not is_image_name(key):
                continue
            parts = key.split("/")
            if len(parts) == 3:  # split/wnid/file
                label = sys.intern(parts[1])  # one string a class, not one an image
            elif len(parts) == 2:  # flat val/
                if flat_labels is None:
                    flat_labels = _val_labels(storage)
                    if not flat_labels:
                        raise SourceError(
                            f"{storage.uri(split)} is flat but {storage.uri('LOC_val_solution.csv')} is missing: "
                            "add it, or arrange the images in class folders"
                        )
                image_id = parts[1].rsplit(".", 1)[0]
                label = flat_labels.get(image_id)
            else:
                continue
            items.append(
                SourceItem(
                    uri=storage.uri(key),
                    name=key,
                    label=label,
                    label_name=synsets.get(label) if label else None,
                    source_split=split,
                    **listed(obj),
                )
            )
    if not items:
        wanted = " or ".join(f"{split}/<wnid>/*.JPEG" for split in splits)
        raise SourceError(f"no ImageNet images under {root}: expected {wanted}")
    return items
