"""COCO 2017 in its native layout, driven by a COCO-format annotation file.

ROOT/<split>2017/<id>.jpg
FILE: instances_*, panoptic_* or captions_* JSON; all share `images` (and, except captions,
`categories`). Only the images the file lists are ingested.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from ingest.sources.base import SourceError, SourceItem, listed, open_source_root
from ingest.storage import read_uri


def load_annotations(annotations: str) -> dict:
    """Read and check a COCO-format JSON (local path or s3://)."""
    try:
        raw = read_uri(annotations)
    except FileNotFoundError:
        raise SourceError(f"annotation file {annotations} does not exist") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"annotation file {annotations} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(
            f"annotation file {annotations} is not in COCO format: it needs an 'images' list "
            "(use an instances_, panoptic_ or captions_ file of COCO 2017)"
        )
    for index, image in enumerate(data["images"][:1]):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise SourceError(f"annotation file {annotations}: images[{index}] lacks 'id' or 'file_name'")
    return data


def _image_categories(data: dict) -> dict[int, set[str]]:
    names = {c["id"]: c["name"] for c in data.get("categories", []) if "id" in c and "name" in c}
    found: dict[int, set[str]] = defaultdict(set)
    for ann in data.get("annotations", []):
        image_id = ann.get("image_id")
        category_ids = [ann["category_id"]] if "category_id" in ann else []
        category_ids += [s["category_id"] for s in ann.get("segments_info", []) if "category_id" in s]  # panoptic
        for category_id in category_ids:
            if category_id in names:
                found[image_id].add(names[category_id])
    return found


def guess_split(annotations: str) -> str:
    match = re.search(r"(train|val|test)(20\d\d)", annotations.rsplit("/", 1)[-1])
    if not match:
        raise SourceError(
            f"cannot tell the image folder from the annotation file name {annotations}: pass --split (e.g. val2017)"
        )
    return match.group(0)


def list_coco(
    root: str,
    annotations: str,
    split: str | None = None,
    categories: tuple[str, ...] = (),
) -> list[SourceItem]:
    """List the COCO images an annotation file names, with their id and category names.

    Args:
        root: the COCO root holding `<split>/` folders.
        annotations: the COCO-format JSON.
        split: the image folder (`val2017`); guessed from the annotation file's name when None.
        categories: keep only images with at least one of these category names.

    Raises:
        SourceError: missing root or folder, non-COCO JSON, unknown category names.
    """
    storage = open_source_root(root)
    data = load_annotations(annotations)
    split = split or guess_split(annotations)
    image_categories = _image_categories(data)
    if categories:
        known = {c.get("name") for c in data.get("categories", [])}
        if not known:
            raise SourceError(f"--category needs categories, but {annotations} has none (a captions file?)")
        unknown = sorted(set(categories) - known)
        if unknown:
            raise SourceError(f"unknown COCO categories {', '.join(unknown)} in {annotations}")
    # Images the file lists but the folder lacks stay in: ingest records them as rejects ("missing").
    present = {obj.key: obj for obj in storage.list(split)}  # one listing: sizes and stamps for free
    if not present:
        raise SourceError(f"no images under {storage.uri(split)}: check ROOT and --split")
    items = []
    for image in data["images"]:
        key = f"{split}/{image['file_name']}"
        names = tuple(sorted(image_categories.get(image["id"], ())))
        if categories and not set(names) & set(categories):
            continue
        stats = listed(present[key]) if key in present else {}
        items.append(
            SourceItem(
                uri=storage.uri(key),
                name=key,
                coco_id=int(image["id"]),
                categories=names,
                source_split=split,
                **stats,
            )
        )
    items.sort(key=lambda item: item.name)
    if not items:
        raise SourceError(f"none of the images {annotations} lists were found under {storage.uri(split)}")
    return items
