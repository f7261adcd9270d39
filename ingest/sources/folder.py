"""Any tree of images, local or on S3."""

from __future__ import annotations

from ingest.sources.base import SourceError, SourceItem, listed, open_source_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder(root: str) -> list[SourceItem]:
    """Every image file below `root` (extensions matched case-insensitively), sorted by path.

    Raises:
        SourceError: the root is missing or holds no image.
    """
    storage = open_source_root(root)
    items = [
        SourceItem(uri=storage.uri(obj.key), name=obj.key, **listed(obj))
        for obj in storage.list("")
        if is_image_name(obj.key) and not hidden(obj.key)
    ]
    if not items:
        raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    # A local walk lists a folder's files before its sub-folders; S3 lists keys in plain string order.
    items.sort(key=lambda item: item.name)
    return items


def hidden(key: str) -> bool:
    """Whether a relative key (`a/b/c.jpg`, `/`-separated) is hidden: a part of it starts with a dot. Hidden files
    and folders are never inputs (ingest's sources, colorize's folders and prefixes)."""
    return any(part.startswith(".") for part in key.split("/"))
