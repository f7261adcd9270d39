"""Sources in their native layouts: ImageNet, COCO (instances, panoptic, captions) and plain folders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.driver import IngestConfig, list_source, run_ingest
from ingest.lake import Lake
from ingest.sources import SourceError, list_coco, list_folder, list_imagenet, select_subset

# --- ImageNet ----------------------------------------------------------------------------------


def test_imagenet_train_class_folders(imagenet_tree) -> None:
    items = list_imagenet(str(imagenet_tree.root))
    assert len(items) == 12
    assert [item.name for item in items] == sorted(item.name for item in items)
    for item in items:
        split, wnid, file_name = item.name.split("/")
        assert split == "train" and item.source_split == "train"
        assert item.label == wnid and file_name in imagenet_tree.train[wnid]
        assert item.label_name == imagenet_tree.names[wnid]
        assert Path(item.uri).is_file() and Path(item.uri).is_absolute()
    assert Counter(item.label for item in items) == {wnid: 4 for wnid in imagenet_tree.train}


def test_imagenet_flat_val_takes_labels_from_the_csv(imagenet_tree) -> None:
    items = list_imagenet(str(imagenet_tree.root), ("val",))
    assert len(items) == 6
    for item in items:
        file_name = item.name.split("/")[-1]
        assert item.name == f"val/{file_name}" and item.source_split == "val"
        assert item.label == imagenet_tree.val[file_name]
        assert item.label_name == imagenet_tree.names[item.label]


def test_imagenet_val_in_class_folders_and_both_splits(make_imagenet) -> None:
    tree = make_imagenet(val_layout="folders", val_per_class=1)
    assert not (tree.root / "LOC_val_solution.csv").exists()
    items = list_imagenet(str(tree.root), ("train", "val"))
    assert Counter(item.source_split for item in items) == {"train": 12, "val": 3}
    for item in items:
        assert item.label == item.name.split("/")[1]


def test_imagenet_without_synset_mapping_has_no_names(make_imagenet) -> None:
    tree = make_imagenet(synsets=False)
    items = list_imagenet(str(tree.root))
    assert {item.label for item in items} == set(tree.train)
    assert all(item.label_name is None for item in items)


def test_imagenet_flat_val_without_csv_is_a_clear_error(imagenet_tree) -> None:
    (imagenet_tree.root / "LOC_val_solution.csv").unlink()
    with pytest.raises(SourceError, match="LOC_val_solution.csv is missing"):
        list_imagenet(str(imagenet_tree.root), ("val",))


def test_imagenet_unknown_split_and_empty_root(tmp_path, imagenet_tree) -> None:
    with pytest.raises(SourceError, match="unknown ImageNet split 'test'"):
        list_imagenet(str(imagenet_tree.root), ("test",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no ImageNet images under .*empty: expected train/<wnid>/\*\.JPEG"):
        list_imagenet(str(tmp_path / "empty"))


def imagenet_config(root: Path, limit: int, seed: int = 0) -> IngestConfig:
    return IngestConfig(kind="imagenet", source=str(root), dataset="d", limit=limit, seed=seed, use_ray=False)


def test_imagenet_limit_is_spread_evenly_across_classes(make_imagenet) -> None:
    tree = make_imagenet(per_class={"n01": 6, "n02": 6, "n03": 6}, val_per_class=0)
    items = list_source(imagenet_config(tree.root, limit=6))
    assert len(items) == 6
    assert Counter(item.label for item in items) == {"n01": 2, "n02": 2, "n03": 2}
    seven = Counter(item.label for item in list_source(imagenet_config(tree.root, limit=7)))
    assert sorted(seven.values()) == [2, 2, 3]
    assert [item.name for item in items] == sorted(item.name for item in items)


def test_imagenet_limit_with_a_small_class_fills_from_the_others(make_imagenet) -> None:
    tree = make_imagenet(per_class={"n01": 1, "n02": 6, "n03": 6}, val_per_class=0)
    counts = Counter(item.label for item in list_source(imagenet_config(tree.root, limit=9)))
    assert counts == {"n01": 1, "n02": 4, "n03": 4}


def test_limit_is_deterministic_per_seed(make_imagenet) -> None:
    tree = make_imagenet(per_class={"n01": 8, "n02": 8, "n03": 8}, val_per_class=0)

    def names(seed: int) -> list[str]:
        return [item.name for item in list_source(imagenet_config(tree.root, limit=6, seed=seed))]

    assert names(1) == names(1)
    assert len({tuple(names(seed)) for seed in range(6)}) > 1  # the seed matters


def test_select_subset_without_labels(imagenet_tree) -> None:
    items = list_imagenet(str(imagenet_tree.root))
    chosen = select_subset(items, 5, seed=3)
    assert len(chosen) == 5 and len({item.name for item in chosen}) == 5
    assert chosen == select_subset(items, 5, seed=3)
    assert select_subset(items, None, seed=3) == items
    assert select_subset(items, 100, seed=3) == items


# --- COCO ----------------------------------------------------------------------------------------


def test_coco_instances_lists_images_with_ids_and_categories(coco_tree) -> None:
    items = list_coco(str(coco_tree.root), str(coco_tree.instances))
    assert len(items) == 7  # six on disk plus one listed but missing
    by_id = {item.coco_id: item for item in items}
    for image_id, categories in coco_tree.categories.items():
        item = by_id[image_id]
        assert item.name == f"val2017/{coco_tree.file_name(image_id)}"
        assert item.categories == categories and item.source_split == "val2017"
        assert Path(item.uri).is_file()
    assert not Path(by_id[coco_tree.missing_id].uri).exists()


def test_coco_panoptic_takes_categories_from_segments(coco_tree) -> None:
    items = list_coco(str(coco_tree.root), str(coco_tree.panoptic))
    assert {item.coco_id: item.categories for item in items} == coco_tree.categories


def test_coco_captions_file_has_no_categories(coco_tree) -> None:
    items = list_coco(str(coco_tree.root), str(coco_tree.captions))
    assert {item.coco_id for item in items} == set(coco_tree.categories)
    assert all(item.categories == () for item in items)
    with pytest.raises(SourceError, match="--category needs categories, but .*captions_val2017.json has none"):
        list_coco(str(coco_tree.root), str(coco_tree.captions), categories=("dog",))


@pytest.mark.parametrize("annotations", ["instances", "panoptic"])
def test_coco_category_filter(coco_tree, annotations: str) -> None:
    path = str(getattr(coco_tree, annotations))
    dogs = list_coco(str(coco_tree.root), path, categories=("dog",))
    assert {item.coco_id for item in dogs} == {285, 632, 724}
    people_or_cats = list_coco(str(coco_tree.root), path, categories=("person", "cat"))
    expected = {139, 632, 724, 785} | ({coco_tree.missing_id} if annotations == "instances" else set())
    assert {item.coco_id for item in people_or_cats} == expected


def test_coco_unknown_category_is_named(coco_tree) -> None:
    with pytest.raises(SourceError, match="unknown COCO categories unicorn, zebra"):
        list_coco(str(coco_tree.root), str(coco_tree.instances), categories=("dog", "zebra", "unicorn"))


def test_coco_split_from_file_name_or_argument(coco_tree, tmp_path) -> None:
    renamed = tmp_path / "my_annotations.json"
    renamed.write_bytes(coco_tree.instances.read_bytes())
    with pytest.raises(SourceError, match="pass --split"):
        list_coco(str(coco_tree.root), str(renamed))
    assert len(list_coco(str(coco_tree.root), str(renamed), split="val2017")) == 7
    with pytest.raises(SourceError, match=r"no images under .*train2017: check ROOT and --split"):
        list_coco(str(coco_tree.root), str(renamed), split="train2017")


def test_coco_annotation_path_relative_to_the_working_directory(coco_tree, monkeypatch) -> None:
    monkeypatch.chdir(coco_tree.root)
    items = list_coco(str(coco_tree.root), "annotations/instances_val2017.json")
    assert len(items) == 7
    monkeypatch.chdir(coco_tree.root / "annotations")
    assert len(list_coco(str(coco_tree.root), "instances_val2017.json")) == 7


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps({"info": {}, "licenses": []}), "is not in COCO format: it needs an 'images' list"),
        (json.dumps([{"file_name": "a.jpg"}]), "is not in COCO format"),
        (json.dumps({"images": [{"file": "a.jpg"}]}), r"images\[0\] lacks 'id' or 'file_name'"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_non_coco_json_is_a_clear_error_naming_the_file(coco_tree, tmp_path, content: str, message: str) -> None:
    bad = tmp_path / "instances_val2017.json"
    bad.write_text(content)
    with pytest.raises(SourceError, match=message) as caught:
        list_coco(str(coco_tree.root), str(bad))
    assert str(bad) in str(caught.value)


def test_coco_missing_annotation_file(coco_tree, tmp_path) -> None:
    missing = tmp_path / "instances_val2017.json"
    with pytest.raises(SourceError, match=f"annotation file {missing} does not exist"):
        list_coco(str(coco_tree.root), str(missing))


def test_coco_listed_but_missing_image_is_rejected_as_missing(coco_tree, tmp_path) -> None:
    config = IngestConfig(
        kind="coco",
        source=str(coco_tree.root),
        annotations=str(coco_tree.instances),
        dataset="coco",
        lake=str(tmp_path / "lake"),
        size=32,
        use_ray=False,
        progress=False,
    )
    summary = run_ingest(config)
    assert summary.listed == 7 and summary.ingested == 6 and summary.rejected == {"missing": 1}
    lake = Lake(str(tmp_path / "lake"))
    ref = lake.resolve("coco")
    rejects = lake.rejects(ref).to_pylist()
    assert [(r["reason"], Path(r["source_uri"]).name) for r in rejects] == [
        ("missing", coco_tree.file_name(coco_tree.missing_id))
    ]
    manifest = lake.manifest(ref).to_pylist()
    assert {row["coco_id"]: tuple(row["categories"]) for row in manifest} == coco_tree.categories
    assert {row["source_dataset"] for row in manifest} == {"coco"}
    assert pq.read_schema(tmp_path / "lake" / "coco" / ref.record["manifest"]).field("coco_id").type == "int64"


# --- folder --------------------------------------------------------------------------------------


def test_folder_matches_extensions_case_insensitively(tmp_path, make_photo) -> None:
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    images = ["a.JPG", "b.Jpeg", "c.png", "d.PNG", "e.webp", "f.BMP", "g.TIF", "h.tiff", "i.GIF", "sub/j.jpg"]
    images.append("sub/deeper/k.JpG")
    for name in images:
        (root / name).write_bytes(make_photo(len(name)))
    for name in ["notes.txt", "sub/Thumbs.db", "readme", "archive.jpg.zip", "sub/deeper/x.json"]:
        (root / name).write_text("not an image")
    items = list_folder(str(root))
    assert [item.name for item in items] == sorted(images)
    assert all(Path(item.uri) == root / item.name for item in items)
    assert all(item.label is None and item.coco_id is None for item in items)


def test_folder_skips_hidden_files_and_folders(tmp_path, make_photo) -> None:
    root = tmp_path / "photos"
    (root / ".thumbnails").mkdir(parents=True)
    (root / "album").mkdir()
    (root / "album" / "kept.jpg").write_bytes(make_photo(1))
    (root / ".hidden.jpg").write_bytes(make_photo(2))
    (root / "album" / "._kept.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (root / ".thumbnails" / "kept.jpg").write_bytes(make_photo(3))
    assert [item.name for item in list_folder(str(root))] == ["album/kept.jpg"]


def test_folder_named_like_an_image_is_not_a_file(tmp_path, make_photo) -> None:
    root = tmp_path / "photos"
    (root / "x.jpg").mkdir(parents=True)
    (root / "x.jpg" / "inner.png").write_bytes(make_photo(1, fmt="PNG"))
    (root / "y.jpg").write_bytes(make_photo(2))
    assert [item.name for item in list_folder(str(root))] == ["x.jpg/inner.png", "y.jpg"]


def test_folder_without_images_is_a_clear_error(tmp_path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    with pytest.raises(SourceError, match=f"no images .* found under {root}"):
        list_folder(str(root))


# --- bad roots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["imagenet", "coco", "folder"])
def test_missing_root_is_a_clear_error_naming_the_path(tmp_path, coco_tree, kind: str) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(SourceError, match=f"source {missing} does not exist: check the path"):
        if kind == "imagenet":
            list_imagenet(str(missing))
        elif kind == "coco":
            list_coco(str(missing), str(coco_tree.instances))
        else:
            list_folder(str(missing))


def test_root_that_is_a_file_is_a_clear_error(tmp_path, make_photo) -> None:
    photo = tmp_path / "one.jpg"
    photo.write_bytes(make_photo(1))
    with pytest.raises(SourceError, match=f"{photo} is a file"):
        list_folder(str(photo))
